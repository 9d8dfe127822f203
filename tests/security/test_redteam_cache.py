"""Red-team attacks on the per-sample cache key (issue 12 item 4): settings that change
outcomes but not the key. Each test FAILS on the current code.
"""

from __future__ import annotations

from cycleqd.sandbox.sql import SQLiteBackend
from cycleqd.skills.agentbench.dbbench import DBBenchSkill


def test_db_backend_object_settings_are_in_the_key():
    """``DBBenchSkill(backend=<SQLBackend>)`` keys only ``backend.name``: a backend that
    returns one row per observation (``max_rows=1``) or kills every statement after 1 ms
    (``statement_timeout_s``) shows the model other observations -- other replies, other
    outcomes -- yet shares the default backend's cache key, so its outcomes are served to
    (and from) runs on the default backend."""
    base = DBBenchSkill(split="search", limit=2, backend="sqlite")
    one_row = DBBenchSkill(split="search", limit=2, backend=SQLiteBackend(max_rows=1))
    fast = DBBenchSkill(split="search", limit=2, backend=SQLiteBackend(statement_timeout_s=0.001))
    assert one_row.cache_key != base.cache_key, "max_rows=1 backend shares the default key"
    assert fast.cache_key != base.cache_key, "1 ms statement timeout shares the default key"


def test_expert_rewritten_in_place_changes_its_svd_cache_key(tmp_path):
    """The expert SVD cache (``cache_dir/svd``, used by the SVD mutation) is keyed by
    ``ResolvedSource.fingerprint()`` = resolved path + size + mtime of the weight files.
    A same-architecture expert retrained and written back at the same path has the same
    size; restored with its old mtime (``cp -p``, ``rsync -a``, ``tar x``, ``touch -r``) it
    gets the old key, and every later run mutates along the *old* expert's singular
    vectors. The key must follow the content (cf. docs/cache.md: "key every cached outcome
    by the content of what produced it")."""
    import os

    import torch
    from safetensors.torch import save_file

    from cycleqd.models.sources import resolve_source

    d = tmp_path / "expert"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "llama"}')
    f = d / "model.safetensors"
    save_file({"w": torch.ones(4, 4)}, str(f))
    before = resolve_source(d).fingerprint()
    st = os.stat(f)
    save_file({"w": torch.full((4, 4), 2.0)}, str(f))        # retrained: same size
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))           # mtime kept (cp -p, rsync -a)
    assert os.stat(f).st_size == st.st_size
    assert resolve_source(d).fingerprint() != before, \
        "other weights at the same path (same size and mtime) keep the same SVD cache key"


def test_infrastructure_failures_are_not_cached_as_the_models_outcome(tmp_path, monkeypatch):
    """A sample that failed because the *evaluator* failed (no sandbox could run it, the
    judge gave no verdict, a timeout on an overloaded machine) is cached as 0.0 under the
    model's weights, exactly like a wrong answer: the same weights evaluated again (resume,
    final aggregation, a byte-identical child) are served that 0.0 forever, while a healthy
    evaluator would have scored 1.0 -- one key, two outcomes, decided by machine load.
    Outcomes whose status says the judge could not decide must not be stored."""
    import json

    from cycleqd.skills.coding import skill as coding_mod
    from cycleqd.skills.cache import SampleCache
    from cycleqd.skills.coding.judge import Verdict
    from cycleqd.skills.coding.skill import CodingSkill

    add = {"task_id": 11, "text": "Write a function to add two numbers.",
           "code": "def add(a, b):\n    return a + b\n",
           "test_list": ["assert add(1, 2) == 3"], "test_setup_code": ""}
    data = tmp_path / "m.jsonl"
    data.write_text(json.dumps(add) + "\n")

    class Backend:
        fingerprint = "w-1"

        def __init__(self):
            self.asked = 0

        def generate(self, convs, *, max_new_tokens, stop=()):
            self.asked += len(convs)
            return ["```python\ndef add(a, b):\n    return a + b\n```"] * len(convs)

    sk = CodingSkill("mbpp", data_path=data, split="all", cache=SampleCache(tmp_path / "c.sqlite"))
    be = Backend()
    # the evaluator is broken for this call (e.g. the judge's sandbox was killed under load)
    monkeypatch.setattr(coding_mod, "run_programs", lambda programs, limits, workers=2: {
        k: Verdict(False, "judge_error", "the judge gave no verdict: wall_time") for k in programs})
    assert sk.evaluate(be).quality == 0.0
    monkeypatch.undo()
    # evaluator healthy again: the correct solution must be judged, not served the 0.0
    r = sk.evaluate(be)
    assert be.asked == 2 and r.quality == 1.0, (
        f"the judge_error was cached as the model's outcome (asked {be.asked}x, quality {r.quality})")


def test_agent_evaluator_failures_are_not_cached(tmp_path):
    """The agent skills' shared evaluate (OS, DB-Bench): an episode whose machine could not
    be started (detail ``evaluator_error``) scores 0 now but is not cached; an episode the
    model failed is cached."""
    from dataclasses import dataclass

    from cycleqd.skills.cache import SampleCache
    from cycleqd.skills.agentbench.episode import evaluate_cached

    @dataclass(frozen=True)
    class Item:
        id: str
        text: str

    class Ep:
        def __init__(self, sid, broken):
            self.sample_id, self.score, self.messages, self.n_prompt = sid, 0.0, [], 0
            self.detail = {"error": "setup: OSError: no machine", "evaluator_error": True} if broken else {}

    class Skill:
        items = [Item("a", "x"), Item("b", "y")]
        cache_key, max_new_tokens, stop = "fake/1", 8, ()
        cache = SampleCache(tmp_path / "c.sqlite")
        runs: list = []

        def run_episodes(self, items, generate):
            self.runs.append([it.id for it in items])
            return {it.id: Ep(it.id, broken=(it.id == "a")) for it in items}

    class Model:
        fingerprint = "w"

        def generate(self, convs, **kw):
            return [""] * len(convs)

    sk = Skill()
    assert evaluate_cached(sk, Model()) == {"a": 0.0, "b": 0.0}
    assert evaluate_cached(sk, Model()) == {"a": 0.0, "b": 0.0}
    assert sk.runs == [["a", "b"], ["a"]]   # "b" (the model's own failure) came from the cache

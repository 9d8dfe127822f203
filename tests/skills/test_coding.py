"""Coding skill: data splits, code extraction, sandboxed judging, caching, BCs."""

from __future__ import annotations

import json

import pytest

from cycleqd.skills.cache import SampleCache
from cycleqd.skills.coding.execute import build_program, run_program
from cycleqd.skills.coding.extract import extract_code, sanitize_code
from cycleqd.skills.coding.judge import ExecLimits
from cycleqd.skills.coding.skill import CodingSkill, chunk_scores
from cycleqd.skills.coding.data import load_humaneval, load_mbpp

pytestmark = pytest.mark.timeout(300)


# --------------------------------------------------------------------------- data
def test_mbpp_splits_fixed_disjoint_and_complete():
    s, v, t, tr, a = (load_mbpp(split=x) for x in ("search", "validation", "test", "train", "all"))
    ids = lambda ps: {int(p.id.split("/")[1]) for p in ps}
    print("mbpp sizes search/validation/test/train:", len(s), len(v), len(t), len(tr))
    assert (len(s), len(v), len(t), len(tr), len(a)) == (128, 43, 129, 127, 427)
    parts = [ids(s), ids(v), ids(t), ids(tr)]
    assert all(not parts[i] & parts[j] for i in range(4) for j in range(i + 1, 4))
    assert ids(s) | ids(v) | ids(t) | ids(tr) == ids(a)
    assert all(11 <= i <= 510 for i in ids(s) | ids(t))
    assert all(511 <= i <= 600 for i in ids(v))
    assert all(not 11 <= i <= 600 for i in ids(tr))
    # fixed: the seeded permutation gives the same split every time, ordered by task id
    assert [p.id for p in load_mbpp(split="search")] == [p.id for p in s]
    assert [int(p.id.split("/")[1]) for p in s] == sorted(ids(s))
    assert [p.id for p in load_mbpp(split="search", limit=5)] == [p.id for p in s[:5]]


def test_mbpp_problem_fields():
    p = next(p for p in load_mbpp(split="all") if p.id == "mbpp/98")
    assert p.entry_point == "multiply_num"
    assert "import math" in p.setup_code  # the asserts use math.isclose without importing it
    assert p.test_code.count("assert") == 3 and p.tests[0].startswith("assert")


def test_humaneval_from_wheel():
    ps = load_humaneval()
    assert len(ps) == 164 and ps[0].id == "humaneval/0" and ps[163].id == "humaneval/163"
    assert ps[0].entry_point == "has_close_elements" and "check(has_close_elements)" in ps[0].test_code


def test_bad_arguments_and_missing_data(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="split"):
        load_mbpp(split="valid")
    with pytest.raises(ValueError, match="limit"):
        load_mbpp(limit=0)
    with pytest.raises(ValueError, match="split"):
        load_humaneval(split="search")
    with pytest.raises(ValueError, match="dataset"):
        CodingSkill("apps")
    with pytest.raises(ValueError, match="n_chunks"):
        CodingSkill("mbpp", limit=2, n_chunks=3)
    monkeypatch.setenv("CYCLEQD_DATA_DIR", str(tmp_path / "nowhere"))
    monkeypatch.setenv("CYCLEQD_CACHE", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match="cycleqd data fetch mbpp"):
        load_mbpp()


def test_data_dir_env(tmp_path, monkeypatch):
    """The loader reads ``<CYCLEQD_DATA_DIR>/mbpp/sanitized-mbpp.jsonl`` (the fetch that fills
    it is tested in tests/datasets against a server on 127.0.0.1)."""
    rows = [{"task_id": 12, "prompt": "Return one.", "code": "def one():\n    return 1\n",
             "test_list": ["assert one() == 1"], "test_imports": []},
            {"task_id": 700, "prompt": "Return two.", "code": "def two():\n    return 2\n",
             "test_list": ["assert two() == 2"], "test_imports": []}]
    (tmp_path / "data" / "mbpp").mkdir(parents=True)
    (tmp_path / "data" / "mbpp" / "sanitized-mbpp.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setenv("CYCLEQD_DATA_DIR", str(tmp_path / "data"))
    ps = load_mbpp(split="all")
    assert [p.id for p in ps] == ["mbpp/12", "mbpp/700"] and ps[0].instruction == "Return one."
    assert [p.id for p in load_mbpp(split="train")] == ["mbpp/700"]
    monkeypatch.delenv("CYCLEQD_DATA_DIR")
    monkeypatch.setenv("CYCLEQD_CACHE", str(tmp_path))           # default data dir: <cache>/data
    assert [p.id for p in load_mbpp(split="all")] == ["mbpp/12", "mbpp/700"]


# --------------------------------------------------------------------------- extraction
REF = "def add(a, b):\n    return a + b\n"


@pytest.mark.parametrize("reply", [
    f"Sure! Here it is:\n```python\n{REF}```\nThis adds two numbers.",
    f"```\n{REF}```",
    f"```py\n{REF}\n```\n\n```python\nprint(add(1, 2))\n```",
    f"Here:\n```python\n{REF}\nprint(add(1, 2))\n",                 # fence left open (cut off)
    f"The function:\n\n{REF}\nIt works because + adds numbers.",  # bare code inside prose
    f"```bash\npip install nothing\n```\n```python\n{REF}```",
    f"```python\nimport math\n```\n```python\n{REF}```",
])
def test_extract_code_variants(reply):
    code = sanitize_code(extract_code(reply, "add"), "add")
    ns: dict = {}
    exec(compile(code, "<t>", "exec"), ns)  # test-authored, trusted strings only
    assert ns["add"](2, 3) == 5
    assert "print(" not in code


def test_extract_prefers_block_defining_entry_and_pulls_helpers():
    reply = ("First a helper:\n```python\ndef _sq(x):\n    return x * x\n```\n"
             "Example usage:\n```python\nprint(area(2))\n```\n"
             "```python\ndef area(r):\n    return 3 * _sq(r)\n```")
    code = extract_code(reply, "area")
    ns: dict = {}
    exec(compile(sanitize_code(code, "area"), "<t>", "exec"), ns)
    assert ns["area"](2) == 12


def test_sanitize_drops_demo_code_keeps_used_constants():
    src = ("import re\nLIMIT = 3\nunused = 5\ndef f(x):\n    return x[:LIMIT]\n"
           "print(f('abcdef'))\nassert f('ab') == 'zz'\nif __name__ == '__main__':\n    f(input())\n"
           "for i in range(10**9):\n    pass\n")
    out = sanitize_code(src, "f")
    assert "LIMIT = 3" in out and "import re" in out and "def f" in out
    for gone in ("print(", "assert", "__main__", "range(10**9)", "unused"):
        assert gone not in out
    assert sanitize_code("def broken(:\n", "x") == "def broken(:\n"


def test_extract_never_raises_on_garbage():
    for reply in ("", "no code here at all", "```", "```python\n", "\x00\x01", "def (((", 42):
        assert isinstance(extract_code(reply, "f"), str)


def test_chunk_scores_official_formula():
    out = chunk_scores([1, 0, 1, 1, 0, 0, 1], 3, "mbpp_")
    # size = 7 // 3 + 1 = 3 -> [1,0,1], [1,0,0], [1]
    assert out == {"mbpp_chunk0": 2 / 3, "mbpp_chunk1": 1 / 3, "mbpp_chunk2": 1.0}


# --------------------------------------------------------------------------- judging
@pytest.fixture(scope="module")
def mbpp_all():
    return CodingSkill("mbpp", split="all", workers=2)


@pytest.fixture(scope="module")
def humaneval_all():
    return CodingSkill("humaneval", split="test", workers=2)


def test_all_mbpp_reference_solutions_pass(mbpp_all):
    v = mbpp_all.score_completions({p.id: p.reference for p in mbpp_all.problems})
    failed = {k: (x.status, x.detail) for k, x in v.items() if not x.passed}
    assert not failed and len(v) == 427


def test_all_humaneval_reference_solutions_pass(humaneval_all):
    # reference as a bare completion (body only) and as a full function in a fence
    body = {p.id: p.reference[len(p.instruction):] for p in humaneval_all.problems}
    v = humaneval_all.score_completions(body)
    assert all(x.passed for x in v.values()), {k: x for k, x in v.items() if not x.passed}
    full = {p.id: f"```python\n{p.reference}```" for p in humaneval_all.problems[:20]}
    assert all(x.passed for x in humaneval_all.score_completions(full).values())


def test_known_wrong_solutions_fail(mbpp_all, humaneval_all):
    ps = mbpp_all.problems[:60]
    # each problem gets its neighbour's reference code renamed to its own entry point
    wrong = {}
    for p, q in zip(ps, ps[1:] + ps[:1]):
        wrong[p.id] = q.reference.replace(q.entry_point, p.entry_point)
    v = mbpp_all.score_completions(wrong)
    assert sum(x.passed for x in v.values()) <= 1  # (two problems could share an answer)
    stub = {p.id: f"```python\ndef {p.entry_point}(*args, **kwargs):\n    return None\n```"
            for p in mbpp_all.problems[:40]}
    assert not any(x.passed for x in mbpp_all.score_completions(stub).values())
    he = {p.id: "    return None\n" for p in humaneval_all.problems[:40]}
    assert not any(x.passed for x in humaneval_all.score_completions(he).values())
    syntax = {p.id: "```python\ndef oops(:\n```" for p in mbpp_all.problems[:5]}
    assert {x.status for x in mbpp_all.score_completions(syntax).values()} == {"error"}


def test_early_exit_is_not_a_pass(mbpp_all):
    p = next(p for p in mbpp_all.problems if p.id == "mbpp/2")
    for body in ("import os\n    os._exit(0)", "import sys\n    sys.exit(0)", "raise SystemExit(0)"):
        code = f"def {p.entry_point}(a, b):\n    {body}\n"
        v = run_program(build_program(p, code))
        assert not v.passed and v.status in ("no_result", "error"), (body, v)


def test_timeout_verdict():
    p = load_mbpp(split="all", limit=1)[0]
    code = f"def {p.entry_point}(*a):\n    while True:\n        pass\n"
    v = run_program(build_program(p, code), ExecLimits(timeout_s=1.0))
    assert not v.passed and v.status == "timeout" and v.wall_s < 10


# --------------------------------------------------------------------------- evaluate()
class ScriptedBackend:
    """A GenerationBackend stand-in replying from a table (reference code for some ids)."""

    def __init__(self, skill, good_ids, fingerprint="fp-scripted"):
        self.fingerprint = fingerprint
        self.calls = 0
        self.prompts = []
        self._by_prompt = {}
        for p in skill.problems:
            key = skill.conversation(p)[-1]["content"]
            self._by_prompt[key] = (f"Here you go:\n```python\n{p.reference}\n```\nDone."
                                    if p.id in good_ids else "I don't know.")

    def generate(self, conversations, *, max_new_tokens, stop=()):
        self.calls += 1
        self.prompts.extend(c[-1]["content"] for c in conversations)
        return [self._by_prompt[c[-1]["content"]] for c in conversations]

    def load_weights(self, state_dict, fingerprint):
        self.fingerprint = fingerprint


def test_evaluate_scores_caches_and_chunks(tmp_path):
    cache = SampleCache(tmp_path / "cache.sqlite")
    sk = CodingSkill("mbpp", split="search", limit=9, n_chunks=2, cache=cache)
    good = {p.id for p in sk.problems[:3]} | {sk.problems[-1].id}
    be = ScriptedBackend(sk, good)
    r = sk.evaluate(be)
    assert r.quality == pytest.approx(4 / 9)
    assert r.outcomes == {p.id: float(p.id in good) for p in sk.problems}
    # official chunks: size 9 // 2 + 1 = 5 -> first 5 (3 good), last 4 (1 good)
    assert r.subscores == {"mbpp_chunk0": pytest.approx(3 / 5), "mbpp_chunk1": pytest.approx(1 / 4)}
    assert sk.last_details[sk.problems[0].id]["status"] == "pass"
    assert "MBPP" not in be.prompts[0] and "Your code should pass these tests" in be.prompts[0]
    # same fingerprint: everything from the cache, no generation
    assert sk.evaluate(be) == r and be.calls == 1
    # a bigger split reuses the 9 cached outcomes and only generates the rest
    sk2 = CodingSkill("mbpp", split="search", limit=12, cache=cache)
    be2 = ScriptedBackend(sk2, good)
    sk2.evaluate(be2)
    assert len(be2.prompts) == 3
    # new weights -> new fingerprint -> scored again
    be.load_weights({}, "fp-other")
    sk.evaluate(be)
    assert be.calls == 2
    assert cache.count(skill=sk.cache_key) == 12 + 9


def test_cache_key_tracks_configuration():
    a = CodingSkill("mbpp", limit=2)
    assert a.cache_key == CodingSkill("mbpp", limit=2, split="test").cache_key
    assert a.cache_key != CodingSkill("mbpp", limit=2, max_new_tokens=256).cache_key
    assert a.cache_key != CodingSkill("mbpp", limit=2, system_prompt=None).cache_key
    assert a.cache_key != CodingSkill("mbpp", limit=2, limits=ExecLimits(timeout_s=3)).cache_key


def test_evaluate_with_tiny_hf_model(tmp_path):
    """End to end with a real (random, tiny) transformers model: replies are garbage, every
    sample is judged (failed) without errors, and the prompt follows the documented format."""
    from cycleqd.inference import HFBackend
    from cycleqd.models.tiny import make_tiny_llama

    be = HFBackend.from_pretrained(make_tiny_llama(tmp_path / "m", seed=0, hidden_size=32,
                                                   num_layers=1), batch_size=4)
    sk = CodingSkill("humaneval", limit=3, max_new_tokens=24)
    r = sk.evaluate(be)
    assert r.quality == 0.0 and set(r.outcomes) == {"humaneval/0", "humaneval/1", "humaneval/2"}
    assert all(d["status"] != "pass" for d in sk.last_details.values())


@pytest.mark.integration
def test_smollm2_mbpp_smoke():
    """Real SmolLM2-135M-Instruct on 4 MBPP problems: replies contain code that is extracted
    and judged (the model is weak: pass@1 near 0 is expected)."""
    from cycleqd.inference import HFBackend
    from cycleqd.models.smollm2 import ensure_smollm2

    be = HFBackend.from_pretrained(ensure_smollm2(), batch_size=4)
    sk = CodingSkill("mbpp", split="search", limit=4, max_new_tokens=256)
    r = sk.evaluate(be)
    assert 0.0 <= r.quality <= 1.0 and len(r.outcomes) == 4
    replies = [d["reply"] for d in sk.last_details.values()]
    assert sum("def " in extract_code(x) for x in replies) >= 3

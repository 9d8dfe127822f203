"""A cached outcome is reused only for the same weights, run the same way, on the same item
content, under the same prompt, decoding and judge settings: changing any ONE of them misses.

Each ``test_one_change_misses_*`` scores a model once (filling the cache), checks that an
identical re-run generates nothing, then changes one thing and checks that the model is
asked again -- and that it is asked for exactly the items the change concerns."""

from __future__ import annotations

import dataclasses
import inspect
import json

import pytest

from cycleqd.skills.coding import skill as coding_mod
from cycleqd.skills.cache import (SampleCache, backend_key, canonical, item_key, item_keys,
                                  model_key)
from cycleqd.skills.coding.judge import ExecLimits
from cycleqd.skills.coding.skill import CodingSkill
from cycleqd.skills.coding.data import CodeProblem

try:
    from .test_dbbench_common import HAS_DB_DATA, HAS_OS_DATA, needs_sandbox
except ImportError:  # rootdir-relative import mode
    from test_dbbench_common import HAS_DB_DATA, HAS_OS_DATA, needs_sandbox


# ----------------------------------------------------------------------------- item keys

def _problem(**kw) -> CodeProblem:
    base = dict(id="mbpp/11", dataset="mbpp", instruction="Add two numbers.", entry_point="add",
                test_code="assert add(1, 2) == 3\n", reference="def add(a, b):\n    return a + b\n",
                tests=("assert add(1, 2) == 3",), setup_code="")
    return CodeProblem(**{**base, **kw})


def test_item_key_is_content_every_field_counts():
    p = _problem()
    assert item_key(p) == item_key(_problem()) and item_key(p).startswith("i-")
    for field, value in [("id", "mbpp/12"), ("instruction", "Add two numbers!"),
                         ("entry_point", "plus"), ("test_code", "assert add(1, 2) == 4\n"),
                         ("tests", ("assert add(1, 2) == 4",)), ("setup_code", "import os"),
                         ("reference", "def add(a, b): return b + a\n"), ("dataset", "humaneval")]:
        assert item_key(dataclasses.replace(p, **{field: value})) != item_key(p), field


def test_canonical_form_is_exact():
    assert item_key({"a": 1}) != item_key({"a": 1.0}) != item_key({"a": "1"})
    assert item_key({"a": 1, "b": 2}) == item_key({"b": 2, "a": 1})       # key order: no
    assert item_key([1, 2]) != item_key([2, 1])                             # list order: yes
    assert item_key({"a": None}) != item_key({"a": "None"}) != item_key({})
    assert item_key({"a": True}) != item_key({"a": 1})
    assert item_key({1: "x"}) != item_key({"1": "x"})
    assert item_key(b"\x00") != item_key("\x00")
    assert item_key({"x": float("nan")}) == item_key({"x": float("nan")})
    assert canonical({"k": (1, "a")}) == {"__map__": [["k", [1, "a"]]]}
    from pathlib import Path
    with pytest.raises(TypeError, match="path"):
        item_key({"script": Path("/etc/passwd")})
    with pytest.raises(TypeError, match="object"):
        item_key({"x": object()})


def test_item_keys_refuses_two_items_with_one_id():
    a, b = _problem(), _problem(instruction="Subtract.")
    assert item_keys([a, a]) == {"mbpp/11": item_key(a)}
    with pytest.raises(ValueError, match="share the id"):
        item_keys([a, b])


# ----------------------------------------------------------------------------- model keys

class _Backend:
    """A GenerationBackend stand-in: replies from a table keyed by the user message."""

    def __init__(self, table: dict[str, str], fingerprint: str = "w-1"):
        self.table, self.fingerprint, self.asked = table, fingerprint, []

    def generate(self, conversations, *, max_new_tokens, stop=()):
        self.asked.extend(c[-1]["content"] for c in conversations)
        return [self.table.get(c[-1]["content"], "no idea") for c in conversations]

    def load_weights(self, state_dict, fingerprint):
        self.fingerprint = fingerprint


def test_model_key_joins_weights_and_backend():
    be = _Backend({})
    assert model_key(be).startswith("w-1@b-")
    be2 = _Backend({}, fingerprint="w-2")
    assert model_key(be2) != model_key(be)
    be.fingerprint = ""
    assert model_key(be) is None and model_key(object()) is None
    # an object may state its own identity
    be2.cache_identity = "vllm bf16 tp=2"
    assert backend_key(be2) != backend_key(_Backend({}))


def test_backend_key_tracks_dtype_and_chat_template(tmp_path):
    """Same weights, other backend dtype (fp32 vs bf16) or chat template: other replies, so
    another model key; two backends built the same way share it."""
    import torch

    from cycleqd.inference import HFBackend
    from cycleqd.models.tiny import make_tiny_llama

    path = make_tiny_llama(tmp_path / "m", seed=1, hidden_size=32, num_layers=1)
    a = HFBackend.from_pretrained(path, fingerprint="w-same")
    b = HFBackend.from_pretrained(path, fingerprint="w-same")
    assert model_key(a) == model_key(b)
    half = HFBackend.from_pretrained(path, fingerprint="w-same", dtype=torch.bfloat16)
    assert model_key(half) != model_key(a)
    tpl = HFBackend.from_pretrained(path, fingerprint="w-same",
                                    chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert model_key(tpl) != model_key(a)
    gen = HFBackend.from_pretrained(path, fingerprint="w-same", engine="generate")
    assert model_key(gen) != model_key(a)


# ----------------------------------------------------------------------------- one change, one miss

def _mbpp_file(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


ADD = {"task_id": 11, "text": "Write a function to add two numbers.",
       "code": "def add(a, b):\n    return a + b\n",
       "test_list": ["assert add(1, 2) == 3", "assert add(2, 2) == 4"], "test_setup_code": ""}
MUL = {"task_id": 12, "text": "Write a function to multiply two numbers.",
       "code": "def mul(a, b):\n    return a * b\n",
       "test_list": ["assert mul(2, 3) == 6"], "test_setup_code": ""}


def _answers(skill) -> dict[str, str]:
    """Reference code for every problem of ``skill`` (keyed by the user message)."""
    return {skill.conversation(p)[-1]["content"]: f"```python\n{p.reference}\n```"
            for p in skill.problems}


@needs_sandbox
def test_one_change_misses_coding(tmp_path, monkeypatch):
    data = _mbpp_file(tmp_path / "a.jsonl", [ADD, MUL])
    cache = SampleCache(tmp_path / "c.sqlite")
    sk = CodingSkill("mbpp", data_path=data, split="all", cache=cache)
    be = _Backend(_answers(sk))
    assert sk.evaluate(be).quality == 1.0 and len(be.asked) == 2
    assert sk.evaluate(be).quality == 1.0 and len(be.asked) == 2          # all hits

    def asked_again(skill, backend) -> int:
        n = len(backend.asked)
        skill.evaluate(backend)
        return len(backend.asked) - n

    # weights: a new fingerprint is a new model
    be.load_weights({}, "w-2")
    assert asked_again(sk, be) == 2
    be.load_weights({}, "w-1")
    assert asked_again(sk, be) == 0
    # item content: one problem's hidden tests edited in the same file, same id
    edited = dict(ADD, test_list=["assert add(1, 2) == 3", "assert add(2, 2) == 5"])
    sk2 = CodingSkill("mbpp", data_path=_mbpp_file(tmp_path / "a.jsonl", [edited, MUL]),
                      split="all", cache=cache)
    assert asked_again(sk2, be) == 1
    assert sk2.evaluate(be).outcomes == {"mbpp/11": 0.0, "mbpp/12": 1.0}
    # the same id in another file (different content) is another item
    other = dict(ADD, text="Write a function to add three to a number.")
    sk3 = CodingSkill("mbpp", data_path=_mbpp_file(tmp_path / "b.jsonl", [other]),
                      split="all", cache=cache)
    assert asked_again(sk3, be) == 1
    # ... while an identical item in another file IS the same item (content, not position)
    sk4 = CodingSkill("mbpp", data_path=_mbpp_file(tmp_path / "c.jsonl", [MUL]),
                      split="all", cache=cache)
    assert asked_again(sk4, be) == 0
    # prompt: system prompt, and the template itself
    sk5 = CodingSkill("mbpp", data_path=data, split="all", cache=cache, system_prompt="Be terse.")
    assert asked_again(sk5, be) == 2
    monkeypatch.setattr(coding_mod, "MBPP_TEMPLATE", coding_mod.MBPP_TEMPLATE + "\nThink first.")
    assert asked_again(sk, be) == 2
    monkeypatch.undo()
    assert asked_again(sk, be) == 0
    # decoding: generation budget, stop strings
    assert asked_again(CodingSkill("mbpp", data_path=data, split="all", cache=cache,
                                   max_new_tokens=64), be) == 2
    assert asked_again(CodingSkill("mbpp", data_path=data, split="all", cache=cache,
                                   stop=("\n\n\n",)), be) == 2
    # judge: sandbox limits
    assert asked_again(CodingSkill("mbpp", data_path=data, split="all", cache=cache,
                                   limits=ExecLimits(timeout_s=3.0)), be) == 2
    # backend (same weights, another way to run them): another model key
    be.cache_identity = "bf16"
    assert asked_again(sk, be) == 2


# ----------------------------------------------------------------------------- settings coverage

#: constructor parameters that cannot change a sample's outcome; every OTHER parameter must
#: change ``cache_key`` (items are keyed by content: data_path/split/limit select items)
OUTCOME_NEUTRAL = {"data_path", "split", "limit", "name", "cache", "workers", "episode_batch",
                   "n_chunks", "script_dir", "dataset",
                   # OS: where the image is cached / a prepared image object: the image's own
                   # key is in cache_key; ``machine`` is a variant when an image exists
                   "cache_dir", "rootfs", "machine"}


#: constructor parameters that apply under ``protocol="official"`` only (varied there)
OFFICIAL_ONLY = {"repeats": 2, "chat_format": "llama3-official"}


def _variants(cls) -> dict[str, object]:
    from cycleqd.sandbox import SandboxLimits

    if cls is CodingSkill:
        return {"max_new_tokens": 17, "stop": ("\n\n",), "system_prompt": "Hi.",
                "limits": ExecLimits(max_output_bytes=2048)}
    from cycleqd.skills.agentbench.dbbench import DBBenchSkill
    if cls is DBBenchSkill:
        return {"backend": "mariadb", "max_rounds": 2, "max_new_tokens": 17, "tolerance": 0.5,
                "stop": ("\n\n",), "scorer": "agentbench", "protocol": "official"}
    from cycleqd.skills.agentbench.os_interaction import OS_LIMITS
    v = {"max_rounds": 2, "max_new_tokens": 17, "command_timeout_s": 3.0,
         "setup_timeout_s": 7.0, "one_shot": False, "stop": ("\n\n",),
         "limits": dataclasses.replace(OS_LIMITS, max_output_bytes=2048), "protocol": "official"}
    # the machine: the Debian image (rootfs) vs the host-tree sandbox are different keys
    # (``rootfs`` -- a prepared image object -- selects the same machine as the default)
    from cycleqd.skills.agentbench.os_interaction import OSInteractionSkill
    if OSInteractionSkill(limit=1).rootfs is not None:
        v["machine"] = "host"
    return v


def _skill_classes():
    out = [pytest.param(CodingSkill, {"dataset": "mbpp", "limit": 1}, id="coding")]
    from cycleqd.skills.agentbench.dbbench import DBBenchSkill
    from cycleqd.skills.agentbench.os_interaction import OSInteractionSkill
    out.append(pytest.param(DBBenchSkill, {"limit": 1}, id="dbbench",
                            marks=pytest.mark.skipif(not HAS_DB_DATA, reason="no DB-Bench data")))
    out.append(pytest.param(OSInteractionSkill, {"limit": 1}, id="os",
                            marks=pytest.mark.skipif(not HAS_OS_DATA, reason="no OS data")))
    return out


@pytest.mark.parametrize("cls,base", _skill_classes())
def test_every_setting_that_changes_outcomes_is_in_the_key(cls, base):
    """Every constructor parameter is either declared outcome-neutral or changes the skill's
    cache key (a new parameter must be classified here: forgetting it in ``cache_key`` would
    let outcomes scored under one setting answer for another)."""
    params = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    variants = _variants(cls)
    unclassified = [p for p in params if p not in OUTCOME_NEUTRAL and p not in variants
                    and p not in OFFICIAL_ONLY]
    assert not unclassified, (f"{cls.__name__}: classify {unclassified} (outcome-neutral, or "
                              "give a variant and put it in cache_key)")
    key = cls(**base).cache_key
    for name, value in variants.items():
        assert cls(**base, **{name: value}).cache_key != key, f"{cls.__name__}.{name}"
    # settings of the official protocol only, varied under it
    for name, value in OFFICIAL_ONLY.items():
        if name in params:
            off = cls(**base, protocol="official").cache_key
            assert cls(**base, protocol="official", **{name: value}).cache_key != off, name
    # the neutral ones really are neutral
    for name, value in {"workers": 1, "name": "renamed", "episode_batch": 3}.items():
        if name in params:
            assert cls(**base, **{name: value}).cache_key == key, name


@pytest.mark.skipif(not HAS_DB_DATA, reason="no DB-Bench data")
def test_prompt_constants_are_in_the_keys(monkeypatch):
    from cycleqd.skills.agentbench import dbbench, os_interaction

    db = dbbench.DBBenchSkill(limit=1)
    k = db.cache_key
    monkeypatch.setattr(dbbench, "DB_PROMPT", dbbench.DB_PROMPT + " ")
    assert db.cache_key != k
    if HAS_OS_DATA:
        osk = os_interaction.OSInteractionSkill(limit=1)
        k = osk.cache_key
        monkeypatch.setattr(os_interaction, "OS_PROMPT", os_interaction.OS_PROMPT + " ")
        assert osk.cache_key != k
        k = osk.cache_key
        monkeypatch.setattr(os_interaction, "ONE_SHOT", [dict(m) for m in os_interaction.ONE_SHOT[:-1]])
        assert osk.cache_key != k


def test_backend_key_is_the_same_in_another_process(tmp_path):
    """A later run (another process, another backend object) must find the outcomes of the
    same weights run the same way: the demo's reuse of cached baselines depends on it."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import cycleqd
    from cycleqd.inference import HFBackend
    from cycleqd.models.tiny import make_tiny_llama

    path = make_tiny_llama(tmp_path / "m", seed=2, hidden_size=32, num_layers=1)
    here = model_key(HFBackend.from_pretrained(path, fingerprint="w-x"))
    code = ("import sys; from cycleqd.inference import HFBackend; "
            "from cycleqd.skills.cache import model_key; "
            "print(model_key(HFBackend.from_pretrained(sys.argv[1], fingerprint='w-x')))")
    env = dict(os.environ, PYTHONPATH=str(Path(cycleqd.__file__).resolve().parents[1]))
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == here

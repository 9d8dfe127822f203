"""Every model the engine scores -- seed or child -- is bound under the fingerprint of the
weights actually evaluated, never under its run and id: a later run with the same experts
reuses their outcomes, a byte-identical child reuses its outcomes, and an expert rewritten
at the same path makes its children new models."""

from __future__ import annotations

import json

import pytest
import torch

from cycleqd.engine.step import Job, WorkerContext, run_step
from cycleqd.inference.fingerprint import fingerprint_state_dict
from cycleqd.sandbox import sandbox_status
from cycleqd.skills.base import SkillResult


class _Space:
    def materialize(self, genome):
        return {"w": genome.clone()}

    def crossover(self, parents, gen):
        return sum(parents) / len(parents)

    def mutate(self, child, basis, gen):
        return child


class _Store(dict):
    def get(self, k):
        return self[k]

    def put(self, k, g):
        self[k] = g
        return 4


class _Adapter:
    def __init__(self):
        self.bound = []

    def bind(self, weights, fingerprint):
        self.bound.append(fingerprint)
        return self


class _Skill:
    name = "s"

    def evaluate(self, model):
        return SkillResult(0.5, {})


def _fp(t):
    return fingerprint_state_dict({"w": t})


def test_seeds_and_children_are_keyed_by_their_weights():
    store = _Store({"expert:a": torch.ones(3), "expert:b": torch.zeros(3)})
    ctx = WorkerContext(_Space(), store, _Adapter(), [_Skill()], "runfp")
    run_step(Job(0, 0, (), "expert:a", 0), ctx)
    run_step(Job(1, 0, ("expert:a", "expert:b"), "g000001", 0), ctx)
    assert ctx.adapter.bound == [_fp(torch.ones(3)), _fp(torch.full((3,), 0.5))]
    # the same expert, and a byte-identical child, in a run with another config (seed) get
    # the same keys: their cached outcomes are theirs
    other = WorkerContext(_Space(), store, _Adapter(), [_Skill()], "otherfp")
    run_step(Job(0, 0, (), "expert:a", 1), other)
    run_step(Job(1, 0, ("expert:a", "expert:b"), "g000001", 1), other)
    assert other.adapter.bound == ctx.adapter.bound


def test_expert_rewritten_at_the_same_path_makes_new_children():
    """Re-run after ``expert:a`` was retrained in place: same run config, same child id,
    other weights -- the child must not inherit the old child's key (it did: run/id)."""
    store = _Store({"expert:a": torch.ones(3), "expert:b": torch.zeros(3)})
    ctx = WorkerContext(_Space(), store, _Adapter(), [_Skill()], "runfp")
    run_step(Job(1, 0, ("expert:a", "expert:b"), "g000001", 0), ctx)
    store["expert:a"] = torch.full((3,), 3.0)                    # rewritten at the same path
    again = WorkerContext(_Space(), store, _Adapter(), [_Skill()], "runfp")
    run_step(Job(1, 0, ("expert:a", "expert:b"), "g000001", 0), again)
    assert again.adapter.bound[0] != ctx.adapter.bound[0]
    assert again.adapter.bound[0] == _fp(torch.full((3,), 1.5))


@pytest.mark.skipif(not sandbox_status().available, reason="no sandbox")
def test_rewritten_expert_children_are_scored_again_end_to_end(tmp_path):
    """With a real skill and sample cache: a child whose weights answer correctly scores 1.0;
    the expert is rewritten so that the same child (same run, same id) answers wrongly; the
    re-run must generate again and score 0.0, not serve the cached 1.0."""
    from cycleqd.skills.cache import SampleCache
    from cycleqd.skills.coding.skill import CodingSkill

    data = tmp_path / "mbpp.jsonl"
    data.write_text(json.dumps({"task_id": 11, "text": "Add two numbers.",
                                "code": "def add(a, b):\n    return a + b\n",
                                "test_list": ["assert add(1, 2) == 3"], "test_setup_code": ""}) + "\n")
    skill = CodingSkill("mbpp", data_path=data, split="all", cache=SampleCache(tmp_path / "c.sqlite"))

    class Backend:
        """Answers right iff the bound weights are positive."""
        fingerprint = None
        good = False
        calls = 0

        def generate(self, conversations, *, max_new_tokens, stop=()):
            self.calls += 1
            body = "a + b" if self.good else "a - b"
            return [f"```python\ndef add(a, b):\n    return {body}\n```" for _ in conversations]

    class Adapter:
        def __init__(self):
            self.backend = Backend()

        def bind(self, weights, fingerprint):
            self.backend.fingerprint = fingerprint
            self.backend.good = bool((weights["w"] > 0).all())
            return self.backend

    store = _Store({"expert:a": torch.ones(3), "expert:b": torch.ones(3)})
    ctx = WorkerContext(_Space(), store, Adapter(), [skill], "runfp")
    r1 = run_step(Job(1, 0, ("expert:a", "expert:b"), "g000001", 0), ctx)
    assert r1.scores["mbpp"] == 1.0 and ctx.adapter.backend.calls == 1
    store["expert:a"] = torch.full((3,), -3.0)                   # retrained in place
    ctx2 = WorkerContext(_Space(), store, Adapter(), [skill], "runfp")
    r2 = run_step(Job(1, 0, ("expert:a", "expert:b"), "g000001", 0), ctx2)
    assert ctx2.adapter.backend.calls == 1, "the child was scored from the old child's cache"
    assert r2.scores["mbpp"] == 0.0

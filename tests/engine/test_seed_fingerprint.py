"""Seeds are scored under the fingerprint of their weights, children under run/id."""

from __future__ import annotations

import torch

from cycleqd.executors.base import Job, WorkerContext, run_job
from cycleqd.inference.fingerprint import fingerprint_state_dict
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


def test_seed_fingerprint_is_the_weights_child_is_run_and_id():
    store = _Store({"expert:a": torch.ones(3), "expert:b": torch.zeros(3)})
    ctx = WorkerContext(_Space(), store, _Adapter(), [_Skill()], "runfp")
    run_job(Job(0, 0, (), "expert:a", 0), ctx)
    run_job(Job(1, 0, ("expert:a", "expert:b"), "g000001", 0), ctx)
    assert ctx.adapter.bound == [fingerprint_state_dict({"w": torch.ones(3)}), "runfp/g000001"]
    # the same expert in a run with another config (seed) gets the same key
    other = WorkerContext(_Space(), store, _Adapter(), [_Skill()], "otherfp")
    run_job(Job(0, 0, (), "expert:a", 1), other)
    assert other.adapter.bound[0] == ctx.adapter.bound[0]

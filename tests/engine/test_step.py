"""One generation's body (engine/step.py) with stub space, store and skill: the save gate
writes the genome only when the child would enter an archive as the job's gates saw it,
the mutation follows the job's basis, and every timing is recorded."""

from __future__ import annotations

import torch

from cycleqd.engine.step import Job, WorkerContext, run_step
from cycleqd.qd.archive import BCAxis, Elite, GridArchive
from cycleqd.skills.base import SkillResult
from tests.engine.test_seed_fingerprint import _Adapter, _Space, _Store


class _BasisSpace(_Space):
    def __init__(self):
        self.bases = []

    def mutate(self, child, basis, gen):
        self.bases.append(basis)
        return child


class _Skill:
    def __init__(self, name, value):
        self.name, self.value = name, value

    def evaluate(self, model):
        return SkillResult(self.value, {})


def _ctx(space=None):
    store = _Store({"expert:a": torch.ones(3), "expert:b": torch.zeros(3)})
    return WorkerContext(space or _Space(), store, _Adapter(), [_Skill("s", 0.5), _Skill("t", 0.9)], "fp")


def test_genome_saved_only_when_a_gate_would_accept_the_child():
    arch = GridArchive("s", (BCAxis("t", 0.0, 1.0, 2),))
    arch.add(Elite("old", {"s": 0.7, "t": 0.95}))                 # same cell, better quality
    ctx = _ctx()
    res = run_step(Job(1, 0, ("expert:a", "expert:b"), "g000001", 0, gates=(arch.gate(),)), ctx)
    assert not res.saved and res.genome_bytes == 0 and "g000001" not in ctx.store
    empty = GridArchive("t", (BCAxis("s", 0.0, 1.0, 2),))         # an empty archive accepts
    res = run_step(Job(1, 0, ("expert:a", "expert:b"), "g000001", 0, gates=(arch.gate(), empty.gate())), ctx)
    assert res.saved and res.genome_bytes == 4 and "g000001" in ctx.store
    assert {"crossover_s", "mutation_s", "materialize_s", "finite_check_s", "fingerprint_s", "bind_s",
            "eval_s_s", "eval_t_s", "eval_s", "save_s"} == set(res.timings)
    seed = run_step(Job(0, 0, (), "expert:a", 0, gates=(empty.gate(),)), ctx)   # seeds are never saved
    assert not seed.saved and seed.scores == {"s": 0.5, "t": 0.9} and "crossover_s" not in seed.timings


def test_mutation_follows_the_jobs_basis():
    space = _BasisSpace()
    ctx = _ctx(space)
    run_step(Job(3, 0, ("expert:a", "expert:b"), "g000003", 0, basis=2), ctx)
    run_step(Job(4, 1, ("expert:a", "expert:b"), "g000004", 0), ctx)   # no basis: the archive's skill
    assert space.bases == [2, 1]

"""The executor seam: run "make child + evaluate" jobs and hand back results in order.

A :class:`Job` is self-contained and small (ids, seeds, the archive thresholds it needs),
so it can travel to another process or node. Every random draw in a job comes from
``derive_seed(run seed, generation, purpose)``, so a job's result does not depend on which
worker ran it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from cycleqd.inference.fingerprint import fingerprint_state_dict
from cycleqd.qd.scheduler import derive_seed
from cycleqd.skills.base import NonFiniteScore, SkillResult


@dataclass(frozen=True)
class Job:
    """One generation's work, or the evaluation of a seed model (``parents == ()``).

    Attributes:
        generation: generation number (0 for seed evaluations).
        skill: index of the archive the parents came from (the quality skill in cyclic mode).
        parents: model ids of the parents, in the order drawn.
        child_id: id under which the child's genome is stored.
        seed: run seed.
        thresholds: per archive, cell -> incumbent quality, as the archives were when the
            job was made; the worker saves the genome only if the child would enter one.
        archive_cells: per archive, the callable-free description needed to compute the
            child's cell: list of (quality skill, [(bc skill, lo, hi, bins), ...]).
        mutation_skill: skill index of the SVD-mutation basis when it differs from ``skill``.
    """

    generation: int
    skill: int
    parents: tuple[str, ...]
    child_id: str
    seed: int
    thresholds: tuple[dict[tuple[int, ...], float], ...] = ()
    archive_cells: tuple[tuple[str, tuple[tuple[str, float, float, int], ...]], ...] = ()
    mutation_skill: int | None = None

    @property
    def basis_skill(self) -> int:
        """Skill whose expert basis the SVD mutation uses (``skill`` unless set apart, as in
        the single-archive ablation where the archive index is always 0)."""
        return self.skill if self.mutation_skill is None else self.mutation_skill


@dataclass
class JobResult:
    """What a worker sends back: the child's scores on all skills and timings (seconds).

    ``rejected`` is None for a normal result, else why the child was rejected (weights not
    finite, or a skill returned a NaN/inf score); a rejected child has no (or partial)
    results, is never stored and never offered to an archive, and its metrics line says so.
    """

    job: Job
    results: dict[str, SkillResult]
    saved: bool
    timings: dict[str, float] = field(default_factory=dict)
    genome_bytes: int = 0
    worker: str = "local"
    rejected: str | None = None
    #: fingerprint of the weights evaluated (the sample-cache model key's weight part);
    #: None when the child was rejected before it was computed
    fingerprint: str | None = None

    @property
    def scores(self) -> dict[str, float]:
        return {k: r.quality for k, r in self.results.items()}


@runtime_checkable
class Executor(Protocol):
    """Runs jobs; ``capacity`` jobs may be in flight; results come back in submission order."""

    capacity: int

    def submit(self, job: Job) -> None: ...

    def next_result(self) -> JobResult: ...

    def close(self) -> None: ...


def would_enter(job: Job, scores: dict[str, float]) -> bool:
    """Would a child with ``scores`` enter any archive as the job saw them?"""
    from cycleqd.qd.archive import BCAxis, GridArchive

    for (quality_skill, axes), thr in zip(job.archive_cells, job.thresholds):
        arch = GridArchive(quality_skill, tuple(BCAxis(*a) for a in axes))
        cell = arch.cell_of(scores)
        if cell not in thr or arch.quality_of(scores) > thr[cell]:
            return True
    return False


def run_job(job: Job, ctx: "WorkerContext") -> JobResult:
    """Make the child (crossover, then mutation) and evaluate it on all skills.

    Seed jobs (no parents) evaluate the stored model ``job.child_id`` instead. Every model,
    seed or child, is bound under the fingerprint of the weights actually evaluated
    (:func:`~cycleqd.inference.fingerprint.fingerprint_state_dict`: 0.76 s for SmolLM2-135M
    in fp32, 0.38 s in bf16, ``benchmarks/fingerprint_bench.py``), never under its name: a
    later run with the same experts reuses their cached per-sample outcomes, a child
    byte-identical to an earlier one reuses its outcomes, and an expert rewritten at the same
    path is a new model (its children too). The genome is
    written to the model store only when the child would enter an archive (as the official
    code does), so the store holds no model that no archive references for long.
    """
    space, store = ctx.space, ctx.store
    timings: dict[str, float] = {}
    t = time.perf_counter()
    if job.parents:
        gen = torch.Generator().manual_seed(derive_seed(job.seed, job.generation, "crossover"))
        child = space.crossover([store.get(p) for p in job.parents], gen)
        timings["crossover_s"] = time.perf_counter() - t
        t = time.perf_counter()
        gen = torch.Generator().manual_seed(derive_seed(job.seed, job.generation, "mutation"))
        child = space.mutate(child, job.basis_skill, gen)
        timings["mutation_s"] = time.perf_counter() - t
    else:
        child = store.get(job.child_id)
    t = time.perf_counter()
    weights = space.materialize(child)
    timings["materialize_s"] = time.perf_counter() - t
    # -- non-finite check (issue 18): a child whose weights are NaN/inf/beyond the float16
    # range is rejected before evaluation; it is never stored and never enters an archive
    t = time.perf_counter()
    bad = non_finite_weights(weights)
    timings["finite_check_s"] = time.perf_counter() - t
    if bad is not None:
        return JobResult(job, {}, False, timings, 0, ctx.name, rejected=bad)
    # every model is named by the content of its weights (not by run and id: a run resumed or
    # repeated after an expert was rewritten at the same path would reuse stale outcomes)
    t = time.perf_counter()
    fp = fingerprint_state_dict(weights)
    timings["fingerprint_s"] = time.perf_counter() - t
    model = ctx.adapter.bind(weights, fp)
    del weights
    results: dict[str, SkillResult] = {}
    rejected = None
    for skill in ctx.skills:
        t = time.perf_counter()
        try:
            results[skill.name] = skill.evaluate(model)
        except NonFiniteScore as e:  # a NaN/inf score is a failed evaluation, not a dead run
            rejected = f"skill {skill.name!r} failed: {e}"
        timings[f"eval_{skill.name}_s"] = time.perf_counter() - t
        q = getattr(results.get(skill.name), "quality", 0.0)
        if rejected is None and not _finite(q):
            rejected = f"skill {skill.name!r} failed: non-finite score {q!r}"
        if rejected is not None:
            results.pop(skill.name, None)
            break
    timings["eval_s"] = sum(v for k, v in timings.items() if k.startswith("eval_") and k != "eval_s")
    if rejected is not None:
        return JobResult(job, results, False, timings, 0, ctx.name, rejected=rejected, fingerprint=fp)
    saved, nbytes = False, 0
    if job.parents and would_enter(job, {k: r.quality for k, r in results.items()}):
        t = time.perf_counter()
        nbytes = store.put(job.child_id, child)
        timings["save_s"] = time.perf_counter() - t
        saved = True
    return JobResult(job, results, saved, timings, nbytes, ctx.name, fingerprint=fp)


def _finite(v) -> bool:
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def non_finite_weights(weights) -> str | None:
    """None when every float weight is finite with ``|w| <= 65504`` (the float16 range,
    :data:`cycleqd.models.validate.MAX_ABS_WEIGHT`); else one line naming the first bad
    tensor. Costs one chunked pass over the weights."""
    from cycleqd.models.validate import MAX_ABS_WEIGHT, non_finite_description

    for name, t in weights.items():
        if isinstance(t, torch.Tensor):
            desc = non_finite_description(t, MAX_ABS_WEIGHT)
            if desc is not None:
                return f"weights not finite: tensor {name!r}: {desc}"
    return None


@dataclass
class WorkerContext:
    """Everything a worker needs: weight space, model store, adapter and skills."""

    space: Any
    store: Any
    adapter: Any
    skills: list
    run_fingerprint: str
    name: str = "local"

"""One CycleQD generation's body (paper Algorithm 1, inside the loop), run by an executor.

    child  <- mutate_basis(crossover(parents))       make_child
    scores <- evaluate child on every skill           score_child
    save the genome if the child would enter an archive   (the archives' gate snapshot)

The loop (``loop.py``) asks the scheduler for ``(k, basis, parents)``, packs them into a
:class:`Job` and hands the job to an executor, which calls :func:`run_step` somewhere
(in-process, or on a Ray worker) and hands back the :class:`JobResult`. A job is
self-contained and small (ids, seeds, the archives' :class:`~cycleqd.qd.archive.ArchiveGate`
snapshots), so it can travel to another process or node. Every random draw in a job comes
from ``derive_seed(run seed, generation, purpose)``, so a job's result does not depend on
which worker ran it.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from cycleqd.inference.fingerprint import fingerprint_state_dict
from cycleqd.models.validate import MAX_ABS_WEIGHT, non_finite_description
from cycleqd.qd.archive import ArchiveGate
from cycleqd.qd.cma import OperatorParams
from cycleqd.qd.scheduler import derive_seed
from cycleqd.skills.base import NonFiniteScore, SkillResult


@dataclass(frozen=True)
class Job:
    """One generation's work, or the evaluation of a stored model (``parents == ()``: a
    seed, or the aggregate).

    Attributes:
        generation: generation number (0 for seed evaluations).
        skill: index of the archive the parents came from (the quality skill in cyclic mode).
        parents: model ids of the parents, in the order drawn.
        child_id: id under which the child's genome is stored (or the stored model to score).
        seed: run seed.
        gates: every archive's :meth:`~cycleqd.qd.archive.GridArchive.gate` when the job was
            made; the genome is saved only if the child would enter one of them.
        basis: the expert whose SVD basis mutates the child (the scheduler's ``Ask.basis``);
            None means ``skill``.
        params: per-child operator settings proposed by the CMA-ES policy (``qd.use_cma``,
            :mod:`cycleqd.qd.cma`): crossover ``mu``/``sigma`` and mutation ``rate``; None
            keeps the configured ones.
    """

    generation: int
    skill: int
    parents: tuple[str, ...]
    child_id: str
    seed: int
    gates: tuple[ArchiveGate, ...] = ()
    basis: int | None = None
    params: OperatorParams | None = None

    @property
    def basis_skill(self) -> int:
        """Skill whose expert basis the SVD mutation uses."""
        return self.skill if self.basis is None else self.basis


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


@dataclass
class WorkerContext:
    """Everything a worker needs: weight space, model store, adapter and skills."""

    space: Any
    store: Any
    adapter: Any
    skills: list
    run_fingerprint: str
    name: str = "local"
    #: evaluate the skills concurrently through one :class:`~cycleqd.inference.pool.GenerationPool`
    #: (one continuous batch per child) when the bound model generates text; False: one
    #: skill after another (the pre-pool path, kept for comparison)
    pooled: bool = True


def make_child(ctx: WorkerContext, job: Job, timings: dict[str, float]) -> Any:
    """Crossover of the parents' genomes, then mutation along ``job.basis_skill``'s expert
    basis (paper §3.2-3.3), with ``job.params`` overriding the operators' settings when
    set, each with its own generator: ``derive_seed(seed, g,
    "crossover")`` and ``derive_seed(seed, g, "mutation")``. A job without parents returns
    the stored genome ``job.child_id``. Records ``crossover_s`` and ``mutation_s``."""
    space, store = ctx.space, ctx.store
    if not job.parents:
        return store.get(job.child_id)
    t = time.perf_counter()
    gen = torch.Generator().manual_seed(derive_seed(job.seed, job.generation, "crossover"))
    over = {} if job.params is None else {"params": job.params.crossover()}
    child = space.crossover([store.get(p) for p in job.parents], gen, **over)
    timings["crossover_s"] = time.perf_counter() - t
    t = time.perf_counter()
    gen = torch.Generator().manual_seed(derive_seed(job.seed, job.generation, "mutation"))
    over = {} if job.params is None else {"params": job.params.mutation()}
    child = space.mutate(child, job.basis_skill, gen, **over)
    timings["mutation_s"] = time.perf_counter() - t
    return child


def score_child(ctx: WorkerContext, job: Job, genome: Any, timings: dict[str, float]) -> JobResult:
    """Bind ``genome`` (materialised, or factored) and evaluate it on every skill.

    When the adapter has ``bind_genome`` (:class:`~cycleqd.inference.adapter.LLMAdapter`
    with ``backend.lowrank`` on/auto) and it accepts the genome, the child is evaluated
    without materialisation (low-rank deltas in the forward pass; its finite-weights check
    is a bound on the coefficients, its fingerprint a hash of the genome): records
    ``bind_factored_s``. Seeds and stored models (``job.parents == ()``) and every other
    case are materialised as follows.

    The weights are rejected before evaluation when any is NaN/inf or beyond the float16
    range (:func:`non_finite_weights`); otherwise the model is bound under the fingerprint
    of its weights (:func:`~cycleqd.inference.fingerprint.fingerprint_state_dict`: 0.76 s for
    SmolLM2-135M in fp32, 0.38 s in bf16, ``benchmarks/fingerprint_bench.py``), never under
    its name: a later run with the same experts reuses their cached per-sample outcomes, a
    child byte-identical to an earlier one reuses its outcomes, and an expert rewritten at
    the same path is a new model (its children too). A skill's NaN/inf score (or
    :class:`~cycleqd.skills.base.NonFiniteScore`) rejects the child and stops the
    evaluation. Records ``materialize_s``, ``finite_check_s``, ``fingerprint_s``, ``bind_s``,
    ``eval_<skill>_s`` and ``eval_s``. The skills are evaluated by :func:`evaluate_skills`
    (concurrently through one generation pool when ``ctx.pooled``). The result is unsaved
    (see :func:`run_step`).
    """
    # seeds and stored models (no parents) are always materialised: their fingerprint is
    # the weights' (recorded in the run state and checked on resume)
    bind_genome = getattr(ctx.adapter, "bind_genome", None) if job.parents else None
    t = time.perf_counter()
    bound = bind_genome(ctx.space, genome) if bind_genome is not None else None
    if bound is not None:
        model, fp = bound
        timings["bind_factored_s"] = time.perf_counter() - t
    else:
        t = time.perf_counter()
        weights = ctx.space.materialize(genome)
        timings["materialize_s"] = time.perf_counter() - t
        t = time.perf_counter()
        bad = non_finite_weights(weights)
        timings["finite_check_s"] = time.perf_counter() - t
        if bad is not None:
            return JobResult(job, {}, False, timings, 0, ctx.name, rejected=bad)
        t = time.perf_counter()
        fp = fingerprint_state_dict(weights)
        timings["fingerprint_s"] = time.perf_counter() - t
        t = time.perf_counter()
        model = ctx.adapter.bind(weights, fp)
        timings["bind_s"] = time.perf_counter() - t
        del weights
    results, rejected = evaluate_skills(ctx.skills, model, timings, pooled=ctx.pooled)
    record = getattr(ctx.adapter, "record", None)
    if record is not None:
        record(timings, factored=bound is not None)
    return JobResult(job, results, False, timings, 0, ctx.name, rejected=rejected, fingerprint=fp)


def evaluate_skills(skills: list, model: Any, timings: dict[str, float], *,
                    pooled: bool = True) -> tuple[dict[str, SkillResult], str | None]:
    """Evaluate ``model`` on ``skills``: (results by skill name, rejection reason or None).

    Sequential (``pooled=False``, or a model without ``generate``, or one skill): skill by
    skill, stopping at the first NaN/inf score. Pooled: every skill runs in its own thread
    against the same backend attached to a :class:`~cycleqd.inference.pool.GenerationPool`,
    so all skills' prompts and all agent episodes' turns share one continuous batch; the
    results are then read in skill order with the sequential path's rules (the first
    skill, in order, with a NaN/inf score rejects the child and drops every later skill's
    result; any other exception of a skill is re-raised, the first in skill order), so the
    outcome is the sequential one under greedy decoding. Records ``eval_<skill>_s`` (each
    skill's own wall time; they overlap when pooled) and ``eval_s`` (wall time of the
    whole evaluation).
    """
    t0 = time.perf_counter()
    n = len(skills)
    out: list[Any] = [None] * n        # SkillResult | BaseException
    took = [0.0] * n

    def run(i: int) -> None:
        t = time.perf_counter()
        try:
            out[i] = skills[i].evaluate(model)
        except BaseException as e:  # noqa: BLE001 - judged below, in skill order
            out[i] = e
        took[i] = time.perf_counter() - t

    concurrent = pooled and n > 1 and callable(getattr(model, "generate", None))
    if concurrent:
        from cycleqd.inference.pool import GenerationPool

        with GenerationPool(model).attached():
            threads = [threading.Thread(target=run, args=(i,), name=f"skill-{skills[i].name}",
                                        daemon=True) for i in range(n)]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
    results: dict[str, SkillResult] = {}
    rejected = None
    for i, skill in enumerate(skills):
        if not concurrent:
            run(i)
        timings[f"eval_{skill.name}_s"] = took[i]
        r = out[i]
        if isinstance(r, NonFiniteScore):  # a NaN/inf score is a failed evaluation, not a dead run
            rejected = f"skill {skill.name!r} failed: {r}"
        elif isinstance(r, BaseException):
            raise r
        else:
            results[skill.name] = r
            q = getattr(r, "quality", 0.0)
            if not _finite(q):
                rejected = f"skill {skill.name!r} failed: non-finite score {q!r}"
        if rejected is not None:
            results.pop(skill.name, None)
            break
    timings["eval_s"] = time.perf_counter() - t0
    return results, rejected


def run_step(job: Job, ctx: WorkerContext) -> JobResult:
    """One generation's body: :func:`make_child`, :func:`score_child`, and the save gate.

    The genome is written to the model store only when the child would enter one of the
    archives as ``job.gates`` saw them (as the official code does), so the store holds no
    model that no archive references for long; seed jobs (no parents) save nothing.
    Records ``save_s`` when it writes.
    """
    timings: dict[str, float] = {}
    genome = make_child(ctx, job, timings)
    res = score_child(ctx, job, genome, timings)
    if res.rejected is None and job.parents and any(g.would_accept(res.scores) for g in job.gates):
        t = time.perf_counter()
        res.genome_bytes = ctx.store.put(job.child_id, genome)
        timings["save_s"] = time.perf_counter() - t
        res.saved = True
    return res


def describe_job(job: Job) -> str:
    """How errors and warnings name a job: ``generation G`` or ``model ID``."""
    return f"generation {job.generation}" if job.parents else f"model {job.child_id}"


def _finite(v) -> bool:
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def non_finite_weights(weights) -> str | None:
    """None when every float weight is finite with ``|w| <= 65504`` (the float16 range,
    :data:`cycleqd.models.validate.MAX_ABS_WEIGHT`); else one line naming the first bad
    tensor. Costs one chunked pass over the weights."""
    for name, t in weights.items():
        if isinstance(t, torch.Tensor):
            desc = non_finite_description(t, MAX_ABS_WEIGHT)
            if desc is not None:
                return f"weights not finite: tensor {name!r}: {desc}"
    return None

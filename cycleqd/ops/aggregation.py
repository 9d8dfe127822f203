"""Model aggregation: merge the final archives' best models into one model.

CycleQD (Kuroki et al., ICLR 2025, §3 "model aggregation" and §4) ends by taking the best
model of each of the K archives -- archive k's highest-quality elite, i.e. the strongest
model on skill k found while the other skills were behaviour characteristics -- and
merging them into one multi-skill model. The official code release contains no
aggregation step and the paper's wording of it could not be checked, so ``mean`` (the old
name ``paper`` stays as an alias) is this project's assumption: the run's own crossover
family at its mean, the equal-weight model-wise linear merge of the bests' task vectors,

    tau_agg = (1/K) * sum_k tau_best(k)       (theta_agg = theta_base + tau_agg)

i.e. CycleQD's linear crossover with ``w_k = 1`` (the mean of ``N(1, sigma)``),
normalised. Alternatives (``final.strategy`` / ``operators.aggregation.name``):

* ``quality_weighted`` (alias ``quality``) -- ``w_k`` proportional to ``quality_k ** power``
  (skills the run solved better weigh more).
* ``task_arithmetic`` -- ``tau = lambda * sum_k tau_best(k)`` with ``lambda`` chosen on the
  validation split from a small grid (Ilharco et al. 2023 choose the scale on held-out
  validation data); a fixed ``lambda`` needs no validation.
* ``weight_search`` -- ``tau = sum_k w_k tau_best(k)``, the K weights unconstrained (no
  normalisation), found by a seeded (1+1) random search of fixed ``budget`` validation
  scores starting from ``mean`` (LoraHub, Huang et al. 2023, searches merge weights
  gradient-free on held-out examples).
* ``best_elite`` -- no merge: the single elite with the best validation mean among the
  top ``top`` elites (by quality) of every archive.
* ``weighted`` -- explicit ``weights`` (one per archive), normalised unless
  ``normalize=False``.
* ``task_arithmetic`` / ``ties`` / ``dare`` / ``dare_ties`` / ``slerp`` -- the crossover
  operators of :mod:`cycleqd.ops.crossover` applied to the K bests with their own
  parameters (``slerp`` needs exactly two archives). Non-linear merges give a dense task
  vector (stored densely even in an SVD-genome run).

The same model may be the best of several archives; it then simply counts several times,
as in a plain merge of the K bests.

Validation (:func:`aggregate` keyword arguments, passed by the engine): ``score(genome) ->
{skill: float}`` scores a genome on the **validation** split; ``elites`` gives archive k's
elites as ``(genome, quality)`` pairs, best first. No strategy ever receives test scores.
Strategies that choose use the validation mean (the mean over skills); ties keep the
earliest candidate in the order each strategy documents. A ``report`` dict, when given, is
filled with every candidate's validation scores and the choice.
"""

from __future__ import annotations

import inspect
import math
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from cycleqd._lazy import lazy_import
from cycleqd.ops.crossover import make_crossover, weighted_sum
from cycleqd.ops.genome import SVDGenome
from cycleqd.registry import AGGREGATIONS, CROSSOVERS

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_import("torch")

# AGGREGATIONS: name -> factory(**params) -> fn(space, genomes, qualities, *, score, elites,
# report) -> genome; fn.needs names the keyword arguments it cannot do without
Score = Callable[[Any], Mapping[str, float]]


def linear_combination(space: Any, genomes: Sequence[Any], weights: Sequence[float]) -> Any:
    """``sum_i weights[i] * genome_i`` in the space's own representation when possible
    (SVD genomes stay compact; anything else becomes a dense fp32 task vector)."""
    if all(isinstance(g, SVDGenome) for g in genomes):
        c = sum(float(w) * g.c for w, g in zip(weights, genomes))
        m = {}
        names = list(dict.fromkeys(n for g in genomes for n in g.m))
        for n in names:
            acc = None
            for w, g in zip(weights, genomes):
                if n in g.m:
                    acc = g.m[n] * float(w) if acc is None else acc + g.m[n] * float(w)
            m[n] = acc
        return SVDGenome(c=c, m=m)
    taus = [space.task_vector(g) for g in genomes]
    return weighted_sum(taus, weights)


def _normalise(w: Sequence[float], field: str) -> list[float]:
    s = float(sum(w))
    if abs(s) < 1e-12:
        raise ValueError(f"{field}: aggregation weights sum to zero")
    return [float(x) / s for x in w]


def _check(genomes: Sequence[Any], qualities: Sequence[float]) -> None:
    if len(genomes) == 0:
        raise ValueError("aggregation needs at least one model")
    if qualities is not None and len(qualities) != len(genomes):
        raise ValueError(f"aggregation: {len(qualities)} qualities for {len(genomes)} models")


def _mean_scores(scores: Mapping[str, float]) -> float:
    if not scores:
        raise ValueError("validation score: no skill scores")
    return float(sum(float(v) for v in scores.values()) / len(scores))


def _need(name: str, **given: Any) -> None:
    for k, v in given.items():
        if v is None:
            raise ValueError(f"aggregation {name!r} needs {k!r} (validation-split scoring, passed by the engine)")


def _record(report: dict | None, candidates: list[dict], chosen: int, rule: str) -> None:
    if report is not None:
        report.update(candidates=candidates, chosen=chosen, rule=rule)


def _choose(score: Score, genomes: Sequence[Any], labels: Sequence[dict]) -> tuple[int, list[dict]]:
    """Score each genome on validation; the index of the best mean (first on ties)."""
    rows, best = [], 0
    for i, (g, lab) in enumerate(zip(genomes, labels)):
        sc = {k: float(v) for k, v in score(g).items()}
        rows.append({**lab, "validation": sc, "validation_mean": _mean_scores(sc)})
        if rows[i]["validation_mean"] > rows[best]["validation_mean"]:
            best = i
    return best, rows


_MEAN_SOURCE = ("cycleqd assumption: the official CycleQD code has no aggregation step and the "
                "paper's text on it could not be checked; equal-weight linear merge of the archives' bests")


def mean():
    """Equal-weight linear merge of the archives' bests (see module docstring)."""

    def agg(space, genomes, qualities=None, **_):
        _check(genomes, qualities)
        return linear_combination(space, genomes, [1.0 / len(genomes)] * len(genomes))

    return agg


AGGREGATIONS.register("mean", source=_MEAN_SOURCE)(mean)
AGGREGATIONS.register("paper", source="alias of 'mean' (kept for old configs); NOT from the paper: "
                      + _MEAN_SOURCE)(mean)


def quality_weighted(power: float = 1.0):
    """``w_k ~ quality_k ** power`` (normalised). Raises ValueError if all qualities are 0."""

    def agg(space, genomes, qualities=None, **_):
        _check(genomes, qualities)
        if qualities is None:
            raise ValueError("aggregation 'quality' needs the models' qualities")
        w = [max(float(q), 0.0) ** power for q in qualities]
        return linear_combination(space, genomes, _normalise(w, "aggregation.quality"))

    return agg


_QW = "cycleqd choice (no external source): linear merge of the bests, w_k ~ quality_k ** power, normalised"
AGGREGATIONS.register("quality_weighted", source=_QW)(quality_weighted)
AGGREGATIONS.register("quality", source="alias of 'quality_weighted': " + _QW)(quality_weighted)


@AGGREGATIONS.register("weighted", source="cycleqd: explicit per-archive weights (task arithmetic)")
def weighted(weights: Sequence[float], normalize: bool = True):
    """Explicit weights, one per archive (in skill order)."""

    def agg(space, genomes, qualities=None, **_):
        _check(genomes, qualities)
        if len(weights) != len(genomes):
            raise ValueError(f"aggregation.weights: {len(weights)} values for {len(genomes)} archives")
        w = _normalise(weights, "aggregation.weights") if normalize else [float(x) for x in weights]
        return linear_combination(space, genomes, w)

    return agg


def _crossover_aggregation(name: str):
    entry = CROSSOVERS.entry(name)

    def factory(seed: int = 0, **params):
        entry.factory(**params, **entry.dry_context)   # the crossover's own checks, now

        def agg(space, genomes, qualities=None, **_):
            _check(genomes, qualities)
            base = getattr(space, "base", None)
            op = make_crossover({"name": name, **params}, base=base)
            if entry.svd_genome:   # linear: combine in the space's own representation
                w = op.prepare(len(genomes), torch.Generator().manual_seed(seed))
                return linear_combination(space, genomes, w)
            taus = [space.task_vector(g) for g in genomes]
            return op(taus, generator=torch.Generator().manual_seed(seed))

        return agg

    factory.__name__ = name
    factory.__doc__ = (f"Aggregate with the {name!r} crossover operator (its parameters as "
                       f"keyword arguments; ``seed`` seeds its randomness).")
    # the crossover's parameters (less its context) plus ``seed``: what a config may set
    params = [p for k, p in inspect.signature(entry.factory).parameters.items() if k not in entry.context]
    seed = inspect.Parameter("seed", inspect.Parameter.KEYWORD_ONLY, default=0, annotation="int")
    plain = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) if p.kind is not p.VAR_KEYWORD else p for p in params]
    factory.__signature__ = inspect.Signature([seed] + [p for p in plain if p.kind is not p.VAR_KEYWORD]
                                              + [p for p in plain if p.kind is p.VAR_KEYWORD])
    return factory


for _name in ("ties", "dare", "dare_ties", "slerp"):
    AGGREGATIONS.register(_name, source=f"the {_name!r} crossover applied to the archives' bests: "
                          + CROSSOVERS.entry(_name).source,
                          extra=CROSSOVERS.entry(_name).extra)(_crossover_aggregation(_name))


@AGGREGATIONS.register("task_arithmetic", source="Ilharco et al. 2023 (task arithmetic; the scale "
                       "chosen on held-out validation data), applied to the archives' bests",
                       extra=("lambda", "lambdas"))
def task_arithmetic(**kw):
    """``tau = lambda * sum_k tau_best(k)``.

    Config keys: ``lambda`` (a fixed scale: no validation needed) or ``lambdas`` (the grid,
    default ``[0.2, 0.4, 0.6, 0.8, 1.0]``; the scale with the best validation mean wins,
    ties: the first in the grid). Raises ValueError for an empty or non-finite grid."""
    if "lambda" in kw and "lambdas" in kw:
        raise ValueError("task_arithmetic: give lambda or lambdas, not both")
    grid = [kw["lambda"]] if "lambda" in kw else list(kw.get("lambdas", (0.2, 0.4, 0.6, 0.8, 1.0)))
    if not grid or not all(isinstance(x, (int, float)) and math.isfinite(x) for x in grid):
        raise ValueError(f"task_arithmetic.lambdas: a non-empty list of finite numbers, got {grid!r}")

    def agg(space, genomes, qualities=None, *, score=None, report=None, **_):
        _check(genomes, qualities)
        cands = [linear_combination(space, genomes, [float(lam)] * len(genomes)) for lam in grid]
        if len(cands) == 1:
            return cands[0]
        _need("task_arithmetic", score=score)
        best, rows = _choose(score, cands, [{"lambda": float(lam)} for lam in grid])
        _record(report, rows, best, "best validation mean; ties: the first lambda in the grid")
        return cands[best]

    agg.needs = () if len(grid) == 1 else ("score",)
    return agg


@AGGREGATIONS.register("weight_search", source="seeded (1+1) random search over the K merge weights on "
                       "validation data, as LoraHub (Huang et al. 2023) searches LoRA merge weights "
                       "gradient-free on held-out examples")
def weight_search(budget: int = 16, sigma: float = 0.3, seed: int = 0):
    """``tau = sum_k w_k tau_best(k)``, ``w`` unconstrained (no normalisation).

    Starts at ``w_k = 1/K`` (``mean``), then ``budget`` proposals ``w + N(0, sigma^2)`` around
    the current best (``torch.Generator`` seeded by ``seed``); a proposal replaces the best
    only with a strictly higher validation mean (ties: the earlier). ``budget + 1``
    validation scores in all. Raises ValueError: budget < 0 or sigma <= 0."""
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
        raise ValueError(f"weight_search.budget={budget!r}: must be an int >= 0")
    if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"weight_search.sigma={sigma!r}: must be > 0")

    def agg(space, genomes, qualities=None, *, score=None, report=None, **_):
        _check(genomes, qualities)
        k = len(genomes)
        w = [1.0 / k] * k
        if budget == 0:
            return linear_combination(space, genomes, w)
        _need("weight_search", score=score)
        g = torch.Generator().manual_seed(seed)
        best_i, rows = _choose(score, [linear_combination(space, genomes, w)], [{"weights": w}])
        best_w, best_m = w, rows[0]["validation_mean"]
        for _ in range(budget):
            cand = [x + float(sigma) * float(z) for x, z in zip(best_w, torch.randn(k, generator=g))]
            _, row = _choose(score, [linear_combination(space, genomes, cand)], [{"weights": cand}])
            rows += row
            if row[0]["validation_mean"] > best_m:
                best_i, best_w, best_m = len(rows) - 1, cand, row[0]["validation_mean"]
        _record(report, rows, best_i, "best validation mean; ties: the earlier proposal")
        return linear_combination(space, genomes, best_w)

    agg.needs = () if budget == 0 else ("score",)
    return agg


@AGGREGATIONS.register("best_elite", source="no merge: model selection on validation data among the top "
                       "elites of every archive (cycleqd; the standard held-out selection rule)")
def best_elite(top: int = 3):
    """The single elite with the best validation mean among the ``top`` best elites (by
    quality) of every archive (``elites``; default: the archives' bests). Candidates are
    ordered archive by archive, best quality first; the same genome object is scored once;
    ties: the earlier. Returns that genome unchanged. Raises ValueError: top < 1."""
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ValueError(f"best_elite.top={top!r}: must be an int >= 1")

    def agg(space, genomes, qualities=None, *, score=None, elites=None, report=None, **_):
        _check(genomes, qualities)
        pools = elites if elites is not None else [[(g, q)] for g, q in zip(genomes, qualities or [0.0] * len(genomes))]
        cands, labels, seen = [], [], set()
        for k, pool in enumerate(pools):
            for r, (g, q) in enumerate(list(pool)[:top]):
                if id(g) not in seen:
                    seen.add(id(g))
                    cands.append(g)
                    labels.append({"archive": k, "rank": r, "quality": float(q)})
        if len(cands) == 1:
            return cands[0]
        _need("best_elite", score=score)
        best, rows = _choose(score, cands, labels)
        _record(report, rows, best, "best validation mean; ties: the earlier archive, then rank")
        return cands[best]

    agg.needs = ("score",)
    return agg


def aggregate(space: Any, genomes: Sequence[Any], qualities: Sequence[float] | None = None, *,
              method: str = "mean", field: str | None = None, score: Score | None = None,
              elites: Sequence[Sequence[tuple[Any, float]]] | None = None, report: dict | None = None,
              **params) -> Any:
    """Merge the archives' best genomes into one genome of ``space``.

    Args:
        space: the run's WeightSpace.
        genomes: archive k's best genome, k = 0..K-1 (in skill order).
        qualities: their qualities (archive k's quality skill score), same order.
        method: a name in :data:`AGGREGATIONS` (default ``mean``).
        params: the method's parameters.
        field: the config path named in errors (e.g. ``operators.aggregation``).
        score: ``score(genome) -> {skill: float}`` on the validation split (strategies that
            choose need it; never a test-split scorer).
        elites: archive k's ``(genome, quality)`` elites, best first (``best_elite``).
        report: filled with every candidate's validation scores and the choice.
    Returns:
        A genome ``space`` can save, materialise and export (an SVD genome for linear
        methods in an SVD-genome space, else a dense fp32 task vector).
    Raises:
        ConfigError (a ValueError): unknown method (known ones listed) or bad parameters.
    """
    return AGGREGATIONS.build(method, params, field=field)(space, list(genomes), qualities, score=score,
                                                           elites=elites, report=report)

"""Model aggregation: merge the final archives' best models into one model.

CycleQD (Kuroki et al., ICLR 2025, §3 "model aggregation" and §4) ends by taking the best
model of each of the K archives -- archive k's highest-quality elite, i.e. the strongest
model on skill k found while the other skills were behaviour characteristics -- and
merging them into one multi-skill model. The official code release contains no
aggregation step, so the default here, ``paper``, is the paper's merge realised with the
run's own crossover family at its mean: the equal-weight model-wise linear merge of the
bests' task vectors,

    tau_agg = (1/K) * sum_k tau_best(k)       (theta_agg = theta_base + tau_agg)

i.e. CycleQD's linear crossover with ``w_k = 1`` (the mean of ``N(1, sigma)``),
normalised. Alternatives (``operators.aggregation.name``):

* ``quality`` -- ``w_k`` proportional to ``quality_k ** power`` (skills the run solved
  better weigh more).
* ``weighted`` -- explicit ``weights`` (one per archive), normalised unless
  ``normalize=False``.
* ``task_arithmetic`` / ``ties`` / ``dare`` / ``dare_ties`` / ``slerp`` -- the crossover
  operators of :mod:`cycleqd.ops.crossover` applied to the K bests with their own
  parameters (``slerp`` needs exactly two archives). Non-linear merges give a dense task
  vector (stored densely even in an SVD-genome run).

The same model may be the best of several archives; it then simply counts several times,
as in a plain merge of the K bests.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, Sequence

from cycleqd._lazy import lazy_import
from cycleqd.ops.crossover import make_crossover, weighted_sum
from cycleqd.ops.genome import SVDGenome
from cycleqd.registry import AGGREGATIONS, CROSSOVERS

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_import("torch")

# AGGREGATIONS: name -> factory(**params) -> fn(space, genomes, qualities) -> genome


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


@AGGREGATIONS.register("paper", source="CycleQD paper §3 model aggregation (the official code has "
                       "none): equal-weight linear merge of the archives' bests")
def paper():
    """Equal-weight linear merge of the archives' bests (see module docstring)."""

    def agg(space, genomes, qualities=None):
        _check(genomes, qualities)
        return linear_combination(space, genomes, [1.0 / len(genomes)] * len(genomes))

    return agg


@AGGREGATIONS.register("quality", source="cycleqd: quality-weighted linear merge of the bests")
def quality(power: float = 1.0):
    """``w_k ~ quality_k ** power`` (normalised). Raises ValueError if all qualities are 0."""

    def agg(space, genomes, qualities=None):
        _check(genomes, qualities)
        if qualities is None:
            raise ValueError("aggregation 'quality' needs the models' qualities")
        w = [max(float(q), 0.0) ** power for q in qualities]
        return linear_combination(space, genomes, _normalise(w, "aggregation.quality"))

    return agg


@AGGREGATIONS.register("weighted", source="cycleqd: explicit per-archive weights (task arithmetic)")
def weighted(weights: Sequence[float], normalize: bool = True):
    """Explicit weights, one per archive (in skill order)."""

    def agg(space, genomes, qualities=None):
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

        def agg(space, genomes, qualities=None):
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


for _name in ("task_arithmetic", "ties", "dare", "dare_ties", "slerp"):
    AGGREGATIONS.register(_name, source=f"the {_name!r} crossover applied to the archives' bests: "
                          + CROSSOVERS.entry(_name).source,
                          extra=CROSSOVERS.entry(_name).extra)(_crossover_aggregation(_name))


def aggregate(space: Any, genomes: Sequence[Any], qualities: Sequence[float] | None = None, *,
              method: str = "paper", field: str | None = None, **params) -> Any:
    """Merge the archives' best genomes into one genome of ``space``.

    Args:
        space: the run's WeightSpace.
        genomes: archive k's best genome, k = 0..K-1 (in skill order).
        qualities: their qualities (archive k's quality skill score), same order.
        method: a name in :data:`AGGREGATIONS` (default ``paper``).
        params: the method's parameters.
        field: the config path named in errors (e.g. ``operators.aggregation``).
    Returns:
        A genome ``space`` can save, materialise and export (an SVD genome for linear
        methods in an SVD-genome space, else a dense fp32 task vector).
    Raises:
        ConfigError (a ValueError): unknown method (known ones listed) or bad parameters.
    """
    return AGGREGATIONS.build(method, params, field=field)(space, list(genomes), qualities)

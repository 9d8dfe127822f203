"""The run's final model: a strategy of :data:`cycleqd.registry.AGGREGATIONS` applied to the
archives, chosen on the **validation** split (``final`` config section, :class:`FinalConfig`).

Three disjoint splits per skill: ``search`` scores the children during the run, ``validation``
chooses the final model here, ``test`` is only ever reported (never read by any choice: the
validation skills are built with ``split="validation"``, and the strategies receive only their
scores). ``final.strategy: auto`` builds every strategy of :data:`AUTO_STRATEGIES`, scores each
result on validation and keeps the best validation mean (mean over the skills; ties: the
earlier in :data:`AUTO_STRATEGIES`). The record (every candidate's validation scores, the
choice and the rule) is written to ``RUN_DIR/final.json`` by the loop.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

from cycleqd.config import AUTO_STRATEGIES, FinalConfig, RunConfig
from cycleqd.registry import AGGREGATIONS

Score = Callable[[Any], Mapping[str, float]]


def final_plan(cfg: RunConfig) -> list[tuple[str, dict]]:
    """``[(strategy name, parameters)]`` to build: one for a named strategy (``final``, else
    ``operators.aggregation``), every one of :data:`AUTO_STRATEGIES` for ``auto``."""
    fin: FinalConfig = cfg.final
    if fin.strategy is None:
        op = cfg.operators.aggregation
        return [(op.name, op.kwargs())]
    if fin.strategy == "auto":
        return [(n, dict(fin.params.get(n, {}))) for n in AUTO_STRATEGIES]
    return [(fin.strategy, dict(fin.params))]


def needs_validation(cfg: RunConfig) -> bool:
    """Whether the final choice needs validation scores (``auto``, or a strategy that chooses)."""
    plan = final_plan(cfg)
    return len(plan) > 1 or bool(getattr(AGGREGATIONS.build(*plan[0], field="final"), "needs", ()))


class _Cached:
    """``score`` memoised per genome object (a strategy's chosen candidate is not rescored)."""

    def __init__(self, score: Score) -> None:
        self.score, self.memo, self.calls = score, {}, 0

    def __call__(self, genome: Any) -> dict[str, float]:
        key = id(genome)
        if key not in self.memo:
            self.calls += 1
            self.memo[key] = (genome, {k: float(v) for k, v in self.score(genome).items()})
        return dict(self.memo[key][1])


def select_final(space: Any, archives: Sequence[Any], get: Callable[[str], Any], plan: list[tuple[str, dict]],
                 score: Score | None) -> tuple[Any, dict]:
    """Build each planned strategy's model and choose the final one.

    Args:
        space: the run's WeightSpace.
        archives: the K archives (their bests, in skill order, are the merge inputs).
        get: model id -> genome (the run's model store).
        plan: :func:`final_plan`.
        score: genome -> ``{skill: float}`` on the validation split; None when the skills have
            no validation split (then only a single strategy that does not choose can run).
    Returns:
        (genome, record): the record holds ``strategy``, ``chosen``, ``rule``, ``sources`` and
        ``candidates`` (each: strategy, params, validation scores and mean, the strategy's own
        choices under ``search``; with ``auto``, a strategy that raised ValueError, e.g.
        ``quality_weighted`` when every quality is 0, is a candidate with ``error`` only and
        is not chosen); JSON-ready.
    Raises:
        ConfigError/ValueError: a strategy that needs validation scores without ``score``;
            the single configured strategy's error; every ``auto`` strategy failing.
    """
    bests = [a.best() for a in archives]
    cache: dict[str, Any] = {}

    def load(mid: str) -> Any:
        if mid not in cache:
            cache[mid] = get(mid)
        return cache[mid]

    genomes = [load(e.id) for e in bests]
    qualities = [a.quality_of(e.scores) for a, e in zip(archives, bests)]
    top = max([int(p.get("top", 3)) for n, p in plan if n == "best_elite"] or [0])
    pools = [[(load(e.id), a.quality_of(e.scores))
              for _, e in sorted(a, key=lambda ce: -a.quality_of(ce[1].scores))[:top]] for a in archives]
    cached = _Cached(score) if score is not None else None
    cands, models = [], []
    for name, params in plan:
        fn = AGGREGATIONS.build(name, params, field="final")
        inner: dict = {}
        try:
            g = fn(space, genomes, qualities, score=cached, elites=pools if top else None, report=inner)
        except ValueError as e:   # auto: one strategy that cannot apply (quality_weighted with
            if len(plan) == 1:    # every quality 0) is one failed candidate, not a dead run
                raise
            cands.append({"strategy": name, "params": params, "error": str(e)})
            models.append(None)
            continue
        row: dict[str, Any] = {"strategy": name, "params": params}
        if cached is not None:
            row["validation"] = cached(g)
            row["validation_mean"] = sum(row["validation"].values()) / len(row["validation"])
        if inner:
            row["search"] = inner
        cands.append(row)
        models.append(g)
    ok = [i for i, row in enumerate(cands) if "error" not in row]
    if not ok:
        raise ValueError("final: every strategy failed: " + "; ".join(f"{r['strategy']}: {r['error']}" for r in cands))
    best = ok[0]
    if cached is not None:
        for i in ok:
            if cands[i]["validation_mean"] > cands[best]["validation_mean"]:
                best = i
    rule = ("best validation mean over the skills; ties: the earlier strategy in "
            f"{list(AUTO_STRATEGIES)}" if len(plan) > 1 else "the configured strategy")
    record = {"strategy": "auto" if len(plan) > 1 else plan[0][0], "chosen": cands[best]["strategy"],
              "rule": rule, "split": "validation" if cached is not None else None,
              "validation_mean": cands[best].get("validation_mean"),
              "validation_scorings": cached.calls if cached is not None else 0,
              "sources": [e.id for e in bests], "candidates": cands}
    return models[best], record

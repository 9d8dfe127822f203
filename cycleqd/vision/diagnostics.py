"""Why a vision run's final model lands where it does: measurements on a finished run.

Used by ``benchmarks/vision_fidelity.py`` (issue 14, item 4). Nothing here reads the test
split: every quantity is a property of the weights (coefficients on the experts' task
vectors) or a search/validation score.

* :func:`expert_coefficients` -- the least-squares coordinates ``c`` of a task vector on the
  K experts' task vectors (all tensors flattened and concatenated, fp64) and the share of it
  outside their span. A task-arithmetic merge ``lambda * sum_k tau_k`` has ``c = (lambda, ...,
  lambda)`` and ``sum(c) = K * lambda``; a child of the official linear crossover
  (``sum_i w_i tau_i / sum_i w_i``, SakanaAI/CycleQD ``crossover/model_linear.py``) is a convex
  combination of its parents, so without mutation ``sum(c) = 1`` for every elite. The SVD
  mutation adds ``U diag(s r) V^T`` of expert q's matrices, ``r ~ U(0, rate)``: about
  ``rate / 2`` of tau_q on the matrices (outside the span where r is not constant).
* :func:`archive_landscape` -- every elite of every archive with its cell, quality rank,
  search mean, validation mean and coefficients: where the good multi-skill models sit.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from cycleqd.ops.base import TaskVector


class ExpertBasis:
    """The K experts' task vectors as the columns of one (P, K) fp64 matrix.

    Args:
        taus: the experts' task vectors (name -> tensor), same names and shapes, in skill
            order. P = total number of parameters (of ``names``).
        names: only these tensors (default: all), e.g. the 2-D matrices the SVD mutation
            changes.
    Raises:
        ValueError: no experts, the experts differ in tensor names, or ``names`` is empty or
            names a tensor the experts lack.
    """

    def __init__(self, taus: Sequence[TaskVector], names: Sequence[str] | None = None):
        if not taus:
            raise ValueError("ExpertBasis: no expert task vectors")
        for i, t in enumerate(taus[1:], 1):
            if list(t) != list(taus[0]):
                raise ValueError(f"ExpertBasis: expert {i} has different tensor names than expert 0")
        self.names = list(taus[0]) if names is None else list(names)
        bad = [n for n in self.names if n not in taus[0]]
        if not self.names or bad:
            raise ValueError(f"ExpertBasis: names must be a non-empty subset of the experts' tensors"
                             + (f" ({bad[0]!r} is not one)" if bad else ""))
        self.T = torch.stack([self.flat(t) for t in taus], 1)   # (P, K)
        self.pinv = torch.linalg.pinv(self.T)                   # (K, P)

    def flat(self, tau: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """(P,) fp64: the tensors of ``tau`` in the experts' name order (ValueError if one is missing)."""
        missing = [n for n in self.names if n not in tau]
        if missing:
            raise ValueError(f"task vector lacks tensor {missing[0]!r}")
        return torch.cat([tau[n].detach().double().reshape(-1) for n in self.names])

    def coefficients(self, tau: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """``{"c": [c_1..c_K], "sum": sum(c), "residual": ||tau - T c|| / ||tau||, "norm": ||tau||}``
        (least squares; ``residual`` 0 for a task vector in the experts' span, NaN for tau = 0)."""
        v = self.flat(tau)
        c = self.pinv @ v
        nv = float(v.norm())
        res = float((v - self.T @ c).norm()) / nv if nv > 0 else float("nan")
        return {"c": [float(x) for x in c], "sum": float(c.sum()), "residual": res, "norm": nv}


def expert_coefficients(tau: Mapping[str, torch.Tensor], taus: Sequence[TaskVector]) -> dict[str, Any]:
    """:meth:`ExpertBasis.coefficients` of ``tau`` on ``taus`` (builds the basis once per call)."""
    return ExpertBasis(taus).coefficients(tau)


def archive_landscape(archives: Sequence[Any], get: Callable[[str], Any], space: Any, basis: ExpertBasis,
                      validation: Callable[[TaskVector], Mapping[str, float]]) -> list[dict[str, Any]]:
    """One row per (archive, elite): ``archive`` (its quality skill), ``cell``, ``rank`` (0 =
    the archive's best by quality), ``quality``, ``search`` (scores), ``search_mean``,
    ``validation_mean``, ``coef`` (:meth:`ExpertBasis.coefficients`). Each distinct elite id
    is loaded and scored once.

    Args:
        archives: the run's archives (iterating yields ``(cell, Elite)``).
        get: elite id -> genome (the run's model store).
        space: the run's weight space (``task_vector(genome)``).
        validation: task vector -> ``{skill: accuracy}`` on the validation split.
    """
    memo: dict[str, tuple[float, dict]] = {}
    rows = []
    for a in archives:
        ranked = sorted(a, key=lambda ce: -a.quality_of(ce[1].scores))
        for rank, (cell, e) in enumerate(ranked):
            if e.id not in memo:
                tau = space.task_vector(get(e.id))
                v = validation(tau)
                memo[e.id] = (sum(v.values()) / len(v), basis.coefficients(tau))
            vm, coef = memo[e.id]
            rows.append({"archive": a.quality_skill, "id": e.id, "cell": [int(x) for x in cell], "rank": rank,
                         "quality": float(a.quality_of(e.scores)), "search": dict(e.scores),
                         "search_mean": sum(e.scores.values()) / len(e.scores), "validation_mean": vm,
                         "coef": coef})
    return rows


def landscape_summary(rows: Sequence[Mapping[str, Any]], top: int = 5) -> dict[str, Any]:
    """Digest of :func:`archive_landscape`: per archive its size, the best's validation mean
    and coefficient sum, the highest validation mean in it, that elite's quality rank and
    cell, the mean coefficient sum of its elites; overall the ``top`` elites by validation
    mean (distinct ids) with their archive, rank, cell and coefficients, and the range of
    coefficient sums over all elites."""
    out: dict[str, Any] = {"archives": {}}
    for name in dict.fromkeys(r["archive"] for r in rows):
        rs = [r for r in rows if r["archive"] == name]
        best = min(rs, key=lambda r: r["rank"])
        top_v = max(rs, key=lambda r: r["validation_mean"])
        out["archives"][name] = {
            "size": len(rs), "best_id": best["id"], "best_validation_mean": best["validation_mean"],
            "best_coef_sum": best["coef"]["sum"], "max_validation_mean": top_v["validation_mean"],
            "max_validation_id": top_v["id"], "max_validation_rank": top_v["rank"],
            "max_validation_cell": top_v["cell"],
            "mean_coef_sum": sum(r["coef"]["sum"] for r in rs) / len(rs)}
    seen, tops = set(), []
    for r in sorted(rows, key=lambda r: -r["validation_mean"]):
        if r["id"] not in seen:
            seen.add(r["id"])
            tops.append({k: r[k] for k in ("id", "archive", "rank", "cell", "validation_mean", "search_mean")}
                        | {"c": r["coef"]["c"], "coef_sum": r["coef"]["sum"], "residual": r["coef"]["residual"]})
        if len(tops) == top:
            break
    sums = [r["coef"]["sum"] for r in rows]
    out["top_by_validation"] = tops
    out["coef_sum_range"] = [min(sums), max(sums)] if sums else None
    out["n_elites"] = len(seen | {r["id"] for r in rows})
    return out

"""cycleqd.vision.diagnostics: coefficients of task vectors on the experts, and the archive
landscape digest."""

from __future__ import annotations

import math

import pytest
import torch

from cycleqd.ops import CROSSOVERS
from cycleqd.qd.archive import Elite, make_archives
from cycleqd.vision.diagnostics import ExpertBasis, archive_landscape, expert_coefficients, landscape_summary


def _taus(k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"w": torch.randn(6, 5, generator=g), "b": torch.randn(5, generator=g)} for _ in range(k)]


def test_coefficients_recover_a_linear_combination_and_the_residual():
    taus = _taus()
    c = [0.7, -0.2, 1.3]
    tau = {n: sum(ci * t[n] for ci, t in zip(c, taus)) for n in taus[0]}
    r = expert_coefficients(tau, taus)
    assert r["c"] == pytest.approx(c, abs=1e-6) and r["sum"] == pytest.approx(1.8) and r["residual"] < 1e-6
    # a direction orthogonal to the experts' span shows up as residual only
    basis = ExpertBasis(taus)
    v = torch.randn(basis.T.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    v = v - basis.T @ (basis.pinv @ v)
    off = {"w": v[:30].reshape(6, 5).float(), "b": v[30:].float()}
    both = {n: tau[n] + off[n] for n in tau}
    r2 = basis.coefficients(both)
    assert r2["c"] == pytest.approx(c, abs=1e-5)
    assert r2["residual"] == pytest.approx(float(v.norm()) / r2["norm"], rel=1e-4)
    assert math.isnan(basis.coefficients({n: torch.zeros_like(t) for n, t in tau.items()})["residual"])


def test_official_linear_crossover_children_are_convex_and_task_arithmetic_is_k_lambda():
    taus = _taus()
    g = torch.Generator().manual_seed(0)
    child = CROSSOVERS["linear"](sigma=0.3)(taus[:2], generator=g)
    r = expert_coefficients(child, taus)
    assert r["sum"] == pytest.approx(1.0, abs=1e-6) and abs(r["c"][2]) < 1e-6
    ta = CROSSOVERS["task_arithmetic"](weights=1.0, **{"lambda": 0.6})(taus, generator=g)
    assert expert_coefficients(ta, taus)["sum"] == pytest.approx(1.8, abs=1e-6)


def test_names_subset_and_errors():
    taus = _taus()
    only_w = ExpertBasis(taus, ["w"])
    assert only_w.T.shape == (30, 3)
    with pytest.raises(ValueError, match="non-empty subset"):
        ExpertBasis(taus, ["nope"])
    with pytest.raises(ValueError, match="no expert"):
        ExpertBasis([])
    with pytest.raises(ValueError, match="different tensor names"):
        ExpertBasis([taus[0], {"w": taus[1]["w"]}])
    with pytest.raises(ValueError, match="lacks tensor 'b'"):
        ExpertBasis(taus).coefficients({"w": taus[0]["w"]})


class _Space:
    def task_vector(self, g):
        return g


def test_landscape_ranks_cells_and_finds_the_best_validation_elite():
    taus = _taus()
    names = ["a", "b", "c"]
    archives = make_archives(names, {n: (0.0, 1.0) for n in names}, {n: 5 for n in names})
    genomes = {"e0": taus[0], "e1": taus[1], "e2": taus[2],
               "m": {n: (taus[0][n] + taus[1][n] + taus[2][n]) / 3 for n in taus[0]}}
    scores = {"e0": {"a": 0.9, "b": 0.1, "c": 0.1}, "e1": {"a": 0.1, "b": 0.9, "c": 0.1},
              "e2": {"a": 0.1, "b": 0.1, "c": 0.9}, "m": {"a": 0.5, "b": 0.5, "c": 0.5}}
    for i, s in scores.items():
        for a in archives:
            a.add(Elite(id=i, scores=s, generation=0))
    val = {"e0": 0.3, "e1": 0.3, "e2": 0.3, "m": 0.6}
    calls = []

    def validation(t):
        key = next(k for k, g in genomes.items() if g is t)
        calls.append(key)
        return {"a": val[key], "b": val[key], "c": val[key]}

    rows = archive_landscape(archives, genomes.__getitem__, _Space(), ExpertBasis(taus), validation)
    assert sorted(calls) == sorted(genomes)   # each distinct elite scored once
    assert len(rows) == sum(len(a) for a in archives)
    best_a = [r for r in rows if r["archive"] == "a" and r["rank"] == 0]
    assert best_a[0]["id"] == "e0"
    s = landscape_summary(rows, top=2)
    assert s["top_by_validation"][0]["id"] == "m" and s["top_by_validation"][0]["coef_sum"] == pytest.approx(1.0)
    assert s["archives"]["a"]["max_validation_id"] == "m" and s["archives"]["a"]["max_validation_rank"] == 1
    assert s["n_elites"] == 4 and s["coef_sum_range"] == pytest.approx([1.0, 1.0])

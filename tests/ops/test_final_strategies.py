"""Final-model strategies on a problem whose best answer is known: the validation score of a
genome is minus its squared distance to a target task vector built from the archives' bests."""

from __future__ import annotations

import pytest
import torch

from cycleqd.ops import AGGREGATIONS, DenseWeightSpace, aggregate, make_crossover, make_mutation


def _taus(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"a": torch.randn(6, 4, generator=g), "b": torch.randn(4, generator=g)} for _ in range(n)]


@pytest.fixture()
def setup():
    taus = _taus(3)
    base = {k: torch.zeros_like(v) for k, v in taus[0].items()}
    space = DenseWeightSpace(base, taus, make_crossover("linear"), make_mutation("none"))
    return space, taus


def _lin(taus, w):
    return {k: sum(float(x) * t[k] for x, t in zip(w, taus)) for k in taus[0]}


def _scorer(target, calls):
    def score(g):
        calls.append(g)
        d = sum(float((g[k] - target[k]).square().sum()) for k in target)
        return {"s1": -d, "s2": -2 * d}
    return score


def test_mean_and_paper_alias_are_the_equal_weight_mean(setup):
    space, taus = setup
    for m in ("mean", "paper"):
        out = aggregate(space, taus, [0.1, 0.2, 0.3], method=m)
        for k in out:
            torch.testing.assert_close(out[k], _lin(taus, [1 / 3] * 3)[k])
    assert "assumption" in AGGREGATIONS.entry("paper").source and "alias" in AGGREGATIONS.entry("paper").source


def test_quality_weighted(setup):
    space, taus = setup
    out = aggregate(space, taus, [0.5, 0.25, 0.25], method="quality_weighted")
    torch.testing.assert_close(out["a"], _lin(taus, [0.5, 0.25, 0.25])["a"])


def test_task_arithmetic_chooses_the_known_best_lambda(setup):
    space, taus = setup
    calls, report = [], {}
    out = aggregate(space, taus, [1, 1, 1], method="task_arithmetic", lambdas=[0.2, 0.4, 0.6, 0.8],
                    score=_scorer(_lin(taus, [0.6] * 3), calls), report=report)
    torch.testing.assert_close(out["a"], _lin(taus, [0.6] * 3)["a"])
    assert len(calls) == 4 and report["chosen"] == 2 and report["candidates"][2]["lambda"] == 0.6
    assert report["candidates"][2]["validation"]["s1"] == pytest.approx(0.0, abs=1e-8)
    # a fixed lambda needs no validation
    fixed = aggregate(space, taus, [1, 1, 1], method="task_arithmetic", **{"lambda": 0.5})
    torch.testing.assert_close(fixed["b"], _lin(taus, [0.5] * 3)["b"])
    with pytest.raises(ValueError, match="needs 'score'"):
        aggregate(space, taus, [1, 1, 1], method="task_arithmetic")


def test_weight_search_improves_on_the_mean_within_its_budget(setup):
    space, taus = setup
    w_star = [0.9, -0.2, 0.5]                 # unnormalised: sums to 1.2, one negative
    calls, report = [], {}
    score = _scorer(_lin(taus, w_star), calls)
    out = aggregate(space, taus, [1, 1, 1], method="weight_search", budget=60, sigma=0.2, seed=3,
                    score=score, report=report)
    assert len(calls) == 61 and len(report["candidates"]) == 61
    best = report["candidates"][report["chosen"]]
    assert best["validation_mean"] == max(c["validation_mean"] for c in report["candidates"])
    assert best["validation_mean"] > 0.1 * report["candidates"][0]["validation_mean"]   # 10x closer
    torch.testing.assert_close(out["a"], _lin(taus, best["weights"])["a"])
    again = aggregate(space, taus, [1, 1, 1], method="weight_search", budget=60, sigma=0.2, seed=3, score=score)
    torch.testing.assert_close(again["a"], out["a"])   # seeded


def test_best_elite_picks_the_elite_nearest_the_target(setup):
    space, taus = setup
    extra = _taus(4, seed=9)
    elites = [[(taus[0], 0.9), (extra[0], 0.8)], [(taus[1], 0.7), (extra[1], 0.6), (extra[2], 0.1)],
              [(taus[2], 0.5)]]
    calls, report = [], {}
    out = aggregate(space, taus, [0.9, 0.7, 0.5], method="best_elite", top=2, elites=elites,
                    score=_scorer(extra[1], calls), report=report)
    assert out is extra[1] and len(calls) == 5                 # top 2 per archive: 2 + 2 + 1
    assert (report["candidates"][report["chosen"]]["archive"], report["candidates"][report["chosen"]]["rank"]) == (1, 1)
    assert all(g is not extra[2] for g in calls)               # rank 2 is outside top=2


def test_ties_keep_the_first_candidate(setup):
    space, taus = setup
    report = {}
    aggregate(space, taus, [1, 1, 1], method="task_arithmetic", lambdas=[0.3, 0.7],
              score=lambda g: {"s": 1.0}, report=report)
    assert report["chosen"] == 0


def test_bad_strategy_parameters():
    for name, params, match in [("task_arithmetic", {"lambdas": []}, "lambdas"),
                                ("weight_search", {"budget": -1}, "budget"),
                                ("weight_search", {"sigma": 0}, "sigma"),
                                ("best_elite", {"top": 0}, "top")]:
        with pytest.raises(ValueError, match=match):
            AGGREGATIONS.build(name, params)

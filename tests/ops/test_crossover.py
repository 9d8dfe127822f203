"""Crossover operators: semantics, determinism, and clear errors for bad input."""

from __future__ import annotations

import pytest
import torch

from cycleqd.ops import CROSSOVERS, make_crossover
from cycleqd.ops.crossover import linear_merge_weights, magnitude_prune, slerp_tensor


def _taus(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"w": torch.randn(6, 5, generator=g), "b": torch.randn(5, generator=g)} for _ in range(n)]


def test_registry_has_all_operators():
    assert {"linear", "task_arithmetic", "ties", "dare", "dare_ties", "slerp"} <= set(CROSSOVERS)


def test_linear_is_normalised_weighted_mean_and_seeded():
    taus = _taus(2)
    op = make_crossover({"name": "linear", "sigma": 0.01})
    a = op(taus, generator=torch.Generator().manual_seed(1))
    b = op(taus, generator=torch.Generator().manual_seed(1))
    c = op(taus, generator=torch.Generator().manual_seed(2))
    w = linear_merge_weights(2, mu=0.0, sigma=0.01, generator=torch.Generator().manual_seed(1))
    assert abs(sum(w) - 1) < 1e-12 and all(0.45 < x < 0.55 for x in w)
    torch.testing.assert_close(a["w"], w[0] * taus[0]["w"] + w[1] * taus[1]["w"])
    assert torch.equal(a["w"], b["w"]) and not torch.equal(a["w"], c["w"])


def test_linear_sigma_zero_is_plain_mean():
    taus = _taus(3)
    out = make_crossover({"name": "linear", "sigma": 0.0})(
        taus, generator=torch.Generator())
    torch.testing.assert_close(out["b"], sum(t["b"] for t in taus) / 3)


def test_task_arithmetic_formula():
    taus = _taus(2)
    out = make_crossover({"name": "task_arithmetic", "weights": [0.3, 2.0], "lambda": 0.5})(
        taus, generator=torch.Generator())
    torch.testing.assert_close(out["w"], 0.5 * (0.3 * taus[0]["w"] + 2.0 * taus[1]["w"]))


def test_magnitude_prune_keeps_topk():
    x = torch.tensor([0.1, -5.0, 0.3, 2.0, -0.2])
    assert torch.equal(magnitude_prune(x, 0.4), torch.tensor([0.0, -5.0, 0.0, 2.0, 0.0]))
    assert magnitude_prune(x, 0.0).abs().sum() == 0 and torch.equal(magnitude_prune(x, 1.0), x)


def test_ties_sign_election_drops_disagreeing_entries():
    taus = [{"x": torch.tensor([1.0, 1.0, -3.0])}, {"x": torch.tensor([2.0, -0.5, 1.0])}]
    out = make_crossover({"name": "ties", "density": 1.0})(taus, generator=torch.Generator())
    # elected signs: +, + (1 - 0.5 > 0), - ; disjoint mean over agreeing parents
    torch.testing.assert_close(out["x"], torch.tensor([1.5, 1.0, -3.0]))


def test_dare_inverse_density_rescale_and_determinism():
    taus = [{"x": torch.ones(2000)}]
    op = make_crossover({"name": "dare", "density": 0.25, "rescale": "inverse_density"})
    a = op(taus, generator=torch.Generator().manual_seed(0))["x"]
    b = op(taus, generator=torch.Generator().manual_seed(0))["x"]
    assert torch.equal(a, b)
    assert set(a.unique().tolist()) <= {0.0, 4.0}
    assert 0.2 < float((a > 0).float().mean()) < 0.3
    l1 = make_crossover({"name": "dare", "density": 0.25})(taus, generator=torch.Generator().manual_seed(0))["x"]
    torch.testing.assert_close(l1.abs().sum(), torch.tensor(2000.0))  # mergekit: L1 norm preserved


def test_slerp_endpoints_and_norm():
    a, b = torch.randn(4, 8), torch.randn(4, 8)
    torch.testing.assert_close(slerp_tensor(0.0, a, b), a)
    torch.testing.assert_close(slerp_tensor(1.0, a, b), b)
    u, v = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    mid = slerp_tensor(0.5, u, v)
    torch.testing.assert_close(mid, torch.tensor([2 ** -0.5, 2 ** -0.5]))  # stays on the circle
    row = slerp_tensor(0.5, torch.stack([u, u]), torch.stack([v, u]), granularity="row")
    torch.testing.assert_close(row[1], u)


def test_slerp_in_weight_space_uses_base():
    base = {"x": torch.tensor([1.0, 0.0])}
    taus = [{"x": torch.tensor([0.0, 0.0])}, {"x": torch.tensor([-1.0, 1.0])}]
    out = make_crossover({"name": "slerp", "t": 0.5}, base=base)(taus, generator=torch.Generator())
    torch.testing.assert_close(base["x"] + out["x"], torch.tensor([2 ** -0.5, 2 ** -0.5]))


@pytest.mark.parametrize("spec,match", [
    ({"name": "nope"}, "crossover.name"),
    ({"name": "ties", "density": 1.5}, "density"),
    ({"name": "dare", "rescale": "l7"}, "rescale"),
    ({"name": "slerp", "t": 2.0}, "slerp.t"),
    ({"name": "linear", "bogus": 1}, "crossover.bogus: 'linear' takes no argument 'bogus'"),
    ({"name": "task_arithmetic", "weights": [1.0, 2.0]}, "weights"),
])
def test_bad_parameters_raise_valueerror(spec, match):
    with pytest.raises(ValueError, match=match):
        op = make_crossover(spec, base={"w": torch.zeros(6, 5), "b": torch.zeros(5)})
        op(_taus(3), generator=torch.Generator())


def test_mismatched_parents_are_named():
    t = _taus(2)
    t[1]["w"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="'w'"):
        make_crossover("linear")(t, generator=torch.Generator())
    with pytest.raises(ValueError, match="exactly 2"):
        make_crossover({"name": "slerp", "space": "task_vector"})(_taus(3), generator=torch.Generator())
    with pytest.raises(ValueError, match="base weights"):
        make_crossover({"name": "slerp"})

"""Per-call operator settings (``ops.base.with_params``), used by the CMA-ES policy."""

import pytest
import torch

from cycleqd.ops.base import with_params
from cycleqd.ops.crossover import LinearCrossover
from cycleqd.ops.mutation import SVDSelfMutation


def _tv(seed):
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(6, 4, generator=g), "b": torch.randn(4, generator=g)}


def test_overrides_equal_an_operator_built_with_those_settings():
    parents = [_tv(0), _tv(1)]
    op = LinearCrossover(mu=0.0, sigma=0.01)
    got = with_params(op, {"mu": 0.3, "sigma": -0.2})(parents, generator=torch.Generator().manual_seed(5))
    want = LinearCrossover(mu=0.3, sigma=0.2)(parents, generator=torch.Generator().manual_seed(5))
    assert all(torch.equal(got[k], want[k]) for k in want)   # |sigma|, as the official merge
    assert (op.mu, op.sigma) == (0.0, 0.01) and with_params(op, None) is op
    mut = SVDSelfMutation(rate=0.1)
    neg = with_params(mut, {"rate": -0.05})(parents[0], skill=0, generator=torch.Generator().manual_seed(1))
    pos = SVDSelfMutation(rate=0.05)(parents[0], skill=0, generator=torch.Generator().manual_seed(1))
    delta_neg, delta_pos = neg["w"] - parents[0]["w"], pos["w"] - parents[0]["w"]
    assert torch.allclose(delta_neg, -delta_pos, atol=1e-6) and delta_pos.abs().sum() > 0
    with pytest.raises(ValueError, match="no setting 'rate'"):
        with_params(op, {"rate": 0.1})

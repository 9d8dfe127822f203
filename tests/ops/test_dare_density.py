"""Issue 18 item 9a: DARE with a tiny density (1e-8) rescaled the kept fp16 entries by ~1e8
and produced inf. mergekit's ``sparsify.bernoulli`` keeps each entry with probability
``density`` and rescales (1/density, or to the unpruned norm) in the tensor's own dtype
(fp32 on CPU for fp16 inputs) and casts back -- so a 1e8 factor overflows fp16/bf16.
Here the density has a floor (1e-3, checked when the operator is built, i.e. at
``cycleqd validate``), the rescale is computed in fp32, and a non-finite result names the
tensor instead of entering a child."""

from __future__ import annotations

import pytest
import torch

from cycleqd.ops.crossover import MIN_DARE_DENSITY, Dare, make_crossover


@pytest.mark.parametrize("name", ["dare", "dare_ties"])
@pytest.mark.parametrize("density", [1e-8, [0.5, 1e-8], 0.0])
def test_tiny_density_is_refused_when_the_operator_is_built(name, density):
    with pytest.raises(ValueError, match=r"density=.*(below the minimum 0.001|must be)"):
        make_crossover({"name": name, "density": density})


def test_tiny_density_used_to_overflow_fp16():
    """What the floor prevents: the 1/density rescale of an fp16 delta at density 1e-8."""
    tau = torch.full((4096,), 1e-3, dtype=torch.float16)
    assert torch.isinf((tau.float() / 1e-8).to(torch.float16)).all()
    # at the floor the same delta stays finite in fp16
    assert torch.isfinite((tau.float() / MIN_DARE_DENSITY).to(torch.float16)).all()


def test_minimum_density_merges_finite_in_fp32_and_is_deterministic():
    g = torch.Generator().manual_seed(0)
    taus = [torch.randn(64, 64, generator=g, dtype=torch.float16) * 0.01 for _ in range(2)]
    for rescale in ("l1", "inverse_density"):
        op = make_crossover({"name": "dare", "density": MIN_DARE_DENSITY, "rescale": rescale})
        a = op([{"w": taus[0]}, {"w": taus[1]}], generator=torch.Generator().manual_seed(1))
        b = op([{"w": taus[0]}, {"w": taus[1]}], generator=torch.Generator().manual_seed(1))
        assert a["w"].dtype == torch.float32 and torch.isfinite(a["w"]).all()
        assert torch.equal(a["w"], b["w"])


def test_non_finite_rescaled_delta_names_the_tensor():
    op = Dare(density=0.01, rescale="inverse_density")
    tau = torch.full((100,), 1e37)
    with pytest.raises(ValueError, match=r"dare: tensor 'model.x' of parent 0 is not finite after dropping"):
        for _ in range(20):  # some entry is kept with overwhelming probability
            op.drop("model.x", 0, tau, 0.01, torch.Generator().manual_seed(0))

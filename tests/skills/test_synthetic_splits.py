"""Synthetic skill splits: search is the unperturbed target; validation and test are fixed,
distinct perturbations of it (the synthetic stand-in for disjoint held-out samples)."""

import pytest
import torch

from cycleqd.skills.synthetic import SyntheticSkill


def _skill(split, **kw):
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(6, 4, generator=g), "b": torch.randn(4, generator=g)}
    target = {k: v + torch.randn(v.shape, generator=g) for k, v in base.items()}
    return SyntheticSkill("s", base, target, split=split, **kw), base


def test_split_targets_distinct_fixed_and_search_unchanged():
    sk = {s: _skill(s)[0] for s in ("search", "validation", "test")}
    plain, base = _skill("search")
    for k in base:
        assert torch.equal(sk["search"].target[k], plain.target[k])
        assert not torch.allclose(sk["validation"].target[k], sk["test"].target[k])
        assert not torch.allclose(sk["validation"].target[k], sk["search"].target[k])
        assert torch.equal(_skill("validation")[0].target[k], sk["validation"].target[k])
        rel = float((sk["test"].target[k] - plain.target[k]).norm() / plain.target[k].norm())
        assert rel == pytest.approx(0.1, rel=1e-4)
    # the search optimum scores 1 on search only
    best = {k: base[k] + sk["search"].target[k] for k in base}
    assert sk["search"].evaluate(best).quality == pytest.approx(1.0)
    assert sk["validation"].evaluate(best).quality < 1.0


def test_bad_split_arguments():
    with pytest.raises(ValueError, match="split must be one of"):
        _skill("train")
    with pytest.raises(ValueError, match="split_noise"):
        _skill("test", split_noise=-1)

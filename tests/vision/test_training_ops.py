"""Recipe hash cache, training, and the vision pipeline's operator choices."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from cycleqd.ops import MUTATIONS
from cycleqd.qd.archive import MEAN_QUALITY, BCAxis, Elite, GridArchive
from cycleqd.qd.scheduler import CycleQDScheduler
from cycleqd.vision.pipeline import (
    bc_ranges,
    gaussian_std_matched,
    make_mutation,
)
from cycleqd.vision.training import VisionRecipe, get_models

TINY = dict(channels=4, hidden=8, base_steps=20, expert_steps=5)


def test_recipe_validation_and_hash():
    r = VisionRecipe.toy()
    assert r.hash() == VisionRecipe.toy().hash()
    assert r.hash() != dataclasses.replace(r, noise_std=0.3).hash()
    assert r.multidomain_steps == 3 * r.expert_steps
    with pytest.raises(ValueError, match="domains"):
        VisionRecipe(domains=("rotated",))
    with pytest.raises(ValueError, match="domains"):
        VisionRecipe(domains=("rotated", "clean"))
    with pytest.raises(ValueError, match="base_lr"):
        VisionRecipe(base_lr=0.0)
    with pytest.raises(ValueError, match="expert_steps"):
        VisionRecipe(expert_steps=0)


def test_models_are_trained_once_then_loaded_from_the_cache(tmp_path):
    r = VisionRecipe.toy(**TINY)
    first = get_models(r, cache_root=tmp_path)
    assert not first.log["cache_hit"]
    assert first.path == tmp_path / "vision" / r.hash()
    for name in ["base", "multidomain"] + [f"expert_{d}" for d in r.domains]:
        assert first.file(name).is_file()
    second = get_models(r, cache_root=tmp_path)
    assert second.log["cache_hit"]
    for d in r.domains:
        for k, v in first.experts[d].items():
            assert torch.equal(v, second.experts[d][k])
    # experts moved away from the base; the multi-domain model too
    assert any(not torch.equal(first.base[k], first.experts[d][k]) for d in r.domains for k in first.base)
    assert not torch.equal(first.base["fc2.weight"], first.multidomain["fc2.weight"])
    # deterministic training: retraining gives the same weights
    third = get_models(r, cache_root=tmp_path, retrain=True)
    assert not third.log["cache_hit"]
    assert torch.equal(third.base["fc1.weight"], first.base["fc1.weight"])


def _taus():
    g = torch.Generator().manual_seed(0)
    return [{"fc.weight": torch.randn(20, 30, generator=g) * s, "fc.bias": torch.randn(20, generator=g)}
            for s in (0.5, 1.0, 2.0)]


def test_gaussian_std_matches_the_svd_mutation_energy():
    taus = _taus()
    std = gaussian_std_matched(taus, rate=0.1)
    svd = MUTATIONS["svd_expert"](experts=taus, rate=0.1)
    zero = {k: torch.zeros_like(v) for k, v in taus[0].items()}
    g = torch.Generator().manual_seed(1)
    energy = [float(svd(zero, skill=q, generator=g)["fc.weight"].pow(2).mean())
              for _ in range(300) for q in range(3)]
    assert (sum(energy) / len(energy)) ** 0.5 == pytest.approx(std, rel=0.1)
    op, kw = make_mutation("gaussian", taus)
    assert kw == {"std": pytest.approx(std), "matrices_only": True}
    out = op(zero, skill=0, generator=torch.Generator().manual_seed(2))
    assert torch.equal(out["fc.bias"], zero["fc.bias"])  # only matrices, as the SVD mutation
    assert float(out["fc.weight"].std()) == pytest.approx(std, rel=0.15)


def test_single_mode_rotates_the_svd_basis_per_child():
    taus = _taus()
    op, _ = make_mutation("svd_expert", taus)
    zero = {k: torch.zeros_like(v) for k, v in taus[0].items()}
    # single-archive mode: one archive (index 0), the basis comes from the scheduler's ask
    arch = GridArchive(MEAN_QUALITY, tuple(BCAxis(s, 0.0, 1.0, 3) for s in "xyz"))
    sched = CycleQDScheduler([arch], seed=0, num_skills=len(taus))
    sched.tell_seed(Elite("e0", {"x": 0.2, "y": 0.5, "z": 0.9}))
    sched.tell_seed(Elite("e1", {"x": 0.9, "y": 0.2, "z": 0.4}))
    # the perturbation lies in the row space of the basis expert; different children
    # must use different experts although the archive index is always 0
    spaces = set()
    for seed in range(1, 13):
        ask = sched.ask(seed)
        sched.tell(seed, None)
        assert ask.skill == 0
        d = op(zero, skill=ask.basis, generator=torch.Generator().manual_seed(seed))["fc.weight"]
        for q, t in enumerate(taus):
            proj = torch.linalg.lstsq(t["fc.weight"].T, d.T).residuals
            if float(proj.sum()) < 1e-6 * float(d.pow(2).sum()) + 1e-8:
                spaces.add(q)
    assert spaces == {0, 1, 2}   # (g // flip_interval) mod K: every expert's basis in turn
    with pytest.raises(ValueError, match="mutation must be one of"):
        make_mutation("cauchy", taus)


def test_bc_ranges_cover_the_seed_models():
    seeds = [{"a": 0.42, "b": 0.9}, {"a": 0.95, "b": 0.31}]
    r = bc_ranges(seeds, ["a", "b"])
    assert r["a"] == pytest.approx((0.40, 1.0)) and r["b"] == pytest.approx((0.30, 1.0))

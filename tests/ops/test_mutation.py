"""Mutation operators: the official SVD mutation, its disk cache, the paper-text variant,
Gaussian noise."""

from __future__ import annotations

import pytest
import torch

import cycleqd.ops.mutation as mutation_mod
from cycleqd.ops import MUTATIONS, make_mutation
from cycleqd.ops.mutation import svd_matrix


def test_registry():
    assert {"svd_expert", "svd_self", "gaussian", "none"} <= set(MUTATIONS)


def test_svd_expert_adds_expert_basis_perturbation(tiny_tensors):
    taus = tiny_tensors["taus"]
    mut = make_mutation({"name": "svd_expert", "rate": 0.1}, experts=taus)
    child = {k: v.clone() for k, v in taus[0].items()}
    out = mut(child, skill=1, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    for k, v in child.items():
        if v.ndim == 2 and "norm" not in k:  # embeddings and lm_head included (official)
            U, S, Vh = svd_matrix(taus[1][k])
            r = torch.rand(S.shape, generator=g) * 0.1
            torch.testing.assert_close(out[k], v + U @ torch.diag(S * r) @ Vh, atol=1e-6, rtol=1e-5)
        else:
            assert torch.equal(out[k], v)  # 1-D / norms untouched
    assert torch.equal(child[next(iter(child))], taus[0][next(iter(child))])  # input not modified


def test_svd_rank_truncation_and_selection(tiny_tensors):
    taus = tiny_tensors["taus"]
    mut = make_mutation({"name": "svd_expert", "rank": 4, "exclude": ["embed_tokens", "lm_head"],
                         "include": [r"self_attn\.", r"mlp\."], "svd_tol": 0}, experts=taus)
    basis = mut.basis(0)
    assert basis and all(S.numel() == 4 and U.shape[1] == 4 and Vh.shape[0] == 4 for U, S, Vh in basis.values())
    assert not any("embed" in k or "lm_head" in k or "norm" in k for k in basis)
    with pytest.raises(ValueError, match="rank"):
        make_mutation({"name": "svd_expert", "rank": 0}, experts=taus)
    with pytest.raises(ValueError, match="out of range"):
        mut.basis(7)


def test_svd_cache_is_computed_once_and_reused(tiny_tensors, tmp_path, monkeypatch):
    taus = tiny_tensors["taus"]
    calls = []
    real = mutation_mod.svd_of
    monkeypatch.setattr(mutation_mod, "svd_of", lambda *a, **k: calls.append(1) or real(*a, **k))
    m1 = make_mutation("svd_expert", experts=taus, cache_dir=tmp_path, fingerprints=["e0", "e1", "e2"])
    b1 = m1.basis(2)
    assert len(calls) == 1 and len(list(tmp_path.glob("e2-full-*.safetensors"))) == 1
    m2 = make_mutation("svd_expert", experts=taus, cache_dir=tmp_path, fingerprints=["e0", "e1", "e2"])
    b2 = m2.basis(2)
    assert len(calls) == 1  # loaded from disk, not recomputed
    for k in b1:
        assert all(torch.equal(x, y) for x, y in zip(b1[k], b2[k]))
    # without a fingerprint the cache key is a content hash, still shared
    m3 = make_mutation("svd_expert", experts=taus, cache_dir=tmp_path / "h")
    m3.basis(0)
    m4 = make_mutation("svd_expert", experts=taus, cache_dir=tmp_path / "h")
    m4.basis(0)
    assert len(calls) == 2


def test_svd_self_rescales_own_singular_values():
    g = torch.Generator().manual_seed(0)
    child = {"m": torch.randn(7, 5, generator=g), "norm.weight": torch.ones(5)}
    out = make_mutation({"name": "svd_self", "rate": 0.2})(child, skill=0, generator=torch.Generator().manual_seed(3))
    U, S, Vh = svd_matrix(child["m"])
    r = torch.rand(S.shape, generator=torch.Generator().manual_seed(3)) * 0.2
    torch.testing.assert_close(out["m"], U @ torch.diag(S * (1 + r)) @ Vh, atol=1e-5, rtol=1e-5)
    assert torch.equal(out["norm.weight"], child["norm.weight"])


def test_gaussian_official_default_touches_every_tensor():
    child = {"m": torch.zeros(300, 300), "norm.weight": torch.zeros(300)}
    out = make_mutation("gaussian")(child, skill=0, generator=torch.Generator().manual_seed(0))
    assert abs(float(out["m"].std()) - 0.0003) < 2e-5 and float(out["norm.weight"].abs().sum()) > 0
    only = make_mutation({"name": "gaussian", "std": 0.01, "matrices_only": True})(
        child, skill=0, generator=torch.Generator().manual_seed(0))
    assert float(only["norm.weight"].abs().sum()) == 0


def test_none_and_bad_names():
    c = {"m": torch.ones(2, 2)}
    assert make_mutation("none")(c, skill=0, generator=torch.Generator()) is c
    with pytest.raises(ValueError, match="mutation.name"):
        make_mutation("svd")
    with pytest.raises(ValueError, match="rate"):
        make_mutation({"name": "svd_expert", "rate": -1})


def test_numerically_zero_directions_are_skipped_without_changing_the_result(tiny_tensors):
    """The experts are rank-3 deltas: with the default tolerance only 3 directions per matrix
    are multiplied, the random stream is unchanged and the result equals the full-rank one."""
    taus = tiny_tensors["taus"]
    fast = make_mutation("svd_expert", experts=taus)
    full = make_mutation({"name": "svd_expert", "svd_tol": 0}, experts=taus)
    assert all(S.numel() == 3 for _, S, _ in fast.basis(0).values())
    assert all(S.numel() == min(U.shape[0], Vh.shape[1]) for U, S, Vh in full.basis(0).values())
    a = fast(taus[1], skill=0, generator=torch.Generator().manual_seed(5))
    b = full(taus[1], skill=0, generator=torch.Generator().manual_seed(5))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6
    with pytest.raises(ValueError, match="svd_tol"):
        make_mutation({"name": "svd_expert", "svd_tol": -1})

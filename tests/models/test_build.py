"""build_weight_space: validation order, genome choice, mixed expert formats, lazy mode."""

from __future__ import annotations

import pytest
import torch

import cycleqd.models.build as build_mod
from cycleqd.models.build import build_weight_space
from cycleqd.models.sources import ModelLoadError
from cycleqd.ops import DenseWeightSpace, SVDGenomeWeightSpace, WeightSpace

LIN = {"name": "linear", "sigma": 0.01}
SVD = {"name": "svd_expert", "rate": 0.1}


def test_auto_picks_svd_genomes_and_reports_info(llama, lora_dir, cache):
    space, info = build_weight_space(str(llama["base"]), [str(llama["experts"][0]), str(lora_dir)],
                                     LIN, SVD, "auto", cache)
    assert isinstance(space, SVDGenomeWeightSpace) and isinstance(space, WeightSpace)
    assert info.genome == "svd" and info.model_dir == llama["base"] and info.has_tokenizer
    assert info.expert_kinds == ["hf_dir", "lora"] and info.dtype == torch.float32
    assert info.n_params == sum(t.numel() for t in space.base.values())
    g = torch.Generator().manual_seed(0)
    e = space.expert_genomes()
    child = space.mutate(space.crossover(e, g), 1, g)
    w = space.materialize(child)
    assert set(w) == set(space.base) and all(w[k].dtype == space.base[k].dtype for k in w)
    assert list((cache / "svd").glob("*.safetensors"))  # expert SVD cached on disk


def test_dense_for_nonlinear_operators_and_forced_svd_rejected_early(llama, cache, monkeypatch):
    space, info = build_weight_space(str(llama["base"]), [str(p) for p in llama["experts"]],
                                     {"name": "ties", "density": 0.5}, SVD, "auto", cache)
    assert isinstance(space, DenseWeightSpace) and info.genome == "dense"
    monkeypatch.setattr(build_mod, "load_model", lambda *a, **k: pytest.fail("loaded before validating"))
    with pytest.raises(ValueError, match="genome='svd' needs"):
        build_weight_space(str(llama["base"]), [str(llama["experts"][0])], {"name": "ties"}, SVD, "svd", cache)
    with pytest.raises(ValueError, match="crossover.name"):
        build_weight_space(str(llama["base"]), [str(llama["experts"][0])], {"name": "lerp"}, SVD, "auto", cache)
    with pytest.raises(FileNotFoundError):
        build_weight_space(str(llama["base"]), ["/no/such/expert"], LIN, SVD, "auto", cache)


def test_lazy_mode_equals_resident(llama, cache):
    kw = dict(crossover=LIN, mutation=SVD, genome="svd", cache_dir=cache)
    experts = [str(p) for p in llama["experts"]]
    lazy, i1 = build_weight_space(str(llama["base"]), experts, resident_models=False, **kw)
    res, i2 = build_weight_space(str(llama["base"]), experts, resident_models=True, **kw)
    assert not i1.resident and i2.resident and not isinstance(lazy.base, dict)
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    c1 = lazy.mutate(lazy.crossover(lazy.expert_genomes(), g1), 0, g1)
    c2 = res.mutate(res.crossover(res.expert_genomes(), g2), 0, g2)
    w1, w2 = lazy.materialize(c1), res.materialize(c2)
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


def test_mismatched_expert_fails_before_any_arithmetic(tmp_path, llama, cache):
    from cycleqd.models.tiny import make_tiny_llama

    other = make_tiny_llama(tmp_path / "o", seed=0, hidden_size=48, num_layers=2, vocab_size=320)
    with pytest.raises(ModelLoadError, match=r"expert 1 .*hidden_size = 48"):
        build_weight_space(str(llama["base"]), [str(llama["experts"][0]), str(other)], LIN, SVD, "auto", cache)
    with pytest.raises(ValueError, match="at least one expert"):
        build_weight_space(str(llama["base"]), [], LIN, SVD, "auto", cache)

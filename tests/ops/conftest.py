"""Tiny random-init models shared by the operator tests (built once per session)."""

from __future__ import annotations


import pytest
import torch


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict:
    """A tiny Llama base (hidden 32, 2 layers, vocab 320, untied) and three LoRA-like experts."""
    from cycleqd.models.tiny import make_tiny_expert, make_tiny_llama

    root = tmp_path_factory.mktemp("ops-models")
    base = make_tiny_llama(root / "base", seed=0, hidden_size=32, num_layers=2, vocab_size=320)
    experts = [make_tiny_expert(base, root / f"expert{i}", seed=10 + i, rank=3, scale=0.05)
               for i in range(3)]
    return {"base": base, "experts": experts, "root": root}


@pytest.fixture(scope="session")
def tiny_tensors(tiny_dirs) -> dict:
    """Resident base weights and fp32 expert task vectors (checkpoint names, base order)."""
    from cycleqd.models.lazy import resident
    from cycleqd.models.loading import load_expert, load_model

    cache = tiny_dirs["root"] / "cache"
    base = load_model(tiny_dirs["base"], cache_dir=cache)
    taus = [resident(load_expert(e, base, cache_dir=cache).task_vector) for e in tiny_dirs["experts"]]
    return {"base": resident(base.state), "taus": taus}


@pytest.fixture()
def mad():
    """max |a - b| over all tensors of two name -> tensor dicts with the same names."""

    def f(a: dict, b: dict) -> float:
        assert set(a) == set(b), sorted(set(a) ^ set(b))[:3]
        return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)

    return f


@pytest.fixture()
def gen():
    return lambda seed=0: torch.Generator().manual_seed(seed)

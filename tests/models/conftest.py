"""Tiny random-init HF models for the model-layer tests (built once per session)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def mroot(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def llama(mroot) -> dict:
    """Untied tiny Llama base (vocab 320) + two low-rank experts, as HF folders."""
    from cycleqd.models.tiny import make_tiny_expert, make_tiny_llama

    base = make_tiny_llama(mroot / "llama", seed=0, hidden_size=32, num_layers=2, vocab_size=320)
    experts = [make_tiny_expert(base, mroot / f"llama-e{i}", seed=20 + i, rank=2) for i in range(2)]
    return {"base": base, "experts": experts}


@pytest.fixture(scope="session")
def qwen(mroot) -> dict:
    """Tied tiny Qwen2 base (q/k/v biases) + one expert."""
    from cycleqd.models.tiny import make_tiny_expert, make_tiny_qwen2

    base = make_tiny_qwen2(mroot / "qwen", seed=1, hidden_size=32, num_layers=2, vocab_size=320)
    return {"base": base, "experts": [make_tiny_expert(base, mroot / "qwen-e0", seed=30)]}


@pytest.fixture(scope="session")
def lora_dir(mroot, llama):
    """A peft LoRA adapter (q/v/down + embedding LoRA, lm_head in modules_to_save) on the
    tiny Llama, with non-zero B so the delta is not zero."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        m = AutoModelForCausalLM.from_pretrained(str(llama["base"]))
        pm = get_peft_model(m, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                          target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
                                          modules_to_save=["lm_head"]))
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "modules_to_save" in n:
                    p.add_(0.01)
        out = mroot / "lora"
        pm.save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def cache(mroot):
    return mroot / "cache"

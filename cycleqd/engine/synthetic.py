"""Tiny synthetic base + experts for the example config and tests.

The base is a random-init Hugging Face causal LM (Llama or Qwen2 architecture, no
tokenizer needed by the synthetic skills); expert k = base + a random rank-r update
``A_k B_k`` on every weight matrix (like a merged LoRA), scaled to ``expert_scale``
times the matrix's RMS. Written as HF folders so the normal loading path is exercised.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

import torch

from cycleqd.config import SyntheticModelConfig


def _hf_config(cfg: SyntheticModelConfig):
    from transformers import LlamaConfig, Qwen2Config

    kw = dict(hidden_size=cfg.hidden_size, intermediate_size=cfg.hidden_size * 2,
              num_hidden_layers=cfg.num_layers, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=256, max_position_embeddings=128, tie_word_embeddings=False)
    return (LlamaConfig if cfg.arch == "llama" else Qwen2Config)(**kw)


def build_synthetic_models(cfg: SyntheticModelConfig, skills: Sequence[str], cache_dir: Path) -> tuple[Path, dict[str, Path]]:
    """Create (or reuse, keyed by a hash of the recipe) the base and one expert per skill.

    Returns:
        (base folder, skill -> expert folder)
    """
    from transformers import AutoModelForCausalLM

    key = hashlib.sha256(json.dumps([cfg.model_dump(), list(skills)], sort_keys=True).encode()).hexdigest()[:12]
    root = Path(cache_dir) / "synthetic" / key
    base_dir = root / "base"
    experts = {s: root / f"expert-{s}" for s in skills}
    if all((p / "config.json").exists() for p in [base_dir, *experts.values()]):
        return base_dir, experts
    torch.manual_seed(cfg.seed)
    base = AutoModelForCausalLM.from_config(_hf_config(cfg))
    base.save_pretrained(base_dir)
    sd = {k: v.detach().clone() for k, v in base.state_dict().items()}
    for i, (skill, path) in enumerate(experts.items()):
        g = torch.Generator().manual_seed(cfg.seed * 1000 + i + 1)
        new = {}
        for k, w in sd.items():
            if w.ndim == 2:
                a = torch.randn(w.shape[0], cfg.expert_rank, generator=g)
                b = torch.randn(cfg.expert_rank, w.shape[1], generator=g)
                delta = a @ b
                delta *= cfg.expert_scale * w.float().pow(2).mean().sqrt() / delta.pow(2).mean().sqrt()
                new[k] = (w.float() + delta).to(w.dtype)
            else:
                new[k] = w
        base.load_state_dict(new)
        base.save_pretrained(path)
        base.load_state_dict(sd)
    return base_dir, experts

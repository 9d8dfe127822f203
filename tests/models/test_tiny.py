"""The tiny random-init model factories used across the test suite."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cycleqd.models.tiny import make_tiny_llama


def test_tiny_llama_is_deterministic_and_loads(tmp_path, llama):
    again = make_tiny_llama(tmp_path / "again", seed=0, hidden_size=32, num_layers=2, vocab_size=320)
    assert (again / "model.safetensors").read_bytes() == (llama["base"] / "model.safetensors").read_bytes()
    other = make_tiny_llama(tmp_path / "other", seed=1, hidden_size=32, num_layers=2, vocab_size=320)
    assert (other / "model.safetensors").read_bytes() != (llama["base"] / "model.safetensors").read_bytes()
    m = AutoModelForCausalLM.from_pretrained(str(llama["base"]))
    tok = AutoTokenizer.from_pretrained(str(llama["base"]))
    assert m.config.vocab_size == 320 and len(tok) <= 320
    text = "SELECT name FROM t WHERE id = 3; def f(x): return x"
    assert tok.decode(tok(text).input_ids) == text  # byte-level BPE round trip
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    out = m.generate(**ids, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 3


def test_tiny_qwen_is_tied_with_biases(qwen):
    m = AutoModelForCausalLM.from_pretrained(str(qwen["base"]))
    assert m.config.tie_word_embeddings and m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()
    assert m.model.layers[0].self_attn.q_proj.bias is not None


def test_global_rng_untouched(tmp_path):
    torch.manual_seed(123)
    a = torch.rand(1)
    torch.manual_seed(123)
    make_tiny_llama(tmp_path / "x", seed=5, hidden_size=16, num_layers=1, vocab_size=300)
    assert torch.equal(torch.rand(1), a)

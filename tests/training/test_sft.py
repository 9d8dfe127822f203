"""LoRA SFT on a tiny random-init model: label masking, learning, adapter format, caching."""

from __future__ import annotations

import json

import pytest
import torch

from cycleqd.models.tiny import make_tiny_llama
from cycleqd.training.sft import (ALL_LINEAR, IGNORE, LoraRecipe, _collate, assistant_spans, causal_lm_loss,
                                  cpu_bf16_native, encode_conversation, train_lora)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "base", seed=0, hidden_size=32,
                           num_layers=2, vocab_size=512)


@pytest.fixture(scope="module")
def tok(tiny):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(tiny))


CONV = [{"role": "system", "content": "You are terse."},
        {"role": "user", "content": "List files."},
        {"role": "assistant", "content": "Act: bash\n```bash\nls\n```"},
        {"role": "user", "content": "The output of the OS:\na.txt"},
        {"role": "assistant", "content": "Act: answer(a.txt)"}]


def test_loss_only_on_assistant_turns(tok):
    text, spans = assistant_spans(tok, CONV)
    assert [text[a:b] for a, b in spans] == ["Act: bash\n```bash\nls\n```<|im_end|>",
                                             "Act: answer(a.txt)<|im_end|>"]
    ids, labels = encode_conversation(tok, CONV, 4096)
    kept = tok.decode([i for i, l in zip(ids, labels) if l != IGNORE])
    assert kept == "Act: bash\n```bash\nls\n```<|im_end|>Act: answer(a.txt)<|im_end|>"
    assert all(l in (IGNORE, i) for i, l in zip(ids, labels))


def test_truncation_and_bad_conversations(tok):
    ids, labels = encode_conversation(tok, CONV, 4096)
    # cut inside the first user turn: no assistant token survives
    assert encode_conversation(tok, CONV, 10) is None
    with pytest.raises(ValueError, match="no assistant turn"):
        assistant_spans(tok, CONV[:2])
    with pytest.raises(ValueError, match="unknown role"):
        assistant_spans(tok, [{"role": "tool", "content": "x"}, CONV[2]])


def test_recipe_validation():
    with pytest.raises(ValueError, match="LoraRecipe.steps"):
        LoraRecipe(steps=0)
    with pytest.raises(ValueError, match="LoraRecipe.lr"):
        LoraRecipe(lr=-1.0)
    assert LoraRecipe().replace(steps=5).steps == 5
    with pytest.raises(ValueError, match="LoraRecipe.autocast"):
        LoraRecipe(autocast="fp8")
    assert LoraRecipe(autocast="auto").autocast == ("bfloat16" if cpu_bf16_native() else "none")
    # the fp32 recipe keeps its old cache key; bf16 autocast gets its own
    assert "autocast" not in LoraRecipe().to_json()
    assert LoraRecipe(autocast="bfloat16").to_json()["autocast"] == "bfloat16"


@pytest.mark.parametrize("head_lora", [False, True])
def test_loss_at_kept_positions_equals_the_full_loss(tiny, tok, head_lora):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(tiny), dtype=torch.float32)
    targets = list(ALL_LINEAR) + (["lm_head"] if head_lora else [])
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
    batch = _collate([encode_conversation(tok, CONV, 512), encode_conversation(tok, CONV[:3], 512)],
                     tok.pad_token_id or 0)
    full = model(**batch).loss
    mine = causal_lm_loss(model, batch)
    torch.testing.assert_close(mine, full, rtol=1e-5, atol=1e-6)
    g_full = torch.autograd.grad(full, [p for p in model.parameters() if p.requires_grad])
    g_mine = torch.autograd.grad(causal_lm_loss(model, batch), [p for p in model.parameters() if p.requires_grad])
    for a, b in zip(g_mine, g_full):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_training_learns_and_writes_a_loadable_adapter(tiny, tmp_path):
    from cycleqd.models.loading import load_expert, load_model

    # a random-init tiny model has near-zero logits: only an adapter on lm_head can make
    # them peaked enough to memorise, so the head is a LoRA target here
    recipe = LoraRecipe(rank=8, alpha=16, steps=20, batch_size=1, lr=3e-2, warmup_steps=0, max_length=512,
                        target_modules=ALL_LINEAR + ("lm_head",))
    rep = train_lora(tiny, [CONV], recipe, tmp_path / "adapter", progress=False)
    assert len(rep.losses) == 20 and rep.examples == 1
    assert rep.losses[-1] < 0.6 * rep.losses[0], rep.losses  # it memorises the one example
    files = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "train_report.json"} <= files
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    meta = json.loads((tmp_path / "adapter" / "train_report.json").read_text())
    assert meta["recipe"]["steps"] == 20
    base = load_model(str(tiny), cache_dir=tmp_path)
    tau = load_expert(str(tmp_path / "adapter"), base, cache_dir=tmp_path).task_vector
    q = "model.layers.0.self_attn.q_proj.weight"
    assert tau[q].abs().max() > 0 and tau["lm_head.weight"].abs().max() > 0
    assert tau["model.norm.weight"].abs().max() == 0


def test_training_is_deterministic(tiny, tmp_path):
    recipe = LoraRecipe(rank=4, alpha=8, steps=3, batch_size=1, lr=1e-3, max_length=512, seed=3)
    a = train_lora(tiny, [CONV, CONV[:3]], recipe, tmp_path / "a", progress=False)
    b = train_lora(tiny, [CONV, CONV[:3]], recipe, tmp_path / "b", progress=False)
    assert a.losses == b.losses
    from safetensors.torch import load_file
    sa, sb = load_file(str(tmp_path / "a" / "adapter_model.safetensors")), load_file(
        str(tmp_path / "b" / "adapter_model.safetensors"))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # the global RNG is untouched by training
    torch.manual_seed(0)
    x = torch.rand(1)
    torch.manual_seed(0)
    train_lora(tiny, [CONV], recipe.replace(steps=1), tmp_path / "c", progress=False)
    assert torch.equal(torch.rand(1), x)


def test_bf16_autocast_training_runs_and_is_recorded(tiny, tmp_path):
    recipe = LoraRecipe(rank=4, alpha=8, steps=2, batch_size=1, lr=1e-3, max_length=512, autocast="bfloat16")
    rep = train_lora(tiny, [CONV], recipe, tmp_path / "a", progress=False)
    assert len(rep.losses) == 2 and all(l == l for l in rep.losses)
    meta = json.loads((tmp_path / "a" / "train_report.json").read_text())
    assert meta["recipe"]["autocast"] == "bfloat16"
    from safetensors.torch import load_file
    assert all(t.dtype == torch.float32 for t in load_file(str(tmp_path / "a" / "adapter_model.safetensors")).values())


def test_no_usable_examples(tiny, tmp_path):
    with pytest.raises(ValueError, match="no usable training conversation"):
        train_lora(tiny, [CONV], LoraRecipe(steps=1, max_length=4), tmp_path / "x", progress=False)

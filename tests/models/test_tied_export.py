"""Issue 18 item 9b: a tied-embedding base with a LoRA adapter that trains ``lm_head`` or
``embed_tokens`` on its own (peft ``modules_to_save``, or a LoRA on either) used to be
exported with ``tie_word_embeddings=True`` and one side lost (or refused at load time): the
reloaded model's logits differed from the adapter's. Now the weight space holds both
tensors and the export unties them; the logits after save and reload equal peft's."""

from __future__ import annotations

import json

import pytest
import torch

from cycleqd.models.build import build_weight_space
from cycleqd.engine.export import export_model

CASES = {
    "modules_to_save_lm_head": dict(target_modules=["q_proj"], modules_to_save=["lm_head"]),
    "modules_to_save_embed": dict(target_modules=["q_proj"], modules_to_save=["embed_tokens"]),
    "lora_on_embed": dict(target_modules=["q_proj", "embed_tokens"]),
    "lora_on_lm_head": dict(target_modules=["q_proj", "lm_head"]),
}
IDS = torch.tensor([[1, 5, 9, 33, 200, 7, 64, 3]])


@pytest.fixture(scope="module")
def tied_base(tmp_path_factory):
    from cycleqd.models.tiny import make_tiny_llama

    root = tmp_path_factory.mktemp("tied")
    return make_tiny_llama(root / "base", seed=3, hidden_size=32, num_layers=1, vocab_size=320,
                           tie_word_embeddings=True)


def _adapter(base, out, kw):
    """A trained-looking adapter (random LoRA factors, perturbed saved modules) and the
    logits of the PeftModel it defines."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        m = AutoModelForCausalLM.from_pretrained(str(base))
        pm = get_peft_model(m, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **kw))
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "modules_to_save" in n:
                    p.add_(torch.randn_like(p) * 0.5)
        pm.eval()
        with torch.no_grad():
            ref = pm(IDS).logits
        pm.save_pretrained(str(out))
    return ref


def _logits(folder):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        return m(IDS).logits, m


@pytest.mark.parametrize("case", sorted(CASES))
def test_tied_base_adapter_export_reloads_with_the_adapters_logits(tied_base, tmp_path, case):
    ref = _adapter(tied_base, tmp_path / "adapter", CASES[case])
    space, info = build_weight_space(str(tied_base), [str(tmp_path / "adapter")], {"name": "linear"},
                                     {"name": "none"}, genome="dense", cache_dir=tmp_path / "cache")
    assert info.extra["untied"] == ["lm_head.weight"]
    export_model(space, space.expert_genomes()[0], tmp_path / "out", info.model_dir)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False
    got, m = _logits(tmp_path / "out")
    assert m.lm_head.weight.data_ptr() != m.model.embed_tokens.weight.data_ptr()
    assert (got - ref).abs().max().item() < 1e-4


def test_untouched_tied_pair_stays_tied(tied_base, tmp_path):
    """An adapter that leaves both sides alone: no untying, the export stays tied."""
    from cycleqd.models.tiny import make_tiny_expert

    ref = _adapter(tied_base, tmp_path / "adapter", dict(target_modules=["q_proj", "v_proj"]))
    space, info = build_weight_space(str(tied_base), [str(tmp_path / "adapter")], {"name": "linear"},
                                     {"name": "none"}, genome="dense", cache_dir=tmp_path / "cache")
    assert info.extra["untied"] == [] and "lm_head.weight" not in space.base
    export_model(space, space.expert_genomes()[0], tmp_path / "out", info.model_dir)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is True
    got, _ = _logits(tmp_path / "out")
    assert (got - ref).abs().max().item() < 1e-4


def test_child_of_tied_full_expert_and_lm_head_adapter_exports_untied(tied_base, tmp_path):
    """A full-model (tied) expert merged with an lm_head adapter: the full expert is read
    untied like the base, and the child's two sides are the merge of each side."""
    from cycleqd.models.tiny import make_tiny_expert

    full = make_tiny_expert(tied_base, tmp_path / "full", seed=5)
    _adapter(tied_base, tmp_path / "adapter", CASES["modules_to_save_lm_head"])
    space, info = build_weight_space(str(tied_base), [str(full), str(tmp_path / "adapter")],
                                     {"name": "linear", "sigma": 0.0}, {"name": "none"}, genome="dense",
                                     cache_dir=tmp_path / "cache")
    g = space.crossover(space.expert_genomes(), torch.Generator().manual_seed(0))
    w = space.materialize(g)
    export_model(space, g, tmp_path / "out", info.model_dir)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False
    _, m = _logits(tmp_path / "out")
    assert torch.allclose(m.lm_head.weight, w["lm_head.weight"], atol=1e-6)
    assert torch.allclose(m.model.embed_tokens.weight, w["model.embed_tokens.weight"], atol=1e-6)
    assert not torch.allclose(w["lm_head.weight"], w["model.embed_tokens.weight"])


def test_adapter_with_ensure_weight_tying_stays_tied(tied_base, tmp_path):
    """peft's ``ensure_weight_tying=True`` trains both sides as one: the export stays tied."""
    ref = _adapter(tied_base, tmp_path / "adapter", dict(target_modules=["q_proj"], modules_to_save=["embed_tokens"],
                                                         ensure_weight_tying=True))
    space, info = build_weight_space(str(tied_base), [str(tmp_path / "adapter")], {"name": "linear"},
                                     {"name": "none"}, genome="dense", cache_dir=tmp_path / "cache")
    export_model(space, space.expert_genomes()[0], tmp_path / "out", info.model_dir)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is True
    got, _ = _logits(tmp_path / "out")
    assert (got - ref).abs().max().item() < 1e-3

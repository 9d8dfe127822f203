"""Loading base and experts in every common form, and validating experts against the base."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from cycleqd.models.lazy import DiffTaskVector, LoraTaskVector, resident
from cycleqd.models.loading import load_expert, load_model
from cycleqd.models.sources import ModelLoadError, resolve_source


def _tau(expert_dir, base_dir):
    a, b = load_file(str(expert_dir / "model.safetensors")), load_file(str(base_dir / "model.safetensors"))
    return {k: a[k].float() - b[k].float() for k in b}


def _same(t1, t2, tol=0.0):
    assert set(t1) == set(t2)
    return max(float((t1[k] - t2[k]).abs().max()) for k in t1) <= tol


def test_hf_folder_and_stored_dtype(tmp_path, llama, cache):
    from cycleqd.models.tiny import make_tiny_llama

    base = load_model(llama["base"], cache_dir=cache)
    assert list(base.state) == list(load_file(str(llama["base"] / "model.safetensors")))
    assert base.folder == llama["base"] and base.config.model_type == "llama"
    bf = load_model(make_tiny_llama(tmp_path / "bf16", seed=0, hidden_size=32, num_layers=1,
                                    vocab_size=320, dtype=torch.bfloat16), cache_dir=cache)
    assert {bf.state[k].dtype for k in bf.state} == {torch.bfloat16}  # stored dtype kept
    e = load_expert(llama["experts"][0], base, cache_dir=cache)
    assert isinstance(e.task_vector, DiffTaskVector)  # lazy, per tensor
    assert all(e.task_vector[k].dtype == torch.float32 for k in e.task_vector)
    assert _same(resident(e.task_vector), _tau(llama["experts"][0], llama["base"]))


def test_bare_safetensors_bin_and_sharded_experts(tmp_path, llama, cache):
    from transformers import AutoModelForCausalLM

    base = load_model(llama["base"], cache_dir=cache)
    want = _tau(llama["experts"][0], llama["base"])
    st = llama["experts"][0] / "model.safetensors"
    sd = load_file(str(st))
    torch.save(sd, tmp_path / "expert.bin")
    m = AutoModelForCausalLM.from_pretrained(str(llama["experts"][0]))
    m.save_pretrained(str(tmp_path / "sharded"), max_shard_size="20KB")
    shutil.copy(llama["base"] / "tokenizer.json", tmp_path / "sharded")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    for spec, kind in ((st, "hf_dir"), (tmp_path / "expert.bin", "bin"), (tmp_path / "sharded", "hf_dir")):
        e = load_expert(spec, base, cache_dir=cache)
        assert _same(resident(e.task_vector), want, 1e-7), spec
    assert resolve_source(tmp_path / "expert.bin").kind == "bin"
    assert resolve_source(st).kind == "safetensors"


def test_gguf_base_and_expert(tmp_path, llama, cache):
    """GGUF files are dequantised through transformers into a cached HF folder."""
    from cycleqd.models.tiny import write_tiny_gguf

    g_base = write_tiny_gguf(llama["base"], tmp_path / "base.gguf")
    g_exp = write_tiny_gguf(llama["experts"][1], tmp_path / "expert.gguf")
    assert resolve_source(g_base).kind == "gguf"
    base = load_model(g_base, cache_dir=cache)
    assert base.folder is not None and (base.folder / "tokenizer.json").is_file()
    assert (base.folder / "config.json").is_file() and "quantization_config" not in json.loads(
        (base.folder / "config.json").read_text())
    e = load_expert(g_exp, base, cache_dir=cache)
    assert _same(resident(e.task_vector), _tau(llama["experts"][1], llama["base"]), 1e-7)  # F32: exact
    again = load_model(g_base, cache_dir=cache)  # cached: same folder, no second conversion
    assert again.folder == base.folder


def test_lora_adapter_equals_peft_merge(llama, lora_dir, cache):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = load_model(llama["base"], cache_dir=cache)
    e = load_expert(lora_dir, base, cache_dir=cache)
    assert e.kind == "lora" and isinstance(e.task_vector, LoraTaskVector)
    with torch.random.fork_rng(devices=[]):
        m = AutoModelForCausalLM.from_pretrained(str(llama["base"]))
        merged = PeftModel.from_pretrained(m, str(lora_dir)).merge_and_unload().state_dict()
    want = {k: merged[k].float() - base.state[k].float() for k in base.state}
    got = resident(e.task_vector)
    assert _same(got, want, 1e-6)
    touched = {k for k in got if got[k].abs().sum() > 0}
    assert "model.embed_tokens.weight" in touched and "lm_head.weight" in touched
    assert any("q_proj" in k for k in touched) and not any("k_proj" in k for k in touched)


def test_dora_adapter_falls_back_to_peft(tmp_path, llama, cache):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        m = AutoModelForCausalLM.from_pretrained(str(llama["base"]))
        pm = get_peft_model(m, LoraConfig(r=2, target_modules=["q_proj"], use_dora=True, init_lora_weights=False))
        pm.save_pretrained(str(tmp_path / "dora"))
        merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(llama["base"])),
                                           str(tmp_path / "dora")).merge_and_unload().state_dict()
    base = load_model(llama["base"], cache_dir=cache)
    e = load_expert(tmp_path / "dora", base, cache_dir=cache)
    assert _same(resident(e.task_vector), {k: merged[k].float() - base.state[k].float() for k in base.state}, 1e-6)


def _edit(src, dst, fn):
    shutil.copytree(src, dst)
    sd = load_file(str(dst / "model.safetensors"))
    sd = fn(sd)
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_mismatching_experts_name_the_first_bad_tensor(tmp_path, llama, cache):
    base = load_model(llama["base"], cache_dir=cache)
    e0 = llama["experts"][0]
    k = "model.layers.1.mlp.up_proj.weight"

    bad = _edit(e0, tmp_path / "shape", lambda sd: {**sd, k: torch.zeros(3, 3)})
    with pytest.raises(ModelLoadError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight' has shape \(3, 3\)"):
        load_expert(bad, base, cache_dir=cache)
    missing = _edit(e0, tmp_path / "missing", lambda sd: {n: v for n, v in sd.items() if n != k})
    with pytest.raises(ModelLoadError, match=r"up_proj.weight' of the base is missing"):
        load_expert(missing, base, cache_dir=cache)
    extra = _edit(e0, tmp_path / "extra", lambda sd: {**sd, "model.extra.weight": torch.zeros(2)})
    with pytest.raises(ModelLoadError, match="model.extra.weight"):
        load_expert(extra, base, cache_dir=cache)


def test_resized_vocab_and_architecture_are_explained(tmp_path, llama, cache):
    from cycleqd.models.tiny import make_tiny_llama

    base = load_model(llama["base"], cache_dir=cache)
    big = make_tiny_llama(tmp_path / "big", seed=0, hidden_size=32, num_layers=2, vocab_size=352)
    with pytest.raises(ModelLoadError, match="resized"):
        load_expert(big, base, cache_dir=cache)
    # the same without any config: caught at the tensor level, still explained
    (tmp_path / "bare").mkdir()
    bare = shutil.copy(big / "model.safetensors", tmp_path / "bare" / "big.safetensors")
    with pytest.raises(ModelLoadError, match=r"vocabulary was resized from 320 to 352"):
        load_expert(bare, base, cache_dir=cache)
    deeper = make_tiny_llama(tmp_path / "deep", seed=0, hidden_size=32, num_layers=3, vocab_size=320)
    with pytest.raises(ModelLoadError, match="num_hidden_layers = 3"):
        load_expert(deeper, base, cache_dir=cache)


def test_tied_vs_untied_is_explained(tmp_path, qwen, cache):
    from cycleqd.models.tiny import make_tiny_qwen2

    base = load_model(qwen["base"], cache_dir=cache)
    assert "lm_head.weight" not in base.state  # tied: stored once
    untied = make_tiny_qwen2(tmp_path / "untied", seed=1, hidden_size=32, num_layers=2,
                             vocab_size=320, tie_word_embeddings=False)
    with pytest.raises(ModelLoadError, match="tie_word_embeddings"):
        load_expert(untied, base, cache_dir=cache)
    (tmp_path / "bare").mkdir()
    bare = shutil.copy(untied / "model.safetensors", tmp_path / "bare" / "untied.safetensors")
    with pytest.raises(ModelLoadError, match="lm_head.weight.*ties it to the input embeddings"):
        load_expert(bare, base, cache_dir=cache)
    ok = load_expert(qwen["experts"][0], base, cache_dir=cache)
    assert any(k.endswith("q_proj.bias") and ok.task_vector[k].abs().sum() > 0 for k in ok.task_vector)


def test_corrupt_and_missing_files(tmp_path, llama, cache):
    base = load_model(llama["base"], cache_dir=cache)
    broken = shutil.copytree(llama["experts"][0], tmp_path / "broken")
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])  # truncated download
    with pytest.raises(ModelLoadError, match="corrupt or unreadable safetensors file"):
        load_expert(broken, base, cache_dir=cache)
    (broken / "model.safetensors").write_bytes(b"\x07" * 64)
    with pytest.raises(ModelLoadError, match="corrupt"):
        load_expert(broken, base, cache_dir=cache)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_expert(tmp_path / "nope", base, cache_dir=cache)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no model weights"):
        resolve_source(tmp_path / "empty")
    (tmp_path / "fake.gguf").write_bytes(b"notgguf")
    with pytest.raises(ValueError, match="not a GGUF file"):
        load_model(tmp_path / "fake.gguf", cache_dir=cache)
    with pytest.raises(ModelLoadError, match="LoRA adapter"):
        load_model(_lora_like(tmp_path), cache_dir=cache)


def _lora_like(tmp_path):
    d = tmp_path / "lora_like"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    save_file({"x": torch.zeros(1)}, str(d / "adapter_model.safetensors"))
    return d


def test_hub_ids_go_through_snapshot_download(monkeypatch, llama):
    import huggingface_hub

    seen = {}

    def fake(repo, revision=None, allow_patterns=None):
        seen.update(repo=repo, revision=revision)
        return str(llama["base"])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    r = resolve_source("HuggingFaceTB/SmolLM2-135M-Instruct@main")
    assert r.kind == "hf_dir" and r.hub_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert seen == {"repo": "HuggingFaceTB/SmolLM2-135M-Instruct", "revision": "main"}

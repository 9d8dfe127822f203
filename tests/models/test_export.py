"""Export as HF folders that transformers loads unchanged; streaming merges; run export."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from cycleqd.models.build import build_weight_space
from cycleqd.engine.export import export_from_run, export_model, stream_merge


@pytest.fixture(scope="module")
def space_info(llama, cache):
    return build_weight_space(str(llama["base"]), [str(p) for p in llama["experts"]],
                              {"name": "linear"}, {"name": "svd_expert"}, "svd", cache)


def _child(space):
    g = torch.Generator().manual_seed(1)
    return space.mutate(space.crossover(space.expert_genomes(), g), 0, g)


def test_exported_folder_loads_unchanged(tmp_path, space_info):
    space, info = space_info
    child = _child(space)
    out = export_model(space, child, tmp_path / "out", info.model_dir)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json"} <= names
    m = AutoModelForCausalLM.from_pretrained(str(out))
    want = space.materialize(child)
    sd = m.state_dict()
    assert all(torch.equal(sd[k], want[k]) for k in want)
    tok = AutoTokenizer.from_pretrained(str(out))
    ids = tok.apply_chat_template([{"role": "user", "content": "SELECT 1"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    assert m.generate(**ids, max_new_tokens=2, do_sample=False).shape[1] == ids["input_ids"].shape[1] + 2
    assert GenerationConfig.from_pretrained(str(out)).eos_token_id == m.config.eos_token_id
    with pytest.raises(FileExistsError):
        export_model(space, child, out, info.model_dir)  # never overwrites silently


def test_sharded_export_and_bf16(tmp_path, space_info):
    space, info = space_info
    out = export_model(space, space.expert_genomes()[1], tmp_path / "sh", info.model_dir, max_shard_bytes=30_000)
    idx = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(idx["weight_map"].values())) > 1
    m = AutoModelForCausalLM.from_pretrained(str(out))
    w = space.materialize(space.expert_genomes()[1])
    assert all(torch.equal(m.state_dict()[k], w[k]) for k in w)


def test_stream_merge_equals_in_memory_crossover(tmp_path, llama, lora_dir, cache):
    from cycleqd.models.lazy import resident
    from cycleqd.models.loading import load_expert, load_model
    from cycleqd.ops import make_crossover

    spec = {"name": "ties", "weights": [0.7, 0.5], "density": 0.4}
    out = stream_merge(llama["base"], [llama["experts"][0], lora_dir], spec, tmp_path / "m",
                       cache_dir=cache, max_shard_bytes=20_000)
    base = load_model(llama["base"], cache_dir=cache)
    taus = [resident(load_expert(p, base, cache_dir=cache).task_vector) for p in (llama["experts"][0], lora_dir)]
    tau = make_crossover(spec)(taus, generator=torch.Generator().manual_seed(0))
    sd = AutoModelForCausalLM.from_pretrained(str(out)).state_dict()
    assert max(float((sd[k] - (base.state[k] + tau[k])).abs().max()) for k in tau) <= 1e-6
    assert json.loads((out / "cycleqd_export.json").read_text())["merge"]["name"] == "ties"


def test_export_from_run(tmp_path):
    from cycleqd.config import parse_config
    from cycleqd.engine.build import build_components
    from cycleqd.engine.loop import run_cycleqd

    cfg = parse_config({
        "name": "t", "seed": 0, "cache_dir": str(tmp_path / "cache"),
        "skills": [{"name": n, "type": "synthetic", "bc_range": [0.0, 1.0], "bins": 6} for n in ("a", "b")],
        "model": {"synthetic": {"arch": "llama", "seed": 0, "hidden_size": 32, "num_layers": 1,
                                "expert_rank": 2, "expert_scale": 0.05}},
        "operators": {"crossover": {"name": "linear", "sigma": 0.01},
                      "mutation": {"name": "svd_expert", "rate": 0.1}, "genome": "auto"},
        "qd": {"generations": 3, "snapshot_every": 3}})
    comp = build_components(cfg)
    run = tmp_path / "run"
    res = run_cycleqd(comp, cfg, run, progress=False)
    space = comp.space
    best_a = res.archives[0].best()
    out = export_from_run(run, tmp_path / "best-a", archive="a")
    sd = AutoModelForCausalLM.from_pretrained(str(out)).state_dict()
    want = space.materialize(space.load(run / "genomes" / f"{best_a.id}{space.genome_suffix}")
                             if best_a.id.startswith("g") else space.expert_genomes()[0 if best_a.id.endswith("a") else 1])
    assert all(torch.equal(sd[k], want[k]) for k in want)
    agg = export_from_run(run, tmp_path / "agg", aggregate=True)
    assert json.loads((agg / "cycleqd_export.json").read_text())["model_id"] == "aggregate"
    cell = next(iter(res.archives[1].elites))
    export_from_run(run, tmp_path / "cell", cell=f"b:{','.join(map(str, cell))}")
    with pytest.raises(ValueError, match="empty"):
        empty = next(c for c in [(i,) for i in range(6)] if c not in res.archives[1].elites)
        export_from_run(run, tmp_path / "x", cell=f"b:{empty[0]}")
    with pytest.raises(ValueError, match="archives are"):
        export_from_run(run, tmp_path / "x", archive="zzz")

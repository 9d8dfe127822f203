"""CI: the whole vision pipeline at toy size (tiny CNN, short training, few generations),
checking every artefact the demo and the ablation benchmark promise."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cycleqd.vision.demo import main
from cycleqd.vision.model import DigitCNN
from cycleqd.vision.training import VisionRecipe

GENS = 12
REQUIRED_ROWS = ["base", "expert: rotated", "expert: noisy", "expert: occluded", "task arithmetic", "TIES",
                 "multi-domain fine-tune", "CycleQD best per skill", "CycleQD final model"]


@pytest.fixture(scope="module")
def vision_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("vision-cache")


@pytest.fixture(scope="module")
def demo(tmp_path_factory, vision_cache):
    out = tmp_path_factory.mktemp("vision-demo") / "demo"
    res = main(out, generations=GENS, seed=0, toy=True, cache_root=vision_cache, progress=False, quiet=True)
    return out, res


def test_demo_writes_every_artefact(demo):
    out, res = demo
    run = out / "run"
    for p in [out / "table.md", out / "table.json", out / "curves.png", out / "aggregate.safetensors",
              run / "config.yaml", run / "state.json", run / "archives.json", run / "metrics.jsonl",
              run / "maps" / "elite_maps.png", run / "genomes" / "aggregate.safetensors"]:
        assert p.is_file() and p.stat().st_size > 0, p
    for d in ("rotated", "noisy", "occluded"):
        assert (run / "maps" / f"archive_{d}.png").is_file()
    assert max(p.name for p in (run / "archives").iterdir()) == f"gen_{GENS:06d}.json"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["generation"] for m in metrics] == [0, 0, 0] + list(range(1, GENS + 1)) + [GENS + 1]
    assert metrics[-1].get("kind") == "aggregate"
    state = json.loads((run / "state.json").read_text())
    assert state["generation"] == GENS and state["aggregate"] is not None
    # trained models are cached under the recipe hash
    cache = Path(res["model_cache"])
    assert cache.name == VisionRecipe.toy().hash() and (cache / "train_log.json").is_file()
    assert Path(res["paths"]["elite_maps"]).is_file()


def test_demo_table_is_complete_and_consistent(demo):
    out, res = demo
    rows = {r["model"]: r for r in res["rows"]}
    for name in REQUIRED_ROWS:
        assert name in rows, name
    for r in res["rows"]:
        for k in ("rotated", "noisy", "occluded", "mean"):
            assert 0.0 <= r[k] <= 1.0
        assert r["mean"] == pytest.approx((r["rotated"] + r["noisy"] + r["occluded"]) / 3)
    md = (out / "table.md").read_text()
    for name in REQUIRED_ROWS:
        assert f"| {name} |" in md
    on_disk = json.loads((out / "table.json").read_text())
    assert on_disk["rows"] == json.loads(json.dumps(res["rows"]))
    # fine-tuning on a domain helps on that domain (on average over the three)
    gain = sum(rows[f"expert: {d}"][d] - rows["base"][d] for d in ("rotated", "noisy", "occluded")) / 3
    assert gain > 0.05
    # CycleQD's best-per-skill row is at least as good as the experts on the search split
    for d in ("rotated", "noisy", "occluded"):
        assert res["run"]["best_per_skill"][d]["search"] >= res["train_log"]["models"][f"expert_{d}"][
            "search_accuracy"][d] - 1e-4  # the log rounds to 5 digits


def test_aggregated_model_reproduces_its_row(demo):
    out, res = demo
    r = VisionRecipe.toy()
    model = DigitCNN(r.channels, r.hidden)
    model.load_state_dict(load_file(str(out / "aggregate.safetensors")))
    data = r.build_data()
    row = next(x for x in res["rows"] if x["model"] == "CycleQD final model")
    for d in r.domains:
        with torch.inference_mode():
            acc = float((model(data[d]["test"].x).argmax(1) == data[d]["test"].y).float().mean())
        assert acc == pytest.approx(row[d])


def test_second_demo_into_the_same_folder_is_refused_before_work(demo):
    out, _ = demo
    with pytest.raises(FileExistsError, match="already holds"):
        main(out, toy=True, generations=GENS)
    with pytest.raises(ValueError, match="generations"):
        main(out.parent / "other", toy=True, generations=0)


def test_search_is_deterministic(tmp_path, vision_cache):
    from cycleqd.vision.pipeline import build_setup, run_search

    setup = build_setup(toy=True, cache_root=vision_cache)
    a = run_search(setup, tmp_path / "a", generations=4, seed=3)
    b = run_search(setup, tmp_path / "b", generations=4, seed=3)
    ja = json.loads((tmp_path / "a" / "archives.json").read_text())["archives"]
    jb = json.loads((tmp_path / "b" / "archives.json").read_text())["archives"]
    assert ja == jb and a["mean_test"] == b["mean_test"]


def test_ablation_benchmark_toy(tmp_path, vision_cache, monkeypatch, capsys):
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "ablate_vision.py"
    out = tmp_path / "abl"
    argv = [str(script), "--out", str(out), "--toy", "--seeds", "0", "1", "--generations", "3",
            "--conditions", "cycleqd", "single", "--cache-dir", str(vision_cache)]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(script), run_name="__main__")
    summary = json.loads((out / "ablation.json").read_text())
    assert [r["condition"] for r in summary["rows"]] == ["cycleqd", "single"]
    for r in summary["rows"]:
        assert len(r["per_seed"]["agg_mean_test"]) == 2
        assert r["qd_score"][0] > 0
    md = (out / "ablation.md").read_text()
    assert "single archive, summed quality" in md and "± " in md
    assert "delta_acc_vs_cycleqd" in summary["rows"][1]
    for cond in ("cycleqd", "single"):
        for s in (0, 1):
            assert (out / cond / f"seed_{s}" / "result.json").is_file()
    # a re-run reuses the finished runs
    runpy.run_path(str(script), run_name="__main__")
    assert "(0 s)" in capsys.readouterr().err

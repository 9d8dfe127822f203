"""`cycleqd demo --toy`: the whole demo pipeline at toy size (tiny random-init model, two
items per split, 2 generations) -- real expert training on real train items, a real
CycleQD run on the search splits, the comparison on the test splits -- and every artefact."""

from __future__ import annotations

import json
import os

import pytest


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    from cycleqd.cli import main
    from cycleqd.sandbox import sandbox_status

    if not sandbox_status().available:
        pytest.skip(f"bubblewrap sandbox unavailable: {sandbox_status().reason}")
    cache = tmp_path_factory.mktemp("cache")
    out = tmp_path_factory.mktemp("demo") / "run"
    old = os.environ.get("CYCLEQD_CACHE")
    os.environ["CYCLEQD_CACHE"] = str(cache)   # experts, trajectories, sample cache
    try:
        rc = main(["demo", "--toy", "--out", str(out)])
    finally:
        if old is None:
            os.environ.pop("CYCLEQD_CACHE", None)
        else:
            os.environ["CYCLEQD_CACHE"] = old
    assert rc == 0
    return out, cache


def test_every_artefact(toy_run):
    out, _ = toy_run
    for f in ("demo_config.yaml", "experts.json", "comparison.json", "comparison.md",
              "elite_maps.png", "timings.json", "cycleqd/config.yaml", "cycleqd/state.json",
              "cycleqd/archives.json", "cycleqd/metrics.jsonl", "cycleqd/maps/elite_maps.png"):
        assert (out / f).is_file(), f
    for s in ("coding", "db", "os"):
        assert (out / "cycleqd" / "maps" / f"archive_{s}.png").is_file()
    state = json.loads((out / "cycleqd" / "state.json").read_text())
    assert state["generation"] == 2 and state["aggregate"] is not None


def test_comparison_table(toy_run):
    out, _ = toy_run
    comp = json.loads((out / "comparison.json").read_text())
    ids = [r["id"] for r in comp["rows"]]
    assert ids == ["base", "expert:coding", "expert:db", "expert:os", "task_arithmetic", "ties",
                   "multitask", "cycleqd:best-coding", "cycleqd:best-db", "cycleqd:best-os",
                   "cycleqd:aggregate"]
    assert comp["test_sizes"] == {"coding": 2, "db": 2, "os": 2}
    for r in comp["rows"]:
        assert set(r["scores"]) == {"coding", "db", "os"}
        assert all(0.0 <= v <= 1.0 for v in r["scores"].values())
        assert r["mean"] == pytest.approx(sum(r["scores"].values()) / 3)
        for s, res in r["results"].items():   # scored on the held-out test items
            assert len(res["outcomes"]) == 2
    # test items never overlap the search items the run scored children on
    from cycleqd.skills.agentbench.data import load_dbbench, load_os
    from cycleqd.skills.coding.data import load_mbpp
    test_ids = {i for r in comp["rows"] for res in r["results"].values() for i in res["outcomes"]}
    search_ids = ({p.id for p in load_mbpp(split="search")} | {p.id for p in load_dbbench(split="search")}
                  | {p.id for p in load_os(split="search")})
    assert not test_ids & search_ids
    md = (out / "comparison.md").read_text()
    assert "| cycleqd:aggregate |" in md and "Claims" in md


def test_experts_trained_and_cached(toy_run, tmp_path):
    out, cache = toy_run
    rep = json.loads((out / "experts.json").read_text())
    assert set(rep) == {"coding", "db", "os", "multitask"}
    for k, v in rep.items():
        assert v["trained"] and v["steps"] >= 1 and v["examples"] >= 1
    assert rep["multitask"]["steps"] == sum(rep[s]["steps"] for s in ("coding", "db", "os"))
    # a second training request with the same (base, data, recipe) reuses the adapter
    from cycleqd.demo.config import load_demo_config
    from cycleqd.demo.llm import TOY_CONFIG, resolve_base_dir, train_experts

    cfg = load_demo_config(TOY_CONFIG, {"cache_dir": str(cache)})
    assert str(cache) in rep["coding"]["source"]
    experts, mt, again = train_experts(cfg, resolve_base_dir(cfg, cache), cache, progress=False, log=None)
    assert experts == {k: rep[k]["source"] for k in ("coding", "db", "os")} and mt == rep["multitask"]["source"]

"""`cycleqd demo --toy`: the whole demo pipeline at toy size (tiny random-init model, two
items per split, 2 generations) -- real expert training on real train items, a real
CycleQD run on the search splits, the final model and the merges' hyper-parameters chosen
on the validation splits, the comparison on the test splits -- and every artefact."""

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
    import cycleqd.engine.build as build

    cache = tmp_path_factory.mktemp("cache")
    out = tmp_path_factory.mktemp("demo") / "run"
    events: list[tuple[str, str]] = []   # (split, skill) of every evaluation in this process, in order
    real = build.build_llm_skill

    def logged(*a, **kw):
        sk = real(*a, **kw)
        inner = sk.evaluate

        def evaluate(model, *ea, **ekw):
            events.append((sk.split, sk.name))
            return inner(model, *ea, **ekw)

        sk.evaluate = evaluate
        return sk

    mp = pytest.MonkeyPatch()
    mp.setattr(build, "build_llm_skill", logged)
    mp.setenv("CYCLEQD_CACHE", str(cache))   # experts, trajectories, sample cache
    try:
        rc = main(["demo", "--toy", "--out", str(out)])
    finally:
        mp.undo()
    assert rc == 0
    return out, cache, events


def test_every_artefact(toy_run):
    out, *_ = toy_run
    for f in ("demo_config.yaml", "experts.json", "comparison.json", "comparison.md",
              "elite_maps.png", "timings.json", "cycleqd/config.yaml", "cycleqd/state.json",
              "cycleqd/archives.json", "cycleqd/metrics.jsonl", "cycleqd/maps/elite_maps.png"):
        assert (out / f).is_file(), f
    for s in ("coding", "db", "os"):
        assert (out / "cycleqd" / "maps" / f"archive_{s}.png").is_file()
    state = json.loads((out / "cycleqd" / "state.json").read_text())
    assert state["generation"] == 2 and state["aggregate"] is not None


def test_comparison_table(toy_run):
    out, *_ = toy_run
    comp = json.loads((out / "comparison.json").read_text())
    ids = [r["id"] for r in comp["rows"]]
    assert ids == ["base", "expert:coding", "expert:db", "expert:os", "task_arithmetic", "ties",
                   "multitask", "cycleqd:best-coding", "cycleqd:best-db", "cycleqd:best-os"] + [
        f"final:{c['strategy']}" for c in comp["final"]["candidates"] if "error" not in c]
    assert "final:mean" in ids and "final:best_elite" in ids
    assert comp["test_sizes"] == {"coding": 2, "db": 2, "os": 2}
    assert comp["validation_sizes"] == {"coding": 2, "db": 2, "os": 2}
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
    assert md.count("← chosen**") == 1 and "Claims" in md


def test_every_choice_is_made_on_validation_before_any_test_item(toy_run):
    """The final model and both merges' hyper-parameters are the best validation means of
    their candidates (recorded with their validation scores), and every validation
    evaluation happens before the first test evaluation: no choice can read a test score."""
    out, _, events = toy_run
    comp = json.loads((out / "comparison.json").read_text())
    final = json.loads((out / "cycleqd" / "final.json").read_text())
    assert final["strategy"] == "auto" and final["split"] == "validation"
    cands = final["candidates"]
    assert [c["strategy"] for c in cands] == ["mean", "quality_weighted", "task_arithmetic",
                                              "weight_search", "best_elite"]
    built = [c for c in cands if "error" not in c]   # a strategy that cannot apply is no candidate
    assert len(built) >= 3     # (tiny random models: every quality 0, so quality_weighted fails)
    means = [c["validation_mean"] for c in built]
    assert final["chosen"] == built[means.index(max(means))]["strategy"]   # ties: the earlier
    rows = {r["id"]: r for r in comp["rows"]}
    chosen = [r for r in comp["rows"] if r.get("final_choice")]
    assert [r["id"] for r in chosen] == [f"final:{final['chosen']}"]
    for c in built:   # every candidate's validation scores reach the table's row
        assert rows[f"final:{c['strategy']}"]["validation"] == c["validation"]
    for c in cands:
        if "error" in c:
            assert f"final:{c['strategy']}" not in rows and c["strategy"] in (out / "comparison.md").read_text()
    for op in ("task_arithmetic", "ties"):
        m = comp["merges"][op]
        assert m["split"] == "validation" and len(m["grid"]) == 2
        vm = [g["validation_mean"] for g in m["grid"]]
        assert m["params"] == m["grid"][vm.index(max(vm))]["params"] == rows[op]["params"]
        assert rows[op]["validation_mean"] == max(vm)
    splits = [s for s, _ in events]
    assert "validation" in splits and "test" in splits
    last_val = max(i for i, s in enumerate(splits) if s == "validation")
    first_test = splits.index("test")
    assert last_val < first_test, events
    # the test evaluations are exactly the table's: once per distinct model and skill
    n_models = len({r["fingerprint"] for r in comp["rows"]})
    assert splits.count("test") == 3 * n_models


def test_experts_trained_and_cached(toy_run, tmp_path):
    out, cache, _ = toy_run
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

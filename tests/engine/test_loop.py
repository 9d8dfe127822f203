import json

import pytest

from cycleqd.engine.build import build_components
from cycleqd.engine.loop import run_cycleqd
from cycleqd.engine.rundir import RunDir


def _archives(run_dir):
    return json.loads((run_dir / "state.json").read_text())["archives"]


def test_run_produces_a_complete_run_directory(tiny_cfg, tmp_path):
    cfg = tiny_cfg()
    res = run_cycleqd(build_components(cfg), cfg, tmp_path / "run", progress=False)
    rd = RunDir(tmp_path / "run")
    assert res.generation == 12
    for p in (rd.config, rd.state, rd.archives, rd.metrics, rd.maps / "elite_maps.png",
              rd.snapshots / "gen_000000.json", rd.snapshots / "gen_000010.json", rd.snapshots / "gen_000012.json"):
        assert p.exists(), p
    metrics = rd.read_metrics()
    gens = [m for m in metrics if m["generation"] >= 1 and m.get("kind") != "aggregate"]
    assert [m["generation"] for m in gens] == list(range(1, 13))
    assert [m["quality_skill"] for m in gens] == [["a", "b", "c"][g % 3] for g in range(1, 13)]
    for m in gens:
        assert set(m["scores"]) == {"a", "b", "c"} and len(m["parents"]) == 2
        assert {"crossover_s", "mutation_s", "eval_s"} <= set(m["timings"])
        assert set(m["archives"]) == {"a", "b", "c"}
    seeds = [m for m in metrics if m["generation"] == 0]
    assert [m["child"] for m in seeds] == ["expert:a", "expert:b", "expert:c"]
    # every elite's genome is in the store, nothing else is
    ids = {e["id"] for a in _archives(tmp_path / "run") for e in a["elites"]}
    stored = {p.name.split(".")[0] for p in rd.genomes.iterdir()}
    assert stored - {"aggregate"} == {i for i in ids if not i.startswith("expert:")}
    # every child that entered an archive was saved, and every elite of the final archives
    # is recorded as having entered that archive
    by_child = {m["child"]: m for m in gens}
    for m in gens:
        assert bool(m["entered"]) == m["saved"]
    for a in _archives(tmp_path / "run"):
        for e in a["elites"]:
            if e["generation"] >= 1:
                assert a["quality_skill"] in by_child[e["id"]]["entered"]


def test_same_seed_same_archives_other_seed_differs(tiny_cfg, tmp_path):
    cfg = tiny_cfg()
    run_cycleqd(build_components(cfg), cfg, tmp_path / "r1", progress=False)
    run_cycleqd(build_components(cfg), cfg, tmp_path / "r2", progress=False)
    assert _archives(tmp_path / "r1") == _archives(tmp_path / "r2")
    cfg3 = cfg.model_copy(update={"seed": 1})
    run_cycleqd(build_components(cfg3), cfg3, tmp_path / "r3", progress=False)
    assert _archives(tmp_path / "r1") != _archives(tmp_path / "r3")


def test_stop_and_resume_equals_uninterrupted(tiny_cfg, tmp_path):
    cfg = tiny_cfg()
    run_cycleqd(build_components(cfg), cfg, tmp_path / "full", progress=False)
    run_cycleqd(build_components(cfg), cfg, tmp_path / "part", progress=False, stop_after=5)
    assert json.loads((tmp_path / "part" / "state.json").read_text())["generation"] == 5
    run_cycleqd(build_components(cfg), cfg, tmp_path / "part", progress=False, resume=True)
    assert _archives(tmp_path / "full") == _archives(tmp_path / "part")
    gens = [m["generation"] for m in RunDir(tmp_path / "part").read_metrics()]
    assert gens == [m["generation"] for m in RunDir(tmp_path / "full").read_metrics()]


def test_refuses_to_overwrite_or_resume_with_another_config(tiny_cfg, tmp_path):
    cfg = tiny_cfg()
    run_cycleqd(build_components(cfg), cfg, tmp_path / "r", progress=False, stop_after=1)
    with pytest.raises(FileExistsError, match="already holds a run"):
        run_cycleqd(build_components(cfg), cfg, tmp_path / "r", progress=False)
    other = tiny_cfg(sampling="uniform")
    with pytest.raises(ValueError, match="config differs"):
        run_cycleqd(build_components(other), other, tmp_path / "r", progress=False, resume=True)


@pytest.mark.parametrize("overrides", [{"mode": "single"}, {"sampling": "uniform", "flip_interval": 2},
                                       {"sampling": "elite_official"}])
def test_variants_run(tiny_cfg, tmp_path, overrides):
    cfg = tiny_cfg(generations=4, **overrides)
    res = run_cycleqd(build_components(cfg), cfg, tmp_path / "v", progress=False)
    assert res.generation == 4
    if overrides.get("mode") == "single":
        assert [a.quality_skill for a in res.archives] == ["mean"] and len(res.archives[0].axes) == 3


def test_mutation_variants_and_seeding_with_base(tiny_cfg, tmp_path, cache_dir):
    from cycleqd.config import parse_config
    from tests.conftest import tiny_config_dict

    for mut in ({"name": "gaussian", "std": 0.001}, {"name": "svd_self", "rate": 0.1}, {"name": "none"}):
        d = tiny_config_dict(cache_dir, generations=3)
        d["operators"]["mutation"] = mut
        d["model"]["seed_with_base"] = True
        cfg = parse_config(d)
        res = run_cycleqd(build_components(cfg), cfg, tmp_path / mut["name"], progress=False)
        seeds = [m["child"] for m in RunDir(tmp_path / mut["name"]).read_metrics() if m["generation"] == 0]
        assert seeds == ["expert:a", "expert:b", "expert:c", "base"] and res.generation == 3

"""``qd.use_cma`` in a synthetic run: proposals reach the operators, resume is exact."""

import functools
import json

import pytest

from cycleqd.engine.build import build_components
from cycleqd.engine.loop import CycleQDRun, run_cycleqd
from cycleqd.engine.rundir import RunDir
from cycleqd.engine.step import run_step
from cycleqd.executors.local import LocalExecutor


def _state(run_dir):
    return json.loads((run_dir / "state.json").read_text())


def _gens(run_dir):
    return [m for m in RunDir(run_dir).read_metrics() if m["generation"] >= 1 and m.get("kind") != "aggregate"]


def _run(cfg, run_dir, *, capacity=1, resume=False, stop_after=None):
    run = CycleQDRun(cfg, build_components(cfg), run_dir, resume=resume, progress=False)
    run.executor = LocalExecutor(functools.partial(run_step, ctx=run.ctx), capacity=capacity)
    try:
        return run.run(stop_after=stop_after)
    finally:
        run.executor.close()


def test_cma_params_reach_the_children_and_are_recorded(tiny_cfg, tmp_path):
    plain = tiny_cfg()
    run_cycleqd(build_components(plain), plain, tmp_path / "plain", progress=False)
    cfg = tiny_cfg(use_cma=True, cma_popsize=3)
    run_cycleqd(build_components(cfg), cfg, tmp_path / "cma", progress=False)
    gens = _gens(tmp_path / "cma")
    assert all(set(m["cma"]) == {"mu", "sigma", "rate"} for m in gens)
    assert len({m["cma"]["mu"] for m in gens}) == 12
    # same parents (sampling is independent of the operators), other children
    plain_gens = _gens(tmp_path / "plain")
    assert [m["parents"] for m in gens[:1]] == [m["parents"] for m in plain_gens[:1]]
    assert gens[0]["scores"] != plain_gens[0]["scores"]
    fits = _state(tmp_path / "cma")["cma"]["fitnesses"]
    assert [len(f) for f in fits] == [4, 4, 4]   # 12 generations, one fitness per child of each skill
    assert "cma" not in _state(tmp_path / "plain") and all("cma" not in m for m in plain_gens)


def test_stop_and_resume_equals_uninterrupted(tiny_cfg, tmp_path):
    # capacity 1: with more jobs in flight a resumed run samples parents from newer archives
    # than the uninterrupted one did (with or without CMA)
    cfg = tiny_cfg(use_cma=True, cma_popsize=3)
    _run(cfg, tmp_path / "full")
    _run(cfg, tmp_path / "part", stop_after=5)   # mid-population for every skill
    assert [len(f) for f in _state(tmp_path / "part")["cma"]["fitnesses"]] == [1, 2, 2]   # k = g mod 3
    _run(cfg, tmp_path / "part", resume=True)
    strip = lambda ms: [{k: m[k] for k in ("generation", "parents", "scores", "cma", "entered")} for m in ms]
    assert strip(_gens(tmp_path / "part")) == strip(_gens(tmp_path / "full"))
    assert _state(tmp_path / "part")["cma"] == _state(tmp_path / "full")["cma"]
    assert _state(tmp_path / "part")["archives"] == _state(tmp_path / "full")["archives"]


def test_more_in_flight_than_a_population_waits_for_tells(tiny_cfg, tmp_path):
    cfg = tiny_cfg(use_cma=True, cma_popsize=2)
    res = _run(cfg, tmp_path / "many", capacity=8)   # skill k's third child waits for its tell
    assert res.generation == 12
    assert [len(f) for f in _state(tmp_path / "many")["cma"]["fitnesses"]] == [4, 4, 4]
    assert len({m["cma"]["mu"] for m in _gens(tmp_path / "many")}) == 12


def test_use_cma_refuses_operators_without_its_settings(tiny_cfg, tmp_path):
    from cycleqd.config import parse_config
    from tests.conftest import tiny_config_dict

    d = tiny_config_dict(tmp_path / "cache", use_cma=True)
    d["operators"]["crossover"] = {"name": "task_arithmetic"}
    cfg = parse_config(d)
    with pytest.raises(ValueError, match="use_cma needs crossover 'linear'"):
        CycleQDRun(cfg, build_components(cfg), tmp_path / "r", progress=False)


def test_resume_from_a_snapshot_restores_the_cma_state(tiny_cfg, tmp_path):
    cfg = tiny_cfg(use_cma=True, cma_popsize=3)
    _run(cfg, tmp_path / "full")
    _run(cfg, tmp_path / "r")
    snap = json.loads((tmp_path / "r" / "archives" / "gen_000010.json").read_text())
    assert [len(f) for f in snap["cma"]["fitnesses"]] == [3, 4, 3]
    run = CycleQDRun(cfg, build_components(cfg), tmp_path / "r", resume=True, progress=False, from_snapshot=10)
    try:
        run.run()
    finally:
        run.executor.close()
    assert [m["cma"] for m in _gens(tmp_path / "r")] == [m["cma"] for m in _gens(tmp_path / "full")]
    assert _state(tmp_path / "r")["cma"] == _state(tmp_path / "full")["cma"]


def test_cma_in_the_compact_svd_genome_space(tiny_cfg, tmp_path, cache_dir):
    from cycleqd.config import parse_config
    from tests.conftest import tiny_config_dict

    runs = {}
    for use_cma in (False, True):
        d = tiny_config_dict(cache_dir, use_cma=use_cma, generations=3)
        d["operators"]["genome"] = "svd"
        cfg = parse_config(d)
        run_cycleqd(build_components(cfg), cfg, tmp_path / str(use_cma), progress=False)
        runs[use_cma] = _gens(tmp_path / str(use_cma))
    assert all("cma" in m for m in runs[True]) and all("cma" not in m for m in runs[False])
    assert runs[True][0]["parents"] == runs[False][0]["parents"]
    assert runs[True][0]["scores"] != runs[False][0]["scores"]


def test_fingerprint_sees_cma_settings_only_when_on(tiny_cfg):
    off = tiny_cfg().fingerprint()
    assert tiny_cfg(cma_popsize=4, cma_sigma0=0.5).fingerprint() == off   # unused: runs unchanged
    on = tiny_cfg(use_cma=True).fingerprint()
    assert on != off and tiny_cfg(use_cma=True, cma_popsize=4).fingerprint() != on

"""engine/runview.py: the read view of a finished run, and weight_space(cfg)."""

from __future__ import annotations

import pytest
import torch

from cycleqd.engine.build import build_components
from cycleqd.engine.loop import run_cycleqd
from cycleqd.engine.rundir import RunDirError
from cycleqd.engine.runview import RunView, weight_space


@pytest.fixture(scope="module")
def finished(tmp_path_factory, cache_dir):
    from cycleqd.config import parse_config
    from tests.conftest import tiny_config_dict

    cfg = parse_config(tiny_config_dict(cache_dir, generations=4))
    comps = build_components(cfg)
    res = run_cycleqd(comps, cfg, tmp_path_factory.mktemp("rv") / "run", progress=False)
    return cfg, comps, res


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_view_reads_what_the_run_committed(finished):
    cfg, comps, res = finished
    view = RunView(res.run_dir)
    assert view.config == cfg and view.generation == 4
    assert [a.quality_skill for a in view.archives] == cfg.skill_names
    assert {n: a.to_json() for n, a in zip(cfg.skill_names, view.archives)} == \
        {a.quality_skill: a.to_json() for a in res.archives}
    elites = view.elites()
    assert len(elites) == sum(len(a) for a in view.archives)
    assert all(set(e.scores) == set(cfg.skill_names) for _, e in elites)
    assert [m["child"] for m in view.seed_records()] == [f"expert:{s}" for s in cfg.skill_names]
    assert view.aggregate_scores() == pytest.approx(res.aggregate)
    with pytest.raises(ValueError, match=r"archive 'zz': the run's archives are \['a', 'b', 'c'\]"):
        view.archive("zz")


def test_view_genomes_match_the_run(finished):
    cfg, comps, res = finished
    view = RunView(res.run_dir)           # builds its own weight space from config.yaml
    space = view.space
    assert _same(space.materialize(view.genome("expert:b")), comps.space.materialize(comps.space.expert_genomes()[1]))
    elite = next(e for _, e in view.elites() if not e.id.startswith("expert:"))   # a child
    assert _same(space.materialize(view.genome(elite.id)), comps.space.materialize(
        comps.space.load(res.run_dir / "genomes" / f"{elite.id}{comps.space.genome_suffix}")))
    assert view.model_info.expert_specs == weight_space(cfg)[1].expert_specs
    with pytest.raises(ValueError, match=r"model 'expert:zz': skills are \['a', 'b', 'c'\]"):
        view.genome("expert:zz")
    with pytest.raises(FileNotFoundError, match="genome of 'g999999' not found"):
        view.genome("g999999")


def test_view_takes_a_built_space(finished):
    cfg, comps, res = finished
    view = RunView(res.run_dir, space=comps.space)
    assert view.space is comps.space


def test_view_refuses_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(RunDirError, match="is not a cycleqd run directory"):
        RunView(tmp_path)
    (tmp_path / "config.yaml").write_text("name: x\n")
    with pytest.raises(FileNotFoundError, match="has no state.json"):
        RunView(tmp_path).archives

"""Demo settings: the shipped YAMLs validate; bad values are named before any work."""

from __future__ import annotations

import argparse

import pytest

from cycleqd.config import ConfigError
from cycleqd.demo.config import load_demo_config, parse_demo_config
from cycleqd.demo.llm import DEFAULT_CONFIG, TOY_CONFIG, check_claims, config_from_args, run_config
from cycleqd.demo.llm import test_skills as build_test_skills


def test_shipped_configs_validate():
    full = load_demo_config(DEFAULT_CONFIG)
    toy = load_demo_config(TOY_CONFIG)
    assert [s.type for s in full.skills] == ["mbpp", "dbbench", "os"]
    assert toy.base == "tiny" and toy.qd.generations == 2


def test_flags_override_the_yaml():
    args = argparse.Namespace(toy=True, generations=5, seed=3, test_limit=7, search_limit=4,
                              train_steps=9, demo_set=["skills.db.bins=3", "train.recipe.lr=0.01"],
                              expert=["os=/some/adapter"])
    cfg = config_from_args(args)
    assert cfg.qd.generations == 5 and cfg.seed == 3
    assert {s.test_limit for s in cfg.skills} == {7} and {s.search_limit for s in cfg.skills} == {4}
    assert {s.steps for s in cfg.skills} == {9}
    assert next(s for s in cfg.skills if s.name == "db").bins == 3
    assert cfg.train.recipe["lr"] == 0.01 and cfg.experts == {"os": "/some/adapter"}


@pytest.mark.parametrize("edit, msg", [
    (lambda d: d["skills"][0].update(bc_range=[0.5, 0.1]), "bc_range"),
    (lambda d: d["skills"][0].update(type="humaneval"), "skills.0.type"),
    (lambda d: d["skills"][0]["params"].update(split="test"), "set by the demo"),
    (lambda d: d.update(experts={"nope": "x"}), "unknown skill"),
    (lambda d: d["train"]["recipe"].update(steps=0), "LoraRecipe.steps"),
    (lambda d: d.update(bogus=1), "bogus"),
])
def test_bad_settings_are_named(edit, msg):
    import yaml

    data = yaml.safe_load(TOY_CONFIG.read_text())
    edit(data)
    with pytest.raises(ConfigError, match=msg):
        parse_demo_config(data)


def test_unknown_skill_in_override():
    with pytest.raises(ConfigError, match="no skill named"):
        config_from_args(argparse.Namespace(toy=True, demo_set=["skills.nope.bins=3"]))


def test_run_config_scores_on_search_splits(tmp_path):
    cfg = load_demo_config(TOY_CONFIG)
    base = tmp_path / "base"
    base.mkdir()
    experts = {s.name: str(tmp_path / s.name) for s in cfg.skills}
    rc = run_config(cfg, base, experts, tmp_path)
    assert all(s.params["split"] == "search" for s in rc.skills)
    assert [s.params["limit"] for s in rc.skills] == [s.search_limit for s in cfg.skills]


@pytest.mark.parametrize("on", [True, False])
def test_sample_cache_switch_reaches_every_evaluator(tmp_path, on):
    cfg = load_demo_config(TOY_CONFIG, {"sample_cache": on})
    rc = run_config(cfg, tmp_path / "base", {s.name: str(tmp_path / s.name) for s in cfg.skills}, tmp_path)
    want = str(tmp_path / "samples.sqlite") if on else None
    assert [s.params["cache"] for s in rc.skills] == [want] * len(cfg.skills)
    for sk in build_test_skills(cfg, tmp_path):
        assert (sk.cache is not None) == on, sk.name
        if on:
            assert str(sk.cache.path) == want
    assert on or not list(tmp_path.glob("*.sqlite"))  # no cache file behind the user's back


def test_claims():
    rows = [{"id": "base", "scores": {"a": 0.1, "b": 0.0}, "mean": 0.05},
            {"id": "expert:a", "scores": {"a": 0.2, "b": 0.0}, "mean": 0.1},
            {"id": "expert:b", "scores": {"a": 0.1, "b": 0.03}, "mean": 0.065},
            {"id": "ties", "scores": {"a": 0.1, "b": 0.1}, "mean": 0.1},
            {"id": "cycleqd:aggregate", "scores": {"a": 0.2, "b": 0.1}, "mean": 0.15}]
    c = {x["claim"]: x["holds"] for x in check_claims(rows, ["a", "b"])}
    assert c["expert:a beats base on a by >= 5 points"] is True
    assert c["expert:b beats base on b by >= 5 points"] is False
    assert c["cycleqd:aggregate mean > ties mean"] is True
    assert "cycleqd:aggregate mean > multitask mean" not in c     # absent rows are not claimed


def test_out_dir_guard_and_resume_check(tmp_path):
    """An unfinished demo is continued only with --resume and the same settings; a finished
    one is never overwritten -- all decided before any model work."""
    import yaml

    from cycleqd.demo.llm import check_out_dir

    cfg = load_demo_config(TOY_CONFIG)
    out = tmp_path / "demo"
    assert check_out_dir(cfg, out, resume=False) is False       # fresh directory
    assert check_out_dir(cfg, out, resume=True) is False        # nothing to resume: start
    (out / "cycleqd").mkdir(parents=True)
    (out / "cycleqd" / "config.yaml").write_text("name: x\n")
    (out / "demo_config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    with pytest.raises(FileExistsError, match="--resume"):
        check_out_dir(cfg, out, resume=False)
    assert check_out_dir(cfg, out, resume=True) is True
    other = load_demo_config(TOY_CONFIG, {"qd.generations": 5})
    with pytest.raises(ConfigError, match="differ"):
        check_out_dir(other, out, resume=True)
    (out / "comparison.json").write_text("{}")
    with pytest.raises(FileExistsError, match="finished"):
        check_out_dir(cfg, out, resume=True)

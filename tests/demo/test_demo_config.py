"""Demo settings: the shipped YAMLs validate; bad values are named before any work."""

from __future__ import annotations

import argparse

import pytest

from cycleqd.config import ConfigError
from cycleqd.demo.config import DemoConfig, load_demo_config, parse_demo_config
from cycleqd.demo.llm import DEFAULT_CONFIG, TOY_CONFIG, check_claims, config_from_args, format_table, run_config
from cycleqd.demo.llm import test_skills as build_test_skills


def test_shipped_configs_validate():
    full = load_demo_config(DEFAULT_CONFIG)
    toy = load_demo_config(TOY_CONFIG)
    assert [s.type for s in full.skills] == ["mbpp", "dbbench", "os"]
    assert toy.base == "tiny" and toy.qd.generations == 2


def test_flags_override_the_yaml():
    args = argparse.Namespace(toy=True, generations=5, seed=3, test_limit=7, search_limit=4,
                              validation_limit=5, train_steps=9, demo_set=["skills.db.bins=3", "train.recipe.lr=0.01"],
                              expert=["os=/some/adapter"])
    cfg = config_from_args(args)
    assert cfg.qd.generations == 5 and cfg.seed == 3
    assert {s.test_limit for s in cfg.skills} == {7} and {s.search_limit for s in cfg.skills} == {4}
    assert {s.validation_limit for s in cfg.skills} == {5}
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
    (lambda d: d["merges"].update(ties={"density": []}), "empty grid"),
    (lambda d: d["merges"].update(ties={"density": [0.5, 2.0]}), "merges.ties"),
    (lambda d: d["merges"].update(task_arithmetic={"lamda": [0.5]}), "lamda"),
    (lambda d: d["skills"][1].update(validation_limit=0), "validation_limit"),
    (lambda d: d["final"].update(strategy="nope"), "final"),
    (lambda d: d["final"]["params"].update(weight_search={"budget": -1}), "budget"),
    (lambda d: d["operators"].update(aggregation={"name": "ties"}), "not both"),
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
    assert rc.final.strategy == "auto" and rc.final.params == cfg.final.params


def test_shipped_configs_choose_on_validation():
    """Both shipped demos size a validation split, choose the final model with ``auto`` and
    tune both merges over a grid (more than one point), all on validation."""
    for path in (DEFAULT_CONFIG, TOY_CONFIG):
        cfg = load_demo_config(path)
        assert all(s.validation_limit for s in cfg.skills), path
        assert cfg.final.strategy == "auto", path
        assert len(cfg.merges.grid("task_arithmetic")) > 1 and len(cfg.merges.grid("ties")) > 1, path


def test_validation_and_test_evaluators(tmp_path):
    from cycleqd.demo.llm import validation_skills

    cfg = load_demo_config(TOY_CONFIG, {"skills.coding.validation_limit": 1})
    val = validation_skills(cfg, tmp_path)
    assert [s.split for s in val] == ["validation"] * 3
    assert [s.split for s in build_test_skills(cfg, tmp_path)] == ["test"] * 3
    from cycleqd.demo.llm import _n_items
    assert [_n_items(s) for s in val] == [1, 2, 2]


def test_merge_grid_order():
    cfg = load_demo_config(TOY_CONFIG, {"merges.ties": {"density": [0.2, 0.5], "lambda": [1.0, 0.5]}})
    assert cfg.merges.grid("ties") == [{"density": 0.2, "lambda": 1.0}, {"density": 0.2, "lambda": 0.5},
                                       {"density": 0.5, "lambda": 1.0}, {"density": 0.5, "lambda": 0.5}]
    assert load_demo_config(TOY_CONFIG, {"merges.task_arithmetic": {"lambda": 0.7}}).merges.grid(
        "task_arithmetic") == [{"lambda": 0.7}]


class _Res:
    def __init__(self, q):
        self.quality, self.outcomes = q, {"item": q}


class _FakeSkill:
    """Scores a model (a dict of tensors) by how close its ``w`` is to ``target``."""

    def __init__(self, name, split, target):
        self.name, self.split, self.target, self.calls = name, split, target, 0

    def evaluate(self, model):
        self.calls += 1
        return _Res(float(1.0 - abs(model["w"].sum().item() - self.target)))


class _Space:
    """A weight space where a genome is its own task vector and the base is zero."""

    def materialize(self, g):
        return {k: v.clone() for k, v in g.items()}

    def task_vector(self, g):
        return g


class _Adapter:
    def bind(self, weights, fp):
        return weights


def test_merges_are_chosen_on_validation_never_test():
    """Task arithmetic's lambda and TIES' density follow the validation scores; skills on the
    test split are refused before anything is scored."""
    import torch

    from cycleqd.demo.llm import Scorer, tune_merges

    cfg = load_demo_config(TOY_CONFIG, {"merges.task_arithmetic": {"lambda": [0.5, 1.0, 2.0]},
                                        "merges.ties": {"density": [0.5, 1.0]}})
    experts = [{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.0, 1.0])}]
    space = _Space()
    # validation prefers lambda 1 (sum 2); a test split preferring lambda 0.5 must not matter
    val = [_FakeSkill("a", "validation", 2.0), _FakeSkill("b", "validation", 2.0)]
    out = tune_merges(cfg, space, experts, Scorer(space, _Adapter(), val))
    assert out["task_arithmetic"]["params"] == {"lambda": 1.0}
    assert [r["params"]["lambda"] for r in out["task_arithmetic"]["grid"]] == [0.5, 1.0, 2.0]
    assert out["task_arithmetic"]["grid"][1]["validation"] == {"a": 1.0, "b": 1.0}
    assert out["ties"]["split"] == "validation" and len(out["ties"]["grid"]) == 2
    test = [_FakeSkill("a", "test", 1.0), _FakeSkill("b", "validation", 1.0)]
    with pytest.raises(ValueError, match="validation split only"):
        tune_merges(cfg, space, experts, Scorer(space, _Adapter(), test))
    assert test[0].calls == test[1].calls == 0


def test_table_marks_the_final_choice():
    rows = [{"id": "base", "scores": {"a": 0.1}, "mean": 0.1},
            {"id": "ties", "scores": {"a": 0.2}, "mean": 0.2, "params": {"density": 0.5}, "validation_mean": 0.3},
            {"id": "final:mean", "scores": {"a": 0.0}, "mean": 0.0, "validation_mean": 0.1},
            {"id": "final:best_elite", "scores": {"a": 0.3}, "mean": 0.3, "validation_mean": 0.4,
             "final_choice": True}]
    md = format_table(rows, ["a"], {"a": 5}, check_claims(rows, ["a"]))
    assert "| **final:best_elite ← chosen** | 0.300 | 0.300 | 0.400 |" in md
    assert "| ties {'density': 0.5} | 0.200 | 0.200 | 0.300 |" in md
    assert "| base | 0.100 | 0.100 | - |" in md
    assert md.count("chosen**") == 1


def test_table_lists_unchosen_candidates_by_validation_only():
    """``test_candidates: chosen`` (the default): a candidate without a test row is listed
    under the table with its validation mean, and is never shown as scored on test."""
    rows = [{"id": "final:best_elite", "scores": {"a": 0.3}, "mean": 0.3, "validation_mean": 0.4,
             "final_choice": True}]
    final = {"chosen": "best_elite", "candidates": [
        {"strategy": "mean", "validation_mean": 0.125},
        {"strategy": "quality_weighted", "error": "every quality is 0"},
        {"strategy": "best_elite", "validation_mean": 0.4}]}
    md = format_table(rows, ["a"], {"a": 5}, [], final)
    assert "not scored on test): mean 0.125" in md
    assert "best_elite 0.400" not in md and "| final:mean" not in md
    assert "quality_weighted: every quality is 0" in md
    assert DemoConfig.model_fields["test_candidates"].default == "chosen"


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
            {"id": "final:mean", "scores": {"a": 0.0, "b": 0.0}, "mean": 0.0},
            {"id": "final:weight_search", "scores": {"a": 0.2, "b": 0.1}, "mean": 0.15, "final_choice": True}]
    c = {x["claim"]: x["holds"] for x in check_claims(rows, ["a", "b"])}
    assert c["expert:a beats base on a by >= 5 points"] is True
    assert c["expert:b beats base on b by >= 5 points"] is False
    assert c["final:weight_search (CycleQD's final model) mean > ties mean"] is True
    assert "final:weight_search (CycleQD's final model) mean > multitask mean" not in c  # absent rows
    assert not any(k.startswith("final:mean") for k in c)          # only the chosen candidate


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

"""The final model on a tiny synthetic run: chosen on the validation split only, every
candidate recorded in final.json; resume keeps it; config checks."""

from __future__ import annotations

import functools
import json

import pytest
import yaml

from cycleqd import configs
from cycleqd.config import AUTO_STRATEGIES, ConfigError, check_operators, parse_config
from cycleqd.engine.build import build_components, check_final, validation_skills
from cycleqd.engine.loop import run_cycleqd
from cycleqd.engine.rundir import RunDir
from cycleqd.skills.synthetic import SyntheticSkill
from tests.conftest import tiny_config_dict


def _cfg(cache_dir, final=None, **over):
    d = tiny_config_dict(cache_dir)
    if final is not None:
        d["final"] = final
    d.update(over)
    return parse_config(d)


@pytest.fixture()
def splits_built(monkeypatch):
    """Record every split a synthetic skill is built on; building the test split raises."""
    built = []
    init = SyntheticSkill.__init__

    @functools.wraps(init)
    def guarded(self, *a, split="search", **kw):
        if split == "test":
            raise AssertionError("the test split was built during a run")
        built.append(split)
        init(self, *a, split=split, **kw)

    monkeypatch.setattr(SyntheticSkill, "__init__", guarded)
    return built


def test_auto_scores_every_strategy_on_validation_and_keeps_the_best(cache_dir, tmp_path, splits_built):
    cfg = _cfg(cache_dir, {"strategy": "auto", "params": {"weight_search": {"budget": 4}}})
    run_cycleqd(build_components(cfg), cfg, tmp_path / "run", progress=False)
    assert set(splits_built) == {"search", "validation"}          # never "test"
    rec = json.loads((tmp_path / "run" / "final.json").read_text())
    assert [c["strategy"] for c in rec["candidates"]] == list(AUTO_STRATEGIES)
    means = [c["validation_mean"] for c in rec["candidates"]]
    for c in rec["candidates"]:
        assert set(c["validation"]) == {"a", "b", "c"}
        assert c["validation_mean"] == pytest.approx(sum(c["validation"].values()) / 3)
    assert rec["chosen"] == rec["candidates"][means.index(max(means))]["strategy"]  # first of the best
    assert rec["validation_mean"] == max(means) and rec["split"] == "validation"
    assert len(rec["candidates"][3]["search"]["candidates"]) == 5                     # budget 4 + start
    agg = [m for m in RunDir(tmp_path / "run").read_metrics() if m.get("kind") == "aggregate"]
    assert agg[-1]["final"] == {"strategy": "auto", "chosen": rec["chosen"], "validation_mean": max(means)}


def test_default_stays_the_mean_and_a_finished_run_keeps_its_final_json(cache_dir, tmp_path, splits_built):
    cfg = _cfg(cache_dir)
    assert cfg.fingerprint() == _cfg(cache_dir, {}).fingerprint()   # unset final: old fingerprints hold
    run_cycleqd(build_components(cfg), cfg, tmp_path / "run", progress=False)
    path = tmp_path / "run" / "final.json"
    rec, stat = json.loads(path.read_text()), path.stat()
    assert rec["strategy"] == rec["chosen"] == "paper" and len(rec["candidates"]) == 1
    assert set(rec["candidates"][0]["validation"]) == {"a", "b", "c"}   # recorded, not used to choose
    res = run_cycleqd(build_components(cfg), cfg, tmp_path / "run", progress=False, resume=True)
    assert res.complete and path.stat().st_mtime_ns == stat.st_mtime_ns
    assert "test" not in splits_built


def test_final_config_is_checked(cache_dir):
    with pytest.raises(ConfigError, match="final.strategy: set either"):
        check_operators(_cfg(cache_dir, {"strategy": "mean"}, operators={"aggregation": {"name": "quality"}}))
    with pytest.raises(ConfigError, match=r"final.params: \['meen'\]"):
        check_operators(_cfg(cache_dir, {"strategy": "auto", "params": {"meen": {}}}))
    with pytest.raises(ConfigError, match="final.budgett"):
        check_operators(_cfg(cache_dir, {"strategy": "weight_search", "params": {"budgett": 3}}))
    with pytest.raises(ConfigError, match="final"):
        check_operators(_cfg(cache_dir, {"strategy": "best-of"}))
    check_operators(_cfg(cache_dir, {"strategy": "task_arithmetic", "params": {"lambdas": [0.5, 1.0]}}))


def test_llm_skills_are_rebuilt_on_their_validation_split(tmp_path):
    from tests.engine.test_validate import PROJECT_SKILLS

    d = yaml.safe_load(configs.path("paper").read_text())
    d["skills"] = [dict(s, params=dict(s["params"])) for s in PROJECT_SKILLS]  # official: search only
    d["model"] = {"base": str(tmp_path), "experts": {s["name"]: str(tmp_path) for s in d["skills"]}}
    cfg = parse_config(d)
    skills = validation_skills(cfg, tmp_path)()
    assert [s.name for s in skills] == cfg.skill_names
    assert {s.split for s in skills} == {"validation"}      # never search, never test
    d["skills"][0] = {"name": "arc", "type": "lmeval", "params": {"task": "arc_easy"}, "bc_range": [0, 1]}
    d["model"]["experts"] = {s["name"]: str(tmp_path) for s in d["skills"]}
    d["final"] = {"strategy": "auto"}
    lm = parse_config(d)
    assert validation_skills(lm, tmp_path) is None
    with pytest.raises(ConfigError, match=r"final.strategy: chooses on the validation split.*\['arc'\]"):
        check_final(lm)


def test_auto_keeps_going_when_one_strategy_cannot_apply():
    """Every archive best at quality 0: quality_weighted cannot weigh them (ValueError); with
    ``auto`` it is one failed candidate (recorded with its error, never chosen), not a dead
    run; a single configured strategy still raises."""
    import torch

    from cycleqd.engine.final import select_final

    class E:
        def __init__(self, i):
            self.id, self.scores = f"m{i}", {"a": 0.0, "b": 0.0}

    class A:
        def __init__(self, i):
            self.e = E(i)

        def best(self):
            return self.e

        def quality_of(self, scores):
            return scores["a"]

        def __iter__(self):
            return iter([((0,), self.e)])

    class Space:
        def task_vector(self, g):
            return g

    genomes = {"m0": {"w": torch.tensor([1.0])}, "m1": {"w": torch.tensor([3.0])}}
    plan = [("mean", {}), ("quality_weighted", {}), ("task_arithmetic", {"lambdas": [0.5, 1.0]})]
    score = lambda g: {"a": -abs(float(g["w"].sum()) - 4.0), "b": 0.0}   # prefers the sum (lambda 1)
    g, rec = select_final(Space(), [A(0), A(1)], genomes.__getitem__, plan, score)
    assert [("error" in c) for c in rec["candidates"]] == [False, True, False]
    assert "sum to zero" in rec["candidates"][1]["error"]
    assert rec["chosen"] == "task_arithmetic" and float(g["w"].sum()) == 4.0
    with pytest.raises(ValueError, match="sum to zero"):
        select_final(Space(), [A(0), A(1)], genomes.__getitem__, [("quality_weighted", {})], score)

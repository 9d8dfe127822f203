"""The vision run chooses its final model on the validation split (issue 14): every
strategy's validation scores in final.json, and no test image is built or scored during
the run or the baselines' tuning."""

from __future__ import annotations

import functools
import json

import pytest

from cycleqd.config import AUTO_STRATEGIES
from cycleqd.engine import loop
from cycleqd.vision import pipeline
from cycleqd.vision.pipeline import build_setup, merge_baselines, run_search
from cycleqd.vision.skills import DomainAccuracySkill, domain_skills


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return build_setup(toy=True, cache_root=tmp_path_factory.mktemp("vision-cache"))


@pytest.fixture()
def no_test_in_run(monkeypatch):
    """While ``run_cycleqd`` runs, building or scoring a test-split skill raises; every split
    scored in that time is recorded."""
    seen, inside = [], []
    init, evaluate, run = DomainAccuracySkill.__init__, DomainAccuracySkill.evaluate, loop.run_cycleqd

    def guard(split):
        if inside and split == "test":
            raise AssertionError("a test-split vision skill was used during the run")

    @functools.wraps(init)
    def g_init(self, name, data, **kw):
        guard(data.split)
        init(self, name, data, **kw)

    @functools.wraps(evaluate)
    def g_eval(self, model):
        guard(self.data.split)
        if inside:
            seen.append(self.data.split)
        return evaluate(self, model)

    @functools.wraps(run)
    def g_run(*a, **kw):
        inside.append(1)
        try:
            return run(*a, **kw)
        finally:
            inside.clear()

    monkeypatch.setattr(DomainAccuracySkill, "__init__", g_init)
    monkeypatch.setattr(DomainAccuracySkill, "evaluate", g_eval)
    monkeypatch.setattr(loop, "run_cycleqd", g_run)
    return seen


def test_scores_on_every_split_and_nothing_else(setup):
    val = setup.scores(setup.base, split="validation")
    assert set(val) == set(setup.skill_names) and all(0 <= v <= 1 for v in val.values())
    assert [s.data.split for s in setup.skills("validation")] == ["validation"] * 3
    ids = {int(i) for s in setup.skills("validation") for i in s.data.ids}
    assert not ids & {int(i) for s in setup.skills("test") for i in s.data.ids}
    with pytest.raises(ValueError, match="split must be one of"):
        setup.scores(setup.base, split="train")
    with pytest.raises(ValueError, match="test split only"):
        setup.scores(setup.base, split="validation", clean=True)
    with pytest.raises(ValueError, match="no 'validation' split"):
        domain_skills({"rotated": {"search": setup.data["rotated"]["search"]}}, ["rotated"], "validation")
    with pytest.raises(ValueError, match="tune on"):
        merge_baselines(setup, split="test")


def test_auto_final_is_chosen_on_validation_without_test(setup, tmp_path, no_test_in_run):
    res = run_search(setup, tmp_path / "run", generations=4, seed=1, final="auto")
    assert set(no_test_in_run) == {"search", "validation"}
    rec = json.loads((tmp_path / "run" / "final.json").read_text())
    assert rec == res["final"] and rec["split"] == "validation" and rec["strategy"] == "auto"
    assert [c["strategy"] for c in rec["candidates"]] == list(AUTO_STRATEGIES)
    means = [c["validation_mean"] for c in rec["candidates"]]
    assert rec["chosen"] == rec["candidates"][means.index(max(means))]["strategy"]
    # the recorded validation scores are the setup's own validation accuracies of the final model
    space = pipeline.DenseWeightSpace(setup.base, setup.taus, None, None)
    tau = space.load(tmp_path / "run" / "genomes" / "aggregate.safetensors")
    assert setup.tau_scores(tau, split="validation") == pytest.approx(
        rec["candidates"][means.index(max(means))]["validation"])
    assert set(res["aggregate"]["test"]) == {*setup.skill_names, "clean"}   # test: reported afterwards


def test_default_run_keeps_the_mean_and_records_validation(setup, tmp_path, no_test_in_run):
    res = run_search(setup, tmp_path / "run", generations=2, seed=0)
    assert res["final"]["chosen"] == "paper" and len(res["final"]["candidates"]) == 1
    assert set(res["final"]["candidates"][0]["validation"]) == set(setup.skill_names)
    assert "test" not in no_test_in_run


def test_baselines_tune_on_the_split_given(setup):
    b = merge_baselines(setup, split="validation")
    for name in ("task_arithmetic", "ties"):
        assert b[name]["split"] == "validation" and "search" not in b[name]
        assert b[name]["validation"] == pytest.approx(setup.tau_scores(b[name]["tau"], split="validation"))


def test_demo_chooses_everything_on_validation_before_any_test_score(tmp_path, monkeypatch):
    """The demo's baselines are tuned on validation and its final model chosen on validation;
    every test-split score comes after the last search/validation score."""
    from cycleqd.vision import demo

    log: list[str] = []
    evaluate = DomainAccuracySkill.evaluate

    def logged(self, model):
        log.append(self.data.split)
        return evaluate(self, model)

    monkeypatch.setattr(DomainAccuracySkill, "evaluate", logged)
    cache = tmp_path / "cache"
    res = demo.main(tmp_path / "demo", generations=3, seed=0, toy=True, cache_root=cache, progress=False, quiet=True)
    first_test = log.index("test")
    assert {"search", "validation"} <= set(log[:first_test]) and set(log[first_test:]) == {"test"}
    setup = build_setup(toy=True, cache_root=cache)
    tuned = merge_baselines(setup, split="validation")
    for name in ("task_arithmetic", "ties"):
        assert res["baselines"][name]["params"] == tuned[name]["params"]
        assert res["baselines"][name]["validation"] == pytest.approx(tuned[name]["validation"])
        assert "search" not in res["baselines"][name]
    rows = {r["model"]: r for r in res["rows"]}
    assert "(validation-tuned)" in rows["task arithmetic"]["note"] and "(validation-tuned)" in rows["TIES"]["note"]
    fin = res["run"]["final"]
    assert fin["split"] == "validation" and fin["strategy"] == demo.DEFAULT_FINAL["strategy"] == "auto"
    ta = next(c for c in fin["candidates"] if c["strategy"] == "task_arithmetic")
    assert ta["params"] == {"lambdas": list(pipeline.TA_LAMBDAS)}   # the baseline's grid
    assert f"chose {fin['chosen']} on validation" in rows[demo.FINAL_ROW]["note"]

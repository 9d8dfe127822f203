"""benchmarks/vision_fidelity.py at toy size: every row over two seeds, and per seed every
choice (baselines' tuning, the run, every final strategy) is made before any test score."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from cycleqd.config import AUTO_STRATEGIES
from cycleqd.vision.skills import DomainAccuracySkill

EXTRA = '{"ta half": ["task_arithmetic", {"lambda": 0.5}], "auto2": ["auto", {"weight_search": {"budget": 2}}]}'
SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "vision_fidelity.py"


@pytest.fixture()
def bench():
    spec = importlib.util.spec_from_file_location("vision_fidelity", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_toy_fidelity_table(bench, tmp_path, monkeypatch, capsys):
    log: list[tuple[int, str]] = []
    evaluate, one_seed = DomainAccuracySkill.evaluate, bench.one_seed

    def logged(self, model):
        log.append((current[0], self.data.split))
        return evaluate(self, model)

    current = [None]

    def seed_marked(seed, **kw):
        current[0] = seed
        return one_seed(seed, **kw)

    monkeypatch.setattr(DomainAccuracySkill, "evaluate", logged)
    monkeypatch.setattr(bench, "one_seed", seed_marked)
    out = tmp_path / "fid"
    summary = bench.main(["--out", str(out), "--toy", "--seeds", "0", "1", "--generations", "3",
                          "--cache-dir", str(tmp_path / "cache"), "--final-params", '{"weight_search": {"budget": 3}}', "--extra-finals", EXTRA])
    for seed in (0, 1):                       # selection never saw the test split
        splits = [s for k, s in log if k == seed]
        first_test = splits.index("test")
        assert "validation" in splits[:first_test] and set(splits[first_test:]) == {"test"}
    domains = ["rotated", "noisy", "occluded"]
    names = (["base"] + [f"expert: {d}" for d in domains] + ["multi-domain fine-tune", "task arithmetic", "TIES"]
             + [f"CycleQD final: {s}" for s in (*AUTO_STRATEGIES, "auto", "ta half", "auto2")])
    assert [r["row"] for r in summary["rows"]] == names
    md = (out / "fidelity.md").read_text()
    assert capsys.readouterr().out.strip() == md.strip()
    ref = summary["best_baseline"]
    for r in summary["rows"]:
        assert f"| {r['row']} | {100 * r['mean']:.1f}" in md and len(r["per_seed"]) == 2
        assert r["mean"] == pytest.approx(sum(r["per_domain"].values()) / 3)
        assert (r["vs_best_baseline"] is None) == (r["row"] == ref)
        if r["vs_best_baseline"] is not None:
            assert 0 < r["vs_best_baseline"]["p_sign_flip"] <= 1 and math.isfinite(r["ci95"])
    rows = {r["row"]: r for r in summary["rows"]}
    for seed in (0, 1):
        res = json.loads((out / f"seed_{seed}" / "result.json").read_text())
        fin = res["final_json"]
        assert fin["split"] == "validation" and [c["strategy"] for c in fin["candidates"]] == list(AUTO_STRATEGIES)
        assert res["test"]["CycleQD final: auto"] == res["test"][f"CycleQD final: {fin['chosen']}"]
        assert res["notes"]["TIES"]["validation"] and "search" not in res["notes"]["TIES"]
    assert rows["CycleQD final: auto"]["per_seed"] == [
        rows[f"CycleQD final: {c}"]["per_seed"][i] for i, c in enumerate(summary["auto_chose"])]
    assert json.loads((out / "fidelity.json").read_text())["rows"] == json.loads(json.dumps(summary["rows"]))
    log.clear()                               # a re-run reuses both finished seeds
    assert bench.main(["--out", str(out), "--toy", "--seeds", "0", "1", "--generations", "3", "--cache-dir",
                       str(tmp_path / "cache"), "--final-params", '{"weight_search": {"budget": 3}}',
                       "--extra-finals", EXTRA])["rows"] == summary["rows"] and log == []
    # the extra rows: a fixed-scale task arithmetic of the bests (coefficients 0.5 on each best)
    # and auto over other parameters; the diagnostics are in the table and the JSON
    diag = summary["diagnostics"]
    assert [c["lambda"] for c in diag["coef"]["CycleQD final: ta half"]["chosen"]] == [0.5, 0.5]
    assert diag["coef"]["task arithmetic"]["sum_all"] == pytest.approx(
        3 * sum(c["lambda"] for c in diag["coef"]["task arithmetic"]["chosen"]) / 2, abs=1e-4)
    assert diag["coef"]["CycleQD final: mean"]["sum_all"] == pytest.approx(
        sum(b["sum_all"] for b in diag["bests"].values()) / 3, abs=1e-4)
    assert [x["seed"] for x in diag["landscape"]] == [0, 1] and "Where the good multi-skill models sit" in md
    assert set(diag["optimism"]) == set(diag["coef"]) and "selection optimism" in md
    # a variant folder compares paired against task arithmetic on the same seeds
    cmp = bench.main(["--compare", f"v={out}", f"w={out}"])["markdown"]
    assert cmp.count("| v | ") == len(AUTO_STRATEGIES) + 3 and "| (all) | task arithmetic |" in cmp


def test_bad_extra_final_is_one_line_before_work(bench, tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--out", str(tmp_path / "x"), "--toy", "--extra-finals", '{"a": ["nope", {}]}'])
    assert "nope" in capsys.readouterr().err and not (tmp_path / "x" / "seed_0").exists()


def test_sign_flip_is_exact(bench):
    assert bench.sign_flip_p([0.1, 0.2, 0.3]) == pytest.approx(2 / 8)   # only all-+ and all-- reach it
    assert bench.sign_flip_p([0.0, 0.0]) == 1.0
    assert bench.mean_ci([0.5, 0.7])[1] == pytest.approx(12.7062 * math.sqrt(0.02) / math.sqrt(2), rel=1e-4)

"""Issue 15 item 9: the Python API (`import cycleqd`) and its documentation. The code blocks
of docs/python-api.md are executed; docs/skills.md documents every skill type and every
parameter of each evaluator."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import yaml

import cycleqd

REPO = Path(__file__).resolve().parents[2]
API_DOC = REPO / "docs" / "python-api.md"
SKILLS_DOC = REPO / "docs" / "skills.md"


def _blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def test_registries_and_api_names():
    assert {"linear", "ties", "task_arithmetic"} <= set(cycleqd.CROSSOVERS)
    assert {"svd_expert", "gaussian"} <= set(cycleqd.MUTATIONS)
    assert "paper" in cycleqd.AGGREGATIONS
    assert set(cycleqd.SKILLS) == set(cycleqd.SKILL_TYPES) - {"external"}
    assert cycleqd.RunConfig is cycleqd.load_config(cycleqd.configs.path("tiny")).__class__
    for name in cycleqd.__all__:
        getattr(cycleqd, name)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        cycleqd.nope  # noqa: B018


def test_the_ten_line_search_in_the_doc_runs(tmp_path, monkeypatch, capsys, cache_dir):
    code = _blocks(API_DOC.read_text(), "python")[0]
    assert len([ln for ln in code.splitlines() if ln.strip()]) <= 10
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CYCLEQD_CACHE", str(cache_dir))
    exec(compile(code, str(API_DOC), "exec"), {})
    out = capsys.readouterr().out
    for arch in ("alpha", "beta", "gamma"):
        assert re.search(rf"^{arch}: coverage \d\.\d\d  QD score \d+\.\d\d  best \d\.\d{{3}}$", out, re.M)
    assert "aggregated model: {'alpha'" in out
    run = tmp_path / "runs" / "api-tiny"
    assert (run / "report.html").is_file() and (run / "maps" / "elite_maps.png").is_file()
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3 + 6 + 1   # seeds, generations, aggregate


def test_the_custom_operator_in_the_doc_registers_and_runs(tmp_path, cache_dir):
    from tests.conftest import tiny_config_dict

    code = _blocks(API_DOC.read_text(), "python")[1]
    try:
        exec(compile(code, str(API_DOC), "exec"), {})
        assert "mean" in cycleqd.CROSSOVERS
        d = tiny_config_dict(cache_dir, generations=2)
        d["operators"]["crossover"] = {"name": "mean"}
        cfg = cycleqd.parse_config(d)
        res = cycleqd.run_cycleqd(cycleqd.build_components(cfg), cfg, tmp_path / "run", progress="off")
        assert res.generation == 2 and res.aggregate is not None
    finally:
        cycleqd.CROSSOVERS.pop("mean", None)


def test_skills_doc_lists_every_skill_type_and_parameter():
    from cycleqd.skills.coding.skill import CodingSkill
    from cycleqd.skills.agentbench.dbbench import DBBenchSkill
    from cycleqd.skills.agentbench.os_interaction import OSInteractionSkill
    from cycleqd.skills.synthetic import SyntheticSkill

    text = SKILLS_DOC.read_text()
    sections = dict(re.findall(r"^## `([a-z]+)`.*?\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M))
    for t in cycleqd.SKILL_TYPES:
        assert t in sections or any(f"`{t}`" in h for h in re.findall(r"^## .*$", text, re.M)), t
    classes = {"mbpp": CodingSkill, "dbbench": DBBenchSkill, "os": OSInteractionSkill,
               "synthetic": SyntheticSkill}
    try:
        from cycleqd.skills.lmeval import LMEvalSkill

        classes["lmeval"] = LMEvalSkill
    except ImportError:  # pragma: no cover
        pass
    for t, cls in classes.items():
        params = [p for p in inspect.signature(cls.__init__).parameters
                  if p not in ("self", "name", "dataset", "base", "target")]
        missing = [p for p in params if f"| `{p}` |" not in sections[t]]
        assert not missing, f"docs/skills.md § {t} lacks parameters {missing}"
    # prompt formats are the code's
    from cycleqd.skills.coding import skill as coding

    assert coding.OFFICIAL_SYSTEM_PROMPT in text.replace("\n", " ")
    assert "Your code should pass these tests:" in text and "Write the Python function in a single" in text


def test_skills_doc_example_configs_validate():
    examples = [yaml.safe_load(b) for b in _blocks(SKILLS_DOC.read_text(), "yaml")]
    full = [e for e in examples if "model" in e]
    assert full and full[0]["skills"][0]["type"] == "lmeval"
    cfg = cycleqd.parse_config(full[0])
    assert [s.params["task"] for s in cfg.skills] == ["arc_easy", "gsm8k"]
    for e in examples:
        for s in e["skills"]:
            cycleqd.parse_config({"skills": [s, {**s, "name": s["name"] + "2"}],
                                  "model": {"synthetic": {}} if s["type"] == "synthetic" else
                                  {"base": "b", "experts": {s["name"]: "x", s["name"] + "2": "y"}}})

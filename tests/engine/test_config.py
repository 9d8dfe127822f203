from pathlib import Path

import pytest

from cycleqd.config import ConfigError, load_config, parse_config
from tests.conftest import tiny_config_dict

REPO = Path(__file__).resolve().parents[2]


def _bad(mutate, match, tmp_path):
    d = tiny_config_dict(tmp_path)
    mutate(d)
    with pytest.raises(ConfigError, match=match):
        parse_config(d)


@pytest.mark.parametrize("mutate,match", [
    (lambda d: d.update(colour="red"), r"colour: unknown key; the top level takes name, seed"),
    (lambda d: d["qd"].update(generatoins=3), r"qd.generatoins: unknown key \(did you mean 'generations'\?\); qd takes generations"),
    (lambda d: d["qd"].update(generations="many"), r"qd.generations: Input should be a valid integer"),
    (lambda d: d["skills"][1].update(bc_range=[0.5, 0.2]), r"skills.1.bc_range: min \(0.5\) must be < max \(0.2\)"),
    (lambda d: d["skills"][0].update(bins=0), r"skills.0.bins"),
    (lambda d: d.update(skills=d["skills"][:1]), r"at least 2 skills"),
    (lambda d: d["skills"][2].update(name="a"), r"duplicate skill names: \['a'\]"),
    (lambda d: d["skills"][0].update(type="chess"), r"skills.0.type: unknown skill type 'chess'"),
    (lambda d: d["qd"].update(sampling="best"), r"qd.sampling"),
    (lambda d: d["operators"]["crossover"].update(name="average"), r"operators.crossover.name: unknown crossover 'average'"),
    (lambda d: d["operators"]["mutation"].update(rtae=0.1), r"operators.mutation.rtae: 'svd_expert' takes no argument"),
    (lambda d: d.update(model={"base": "/x", "experts": {"a": "/1", "b": "/2"}}), r"no expert for skill\(s\) \['c'\]"),
    (lambda d: d.update(model={"base": "/x", "experts": {"a": "/1", "b": "/2", "c": "/3", "d": "/4"}}),
     r"expert\(s\) for unknown skill\(s\) \['d'\]"),
    (lambda d: d.update(model={}), r"give model.base"),
])
def test_config_errors_name_the_field(mutate, match, tmp_path):
    _bad(mutate, match, tmp_path)


def test_load_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("skills: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(tmp_path / "list.yaml")


def test_shipped_configs_are_valid_and_overrides_apply():
    cfg = load_config(REPO / "configs" / "tiny.yaml", {"qd.generations": 5, "qd.sampling": "uniform"})
    assert cfg.qd.generations == 5 and cfg.qd.sampling == "uniform"
    paper = load_config(REPO / "configs" / "paper.yaml")
    assert paper.qd.generations == 1200 and paper.skill_names == ["coding", "db", "os"]
    assert [s.bc_range for s in paper.skills] == [(0.0, 0.75), (0.0, 0.45), (0.0, 0.45)]
    assert all(s.bins == 15 for s in paper.skills)


def test_missing_model_path_is_reported_before_loading(tmp_path):
    from cycleqd.engine.build import build_components

    d = tiny_config_dict(tmp_path)
    d["skills"] = [{"name": n, "type": "mbpp"} for n in "ab"]
    d["model"] = {"base": str(tmp_path / "missing-base"), "experts": {"a": "/nope/a", "b": "/nope/b"}}
    with pytest.raises(ConfigError, match="model.base: .*missing-base' does not exist"):
        build_components(parse_config(d))

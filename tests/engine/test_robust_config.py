"""Issue 18 items 3, 4 and 9 at the config layer: operator parameters are finite and in range
at ``cycleqd validate`` time, and ``--set`` values are parsed by the type of the field they set."""

from __future__ import annotations

from pathlib import Path

import pytest

from cycleqd.cli import _overrides, main
from cycleqd.config import ConfigError, load_config, parse_config
from tests.conftest import tiny_config_dict

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"


# -- item 3: non-finite / out-of-range operator parameters -------------------------------------
@pytest.mark.parametrize("kind,params,match", [
    ("mutation", {"rate": float("nan")}, r"operators.mutation: rate=nan: must be a finite number"),
    ("mutation", {"rate": float("inf")}, r"operators.mutation: rate=inf: must be a finite number"),
    ("mutation", {"rate": "nan"}, r"operators.mutation: rate='nan': must be a finite number"),
    ("mutation", {"rate": -0.1}, r"operators.mutation.rate: must be >= 0, got -0.1"),
    ("mutation", {"rate": "fast"}, r"operators.mutation.rate: expected float, got 'fast' \(str\)"),
    ("crossover", {"sigma": float("nan")}, r"operators.crossover: sigma=nan: must be a finite number"),
    ("crossover", {"sigma": float("-inf")}, r"operators.crossover: sigma=-inf: must be a finite number"),
    ("crossover", {"sigma": -0.01}, r"operators.crossover.sigma: must be >= 0 .*, got -0.01"),
    ("crossover", {"mu": float("nan")}, r"operators.crossover: mu=nan"),
    ("crossover", {"name": "ties", "weights": [1.0, float("nan")]}, r"operators.crossover: weights=nan: must be a finite"),
    ("crossover", {"name": "dare", "density": 1e-8}, r"operators.crossover.density: below the minimum 0.001.*, got 1e-08"),
    ("crossover", {"name": "dare", "density": 1.5}, r"operators.crossover.density: must be in \[0, 1\], got 1.5"),
    ("crossover", {"name": "slerp", "t": float("nan")}, r"t=nan: must be a finite"),
    ("aggregation", {"name": "dare", "density": 1e-9}, r"operators.aggregation.density: below the minimum .*, got 1e-09"),
])
def test_validate_rejects_bad_operator_numbers(tmp_path, kind, params, match):
    d = tiny_config_dict(tmp_path)
    default = {"crossover": "linear", "mutation": "svd_expert", "aggregation": "paper"}[kind]
    d["operators"][kind] = {"name": default, **params}
    with pytest.raises(ConfigError, match=match):
        parse_config(d)


def test_other_float_fields_refuse_nan(tmp_path):
    d = tiny_config_dict(tmp_path)
    d["skills"][0]["bc_range"] = [0.0, float("inf")]
    with pytest.raises(ConfigError, match=r"skills.0.bc_range.1: Input should be a finite number"):
        parse_config(d)
    d = tiny_config_dict(tmp_path)
    d["model"]["synthetic"]["expert_scale"] = float("nan")
    with pytest.raises(ConfigError, match=r"model.synthetic.expert_scale: Input should be a finite number"):
        parse_config(d)


def test_yaml_file_exponent_is_a_number_for_operators(tmp_path):
    """YAML 1.1 (PyYAML) reads ``rate: 1e-3`` from a file as the string '1e-3'."""
    cfg = TINY.read_text().replace("rate: 0.1", "rate: 1e-3")
    (tmp_path / "c.yaml").write_text(cfg)
    c = load_config(tmp_path / "c.yaml")
    assert c.operators.mutation.kwargs()["rate"] == pytest.approx(1e-3)
    assert isinstance(c.operators.mutation.kwargs()["rate"], float)


# -- item 4: numbers from the command line ------------------------------------------------------
def test_set_float_with_exponent_is_a_float():
    cfg = load_config(TINY, _overrides(["operators.mutation.rate=1e-3", "operators.crossover.sigma=2E-2"]))
    assert cfg.operators.mutation.kwargs() == {"rate": 1e-3}
    assert cfg.operators.crossover.kwargs() == {"sigma": 0.02}


@pytest.mark.parametrize("pair,check", [
    ("qd.generations=7", lambda c: c.qd.generations == 7),
    ("qd.generations=1e2", lambda c: c.qd.generations == 100),
    ("model.seed_with_base=true", lambda c: c.model.seed_with_base is True),
    ("skills.0.bins=12", lambda c: c.skills[0].bins == 12),
    ("skills.beta.bins=4", lambda c: c.skills[1].bins == 4),
    ("skills.gamma.bc_range=[0, 0.45]", lambda c: c.skills[2].bc_range == (0.0, 0.45)),
    ("name=1e3", lambda c: c.name == "1e3"),                         # a string field stays text
    ("name=007", lambda c: c.name == "007"),
    ("name=yes", lambda c: c.name == "yes"),
    ("executor.address=127.0.0.1:6379", lambda c: c.executor.address == "127.0.0.1:6379"),
    ("executor.address=null", lambda c: c.executor.address is None),
    ("skills.alpha.params.limit=1e1", lambda c: c.skills[0].params == {"limit": 10.0}),
    ("operators.mutation.svd_tol=1e-5", lambda c: c.operators.mutation.kwargs()["svd_tol"] == 1e-5),
    ("operators.mutation.rank=8", lambda c: c.operators.mutation.kwargs()["rank"] == 8),
    ("operators.crossover={name: ties, density: 5e-1}",
     lambda c: c.operators.crossover.name == "ties" and c.operators.crossover.kwargs() == {"density": 0.5}),
    ("seed=010", lambda c: c.seed == 10),                            # YAML 1.2: not octal
])
def test_set_values_follow_the_field_type(pair, check):
    assert check(load_config(TINY, _overrides([pair])))


@pytest.mark.parametrize("pair,match", [
    ("skills.delta.bins=3", r"--set skills.delta.bins: skills has no entry named 'delta' \(names: alpha, beta, gamma"),
    ("skills.9.bins=3", r"--set skills.9.bins: skills has 3 entries, no index 9"),
    ("qd.generations.x=3", r"--set qd.generations.x: qd.generations holds 60 \(int\), not a mapping"),
    ("qd.generations=many", r"qd.generations: Input should be a valid integer"),
    ("operators.mutation.rate=.nan", r"rate=nan: must be a finite number"),
    ("operators.mutation.rate=-1e-3", r"operators.mutation.rate: must be >= 0, got -0.001"),
    ("skills.0.bc_range=[0, .inf]", r"skills.0.bc_range.1: Input should be a finite number"),
])
def test_bad_set_values_give_one_clear_error(pair, match):
    with pytest.raises(ConfigError, match=match):
        load_config(TINY, _overrides([pair]))


def test_cli_validate_reports_set_errors_in_one_line(capsys):
    assert main(["validate", str(TINY), "--set", "skills.delta.bins=3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no entry named 'delta'" in err and "Traceback" not in err
    assert main(["validate", str(TINY), "--set", "operators.mutation.rate=1e-3"]) == 0


def test_set_without_equals_is_refused():
    with pytest.raises(ConfigError, match="^--set expects KEY=VALUE"):
        _overrides(["qd.generations"])


def test_string_operator_parameters_stay_text():
    cfg = load_config(TINY, _overrides(["operators.mutation.svd_method=lowrank", "operators.mutation.rank=8",
                                        "operators.mutation.include=1e3"]))
    kw = cfg.operators.mutation.kwargs()
    assert kw["svd_method"] == "lowrank" and kw["rank"] == 8 and kw["include"] == "1e3"


def test_demo_set_documented_overrides_are_typed():
    """docs/demo.md documents ``--set skills.os.bins=15`` and ``--set train.recipe.lr=3e-4``."""
    from cycleqd.cli import build_parser
    from cycleqd.demo.llm import config_from_args

    argv = ["demo", "--toy", "--set", "train.recipe.lr=3e-4", "--set", "skills.os.bins=15"]
    args = build_parser(argv).parse_args(argv)  # the demo's options load for a demo argv
    cfg = config_from_args(args)
    assert cfg.train.recipe["lr"] == 3e-4 and isinstance(cfg.train.recipe["lr"], float)
    assert {s.name: s.bins for s in cfg.skills}["os"] == 15

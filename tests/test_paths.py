"""One cache rule (issue 16 item 4): ``~`` expanded the same way everywhere, ``cfg.cache_dir``
honoured by everything a run writes, no module with a rule of its own."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cycleqd import paths
from cycleqd.config import parse_config
from tests.conftest import tiny_config_dict


@pytest.fixture()
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("CYCLEQD_CACHE", "~/cq")   # quoted in a shell: a literal "~"
    return tmp_path


def test_tilde_in_the_environment_means_home(home):
    assert paths.cache_dir() == home / "cq"
    assert paths.cache_dir(None) == home / "cq"
    assert paths.cache_dir("~/x") == home / "x"
    assert paths.data_dir("~/d") == home / "d"


def test_the_config_cache_dir_wins_over_the_environment(home):
    d = tiny_config_dict("~/run-cache")
    assert paths.cache_dir(parse_config(d)) == home / "run-cache"
    d["cache_dir"] = None
    assert paths.cache_dir(parse_config(d)) == home / "cq"


def test_every_cache_user_resolves_through_the_rule(home):
    from cycleqd.training.trajectories import _cached

    assert _cached("probe", [1], None, lambda: [[{"role": "user", "content": "x"}]])
    assert list((home / "cq" / "trajectories").glob("probe-*.json"))
    assert _cached("probe", [1], "~/elsewhere", lambda: [])  == []
    assert list((home / "elsewhere" / "trajectories").glob("probe-*.json"))
    assert not (home / "~").exists()


def test_a_run_puts_its_models_under_cfg_cache_dir(home):
    from cycleqd.engine.build import build_components
    from cycleqd.engine.runview import model_sources

    cfg = parse_config(tiny_config_dict("~/run-cache"))
    base, experts = model_sources(cfg)
    assert Path(base).parent.parent == home / "run-cache" / "synthetic"
    assert all(Path(e).parent == Path(base).parent for e in experts)
    build_components(cfg)
    assert not (home / "cq").exists() and not (home / "~").exists()
    assert not (home / ".cache").exists()


def test_no_module_has_a_cache_rule_of_its_own():
    """Only cycleqd/paths.py reads $CYCLEQD_CACHE or spells out the default folder."""
    rule = re.compile(r"environ[^\n]*CYCLEQD_CACHE|[\"']~/\.cache/cycleqd[\"']|\.cache[\"'] */ *[\"']cycleqd")
    root = paths.repo_root()
    offenders = [str(p.relative_to(root)) for d in ("cycleqd", "benchmarks", "scripts")
                 for p in sorted((root / d).rglob("*.py"))
                 if p.name != "paths.py" and rule.search(p.read_text())]
    assert offenders == []

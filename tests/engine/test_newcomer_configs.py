"""Issue 15 item 2: the example configs are package data (a non-editable install has them),
`cycleqd run NAME` takes a bundled name, `cycleqd init DIR` writes editable copies."""

from __future__ import annotations

import tomllib
from importlib import resources
from pathlib import Path

import pytest
import yaml

import cycleqd
from cycleqd import configs
from cycleqd.cli import main
from cycleqd.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]
PKG_CONFIGS = Path(cycleqd.__file__).resolve().parent / "configs"


def test_bundled_configs_are_the_source_tree_configs():
    top = sorted(p.name for p in (REPO / "configs").glob("*.yaml"))
    assert top and top == sorted(p.name for p in PKG_CONFIGS.glob("*.yaml"))
    for name in top:   # `configs/` at the top stays the same files as the package's copies
        assert (REPO / "configs" / name).read_bytes() == (PKG_CONFIGS / name).read_bytes(), name


def test_configs_are_declared_package_data():
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "*.yaml" in data["tool"]["setuptools"]["package-data"]["cycleqd.configs"]


def test_lookup_goes_through_importlib_resources_inside_the_package():
    assert (resources.files("cycleqd.configs") / "tiny.yaml").is_file()
    assert configs.names() == ["demo", "demo-toy", "paper", "tiny"]
    p = configs.path("tiny")
    assert p.resolve().parent == PKG_CONFIGS
    assert configs.path("tiny.yaml") == p
    assert load_config(p).name == "tiny"
    with pytest.raises(ConfigError, match="no bundled config named 'nope'; bundled: demo, demo-toy"):
        configs.path("nope")


def test_demo_configs_come_from_the_package():
    from cycleqd.demo.config import DEFAULT_CONFIG, TOY_CONFIG, load_demo_config
    from cycleqd.demo import llm

    assert DEFAULT_CONFIG.resolve().parent == PKG_CONFIGS == TOY_CONFIG.resolve().parent
    assert llm.TOY_CONFIG == TOY_CONFIG and llm.DEFAULT_CONFIG == DEFAULT_CONFIG
    assert load_demo_config(TOY_CONFIG).name == "demo-toy"


def test_resolve_prefers_an_existing_file_then_a_bundled_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert configs.resolve("tiny") == configs.path("tiny")
    (tmp_path / "tiny").write_text("name: mine\n")
    assert configs.resolve("tiny") == Path("tiny")          # a file of that name wins
    with pytest.raises(ConfigError, match=r"config file not found: sub/tiny.yaml \(bundled configs"):
        configs.resolve("sub/tiny.yaml")                    # a path is never a bundled name
    with pytest.raises(ConfigError, match="cycleqd init DIR"):
        configs.resolve("tinny")


def test_validate_accepts_a_bundled_name(capsys):
    assert main(["validate", "tiny"]) == 0
    assert "valid (3 skills: alpha, beta, gamma" in capsys.readouterr().out
    assert main(["validate", "tinny"]) == 2
    assert "config file not found: tinny" in capsys.readouterr().err


def test_init_writes_editable_copies_and_never_overwrites_silently(tmp_path, capsys):
    out = tmp_path / "my-configs"
    assert main(["init", str(out)]) == 0
    names = sorted(p.name for p in out.glob("*.yaml"))
    assert names == ["demo-toy.yaml", "demo.yaml", "paper.yaml", "tiny.yaml"]
    assert (out / "tiny.yaml").read_text() == configs.path("tiny").read_text()
    # an edited copy runs as a path
    data = yaml.safe_load((out / "tiny.yaml").read_text())
    data["qd"]["generations"] = 3
    (out / "tiny.yaml").write_text(yaml.safe_dump(data))
    assert main(["validate", str(out / "tiny.yaml")]) == 0
    assert "3 generations" in capsys.readouterr().out
    # a second init refuses (nothing written), --overwrite restores
    assert main(["init", str(out)]) == 2
    err = capsys.readouterr().err
    assert "tiny.yaml" in err and "exist" in err and "--overwrite" in err
    assert yaml.safe_load((out / "tiny.yaml").read_text())["qd"]["generations"] == 3
    assert main(["init", str(out), "--overwrite"]) == 0
    assert (out / "tiny.yaml").read_text() == configs.path("tiny").read_text()

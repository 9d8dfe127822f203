"""Layers import downward only (issue 16): every ``import cycleqd.X`` anywhere in the package,
inside functions included, goes to a layer at the same rank or below. A new module or
folder must be given a rank here, which is the point: the order is a decision."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "cycleqd"

#: rank of each top-level unit of the package; lower ranks never import higher ones
RANKS = {
    "errors": 0, "paths": 0, "_checks": 0, "_io": 0, "_lazy": 0,
    "registry": 1,
    "config": 2, "configs": 2,
    "qd": 3,
    "ops": 4,
    "models": 5,
    "inference": 6,
    "sandbox": 7, "datasets": 7,
    "skills": 8,
    "executors": 9, "tracking": 9,
    "training": 10,
    "engine": 11,
    "vision": 12, "demo": 12,
    "cli": 13, "__main__": 13, "__init__": 13,
}


def _unit(path: Path) -> str:
    rel = path.relative_to(PKG)
    return rel.parts[0].removesuffix(".py") if len(rel.parts) > 1 or rel.name != "__init__.py" else "__init__"


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("cycleqd."):
            yield node.module, node.lineno
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("cycleqd."):
                    yield a.name, node.lineno


FILES = sorted(PKG.rglob("*.py"))


def test_every_unit_has_a_rank():
    units = {_unit(f) for f in FILES}
    assert units <= set(RANKS), f"give these a layer rank in tests/test_layers.py: {sorted(units - set(RANKS))}"


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PKG)))
def test_imports_go_downward(path):
    src = _unit(path)
    up = [f"line {ln}: {mod}" for mod, ln in _imports(path)
          if RANKS.get(mod.split(".")[1], 99) > RANKS[src]]
    assert not up, f"{path.relative_to(PKG.parent)} ({src}, rank {RANKS[src]}) imports upward: {up}"


def test_rule_catches_an_upward_import(tmp_path, monkeypatch):
    """The check can fail: a qd module importing the engine is reported."""
    bad = PKG / "qd" / "archive.py"
    src = bad.read_text(encoding="utf-8") + "\nfrom cycleqd.engine.loop import CycleQDRun\n"
    fake = tmp_path / "archive.py"
    fake.write_text(src, encoding="utf-8")
    mods = [m for m, _ in _imports(fake)]
    assert any(RANKS[m.split(".")[1]] > RANKS["qd"] for m in mods)

"""Fault-injection bookkeeping for tests/engine/test_faults_*.py: each test names the class of
fault it injects (``fault.inject("state.json: elite in wrong cell")``) and marks it survived
(``fault.survived()``) once it has asserted a clear one-line refusal or a correct recovery.
The terminal summary prints "faults injected / survived, by class"; with
``CYCLEQD_FAULT_REPORT=path.json`` the counts are also written there."""

from __future__ import annotations

import json
import os
from collections import defaultdict

import pytest

_COUNTS: dict[str, list[int]] = defaultdict(lambda: [0, 0])


class _Fault:
    def __init__(self):
        self.open: list[str] = []

    def inject(self, cls: str) -> None:
        _COUNTS[cls][0] += 1
        self.open.append(cls)

    def survived(self) -> None:
        for cls in self.open:
            _COUNTS[cls][1] += 1
        self.open = []


@pytest.fixture()
def fault():
    return _Fault()


def pytest_terminal_summary(terminalreporter):
    if not _COUNTS:
        return
    tr = terminalreporter
    tr.section("faults injected / survived, by class")
    by_group: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for cls, (n, ok) in sorted(_COUNTS.items()):
        tr.write_line(f"  {n:3d} / {ok:3d}  {cls}")
        g = by_group[cls.split(":")[0]]
        g[0] += n
        g[1] += ok
    tr.write_line("  by group: " + "; ".join(f"{g} {n}/{ok}" for g, (n, ok) in sorted(by_group.items())))
    total = [sum(v[0] for v in _COUNTS.values()), sum(v[1] for v in _COUNTS.values())]
    tr.write_line(f"  total: {total[0]} injected / {total[1]} survived")
    path = os.environ.get("CYCLEQD_FAULT_REPORT")
    if path:
        with open(path, "w") as f:
            json.dump({"by_class": {k: {"injected": v[0], "survived": v[1]} for k, v in _COUNTS.items()},
                       "total": {"injected": total[0], "survived": total[1]}}, f, indent=1)


def _tiny_synthetic_run(tmp, *, generations: int, snapshot_every: int | None = None):
    """Run CycleQD on two synthetic skills (``a``, ``b``) over a 1-layer random Llama in
    ``tmp/run`` (cache in ``tmp/cache``); returns (run dir, components)."""
    from cycleqd.config import parse_config
    from cycleqd.engine.build import build_components
    from cycleqd.engine.loop import run_cycleqd

    qd = {"generations": generations, **({"snapshot_every": snapshot_every} if snapshot_every else {})}
    cfg = parse_config({
        "name": "t", "seed": 0, "cache_dir": str(tmp / "cache"),
        "skills": [{"name": n, "type": "synthetic", "bc_range": [0.0, 1.0], "bins": 6} for n in ("a", "b")],
        "model": {"synthetic": {"arch": "llama", "seed": 0, "hidden_size": 32, "num_layers": 1,
                                "expert_rank": 2, "expert_scale": 0.05}},
        "operators": {"crossover": {"name": "linear", "sigma": 0.01},
                      "mutation": {"name": "svd_expert", "rate": 0.1}, "genome": "auto"},
        "qd": qd})
    comp = build_components(cfg)
    run_cycleqd(comp, cfg, tmp / "run", progress=False)
    return tmp / "run", comp


@pytest.fixture(scope="session")
def tiny_synthetic_run():
    """The maker of the small two-skill synthetic run the read-path tests (elites, export
    cards, read attacks) work on: ``tiny_synthetic_run(tmp, generations=..., snapshot_every=...)``."""
    return _tiny_synthetic_run

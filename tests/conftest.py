"""Shared fixtures: a tiny synthetic CycleQD config (random-init 2-layer Llama, three
synthetic experts, synthetic skills) and a per-session cache directory for its models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Benchmark data: this workplace's read-only copy beside the checkout (as scripts/test.sh
# exports it), unless CYCLEQD_DATA_DIR says otherwise. Tests that write use tmp dirs.
_SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
if not os.environ.get("CYCLEQD_DATA_DIR") and _SHARED_DATA.is_dir():
    os.environ["CYCLEQD_DATA_DIR"] = str(_SHARED_DATA)


def tiny_config_dict(cache_dir: Path, **qd) -> dict:
    """A complete, valid run config as a dict (edit before ``parse_config``)."""
    return {
        "name": "test", "seed": 0, "cache_dir": str(cache_dir),
        "skills": [{"name": n, "type": "synthetic", "bc_range": [0.0, 1.0], "bins": 8}
                   for n in ("a", "b", "c")],
        "model": {"synthetic": {"arch": "llama", "seed": 0, "hidden_size": 32, "num_layers": 1,
                                "expert_rank": 2, "expert_scale": 0.05}},
        "operators": {"crossover": {"name": "linear", "sigma": 0.01},
                      "mutation": {"name": "svd_expert", "rate": 0.1}, "genome": "dense"},
        "qd": {"generations": 12, "snapshot_every": 5, **qd},
    }


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("cycleqd-cache")
    os.environ.setdefault("CYCLEQD_CACHE", str(d))
    return d


@pytest.fixture()
def tiny_cfg(cache_dir):
    from cycleqd.config import parse_config

    def make(**qd):
        return parse_config(tiny_config_dict(cache_dir, **qd))

    return make

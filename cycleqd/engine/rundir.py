"""The run directory and crash-safe checkpoints.

Layout::

    RUN_DIR/
      config.yaml        the resolved, validated config
      state.json         the commit point: last complete generation + archives
      archives.json      the current archives, human-readable, with QD metrics
      archives/gen_NNNNNN.json   snapshots every ``qd.snapshot_every`` generations
      metrics.jsonl      one line per generation (and one per seed model, generation 0)
      genomes/           stored genomes of elites (see engine/store.py)
      maps/              elite-map PNGs, one per archive
      report.md / report.html    written by ``cycleqd report``

Every file is written with write-to-temp, fsync, rename, so a SIGKILL at any moment leaves
either the old or the new version. ``state.json`` is written last in a generation; on
resume, ``metrics.jsonl`` is cut back to the generations ``state.json`` covers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from cycleqd._io import atomic_write_json, atomic_write_text  # noqa: F401  (re-exported)


class RunDir:
    """Paths and I/O of one run directory."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    config = property(lambda self: self.root / "config.yaml")
    state = property(lambda self: self.root / "state.json")
    archives = property(lambda self: self.root / "archives.json")
    snapshots = property(lambda self: self.root / "archives")
    metrics = property(lambda self: self.root / "metrics.jsonl")
    genomes = property(lambda self: self.root / "genomes")
    maps = property(lambda self: self.root / "maps")

    def create(self, config_yaml: str) -> None:
        """Make a new run directory. Raises FileExistsError if it already holds a run."""
        if self.state.exists() or self.metrics.exists():
            raise FileExistsError(f"{self.root} already holds a run: use `cycleqd resume {self.root}` "
                                  f"or choose another --out")
        for d in (self.root, self.snapshots, self.genomes, self.maps):
            d.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.config, config_yaml)

    def append_metrics(self, record: dict[str, Any]) -> None:
        with open(self.metrics, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics.exists():
            return []
        out = []
        for line in self.metrics.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a crash
                break
        return out

    def truncate_metrics(self, last_generation: int) -> None:
        """Keep only complete metric lines of generations <= ``last_generation``."""
        keep = [r for r in self.read_metrics() if r["generation"] <= last_generation]
        atomic_write_text(self.metrics, "".join(json.dumps(r) + "\n" for r in keep))

    def load_state(self) -> dict[str, Any]:
        if not self.state.exists():
            raise FileNotFoundError(f"{self.root} has no state.json: not a cycleqd run directory, "
                                    f"or it crashed before its seed models were evaluated")
        return json.loads(self.state.read_text())

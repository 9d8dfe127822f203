"""The model store: genomes by model id, on disk under ``RUN_DIR/genomes``.

Seed models (experts, base) stay in memory (they are the WeightSpace's own genomes);
children are written by the worker that made them (atomically, through
``WeightSpace.save``) and removed by :meth:`gc` once no archive references them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable


class GenomeStore:
    """Args:
        root: folder of stored genomes.
        space: the run's WeightSpace (defines the on-disk format).
        seeds: model id -> in-memory genome of each seed model.
    """

    def __init__(self, root: Path, space: Any, seeds: dict[str, Any]):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.space, self.seeds = space, dict(seeds)

    def path(self, model_id: str) -> Path:
        return self.root / f"{model_id}{self.space.genome_suffix}"

    def get(self, model_id: str) -> Any:
        """The genome of ``model_id``. Raises KeyError if it was never stored."""
        if model_id in self.seeds:
            return self.seeds[model_id]
        p = self.path(model_id)
        if not p.exists():
            raise KeyError(f"model {model_id!r} is not in the store ({p} missing)")
        return self.space.load(p)

    def put(self, model_id: str, genome: Any) -> int:
        """Store a genome; returns bytes written."""
        return int(self.space.save(genome, self.path(model_id)))

    def gc(self, referenced: Iterable[str]) -> list[str]:
        """Delete stored genomes (and stale temp files) that no archive references."""
        from cycleqd.ops.space import collect_garbage

        return [p.name for p in collect_garbage(self.root, [self.path(m) for m in referenced],
                                                suffix=self.space.genome_suffix)]

    def bytes_used(self) -> int:
        return sum(p.stat().st_size for p in self.root.iterdir() if p.is_file())

"""The model store: genomes by model id, on disk under ``RUN_DIR/genomes``.

Seed models (experts, base) stay in memory (they are the WeightSpace's own genomes);
children are written by the worker that made them (atomically, through
``WeightSpace.save``) and removed by :meth:`gc` once no archive references them.

Before the engine commits a generation that references a new genome, it *seals* it
(:meth:`GenomeStore.seal`): the file is fsynced and its SHA-256 is recorded in
``state.json``, so a resume can prove every referenced genome is present and intact
(:meth:`GenomeStore.verify`) instead of finding out generations later when it is drawn.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

from cycleqd._io import disk_full_names, fsync_dir, fsync_file, sha256_file


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
        """The genome file of ``model_id`` under the store. Raises ValueError for an id that
        is empty, ``.``/``..`` or holds a path separator (it must never leave ``root``)."""
        if not model_id or model_id in (".", "..") or "/" in model_id or "\\" in model_id \
                or os.sep in model_id or "\0" in model_id:
            raise ValueError(f"model id {model_id!r}: not a genome name (no path separators)")
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
        """Store a genome (atomically, fsynced); returns bytes written.

        Raises:
            DiskFullError: the disk filled up (the partial temp file is removed).
        """
        path = self.path(model_id)
        try:
            with disk_full_names(path):
                n = int(self.space.save(genome, path))
        except BaseException:
            path.with_name(f"{path.name}.tmp-{os.getpid()}").unlink(missing_ok=True)
            raise
        with disk_full_names(path):   # a delayed allocation can fail at fsync
            fsync_file(path)
        return n

    def seal(self, model_id: str) -> str:
        """Make a stored genome durable (fsync of the file and of ``genomes/``) and return its
        hex SHA-256, to be recorded in the checkpoint that references it. Raises KeyError if
        the genome is not in the store."""
        p = self.path(model_id)
        if not p.is_file():
            raise KeyError(f"model {model_id!r} is not in the store ({p} missing)")
        with disk_full_names(p):
            fsync_file(p)
            fsync_dir(self.root)
        return sha256_file(p)

    def verify(self, model_id: str, sha256: str | None, root: Path | None = None) -> str | None:
        """None if the genome of ``model_id`` (under ``root``, default the store) is present
        and, when ``sha256`` is given, has that digest; otherwise what is wrong (one phrase)."""
        p = (Path(root) if root is not None else self.root) / self.path(model_id).name
        return check_genome_file(p, sha256)

    def gc(self, referenced: Iterable[str]) -> list[str]:
        """Delete stored genomes (and stale temp files) that no archive references."""
        from cycleqd.ops.space import collect_garbage

        return [p.name for p in collect_garbage(self.root, [self.path(m) for m in referenced],
                                                suffix=self.space.genome_suffix)]

    def bytes_used(self) -> int:
        return sum(p.stat().st_size for p in self.root.iterdir() if p.is_file())


def check_genome_file(path: Path, sha256: str | None) -> str | None:
    """None if ``path`` exists and (when given) matches ``sha256``; else a phrase naming the
    problem (missing, empty, digest mismatch with its size)."""
    path = Path(path)
    if not path.is_file():
        return f"genome file {path} is missing"
    if sha256 is None:
        return None
    got = sha256_file(path)
    if got != sha256:
        size = path.stat().st_size
        return (f"genome file {path} is damaged ({size} bytes{', empty' if size == 0 else ''}; "
                f"sha256 {got[:12]}... but {sha256[:12]}... was recorded when it was written)")
    return None


class IncomingGenomeStore(GenomeStore):
    """A remote worker's view of the run's model store.

    Identical to :class:`GenomeStore` except that :meth:`put` writes the genome under
    ``incoming`` (a folder next to ``genomes/``) and renames it into ``genomes/`` when it is
    complete, so the driver's garbage collection of ``genomes/`` (which runs after every
    generation, while other jobs are still writing) never deletes a half-written file.
    ``incoming`` must be on the same filesystem as ``root`` (the rename is atomic).
    """

    def __init__(self, root: Path, space: Any, seeds: dict[str, Any], incoming: Path):
        super().__init__(root, space, seeds)
        self.incoming = Path(incoming)

    def put(self, model_id: str, genome: Any) -> int:
        self.incoming.mkdir(parents=True, exist_ok=True)
        final = self.path(model_id)
        tmp = self.incoming / f"{os.getpid()}-{final.name}"
        nbytes = int(self.space.save(genome, tmp))
        os.replace(tmp, final)
        return nbytes


def clear_incoming(incoming: Path) -> None:
    """Delete what killed workers left half-written in ``incoming`` and the folder itself
    (run once every worker is stopped)."""
    incoming = Path(incoming)
    if incoming.is_dir():
        for p in incoming.iterdir():
            p.unlink(missing_ok=True)
        try:
            incoming.rmdir()
        except OSError:
            pass

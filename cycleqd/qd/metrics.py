"""Standard QD metrics of an archive (Pugh et al., 2016; pyribs ArchiveStats)."""

from __future__ import annotations

from cycleqd.qd.archive import GridArchive


def coverage(archive: GridArchive) -> float:
    """Fraction of cells holding an elite, in [0, 1]."""
    return len(archive) / archive.num_cells


def qd_score(archive: GridArchive) -> float:
    """Sum of the elites' qualities (qualities are already in [0, 1], so no offset)."""
    return float(sum(archive.quality_of(e.scores) for _, e in archive))


def best_quality(archive: GridArchive) -> float:
    """Highest quality in the archive (0.0 when empty)."""
    best = archive.best()
    return archive.quality_of(best.scores) if best is not None else 0.0


def archive_stats(archive: GridArchive) -> dict[str, float]:
    return {"coverage": coverage(archive), "qd_score": qd_score(archive),
            "best_quality": best_quality(archive), "num_elites": float(len(archive))}

"""Elite maps as in the CycleQD blog: per archive, two BCs on the axes, quality as colour,
the seed models' (experts') cells outlined. Archives with more than two BC axes are shown
projected onto their first two (max quality over the rest); one axis gives a 1-row strip."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from cycleqd._io import atomic_file  # noqa: E402
from cycleqd.qd.archive import GridArchive  # noqa: E402


def _save(fig, path: Path) -> None:
    """``fig.savefig`` to a temp file, fsync, rename: a reader never sees half a PNG."""
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format=Path(path).suffix.lstrip(".") or "png")


def quality_grid(archive: GridArchive) -> np.ndarray:
    """(bins_bc0, bins_bc1) float64 grid of qualities (NaN = empty), max over further axes."""
    shape = archive.shape[:2] if len(archive.shape) >= 2 else (archive.shape[0], 1) if archive.shape else (1, 1)
    grid = np.full(shape, np.nan)
    for cell, e in archive:
        ij = tuple(cell[:2]) if len(cell) >= 2 else ((cell[0], 0) if cell else (0, 0))
        q = archive.quality_of(e.scores)
        if np.isnan(grid[ij]) or q > grid[ij]:
            grid[ij] = q
    return grid


def plot_elite_map(archive: GridArchive, path: Path, *, seed_ids: Iterable[str] = (),
                   title: str | None = None, ax=None) -> Path:
    """Draw one archive's elite map to ``path`` (PNG, written atomically)."""
    grid = quality_grid(archive)
    own = ax is None
    if own:
        fig, ax = plt.subplots(figsize=(4.6, 4.0), dpi=110)
    axes = archive.axes
    x_ax = axes[0] if axes else None
    y_ax = axes[1] if len(axes) > 1 else None
    extent = [x_ax.lo if x_ax else 0, x_ax.hi if x_ax else 1, y_ax.lo if y_ax else 0, y_ax.hi if y_ax else 1]
    im = ax.imshow(grid.T, origin="lower", extent=extent, aspect="auto", cmap="viridis", vmin=0.0,
                   vmax=max(1e-9, float(np.nanmax(grid))) if np.isfinite(grid).any() else 1.0)
    seed_ids = set(seed_ids)
    for cell, e in archive:
        if e.id in seed_ids and x_ax is not None:
            w = (x_ax.hi - x_ax.lo) / x_ax.bins
            h = ((y_ax.hi - y_ax.lo) / y_ax.bins) if y_ax else 1.0
            x0 = x_ax.lo + cell[0] * w
            y0 = (y_ax.lo + cell[1] * h) if y_ax else 0.0
            ax.add_patch(plt.Rectangle((x0, y0), w, h, fill=False, ec="red", lw=1.8))
            ax.annotate(e.id.split(":")[-1], (x0 + w / 2, y0 + h / 2), color="red", fontsize=7,
                        ha="center", va="center")
    ax.set_xlabel(f"{x_ax.skill} (BC)" if x_ax else "")
    ax.set_ylabel(f"{y_ax.skill} (BC)" if y_ax else "")
    ax.set_title(title or f"archive: quality = {archive.quality_skill}", fontsize=9)
    plt.colorbar(im, ax=ax, label=f"{archive.quality_skill} (quality)")
    if own:
        fig.tight_layout()
        _save(fig, path)
        plt.close(fig)
    return Path(path)


def plot_all_maps(archives: Sequence[GridArchive], out_dir: Path, *, seed_ids: Iterable[str] = (),
                  suffix: str = "") -> list[Path]:
    """One PNG per archive plus ``elite_maps.png`` with all of them side by side."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seed_ids = set(seed_ids)
    paths = [plot_elite_map(a, out_dir / f"archive_{a.quality_skill}{suffix}.png", seed_ids=seed_ids)
             for a in archives]
    fig, axs = plt.subplots(1, len(archives), figsize=(4.6 * len(archives), 4.0), dpi=110, squeeze=False)
    for a, ax in zip(archives, axs[0]):
        plot_elite_map(a, out_dir / "unused.png", seed_ids=seed_ids, ax=ax)
    fig.tight_layout()
    combined = out_dir / f"elite_maps{suffix}.png"
    _save(fig, combined)
    plt.close(fig)
    return paths + [combined]


def plot_curves(metrics: Sequence[dict], path: Path) -> Path:
    """Coverage, QD score and best quality per archive against generation."""
    gens = [m for m in metrics if m.get("generation", 0) >= 1 and m.get("kind") != "aggregate"]
    fig, axs = plt.subplots(1, 3, figsize=(13, 3.4), dpi=110)
    if gens:
        names = list(gens[0]["archives"])
        x = [m["generation"] for m in gens]
        for key, ax in zip(("coverage", "qd_score", "best_quality"), axs):
            for n in names:
                ax.plot(x, [m["archives"][n][key] for m in gens], label=n)
            ax.set_xlabel("generation")
            ax.set_title(key.replace("_", " "))
        axs[0].legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return Path(path)

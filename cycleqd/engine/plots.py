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


#: label font sizes (points): the largest that fits the cell, never below the smallest
LABEL_MAX_PT, LABEL_MIN_PT = 8.0, 4.5
#: average bold glyph width of DejaVu Sans relative to the font size (for fitting a label)
_GLYPH_W = 0.7


def colour_range(grid: np.ndarray) -> tuple[float, float]:
    """(vmin, vmax) of the colour scale for a quality grid (NaN = empty cell).

    ``vmin`` is 0 (skill scores are fractions in [0, 1]) unless a quality is negative;
    ``vmax`` is the best quality, or 1.0 when there is none or every quality is <= vmin
    (an all-zero archive gets a 0..1 scale, not a degenerate 0..1e-9 one).
    """
    finite = grid[np.isfinite(grid)]
    lo = min(0.0, float(finite.min())) if finite.size else 0.0
    hi = float(finite.max()) if finite.size else 1.0
    return lo, (hi if hi > lo else lo + 1.0)


def text_colour(rgba: Sequence[float]) -> str:
    """``"white"`` on dark cells, ``"black"`` on light ones (WCAG relative luminance of
    the cell colour; threshold 0.4)."""
    def lin(c: float) -> float:
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (lin(float(c)) for c in rgba[:3])
    return "white" if 0.2126 * r + 0.7152 * g + 0.0722 * b < 0.4 else "black"


def fit_label(label: str, cell_w_pt: float, cell_h_pt: float) -> tuple[str, float] | None:
    """The label text and font size (points) that fit a cell of that size: the largest size
    up to :data:`LABEL_MAX_PT` at which the whole label fits; below :data:`LABEL_MIN_PT` the
    label is shortened (``cod.``); None when not even one letter fits (the outline stays)."""
    usable_w, usable_h = 0.85 * cell_w_pt, 0.8 * cell_h_pt   # margin: tight_layout may shrink ax a little
    size = min(LABEL_MAX_PT, usable_h, usable_w / (_GLYPH_W * max(1, len(label))))
    if size >= LABEL_MIN_PT:
        return label, size
    if usable_h < LABEL_MIN_PT:
        return None
    n = int(usable_w / (_GLYPH_W * LABEL_MIN_PT))
    if n < 1:
        return None
    return (label[: n - 1] + "." if 1 < n < len(label) else label[:n]), LABEL_MIN_PT


#: matplotlib gids of the map's labels: a seed model's name, a cell's index (``i,j``)
SEED_LABEL_GID, INDEX_LABEL_GID = "seed-label", "cell-index"


def cell_index(cell: Sequence[int]) -> str:
    """A cell's index as ``cycleqd export --cell ARCHIVE:i,j`` takes it (``"3,7"``)."""
    return ",".join(str(int(i)) for i in cell)


def shown_cells(archive: GridArchive) -> dict[tuple[int, int], tuple[int, ...]]:
    """Map position ``(i, j)`` -> full cell index of the elite drawn there (with more than
    two BC axes: the best-quality elite among those projected onto it, as
    :func:`quality_grid` colours it; ties by cell index)."""
    best: dict[tuple[int, int], tuple[float, tuple[int, ...]]] = {}
    for cell, e in sorted(archive, key=lambda ce: ce[0]):
        ij = (cell[0], cell[1] if len(cell) > 1 else 0) if cell else (0, 0)
        q = archive.quality_of(e.scores)
        if ij not in best or q > best[ij][0]:
            best[ij] = (q, tuple(cell))
    return {ij: c for ij, (_, c) in best.items()}


def plot_elite_map(archive: GridArchive, path: Path, *, seed_ids: Iterable[str] = (),
                   title: str | None = None, ax=None) -> Path:
    """Draw one archive's elite map to ``path`` (PNG, written atomically).

    Seed models' cells are outlined in red and labelled with the skill name; every filled
    cell is labelled with the index ``i,j`` of the elite drawn there (:func:`cell_index`,
    :func:`shown_cells`; what ``cycleqd export --cell ARCHIVE:i,j`` takes; under the seed's
    name in a seed's cell, left out where it does not fit whole). Labels are white on dark
    cells and black on light ones, at a font size that fits the cell (a seed name is
    shortened when the cell is too small). The colour scale runs from 0 to the best quality
    (0..1 for an archive whose elites all score 0, which the title then says).
    """
    grid = quality_grid(archive)
    own = ax is None
    if own:
        fig, ax = plt.subplots(figsize=(4.6, 4.0), dpi=110)
    axes = archive.axes
    x_ax = axes[0] if axes else None
    y_ax = axes[1] if len(axes) > 1 else None
    extent = [x_ax.lo if x_ax else 0, x_ax.hi if x_ax else 1, y_ax.lo if y_ax else 0, y_ax.hi if y_ax else 1]
    vmin, vmax = colour_range(grid)
    im = ax.imshow(grid.T, origin="lower", extent=extent, aspect="auto", cmap="viridis", vmin=vmin, vmax=vmax)
    cb = plt.colorbar(im, ax=ax, label=f"{archive.quality_skill} (quality)")   # before sizing: it narrows ax
    cb.formatter.set_useOffset(False)
    cb.update_ticks()
    seed_ids = set(seed_ids)
    if x_ax is not None:
        fig_ = ax.figure
        box = ax.get_position()   # axes size in figure fractions -> points
        ax_w_pt = box.width * fig_.get_figwidth() * 72
        ax_h_pt = box.height * fig_.get_figheight() * 72
        cell_w_pt = ax_w_pt / x_ax.bins
        cell_h_pt = ax_h_pt / (y_ax.bins if y_ax else 1)
        w = (x_ax.hi - x_ax.lo) / x_ax.bins
        h = ((y_ax.hi - y_ax.lo) / y_ax.bins) if y_ax else 1.0

        def label(text: str, size: float, ij: tuple[int, int], y_frac: float, gid: str, bold: bool) -> None:
            q = grid[ij]
            colour = text_colour(im.cmap(im.norm(q))) if np.isfinite(q) else "black"
            x0, y0 = x_ax.lo + ij[0] * w, (y_ax.lo + ij[1] * h) if y_ax else 0.0
            ax.annotate(text, (x0 + w / 2, y0 + y_frac * h), color=colour, fontsize=size, ha="center",
                        va="center", fontweight="bold" if bold else "normal", annotation_clip=True, gid=gid)

        shown = shown_cells(archive)
        labelled = set()
        for cell, e in archive:
            if e.id not in seed_ids:
                continue
            ij = (cell[0], cell[1] if len(cell) > 1 else 0)
            ax.add_patch(plt.Rectangle((x_ax.lo + ij[0] * w, (y_ax.lo + ij[1] * h) if y_ax else 0.0), w, h,
                                       fill=False, ec="red", lw=1.8))
            name, idx = e.id.split(":")[-1], cell_index(shown[ij])
            top, bottom = fit_label(name, cell_w_pt, cell_h_pt / 2), fit_label(idx, cell_w_pt, cell_h_pt / 2)
            if ij in labelled:
                continue      # another seed projected onto this position already labelled it
            if top is not None and bottom is not None and bottom[0] == idx:   # name above the index
                label(*top, ij, 0.75, SEED_LABEL_GID, True)
                label(*bottom, ij, 0.25, INDEX_LABEL_GID, False)
                labelled.add(ij)
            elif (fitted := fit_label(name, cell_w_pt, cell_h_pt)) is not None:
                label(*fitted, ij, 0.5, SEED_LABEL_GID, True)
                labelled.add(ij)
        for ij, cell in shown.items():
            fitted = fit_label(cell_index(cell), cell_w_pt, cell_h_pt)
            if ij not in labelled and fitted is not None and fitted[0] == cell_index(cell):
                label(*fitted, ij, 0.5, INDEX_LABEL_GID, False)
    ax.set_xlabel(f"{x_ax.skill} (BC)" if x_ax else "")
    ax.set_ylabel(f"{y_ax.skill} (BC)" if y_ax else "")
    finite = grid[np.isfinite(grid)]
    note = " (all elites score 0)" if finite.size and not (finite != 0).any() else ""
    ax.set_title(title or f"archive: quality = {archive.quality_skill}{note}", fontsize=9)
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

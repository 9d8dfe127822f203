"""Issue 15 item 10: elite-map labels fit their cells and stay readable on dark cells; an
all-zero archive gets a 0..1 colour bar (not 0..1e-9)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from cycleqd.engine.plots import SEED_LABEL_GID, plot_all_maps, plot_elite_map  # noqa: E402
from cycleqd.qd.archive import Elite, make_archives  # noqa: E402

SKILLS = ["coding", "db", "os"]


def _archives(bins: int, scores: dict[str, dict[str, float]]):
    arcs = make_archives(SKILLS, {s: (0.0, 0.45) for s in SKILLS}, {s: bins for s in SKILLS})
    for mid, sc in scores.items():
        for a in arcs:
            a.add(Elite(mid, sc, 0, ()))
    return arcs


def _draw(archive, seeds):
    fig, ax = plt.subplots(figsize=(4.6, 4.0), dpi=110)
    plot_elite_map(archive, "unused.png", seed_ids=seeds, ax=ax)   # with ax: nothing written
    fig.tight_layout()
    fig.canvas.draw()
    return fig, ax


def _luminance(rgba):
    return 0.2126 * rgba[0] + 0.7152 * rgba[1] + 0.0722 * rgba[2]


@pytest.mark.parametrize("bins", [4, 10, 15])
def test_seed_labels_fit_their_cells_and_contrast_with_them(bins):
    # expert:coding scores 0.40 on coding (a bright cell in the coding archive) and low on db/os
    scores = {f"expert:{s}": {t: (0.40 if t == s else 0.02) for t in SKILLS} for s in SKILLS}
    scores["g1"] = {"coding": 0.01, "db": 0.2, "os": 0.3}
    arcs = _archives(bins, scores)
    seeds = set(scores) - {"g1"}
    for arc in arcs:
        fig, ax = _draw(arc, seeds)
        im = ax.images[0]
        texts = [t for t in ax.texts if t.get_text() and t.get_gid() == SEED_LABEL_GID]
        assert texts, "seed cells are labelled"
        cells = {e.id: c for c, e in arc}
        for t in texts:
            # the elite whose label this is (labels may be shortened: 'cod.')
            eid = next(i for i in seeds if i in cells and i.split(":")[1].startswith(t.get_text().rstrip(".")))
            cell = cells[eid]
            x_ax, y_ax = arc.axes
            w, h = (x_ax.hi - x_ax.lo) / x_ax.bins, (y_ax.hi - y_ax.lo) / y_ax.bins
            (x0, y0), (x1, y1) = ax.transData.transform([(x_ax.lo + cell[0] * w, y_ax.lo + cell[1] * h),
                                                        (x_ax.lo + (cell[0] + 1) * w, y_ax.lo + (cell[1] + 1) * h)])
            bb = t.get_window_extent(renderer=fig.canvas.get_renderer())
            assert bb.x0 >= x0 - 0.5 and bb.x1 <= x1 + 0.5 and bb.y0 >= y0 - 0.5 and bb.y1 <= y1 + 0.5, \
                (t.get_text(), bb, (x0, y0, x1, y1))
            q = next(arc.quality_of(e.scores) for c, e in arc if c == cell)
            cell_lum = _luminance(im.cmap(im.norm(q)))
            text_lum = _luminance(matplotlib.colors.to_rgba(t.get_color()))
            assert abs(cell_lum - text_lum) > 0.45, (t.get_text(), cell_lum, t.get_color())
            assert t.get_fontsize() >= 4.5
        plt.close(fig)


def test_all_zero_archive_gets_a_zero_to_one_colour_bar(tmp_path):
    arcs = _archives(4, {f"expert:{s}": {t: 0.0 for t in SKILLS} for s in SKILLS})
    fig, ax = _draw(arcs[0], {"expert:coding"})
    im = ax.images[0]
    assert (im.norm.vmin, im.norm.vmax) == (0.0, 1.0)
    cbar_ax = fig.axes[-1]
    labels = [t.get_text() for t in cbar_ax.get_yticklabels()]
    assert "1.0" in labels and not any("e-" in s for s in labels + [cbar_ax.yaxis.get_offset_text().get_text()])
    assert "all elites score 0" in ax.get_title()
    plt.close(fig)
    paths = plot_all_maps(arcs, tmp_path, seed_ids={"expert:coding"})
    assert all(p.stat().st_size > 1000 for p in paths)


def test_colour_scale_runs_to_the_best_quality():
    arcs = _archives(10, {"x": {"coding": 0.3, "db": 0.1, "os": 0.2}})
    fig, ax = _draw(arcs[0], set())
    assert ax.images[0].norm.vmax == pytest.approx(0.3) and ax.images[0].norm.vmin == 0.0
    plt.close(fig)
    arcs = _archives(10, {})
    fig, ax = _draw(arcs[0], set())       # an empty archive: a 0..1 scale too
    assert (ax.images[0].norm.vmin, ax.images[0].norm.vmax) == (0.0, 1.0)
    assert np.isnan(ax.images[0].get_array()).all() or ax.images[0].get_array().mask.all()
    plt.close(fig)

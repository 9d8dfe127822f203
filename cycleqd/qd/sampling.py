"""Parent selection from one archive (paper §3.2, "elite sampling").

Schemes (``scheme`` argument):

* ``"elite"`` (default, the paper's text): each elite's quality and each of its BC scores
  are min-max normalised over the archive into ``[0.5, 0.8]``
  (``0.5 + 0.3 * (v - min) / (max - min)``) and multiplied; the selection probability is
  proportional to that product. A column whose values are all equal contributes 1.
* ``"elite_official"``: the official code (``sampler/elite_sampler.py``) normalises the
  quality and the elite's *cell indices* with ``0.5 + (v - min) * 0.8 / (max - min)``, which
  actually spans ``[0.5, 1.3]``; equal columns contribute 1.
* ``"uniform"``: every elite equally likely (the paper's ablation; official
  ``random_sampling``).

Parents are drawn without replacement. An archive with fewer elites than parents asked
for returns all of its elites (the official sampler would crash there); crossover of a
single parent is that parent.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from cycleqd.qd.archive import Cell, Elite, GridArchive

Scheme = Literal["elite", "elite_official", "uniform"]
SCHEMES: tuple[str, ...] = ("elite", "elite_official", "uniform")


def _minmax(values: np.ndarray, lo: float, span: float) -> np.ndarray:
    vmin, vmax = float(values.min()), float(values.max())
    if vmin == vmax:
        return np.ones_like(values)
    return lo + (values - vmin) * (span / (vmax - vmin))


def selection_probabilities(archive: GridArchive, scheme: Scheme = "elite") -> tuple[list[Cell], np.ndarray]:
    """Selection probability of every elite.

    Returns:
        cells: the archive's occupied cells, sorted.
        probs: (n_elites,) float64, non-negative, summing to 1.
    Raises:
        ValueError: unknown scheme or empty archive.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown sampling scheme {scheme!r}; choose one of {SCHEMES}")
    items = list(archive)
    if not items:
        raise ValueError(f"archive {archive.quality_skill!r} is empty: nothing to sample")
    cells = [c for c, _ in items]
    n = len(items)
    if scheme == "uniform":
        return cells, np.full(n, 1.0 / n)
    quality = np.array([archive.quality_of(e.scores) for _, e in items], dtype=np.float64)
    if scheme == "elite":
        columns = [quality] + [np.array([e.scores[a.skill] for _, e in items], dtype=np.float64)
                               for a in archive.axes]
        lo, span = 0.5, 0.3
    else:
        columns = [quality] + [np.array([c[i] for c in cells], dtype=np.float64)
                               for i in range(len(archive.axes))]
        lo, span = 0.5, 0.8
    probs = np.ones(n, dtype=np.float64)
    for col in columns:
        probs *= _minmax(col, lo, span)
    if probs.sum() <= 0:
        probs = np.ones(n)
    return cells, probs / probs.sum()


def sample_parents(archive: GridArchive, rng: np.random.Generator, *, n: int = 2,
                   scheme: Scheme = "elite") -> list[Elite]:
    """Draw ``min(n, len(archive))`` distinct elites by ``scheme`` using ``rng`` only."""
    cells, probs = selection_probabilities(archive, scheme)
    k = min(n, len(cells))
    idx = rng.choice(len(cells), size=k, replace=False, p=probs)
    return [archive.elites[cells[i]] for i in idx]

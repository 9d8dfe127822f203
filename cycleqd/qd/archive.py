"""MAP-Elites grid archive for one skill (paper §3.1).

In archive k the *quality* is skill k's score and the *behaviour characteristics* (BCs)
are the other K-1 skills' scores, each binned on a regular grid. Binning follows the
official code (``tasks/base.py::_get_bin_id``): edges ``linspace(lo, hi, bins + 1)``;
a score s falls in bin i when ``edge_i < s <= edge_{i+1}``; scores outside ``[lo, hi]``
are clamped into the edge bins.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np

Cell = tuple[int, ...]
MEAN_QUALITY = "mean"  # quality of the single-archive ablation: mean of all skill scores


@dataclass(frozen=True)
class BCAxis:
    """One behaviour-characteristic axis: a skill's score binned on [lo, hi].

    Raises:
        ValueError: bins < 1 or lo >= hi.
    """

    skill: str
    lo: float
    hi: float
    bins: int

    def __post_init__(self) -> None:
        if self.bins < 1:
            raise ValueError(f"BC axis {self.skill!r}: bins must be >= 1, got {self.bins}")
        if not self.lo < self.hi:
            raise ValueError(f"BC axis {self.skill!r}: range min ({self.lo}) must be < max ({self.hi})")

    def index(self, score: float) -> int:
        """Bin index of ``score`` in [0, bins - 1] (official semantics, clamped)."""
        edges = np.linspace(self.lo, self.hi, self.bins + 1)
        return int(min(max(0, int(np.digitize(score, edges, right=True)) - 1), self.bins - 1))

    def edges(self) -> np.ndarray:
        """(bins + 1,) float64 bin edges."""
        return np.linspace(self.lo, self.hi, self.bins + 1)


@dataclass
class Elite:
    """An archive entry: small fields only, the weights live in the model store.

    Attributes:
        id: model id (``expert:<skill>``, ``base`` or ``g<generation>``).
        scores: skill name -> score in [0, 1], for all K skills.
        generation: generation that produced it (0 for experts/base).
        parents: ids of its parents (empty for seeds).
    """

    id: str
    scores: dict[str, float]
    generation: int = 0
    parents: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "scores": self.scores, "generation": self.generation,
                "parents": list(self.parents)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Elite":
        return cls(d["id"], {k: float(v) for k, v in d["scores"].items()}, int(d["generation"]),
                   tuple(d.get("parents", ())))


@dataclass
class GridArchive:
    """MAP-Elites archive whose quality is ``quality_skill`` and whose cells are ``axes``.

    Attributes:
        quality_skill: name of the skill whose score is the quality.
        axes: the BC axes (the other skills), in skill order.
        elites: cell -> elite.
    """

    quality_skill: str
    axes: tuple[BCAxis, ...]
    elites: dict[Cell, Elite] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(a.bins for a in self.axes)

    @property
    def num_cells(self) -> int:
        return int(np.prod(self.shape)) if self.axes else 1

    def cell_of(self, scores: dict[str, float]) -> Cell:
        """The cell of a model with these skill scores.

        Raises:
            KeyError: a missing skill.
            ValueError: a BC score that is NaN/inf (it has no bin).
        """
        for a in self.axes:
            v = scores[a.skill]
            if not _finite(v):
                raise ValueError(f"archive {self.quality_skill!r}: BC score {a.skill}={v!r} is not a "
                                 "finite number; a model with a non-finite score has no cell")
        return tuple(a.index(scores[a.skill]) for a in self.axes)

    def check_elite(self, elite: "Elite") -> None:
        """Refuse an elite whose quality or BC scores are not finite numbers.

        Raises:
            ValueError: naming the archive, the model and the score.
        """
        bad = {k: v for k, v in elite.scores.items() if not _finite(v)}
        if bad:
            k, v = next(iter(bad.items()))
            raise ValueError(f"archive {self.quality_skill!r}: model {elite.id!r} has a non-finite score "
                             f"{k}={v!r}; NaN/inf scores never enter an archive (they would poison the "
                             "cell, the QD score and the sampling probabilities)")
        q = self.quality_of(elite.scores)
        if not _finite(q):
            raise ValueError(f"archive {self.quality_skill!r}: model {elite.id!r} has non-finite "
                             f"quality {q!r}")

    def quality_of(self, scores: dict[str, float]) -> float:
        """The quality of a model with these scores: the quality skill's score, or the mean
        of all skills' scores for the single-archive ablation (``quality_skill == "mean"``)."""
        return _quality(self.quality_skill, scores)

    def add(self, elite: Elite) -> bool:
        """Insert ``elite`` if :func:`enters` its cell (empty, or *strictly* higher quality than
        the incumbent's: the official rule). Returns True when the archive changed.

        Raises:
            ValueError: a quality or BC score that is NaN/inf (:meth:`check_elite`).
        """
        self.check_elite(elite)
        cell = self.cell_of(elite.scores)
        incumbent = self.elites.get(cell)
        if not enters(self.quality_of(elite.scores),
                      None if incumbent is None else self.quality_of(incumbent.scores)):
            return False
        self.elites[cell] = elite
        return True

    def gate(self) -> "ArchiveGate":
        """A picklable snapshot of what it takes to enter this archive now (cell -> incumbent
        quality, plus the axes): :meth:`ArchiveGate.would_accept` answers as :meth:`add`
        would have at this moment, without the elites. Executors' workers use it to decide
        whether a child's genome is worth writing."""
        return ArchiveGate(self.quality_skill, self.axes,
                           tuple((c, self.quality_of(e.scores)) for c, e in self))

    def __len__(self) -> int:
        return len(self.elites)

    def __iter__(self) -> Iterator[tuple[Cell, Elite]]:
        return iter(sorted(self.elites.items()))

    def best(self) -> Elite | None:
        """Highest-quality elite (ties: earliest cell)."""
        items = list(self)
        return max(items, key=lambda ce: self.quality_of(ce[1].scores))[1] if items else None

    def to_json(self) -> dict[str, Any]:
        return {"quality_skill": self.quality_skill,
                "axes": [{"skill": a.skill, "lo": a.lo, "hi": a.hi, "bins": a.bins} for a in self.axes],
                "elites": [{"cell": list(c), "quality": self.quality_of(e.scores), **e.to_json()}
                           for c, e in self]}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "GridArchive":
        """Inverse of :meth:`to_json`.

        Raises:
            ValueError: an elite with a NaN/inf score (:meth:`check_elite`).
        """
        arch = cls(d["quality_skill"], tuple(BCAxis(**a) for a in d["axes"]))
        for e in d["elites"]:
            elite = Elite.from_json(e)
            arch.check_elite(elite)
            arch.elites[tuple(e["cell"])] = elite
        return arch


def enters(quality: float, incumbent: float | None) -> bool:
    """The MAP-Elites insertion rule, the only copy of it: a model enters its cell when the
    cell is empty (``incumbent`` None) or its quality is *strictly* higher than the
    incumbent's (official ``MapElites`` archive update; a tie keeps the incumbent)."""
    return incumbent is None or quality > incumbent


def _quality(quality_skill: str, scores: dict[str, float]) -> float:
    if quality_skill == MEAN_QUALITY:
        return float(sum(scores.values()) / len(scores))
    return float(scores[quality_skill])


@dataclass(frozen=True)
class ArchiveGate:
    """An archive's entry threshold at one moment (:meth:`GridArchive.gate`): small,
    immutable and picklable, so it travels with a job to another process or node.

    Attributes:
        quality_skill: as the archive's (a skill name, or ``"mean"``).
        axes: the archive's BC axes.
        incumbents: ((cell, incumbent quality), ...) for the occupied cells, in cell order.
    """

    quality_skill: str
    axes: tuple[BCAxis, ...]
    incumbents: tuple[tuple[Cell, float], ...] = ()

    def would_accept(self, scores: dict[str, float]) -> bool:
        """Would :meth:`GridArchive.add` have taken a model with these (finite) scores?

        Raises:
            KeyError: a missing skill. ValueError: a BC score that is NaN/inf.
        """
        cell = GridArchive(self.quality_skill, self.axes).cell_of(scores)
        return enters(_quality(self.quality_skill, scores), dict(self.incumbents).get(cell))


def _finite(v: Any) -> bool:
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def make_archives(skills: Sequence[str], ranges: dict[str, tuple[float, float]],
                  bins: dict[str, int]) -> list[GridArchive]:
    """One archive per skill; archive k's axes are all skills but k, in skill order."""
    axes = {s: BCAxis(s, float(ranges[s][0]), float(ranges[s][1]), int(bins[s])) for s in skills}
    return [GridArchive(q, tuple(axes[s] for s in skills if s != q)) for q in skills]

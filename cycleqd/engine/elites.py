"""The elites of a run as one table, its Pareto front, and selection by preference.

``cycleqd elites RUN_DIR`` lists every model that is an elite of at least one archive of the
run's last committed state (``state.json``) once, with the ``ARCHIVE:i,j`` cells it holds
(the form ``cycleqd export --cell`` takes and the elite maps print in each cell), its
search-split score on every skill, their mean, held-out test scores where a ``cycleqd demo``
recorded them (``comparison.json`` beside the run), and whether it is on the Pareto front.
Seed models (the experts, the base) are elites like any other and are labelled ``seed``.

Pareto front: the elites no other elite dominates over the skills' search scores (``b``
dominates ``a`` when ``b >= a`` on every skill and ``b > a`` on at least one), so elites with
equal score vectors are all on it. ``cycleqd export --select PREF`` picks one elite by a
preference (:func:`parse_preference`): weights over skills and/or constraints on them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml

from cycleqd.errors import CycleQDError
from cycleqd.engine.model_card import _test_scores, load_comparison
from cycleqd.engine.rundir import RunDir
from cycleqd.engine.runview import RunView
from cycleqd.qd.archive import GridArchive


class PreferenceError(CycleQDError, ValueError):
    """A ``--select`` preference that cannot be parsed or that no elite satisfies; the
    message is one line naming the bad token, or the closest elites."""


@dataclass
class EliteRow:
    """One elite of a run.

    Attributes:
        id: model id (``g000123``, ``expert:<skill>``, ``base``).
        generation: generation it was bred in (0 for seed models).
        locations: ``"ARCHIVE:i,j"`` cells it holds, in archive order.
        scores: skill -> search-split score (float in [0, 1] for the built-in skills).
        test: skill -> held-out test score, or None when none was recorded.
        front: on the Pareto front of the table it belongs to.
    """

    id: str
    generation: int
    locations: list[str]
    scores: dict[str, float]
    test: dict[str, float] | None = None
    front: bool = False

    @property
    def seed(self) -> bool:
        return self.generation == 0

    def mean(self, skills: Sequence[str]) -> float:
        """Mean search score over ``skills`` (NaN for a missing one)."""
        return sum(self.scores.get(s, math.nan) for s in skills) / max(1, len(skills))

    def to_json(self, skills: Sequence[str]) -> dict[str, Any]:
        return {"id": self.id, "generation": self.generation, "seed": self.seed,
                "locations": self.locations, "scores": self.scores, "mean": self.mean(skills),
                "test": self.test, "front": self.front}


@dataclass
class EliteTable:
    """Every elite of a run once (order: mean score descending, then id), its skills in
    config order."""

    skills: list[str]
    rows: list[EliteRow] = field(default_factory=list)

    def by_id(self) -> dict[str, EliteRow]:
        return {r.id: r for r in self.rows}


# -- reading a run --------------------------------------------------------------------------------
def load_archives(run_dir: Path | str) -> list[GridArchive]:
    """The archives of the run's last committed generation (``state.json``, read through
    :class:`cycleqd.engine.runview.RunView`, schema-checked).

    Raises:
        RunDirError: ``run_dir`` holds no ``config.yaml`` (not a cycleqd run), or a damaged
            state.json (one line naming the key).
        FileNotFoundError: no state.json (no generation finished).
    """
    return RunView(run_dir).archives


def _skills(run_dir: Path, archives: Sequence[GridArchive]) -> list[str]:
    """Skill names in config order (``config.yaml``), else the elites' score keys sorted."""
    cfg_path = RunDir(run_dir).config
    if cfg_path.is_file():
        cfg = yaml.safe_load(cfg_path.read_text()) or {}
        names = [str(s["name"]) for s in cfg.get("skills") or [] if isinstance(s, dict) and "name" in s]
        if names:
            return names
    return sorted({k for a in archives for _, e in a for k in e.scores})


def elite_table(run_dir: Path | str) -> EliteTable:
    """Read every elite of the run in ``run_dir`` into an :class:`EliteTable` with the
    Pareto front marked.

    Raises:
        FileNotFoundError, RunDirError: as :func:`load_archives`.
    """
    run_dir = Path(run_dir)
    archives = load_archives(run_dir)
    skills = _skills(run_dir, archives)
    rows: dict[str, EliteRow] = {}
    comp = load_comparison(run_dir)
    for a in archives:
        for cell, e in sorted(a, key=lambda ce: ce[0]):
            loc = f"{a.quality_skill}:{','.join(str(int(i)) for i in cell)}"
            if e.id in rows:
                rows[e.id].locations.append(loc)
            else:
                rows[e.id] = EliteRow(e.id, int(e.generation), [loc], dict(e.scores),
                                      _test_scores(run_dir, e.id, comp) if comp else None)
    table = EliteTable(skills, sorted(rows.values(), key=lambda r: (-_num(r.mean(skills)), r.id)))
    mark_front(table.rows, skills)
    return table


def _num(x: float) -> float:
    return x if math.isfinite(x) else -math.inf


# -- Pareto front ---------------------------------------------------------------------------------
def mark_front(rows: Sequence[EliteRow], skills: Sequence[str]) -> None:
    """Set ``row.front`` for every row: True when no other row dominates it over
    ``skills`` (see module docstring; equal vectors do not dominate each other).
    O(n^2 * len(skills)); an archive holds at most a few thousand elites."""
    vecs = [[_num(r.scores.get(s, math.nan)) for s in skills] for r in rows]
    for r, v in zip(rows, vecs):
        r.front = not any(all(x >= y for x, y in zip(w, v)) and any(x > y for x, y in zip(w, v))
                          for w in vecs)


# -- preferences ----------------------------------------------------------------------------------
_TERM = re.compile(r"^\s*([A-Za-z_][\w.-]*)\s*(>=|<=|>|<|=)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$")
_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": lambda a, b: a >= b, ">": lambda a, b: a > b, "<=": lambda a, b: a <= b, "<": lambda a, b: a < b}


@dataclass
class Preference:
    """A parsed ``--select`` preference.

    Attributes:
        weights: skill -> weight (>= 0); empty means every skill weighs 1 (the mean).
        constraints: (skill, operator, bound) triples, operator in ``>= > <= <``.
        text: the preference as given.
    """

    weights: dict[str, float]
    constraints: list[tuple[str, str, float]]
    text: str

    def score(self, row: EliteRow, skills: Sequence[str]) -> float:
        """Weighted sum of ``row``'s search scores (the mean without weights)."""
        if not self.weights:
            return row.mean(skills)
        return sum(w * row.scores.get(s, math.nan) for s, w in self.weights.items())

    def satisfied(self, row: EliteRow) -> bool:
        return all(_OPS[op](row.scores.get(s, math.nan), b) for s, op, b in self.constraints)

    def shortfall(self, row: EliteRow) -> float:
        """How far ``row`` is from satisfying every constraint (sum of score distances)."""
        return sum(0.0 if _OPS[op](v := row.scores.get(s, math.nan), b) else
                   (abs(v - b) if math.isfinite(v) else math.inf) for s, op, b in self.constraints)


def parse_preference(text: str, skills: Sequence[str]) -> Preference:
    """Parse a preference: comma-separated terms, each a weight ``SKILL=W`` (W >= 0) or a
    constraint ``SKILL>=X``, ``SKILL>X``, ``SKILL<=X``, ``SKILL<X`` on the search score.
    E.g. ``coding=2,db=1`` (the best ``2*coding + db``), ``coding>=0.3,os>0.1`` (the best
    mean among elites with those scores), ``coding>=0.3,db=1`` (the best ``db`` among
    elites with ``coding >= 0.3``).

    Raises:
        PreferenceError: an empty preference, a term that is not one of those forms, an
            unknown skill, a non-finite number, a negative or repeated weight, or all weights
            zero (names the term).
    """
    weights: dict[str, float] = {}
    constraints: list[tuple[str, str, float]] = []
    if not text.strip():
        raise PreferenceError("--select: empty preference; give e.g. 'coding=2,db=1' or 'coding>=0.3'")
    for t in text.split(","):
        m = _TERM.match(t)
        if not m:
            raise PreferenceError(f"--select: term {t.strip()!r} is not SKILL=WEIGHT or SKILL>=X "
                                  "(also >, <=, <), e.g. 'coding=2,db>=0.3'")
        skill, op, num = m.group(1), m.group(2), float(m.group(3))
        if not math.isfinite(num):     # 1e309 parses as inf
            raise PreferenceError(f"--select: term {t.strip()!r}: {m.group(3)} is not a finite number")
        if skill not in skills:
            raise PreferenceError(f"--select: term {t.strip()!r}: unknown skill {skill!r}; the run's "
                                  f"skills are {list(skills)}")
        if op == "=":
            if skill in weights:
                raise PreferenceError(f"--select: term {t.strip()!r}: {skill!r} is weighted twice")
            if num < 0:
                raise PreferenceError(f"--select: term {t.strip()!r}: weights must be >= 0")
            weights[skill] = num
        else:
            constraints.append((skill, op, num))
    if weights and not any(weights.values()):
        raise PreferenceError(f"--select {text!r}: every weight is 0; give at least one positive weight")
    return Preference(weights, constraints, text)


def select(table: EliteTable, preference: str | Preference) -> tuple[EliteRow, str]:
    """The elite of ``table`` that best fits ``preference`` and a one-line reason.

    Among the elites satisfying every constraint: the highest weighted score (the mean
    when no weight is given); ties by the higher mean, then the smaller id.

    Raises:
        PreferenceError: a bad preference (:func:`parse_preference`), or no elite satisfies
            the constraints (names the three closest and their constrained scores).
    """
    pref = preference if isinstance(preference, Preference) else parse_preference(preference, table.skills)
    ok = [r for r in table.rows if pref.satisfied(r)]
    if not ok:
        near = sorted(table.rows, key=lambda r: (pref.shortfall(r), r.id))[:3]
        names = sorted({s for s, _, _ in pref.constraints})
        desc = "; ".join(f"{r.id} (" + ", ".join(f"{s}={r.scores.get(s, math.nan):.3f}" for s in names) + ")"
                         for r in near)
        raise PreferenceError(f"--select {pref.text!r}: no elite satisfies it; closest: "
                              f"{desc or 'none (the archives are empty)'}")
    best = min(ok, key=lambda r: (-_num(pref.score(r, table.skills)), -_num(r.mean(table.skills)), r.id))
    what = ("weighted score " + " + ".join(f"{w:g}*{s}" for s, w in pref.weights.items())
            if pref.weights else "mean score")
    why = (f"{best.id} ({', '.join(best.locations)}): highest {what} = {pref.score(best, table.skills):.4f}"
           + (f" among {len(ok)} of {len(table.rows)} elites satisfying "
              + ", ".join(f"{s}{op}{b:g}" for s, op, b in pref.constraints) if pref.constraints
              else f" of {len(table.rows)} elites"))
    return best, why


select_elite = select   # pick_model's ``select`` argument hides the function


def pick_model(view: RunView, *, model_id: str | None = None, cell: str | None = None,
               archive: str | None = None, aggregate: bool = False, select: str | None = None
               ) -> tuple[str, str]:
    """The model ``cycleqd export`` names by exactly one of ``model_id`` (checked:
    :meth:`RunView.check_model_id`), ``cell`` (``ARCHIVE:i,j``), ``archive`` (its best
    elite), ``aggregate`` or ``select`` (a preference, :func:`select`), and a one-line
    description of it (``g000012 (best of archive b, b:3,1)``). Reads only ``state.json``,
    ``metrics.jsonl`` and the config: no torch, no genome.

    Raises:
        ValueError: not exactly one choice; an unknown archive; a malformed, out-of-range or
            empty cell; an empty archive. ModelIdError, PreferenceError, RunDirError.
    """
    chosen = [x for x in (model_id, cell, archive, select) if x is not None] + (["aggregate"] if aggregate else [])
    if len(chosen) != 1:
        raise ValueError("export: give exactly one of --model, --cell, --archive, --aggregate, --select")
    if aggregate or model_id is not None:
        mid = view.check_model_id("aggregate" if aggregate else model_id)
        return mid, mid
    if select is not None:
        row, why = select_elite(elite_table(view.root), select)
        return view.check_model_id(row.id), why
    by_name = {a.quality_skill: a for a in view.archives}
    if archive is not None:
        if archive not in by_name:
            raise ValueError(f"--archive {archive!r}: the run's archives are {sorted(by_name)}")
        best = by_name[archive].best()
        if best is None:
            raise ValueError(f"archive {archive!r} is empty")
        at = next(c for c, e in by_name[archive] if e is best)
        return (view.check_model_id(best.id),
                f"{best.id} (best of archive {archive}, {archive}:{','.join(str(int(i)) for i in at)})")
    name, sep, idx = cell.partition(":")
    if not sep or name not in by_name:
        raise ValueError(f"--cell {cell!r}: expected ARCHIVE:i,j with ARCHIVE in {sorted(by_name)}")
    try:
        c = tuple(int(x) for x in idx.split(","))
    except ValueError:
        raise ValueError(f"--cell {cell!r}: cell indices must be integers like 3,7") from None
    arch = by_name[name]
    if len(c) != len(arch.axes):
        raise ValueError(f"--cell {cell!r}: archive {name!r} has {len(arch.axes)} BC axes")
    for i, ax in zip(c, arch.axes):
        if not 0 <= i < ax.bins:
            raise ValueError(f"--cell {cell!r}: cell index {i} out of range 0..{ax.bins - 1} "
                             f"for axis {ax.skill!r}")
    if c not in arch.elites:
        filled = sorted(arch.elites)[:10]
        raise ValueError(f"--cell {cell!r}: that cell is empty (filled cells include {filled})")
    mid = arch.elites[c].id
    return view.check_model_id(mid), f"{mid} (cell {cell})"


# -- rendering ------------------------------------------------------------------------------------
def _f(x: float | None) -> str:
    return f"{x:.3f}" if x is not None and math.isfinite(x) else "-"


def listed(table: EliteTable, *, front_only: bool = False, sort: str | None = None) -> list[EliteRow]:
    """The rows to list: all (or the front's), by mean (table order) or by ``sort``'s score
    descending, ties by id.

    Raises:
        ValueError: ``sort`` is not a skill or ``mean``.
    """
    if sort is not None and sort not in (*table.skills, "mean"):
        raise ValueError(f"--sort {sort!r}: expected one of {[*table.skills, 'mean']}")
    rows = [r for r in table.rows if r.front or not front_only]
    if sort not in (None, "mean"):
        rows = sorted(rows, key=lambda r: (-_num(r.scores.get(sort, math.nan)), r.id))
    return rows


def table_rows(table: EliteTable, *, front_only: bool = False, sort: str | None = None
               ) -> tuple[list[str], list[list[str]]]:
    """Header and rows (strings) of the elite table: id, kind (``seed`` or the generation),
    cells, every skill's search score, mean, test mean (only when some elite has test
    scores), ``*`` on the Pareto front. ``sort``: a skill (descending) or ``mean``.

    Raises:
        ValueError: ``sort`` is not a skill or ``mean``.
    """
    skills = table.skills
    rows = listed(table, front_only=front_only, sort=sort)
    has_test = any(r.test for r in table.rows)
    header = ["id", "gen", "cells", *skills, "mean"] + (["test mean"] if has_test else []) + ["front"]
    out = []
    for r in rows:
        test = ([_f(sum(r.test.get(s, math.nan) for s in skills) / len(skills)) if r.test else "-"]
                if has_test else [])
        out.append([r.id, "seed" if r.seed else str(r.generation), " ".join(r.locations),
                    *(_f(r.scores.get(s)) for s in skills), _f(r.mean(skills)), *test,
                    "*" if r.front else ""])
    return header, out


def format_text(table: EliteTable, *, front_only: bool = False, sort: str | None = None) -> str:
    """The elite table as aligned plain text (what ``cycleqd elites`` prints)."""
    header, rows = table_rows(table, front_only=front_only, sort=sort)
    widths = [max(len(c) for c in col) for col in zip(header, *rows)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    n_front = sum(r.front for r in table.rows)
    lines.append(f"{len(table.rows)} elites, {n_front} on the Pareto front (*) over "
                 f"{', '.join(table.skills)}; export one with `cycleqd export RUN_DIR --model ID OUT` "
                 "or `--cell ARCHIVE:i,j`")
    return "\n".join(lines)


def add_to_report(doc: Any, run_dir: Path | str, text: Callable[..., Any]) -> None:
    """Append the elite table and the Pareto front to a report document (``doc.h``,
    ``doc.p``, ``doc.table`` of :class:`cycleqd.engine.report.Doc`); ``text`` wraps
    untrusted strings (ids, skill names: :class:`cycleqd.engine.report.Text`)."""
    table = elite_table(run_dir)
    header, rows = table_rows(table)
    skill_cols = range(3, 3 + len(table.skills))
    doc.h(2, "Elites and Pareto front")
    doc.p(f"Every elite of the last state once, with the cells it holds (ARCHIVE:i,j, as printed in "
          f"the elite maps; `cycleqd export RUN_DIR --cell ARCHIVE:i,j OUT`) and its search-split "
          f"scores. {sum(r.front for r in table.rows)} of {len(table.rows)} are on the Pareto front "
          f"(front = *: no other elite is at least as good on every skill and better on one).")
    doc.table([[text(h)] if j in skill_cols else h for j, h in enumerate(header)],
              [[[text(c, code=True)] if j in (0, 2) else c for j, c in enumerate(r)] for r in rows])

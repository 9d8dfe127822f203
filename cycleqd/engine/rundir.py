"""The run directory, crash-safe checkpoints, their validation on resume, and the run lock.

Layout::

    RUN_DIR/
      .lock              exclusive lock (fcntl.flock) of the process running it; pid + host
      config.yaml        the resolved, validated config
      state.json         the commit point: last complete generation, archives, genome digests
      archives.json      the current archives, human-readable, with QD metrics
      archives/gen_NNNNNN.json          snapshots every ``qd.snapshot_every`` generations
      archives/gen_NNNNNN.genomes/      hard links to the genomes a snapshot references
                                        (kept for the newest two snapshots)
      metrics.jsonl      one line per generation (and one per seed model, generation 0)
      genomes/           stored genomes of elites (see executors/store.py)
      maps/              elite-map PNGs, one per archive
      report.md / report.html    written by ``cycleqd report``

Every file is written with write-to-temp, fsync, rename (genomes too: fsynced before the
generation that references them is committed), so a SIGKILL or power loss at any moment
leaves either the old or the new version. ``state.json`` is written last in a generation;
on resume, ``metrics.jsonl`` is cut back to the generations ``state.json`` covers.

Nothing loaded on resume is trusted: :func:`check_resume` validates ``state.json`` (schema,
generation range, every elite in its own cell with finite scores that match its metrics line,
every referenced genome present with the SHA-256 recorded when it was written, the
archives equal cell by cell to a replay of the committed metrics lines
(:func:`replay_archives`), the aggregate's scores equal to its metrics line) and
``metrics.jsonl`` (a torn last line from a crash is dropped; any other bad line is an error),
and refuses with one line naming the file and the problem and the newest snapshot that
passes the same checks (``cycleqd resume RUN_DIR --from-snapshot N``, :func:`restore_snapshot`).
"""

from __future__ import annotations

import copy
import errno
import json
import math
import os
import re
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cycleqd.config import ConfigError, parse_config
from cycleqd.errors import CycleQDError
from cycleqd.qd.archive import Elite
from cycleqd._io import (DiskFullError, atomic_write_json, atomic_write_text,  # noqa: F401  (re-exported)
                         disk_full_names, fsync_dir, sha256_file)

# every model id a run writes: a child ``g<generation:06d>`` (engine/loop.py), a seed
# ``expert:<skill>`` or ``base`` (engine.loop.seed_ids), the aggregated model ``aggregate``
MODEL_ID = re.compile(r"^(g\d{6}|expert:[A-Za-z0-9_][\w.-]*|base|aggregate)$")
STATE_FORMAT = 2          # 2: genome digests recorded; 1 (no "format" key): written before them
SNAPSHOT_GENOMES_KEPT = 2  # newest snapshots whose genomes are kept (hard links) for --from-snapshot


class RunDirError(CycleQDError, ValueError):
    """A run directory that cannot be resumed as it is. The message is one line: the file,
    what is wrong, and what to do instead."""


class RunLockedError(RunDirError):
    """Another live process holds the run directory's lock."""


# ----------------------------------------------------------------------------------------
# schema of state.json and the snapshots
# ----------------------------------------------------------------------------------------
class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class _AxisJ(_Model):
    skill: str
    lo: float
    hi: float
    bins: int = Field(ge=1)


class _EliteJ(_Model):
    cell: list[int]
    quality: float
    id: str
    scores: dict[str, float]
    generation: int = Field(ge=0)
    parents: list[str] = []


class _ArchiveJ(_Model):
    quality_skill: str
    axes: list[_AxisJ]
    elites: list[_EliteJ]


_SHA256 = Field(pattern=r"^[0-9a-f]{64}$")


class StateJ(_Model):
    """``state.json``. ``genomes``: model id -> hex SHA-256 of its genome file, for every
    stored genome the state references (format 2; absent in format-1 states)."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    format: int = 1
    generation: int = Field(ge=0)
    config_fingerprint: str
    seed: int
    rng: str = ""
    archives: list[_ArchiveJ]
    aggregate: dict[str, float] | None = None
    genomes: dict[str, str] | None = None


class SnapshotJ(_Model):
    """``archives/gen_NNNNNN.json``."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    generation: int = Field(ge=0)
    archives: list[_ArchiveJ]
    genomes: dict[str, str] | None = None


def _schema_problem(err: ValidationError) -> str:
    errs = err.errors()
    e = errs[0]
    loc = ".".join(str(p) for p in e["loc"]) or "<top level>"
    msg = e["msg"]
    if e["type"] == "missing":
        msg = "missing key"
    elif e["type"] == "finite_number":
        msg = f"{e.get('input')!r} is not a finite number"
    more = f" (and {len(errs) - 1} more problems)" if len(errs) > 1 else ""
    return f"{loc}: {msg}{more}"


def _load_json_model(path: Path, model: type[BaseModel]) -> tuple[Any, str | None]:
    """(parsed model, None) or (None, problem phrase)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None, "file is missing"
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return None, f"not valid JSON ({e})" if raw else "file is empty"
    if not isinstance(obj, dict):
        return None, f"expected a JSON object, got {type(obj).__name__}"
    try:
        return model.model_validate(obj), None
    except ValidationError as e:
        return None, _schema_problem(e)


# ----------------------------------------------------------------------------------------
# the run directory
# ----------------------------------------------------------------------------------------
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
    lock = property(lambda self: self.root / ".lock")

    def snapshot(self, generation: int) -> Path:
        return self.snapshots / f"gen_{generation:06d}.json"

    def snapshot_genomes(self, generation: int) -> Path:
        return self.snapshots / f"gen_{generation:06d}.genomes"

    def snapshot_generations(self) -> list[int]:
        """Generations of the snapshot files present, newest first."""
        out = []
        for p in self.snapshots.glob("gen_*.json"):
            try:
                out.append(int(p.stem[4:]))
            except ValueError:
                pass
        return sorted(out, reverse=True)

    def create(self, config_yaml: str) -> None:
        """Make a new run directory. Raises FileExistsError if it already holds a run."""
        if self.state.exists() or self.metrics.exists():
            raise FileExistsError(f"{self.root} already holds a run: use `cycleqd resume {self.root}` "
                                  f"or choose another --out")
        for d in (self.root, self.snapshots, self.genomes, self.maps):
            d.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.config, config_yaml)

    def append_metrics(self, record: dict[str, Any]) -> None:
        """Append one line and fsync it. On a full disk the partial line is cut off again and
        :class:`DiskFullError` is raised."""
        data = (json.dumps(record) + "\n").encode()
        with open(self.metrics, "ab") as f:
            pos = f.tell()
            try:
                with disk_full_names(self.metrics):
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            except DiskFullError:
                try:
                    f.truncate(pos)
                except OSError:
                    pass  # a torn last line is dropped on resume anyway
                raise

    def scan_metrics(self) -> "MetricsScan":
        """Parse ``metrics.jsonl`` without raising: the records before the first bad line,
        whether the last line was torn (no newline, not JSON: a crash mid-append) and the
        first bad complete line (1-based number and reason), if any."""
        scan = MetricsScan()
        if not self.metrics.exists():
            return scan
        data = self.metrics.read_bytes()
        lines = data.split(b"\n")
        tail = lines.pop()  # b"" when the file ends with a newline
        for i, line in enumerate(lines, 1):
            rec, why = _parse_metric(line)
            if why:
                scan.bad_line, scan.bad_reason = i, why
                return scan
            scan.records.append(rec)
        if tail:
            rec, why = _parse_metric(tail)
            if why:
                scan.torn_tail = True
            else:
                scan.records.append(rec)
        return scan

    def read_metrics(self) -> list[dict[str, Any]]:
        """All metric records. A torn last line (crash mid-append) is skipped.

        Raises:
            RunDirError: a complete line that is not a metrics record (never silently
                skipped: the lines after it would be lost from reports).
        """
        scan = self.scan_metrics()
        if scan.bad_line:
            raise RunDirError(f"{self.metrics}: line {scan.bad_line} {scan.bad_reason}")
        return scan.records

    def truncate_metrics(self, last_generation: int, *, keep_aggregate: bool = False) -> None:
        """Keep only complete metric lines of generations <= ``last_generation`` (and the
        aggregate's line when ``keep_aggregate``). Raises RunDirError for a corrupt line."""
        recs = self.read_metrics()
        keep = [r for r in recs if (r.get("kind") == "aggregate" and keep_aggregate)
                or (r.get("kind") != "aggregate" and r["generation"] <= last_generation)]
        text = "".join(json.dumps(r) + "\n" for r in keep)
        if not self.metrics.exists() or self.metrics.read_text() != text:
            atomic_write_text(self.metrics, text)

    def load_state(self) -> dict[str, Any]:
        """``state.json`` as a dict, schema-checked (see :class:`StateJ`).

        Raises:
            FileNotFoundError: no state.json.
            RunDirError: not JSON or not a valid state (one line naming the key).
        """
        if not self.state.exists():
            raise FileNotFoundError(f"{self.root} has no state.json: not a cycleqd run directory, "
                                    f"or it crashed before its seed models were evaluated")
        st, why = _load_json_model(self.state, StateJ)
        if why:
            raise RunDirError(f"{self.state}: {why}")
        return st.model_dump()


@dataclass
class MetricsScan:
    records: list[dict[str, Any]] = field(default_factory=list)
    torn_tail: bool = False
    bad_line: int | None = None
    bad_reason: str = ""


def _parse_metric(line: bytes) -> tuple[dict | None, str]:
    try:
        rec = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return None, f"is not valid JSON ({e})"
    if not isinstance(rec, dict) or not isinstance(rec.get("generation"), int) or \
            isinstance(rec.get("generation"), bool):
        return None, "is not a metrics record (no integer 'generation')"
    return rec, ""


# ----------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------
def _finite_scores(scores: dict) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in scores.values())


def _float_scores(scores: Any) -> dict[str, float] | None:
    try:
        return {str(k): float(v) for k, v in scores.items()}
    except (AttributeError, TypeError, ValueError):
        return None


def _fmt_cell(c) -> str:
    return "[" + ", ".join(str(int(x)) for x in c) + "]"


def check_archives(archives: Sequence[_ArchiveJ], expected: Sequence[Any], seed_ids: Sequence[str],
                   generation: int) -> str | None:
    """None if ``archives`` (parsed JSON) fit the run's archives ``expected`` (GridArchives
    built from the config) at ``generation``; else one phrase naming the first problem."""
    if [a.quality_skill for a in archives] != [a.quality_skill for a in expected]:
        return (f"archives are {[a.quality_skill for a in archives]}, the config has "
                f"{[a.quality_skill for a in expected]}")
    skills = None
    for k, (aj, arch) in enumerate(zip(archives, expected)):
        axes = [(x.skill, x.lo, x.hi, x.bins) for x in aj.axes]
        if axes != [(x.skill, x.lo, x.hi, x.bins) for x in arch.axes]:
            return f"archives.{k} ({aj.quality_skill}): BC axes {axes} differ from the config's"
        seen: dict[tuple, str] = {}
        for j, e in enumerate(aj.elites):
            where = f"archives.{k} ({aj.quality_skill}) elite {e.id}"
            if skills is None:
                skills = sorted(e.scores)
            if sorted(e.scores) != skills:
                return f"{where}: scores for {sorted(e.scores)}, other elites have {skills}"
            if e.generation == 0:
                if e.id not in seed_ids:
                    return f"{where}: generation 0 but not a seed model ({list(seed_ids)})"
            elif e.id != f"g{e.generation:06d}":
                return f"{where}: id does not match its generation {e.generation}"
            if e.generation > generation:
                return f"{where}: made in generation {e.generation}, after the checkpoint's {generation}"
            try:
                cell = arch.cell_of(e.scores)
            except KeyError as ke:
                return f"{where}: no score for skill {ke}"
            if tuple(e.cell) != cell:
                return f"{where} sits in cell {_fmt_cell(e.cell)} but its scores put it in {_fmt_cell(cell)}"
            q = arch.quality_of(e.scores)
            if not math.isfinite(q) or q != e.quality:
                return f"{where}: quality {e.quality} does not match its scores ({q})"
            if cell in seen:
                return f"archives.{k} ({aj.quality_skill}): two elites in cell {_fmt_cell(cell)} ({seen[cell]}, {e.id})"
            seen[cell] = e.id
    return None


def check_metrics(records: Sequence[dict], seed_ids: Sequence[str], generation: int,
                  aggregate: bool) -> tuple[str | None, dict[str, dict]]:
    """Check that ``records`` hold the seed lines, then generations 1..``generation`` exactly
    once and in order (then the aggregate's line when ``aggregate``); later lines must be
    uncommitted work (a higher generation, or an aggregate line the state does not hold).
    Returns (problem or None, child id -> its record)."""
    by_child: dict[str, dict] = {}
    n = len(seed_ids)
    for i, r in enumerate(records):
        line = i + 1
        if i < n:
            exp_gen, exp_child = 0, seed_ids[i]
        elif i < n + generation:
            exp_gen = i - n + 1
            exp_child = f"g{exp_gen:06d}"
        elif i == n + generation and aggregate:
            if r.get("kind") != "aggregate":
                return (f"line {line}: expected the aggregated model's line, found generation "
                        f"{r['generation']}"), by_child
            by_child["aggregate"] = r
            continue
        else:  # past the commit point: must be uncommitted work, dropped on resume
            if r.get("kind") == "aggregate" and not aggregate:
                continue
            if r.get("kind") != "aggregate" and r["generation"] > generation:
                continue
            return (f"line {line}: generation {r['generation']} is recorded again after the "
                    f"checkpoint's generation {generation}"), by_child
        if r.get("kind") == "aggregate" or r["generation"] != exp_gen or r.get("child") != exp_child:
            return (f"line {line}: expected generation {exp_gen} ({exp_child}), found generation "
                    f"{r['generation']} ({r.get('child')})"), by_child
        by_child[exp_child] = r
    have = max(0, len([r for r in records if r.get("kind") != "aggregate"]) - n)
    if len(records) < n:
        return f"has {len(records)} seed-model lines, the run has {n} seed models", by_child
    if have < generation:
        return (f"covers generations up to {have} only, the checkpoint says {generation}"), by_child
    if aggregate and "aggregate" not in by_child:
        return "has no line for the aggregated model the checkpoint holds", by_child
    return None, by_child


def elite_scores_problem(rd: RunDir, elites: Iterable[tuple[str, Mapping[str, float]]],
                         by_child: Mapping[str, dict]) -> str | None:
    """None if every ``(id, scores)`` of ``elites`` that has a metrics record in ``by_child``
    (child id -> record, :func:`check_metrics`) holds exactly the record's scores; else one
    line naming the first elite whose ``state.json`` scores differ from ``metrics.jsonl``
    (a hand-edited or damaged state). Used by :func:`check_resume` and by
    :class:`cycleqd.engine.runview.RunView` (export, elites, report)."""
    for mid, scores in elites:
        rec = by_child.get(mid)
        if rec is not None and {k: float(v) for k, v in rec["scores"].items()} != dict(scores):
            return (f"{rd.state}: elite {mid} has scores {dict(scores)}, but "
                    f"{rd.metrics.name} recorded {rec['scores']}")
    return None


def replay_archives(records: Sequence[dict], expected: Sequence[Any], seed_ids: Sequence[str],
                    generation: int) -> tuple[list[Any] | None, str | None]:
    """Rebuild the archives the committed metrics lines imply: the seed lines, then the child
    lines of generations 1..``generation``, each offered in order to copies of ``expected``
    (empty GridArchives of the run's layout) with :meth:`GridArchive.add` (a strictly higher
    quality wins a cell; a line with ``"rejected"`` is never offered). Each line's ``entered``
    list must be the archives the replay puts it in. ``records`` passed :func:`check_metrics`.

    Returns:
        (archives, None), or (None, "line N: ...") naming the first line whose ``entered``
        list contradicts the replay.
    """
    archives = [copy.deepcopy(a) for a in expected]
    for a in archives:
        a.elites.clear()
    n = len(seed_ids) + generation
    lines = [r for r in records if r.get("kind") != "aggregate"][:n]
    for i, r in enumerate(lines, 1):
        entered: list[str] = []
        if not r.get("rejected"):
            try:
                elite = Elite(str(r["child"]), {k: float(v) for k, v in r["scores"].items()},
                              int(r["generation"]), tuple(r.get("parents") or ()))
                entered = [a.quality_skill for a in archives if a.add(elite)]
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                return None, f"line {i} ({r.get('child')}): its scores cannot be replayed ({e})"
        if sorted(entered) != sorted(r.get("entered") or []):
            return None, (f"line {i} ({r.get('child')}): records entering {r.get('entered') or []}, "
                          f"but replaying the committed lines puts it in {entered}")
    return archives, None


def compare_replayed(archives: Sequence[_ArchiveJ], replayed: Sequence[Any]) -> str | None:
    """None if ``archives`` (parsed JSON) hold exactly the elite ids of ``replayed`` cell by
    cell; else one phrase naming the first differing cell."""
    for k, (aj, ar) in enumerate(zip(archives, replayed)):
        have = {tuple(e.cell): e.id for e in aj.elites}
        want = {c: e.id for c, e in ar.elites.items()}
        for cell in sorted(set(have) | set(want)):
            if have.get(cell) != want.get(cell):
                return (f"archives.{k} ({aj.quality_skill}) cell {_fmt_cell(cell)} holds "
                        f"{have.get(cell) or 'nothing'}, but the committed metrics lines put "
                        f"{want.get(cell) or 'nothing'} there")
    return None


def _elite_ids(archives: Sequence[_ArchiveJ], seed_ids: Sequence[str]) -> list[str]:
    ids = {e.id for a in archives for e in a.elites}
    return sorted(i for i in ids if i not in seed_ids)


def _find_genome(folder: Path, model_id: str, suffix: str | None) -> Path:
    if suffix is not None:
        return folder / f"{model_id}{suffix}"
    hits = [p for p in folder.glob(f"{model_id}.*") if ".tmp-" not in p.name] if folder.is_dir() else []
    return hits[0] if len(hits) == 1 else folder / f"{model_id}.safetensors"


def check_genomes(ids: Sequence[str], digests: dict[str, str] | None, folder: Path,
                  suffix: str | None) -> str | None:
    """None if every genome in ``ids`` is in ``folder`` with its recorded digest (``digests``
    None: a format-1 state, presence only); else what is wrong with the first bad one."""
    from cycleqd.executors.store import check_genome_file   # the executors package imports torch

    for mid in ids:
        if digests is not None and mid not in digests:
            return f"no digest recorded for genome {mid}"
        why = check_genome_file(_find_genome(folder, mid, suffix), None if digests is None else digests[mid])
        if why:
            return why
    return None


@dataclass
class ResumePoint:
    """What :func:`check_resume` found: ``state`` (validated dict) or ``fresh`` (nothing
    committed yet: killed while the seed models were being scored)."""

    state: dict[str, Any] | None
    fresh: bool = False


def check_resume(rd: RunDir, cfg: Any, expected: Sequence[Any], seed_ids: Sequence[str], *,
                 genome_suffix: str | None = None) -> ResumePoint:
    """Validate a run directory before resuming it.

    Args:
        rd: the run directory.
        cfg: its RunConfig (``fingerprint()``, ``qd.generations``).
        expected: empty GridArchives built from ``cfg`` (their cells and quality rules).
        seed_ids: the seed model ids, in order (``engine.loop.seed_ids``).
        genome_suffix: file suffix of stored genomes (None: found by name).

    Returns:
        :class:`ResumePoint`.

    Raises:
        RunDirError: one line: the file, what is wrong, and the newest snapshot to resume
            from instead (or how to start again). Checked besides each elite on its own: the
            archives equal the replay of the committed metrics lines (:func:`replay_archives`,
            :func:`compare_replayed`) and the aggregate's scores equal its metrics line. The
            seed models' weight fingerprints are checked once they are loaded
            (``engine.loop.check_seed_fingerprints``).
    """
    scan = rd.scan_metrics()
    if not rd.state.exists():
        if not rd.config.exists():
            raise FileNotFoundError(f"{rd.root} is not a cycleqd run directory (no config.yaml)")
        children = [p for p in rd.genomes.glob("*") if p.is_file() and ".tmp-" not in p.name] \
            if rd.genomes.is_dir() else []
        later = [g for g in rd.snapshot_generations() if g > 0]
        gens = [r["generation"] for r in scan.records if r.get("kind") != "aggregate"]
        if scan.bad_line is None and not children and not later and all(g == 0 for g in gens) \
                and len(gens) <= len(seed_ids):
            return ResumePoint(None, fresh=True)   # killed while scoring the seed models
        done = max(gens, default=0)
        _refuse(rd, cfg, expected, seed_ids, genome_suffix, scan,
                f"{rd.state}: file is missing, but the run has {len(children)} stored genomes and "
                f"metrics up to generation {done}: this is not a fresh run, refusing to start over")
    st, why = _load_json_model(rd.state, StateJ)
    if why:
        _refuse(rd, cfg, expected, seed_ids, genome_suffix, scan, f"{rd.state}: {why}")
    if st.config_fingerprint != cfg.fingerprint():
        raise RunDirError(f"{rd.root}: config differs from the one the run started with "
                          f"({rd.config}); resume with that config")
    g, total = st.generation, cfg.qd.generations
    problem = None
    if g > total:
        problem = f"{rd.state}: generation {g} is beyond the run's qd.generations ({total})"
    elif st.aggregate is not None and g != total:
        problem = f"{rd.state}: holds an aggregated model at generation {g} of {total}"
    elif st.aggregate is not None and not _finite_scores(st.aggregate):
        problem = f"{rd.state}: aggregate scores are not finite"
    else:
        why = check_archives(st.archives, expected, seed_ids, g)
        if why:
            problem = f"{rd.state}: {why}"
    if problem is None:
        if scan.bad_line is not None:
            problem = f"{rd.metrics}: line {scan.bad_line} {scan.bad_reason}"
        else:
            why, by_child = check_metrics(scan.records, seed_ids, g, st.aggregate is not None)
            if why:
                problem = f"{rd.metrics}: {why}"
            else:
                problem = elite_scores_problem(rd, ((e.id, e.scores) for a in st.archives
                                                    for e in a.elites), by_child)
                if problem is None and st.aggregate is not None:
                    rec = by_child["aggregate"]
                    if _float_scores(rec.get("scores")) != st.aggregate:
                        problem = (f"{rd.state}: aggregate scores {st.aggregate} differ from the "
                                   f"aggregated model's line in {rd.metrics.name} ({rec.get('scores')})")
                if problem is None:
                    replayed, why = replay_archives(scan.records, expected, seed_ids, g)
                    if why:
                        problem = f"{rd.metrics}: {why}"
                    else:
                        why = compare_replayed(st.archives, replayed)
                        if why:
                            problem = f"{rd.state}: {why}"
    if problem is None:
        ids = _elite_ids(st.archives, seed_ids) + (["aggregate"] if st.aggregate is not None else [])
        why = check_genomes(ids, st.genomes, rd.genomes, genome_suffix)
        if why:
            problem = f"{rd.state} references a bad genome: {why}"
    if problem:
        _refuse(rd, cfg, expected, seed_ids, genome_suffix, scan, problem)
    return ResumePoint(st.model_dump())


def _refuse(rd, cfg, expected, seed_ids, suffix, scan, problem: str):
    snap = newest_good_snapshot(rd, cfg, expected, seed_ids, genome_suffix=suffix, scan=scan)
    if snap is not None:
        hint = (f"the newest good snapshot is {rd.snapshot(snap)}: continue from it with "
                f"`cycleqd resume {rd.root} --from-snapshot {snap}` (later generations are redone "
                f"and come out the same)")
    else:
        hint = "no snapshot passes the checks either: start again with `cycleqd run` into another --out"
    raise RunDirError(f"{problem}; {hint}")


def check_snapshot(rd: RunDir, generation: int, cfg: Any, expected: Sequence[Any],
                   seed_ids: Sequence[str], *, genome_suffix: str | None = None,
                   scan: MetricsScan | None = None) -> tuple[SnapshotJ | None, str | None]:
    """(snapshot, None) if snapshot ``generation`` can be resumed from: it parses, its archives
    pass :func:`check_archives`, every genome it references is kept beside it with its
    recorded digest, and the metric lines up to it are intact; else (None, problem)."""
    path = rd.snapshot(generation)
    snap, why = _load_json_model(path, SnapshotJ)
    if why:
        return None, f"{path}: {why}"
    if snap.generation != generation or generation > cfg.qd.generations:
        return None, f"{path}: generation {snap.generation} does not fit the run"
    why = check_archives(snap.archives, expected, seed_ids, generation)
    if why:
        return None, f"{path}: {why}"
    ids = _elite_ids(snap.archives, seed_ids)
    if ids:
        if snap.genomes is None:
            return None, f"{path}: written without genome digests (an older cycleqd)"
        why = check_genomes(ids, snap.genomes, rd.snapshot_genomes(generation), genome_suffix)
        if why:
            return None, f"{path}: {why}"
    scan = scan or rd.scan_metrics()
    prefix = [r for r in scan.records if r.get("kind") != "aggregate"]
    why, by_child = check_metrics(prefix[:len(seed_ids) + generation], seed_ids, generation, False)
    if why:
        return None, f"{rd.metrics}: {why}"
    for a in snap.archives:
        for e in a.elites:
            rec = by_child.get(e.id)
            if rec is not None and {k: float(v) for k, v in rec["scores"].items()} != e.scores:
                return None, f"{path}: elite {e.id} scores differ from {rd.metrics.name}"
    replayed, why = replay_archives(prefix, expected, seed_ids, generation)
    if why:
        return None, f"{rd.metrics}: {why}"
    why = compare_replayed(snap.archives, replayed)
    if why:
        return None, f"{path}: {why}"
    return snap, None


def newest_good_snapshot(rd: RunDir, cfg: Any, expected: Sequence[Any], seed_ids: Sequence[str], *,
                         genome_suffix: str | None = None, scan: MetricsScan | None = None) -> int | None:
    """Generation of the newest snapshot :func:`check_snapshot` accepts, or None."""
    scan = scan or rd.scan_metrics()
    for g in rd.snapshot_generations():
        snap, _ = check_snapshot(rd, g, cfg, expected, seed_ids, genome_suffix=genome_suffix, scan=scan)
        if snap is not None:
            return g
    return None


def restore_snapshot(rd: RunDir, generation: int, cfg: Any, expected: Sequence[Any],
                     seed_ids: Sequence[str], *, genome_suffix: str | None = None) -> str:
    """Make snapshot ``generation`` the run's commit point: its genomes go back into
    ``genomes/``, ``metrics.jsonl`` is cut to the generations it covers (the old file is kept
    as ``metrics.jsonl.before-snapshot-N``, a replaced ``state.json`` as
    ``state.json.before-snapshot-N``) and ``state.json`` is rewritten from it. The caller
    holds the run lock. Returns a one-line summary.

    Raises:
        RunDirError: the snapshot does not pass :func:`check_snapshot`.
    """
    snap, why = check_snapshot(rd, generation, cfg, expected, seed_ids, genome_suffix=genome_suffix)
    if why:
        raise RunDirError(f"cannot resume from snapshot {generation}: {why}")
    ids = _elite_ids(snap.archives, seed_ids)
    rd.genomes.mkdir(parents=True, exist_ok=True)
    digests = {}
    for mid in ids:
        src = _find_genome(rd.snapshot_genomes(generation), mid, genome_suffix)
        dst = rd.genomes / src.name
        digests[mid] = snap.genomes[mid]
        if dst.is_file() and sha256_file(dst) == digests[mid]:
            continue
        tmp = dst.with_name(f"{dst.name}.tmp-{os.getpid()}")
        tmp.unlink(missing_ok=True)
        with disk_full_names(dst):
            shutil.copyfile(src, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, dst)
    fsync_dir(rd.genomes)
    tag = f"before-snapshot-{generation}"
    if rd.metrics.exists():
        shutil.copyfile(rd.metrics, rd.root / f"{rd.metrics.name}.{tag}")
    scan = rd.scan_metrics()
    keep = [r for r in scan.records if r.get("kind") != "aggregate"][:len(seed_ids) + generation]
    dropped = len(scan.records) - len(keep) + (1 if scan.bad_line else 0)
    atomic_write_text(rd.metrics, "".join(json.dumps(r) + "\n" for r in keep))
    seed_fps = getattr(snap, "seed_fingerprints", None)   # (extra key) recorded at seeding time
    if seed_fps is None and rd.state.exists():
        try:
            seed_fps = json.loads(rd.state.read_text()).get("seed_fingerprints")
        except (OSError, ValueError, AttributeError):
            seed_fps = None
    if rd.state.exists():
        os.replace(rd.state, rd.root / f"{rd.state.name}.{tag}")
    atomic_write_json(rd.state, {
        "format": STATE_FORMAT, "generation": generation, "config_fingerprint": cfg.fingerprint(),
        "seed": cfg.seed, "rng": "every random draw is derived from (seed, generation, purpose)",
        "archives": [a.model_dump() for a in snap.archives], "aggregate": None, "genomes": digests,
        "restored_from": str(rd.snapshot(generation)),
        **({"seed_fingerprints": seed_fps} if isinstance(seed_fps, dict) else {}),
        **({"cma": snap.cma} if isinstance(getattr(snap, "cma", None), dict) else {})})   # qd.use_cma runs
    return (f"restored generation {generation} from {rd.snapshot(generation)} "
            f"({dropped} later metric line(s) set aside in {rd.metrics.name}.{tag})")


def link_snapshot_genomes(rd: RunDir, generation: int, paths: dict[str, Path]) -> None:
    """Keep the genomes snapshot ``generation`` references beside it (hard links, so no extra
    space while they are also current elites; a copy where the filesystem has no hard links)."""
    final = rd.snapshot_genomes(generation)
    if not paths:
        shutil.rmtree(final, ignore_errors=True)
        return
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for p in paths.values():
        with disk_full_names(tmp / p.name):
            try:
                os.link(p, tmp / p.name)
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                    raise
                shutil.copyfile(p, tmp / p.name)
    fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(rd.snapshots)


def prune_snapshot_genomes(rd: RunDir, keep: int = SNAPSHOT_GENOMES_KEPT) -> None:
    """Remove the genome folders of all but the newest ``keep`` snapshots (gen 0 needs none)."""
    dirs = sorted(rd.snapshots.glob("gen_*.genomes"), reverse=True)
    for d in dirs[keep:] + list(rd.snapshots.glob("gen_*.genomes.tmp")):   # + leftovers of a crash
        shutil.rmtree(d, ignore_errors=True)


# ----------------------------------------------------------------------------------------
# the run lock
# ----------------------------------------------------------------------------------------
_HELD: dict[str, "RunLock"] = {}


class RunLock:
    """Exclusive lock on a run directory for the life of the process running it.

    ``fcntl.flock`` on ``RUN_DIR/.lock`` (released by the kernel when the holder exits, even
    on SIGKILL), with the holder's pid, host and start time written into the file. A lock
    file left by a process that died is *stale*: its flock is gone, so it is taken over (and
    :attr:`took_over` names the dead holder). Where the filesystem has no flock (some network
    filesystems) the recorded pid is checked instead on the same host.

    Within one process the lock is re-entrant (a count), so the command line can take it
    before building models and the engine again for the run.

    Raises (from :meth:`acquire`):
        RunLockedError: a live process holds it (message names its pid and host).
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.path = self.root / ".lock"
        self._fd: int | None = None
        self._count = 0
        self.took_over: dict | None = None

    @classmethod
    def acquire_for(cls, root: str | Path) -> "RunLock":
        """The process-wide lock of ``root``, acquired (re-entrant)."""
        key = str(Path(root).resolve())
        lock = _HELD.get(key)
        if lock is None:
            lock = cls(root)
        lock.acquire()
        _HELD[key] = lock
        return lock

    @staticmethod
    def holder(root: str | Path) -> dict | None:
        """The recorded holder of ``root``'s lock (pid, host, since), or None."""
        try:
            info = json.loads((Path(root) / ".lock").read_text() or "null")
            return info if isinstance(info, dict) else None
        except (OSError, ValueError):
            return None

    def acquire(self) -> None:
        if self._fd is not None:
            self._count += 1
            return
        import fcntl

        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunLockedError(self._busy(self.holder(self.root))) from None
        except OSError as e:  # no flock on this filesystem: fall back to the recorded pid
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                os.close(fd)
                raise
            prev = self.holder(self.root)
            if prev and _alive_elsewhere(prev):
                os.close(fd)
                raise RunLockedError(self._busy(prev)) from None
        prev = self.holder(self.root)
        if prev and prev.get("pid") != os.getpid():
            self.took_over = prev   # its holder died without releasing it
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        except BaseException:
            os.close(fd)   # drops the flock again
            raise
        self._fd, self._count = fd, 1

    def _busy(self, info: dict | None) -> str:
        who = (f"pid {info.get('pid')} on {info.get('host')} (since {info.get('since')})"
               if info else "another process")
        return (f"{self.root} is in use by {who}: one process per run directory; wait for it "
                f"to finish or stop it, then `cycleqd resume {self.root}`")

    def release(self) -> None:
        """Drop one hold; the last one empties the file and unlocks."""
        if self._fd is None:
            return
        self._count -= 1
        if self._count > 0:
            return
        fd, self._fd = self._fd, None
        _HELD.pop(str(self.root.resolve()), None)
        try:
            os.ftruncate(fd, 0)   # an empty lock file = released cleanly
        except OSError:
            pass
        os.close(fd)              # closes the flock too

    @property
    def held(self) -> bool:
        return self._fd is not None


def _alive_elsewhere(info: dict) -> bool:
    """Is the recorded holder alive? Unknown (another host) counts as alive."""
    if info.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(info["pid"]), 0)
    except (KeyError, ValueError, TypeError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return int(info["pid"]) != os.getpid()


# ----------------------------------------------------------------------------------------
# changing the number of generations of an existing run
# ----------------------------------------------------------------------------------------
def finish_pending_config(rd: RunDir) -> bool:
    """Complete an interrupted :func:`extend_run`: a ``state.json`` that carries
    ``pending_config`` was committed with that config's fingerprint, so write it to
    ``config.yaml`` and drop the key. Returns True if there was one.

    Raises:
        RunDirError: the pending config does not parse as a config, or its fingerprint is
            not the state's ``config_fingerprint`` (a corrupted or foreign state file); nothing
            is written, so ``config.yaml`` stays the run's own.
    """
    try:
        st = json.loads(rd.state.read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(st, dict) or "pending_config" not in st:
        return False
    pending = st["pending_config"]
    try:
        import yaml

        fp = parse_config(yaml.safe_load(pending) if isinstance(pending, str) else None,
                          source="pending_config").fingerprint()
    except (ConfigError, ValueError, yaml.YAMLError) as e:
        raise RunDirError(f"{rd.state}: pending_config is not a valid config "
                          f"({str(e).splitlines()[0]}); config.yaml was left as it is") from None
    if fp != st.get("config_fingerprint"):
        raise RunDirError(f"{rd.state}: pending_config has fingerprint {fp}, but the state was "
                          f"committed with {st.get('config_fingerprint')}: not an interrupted "
                          f"--generations change; config.yaml was left as it is")
    atomic_write_text(rd.config, st.pop("pending_config"))
    atomic_write_json(rd.state, st)
    return True


def extend_run(rd: RunDir, state: dict[str, Any], new_cfg: Any) -> str:
    """Give a (finished or unfinished) run ``new_cfg.qd.generations`` generations in all.
    The caller holds the lock and has validated ``state`` with the old config
    (:func:`check_resume`). A finished run's aggregate line moves from ``metrics.jsonl`` to
    ``aggregates-previous.jsonl`` (a new aggregate is made at the new end). Crash-safe: the
    new config travels in ``state.json`` (``pending_config``) until ``config.yaml`` is written.

    Raises:
        RunDirError: fewer generations than already done.
    """
    g, n = int(state["generation"]), int(new_cfg.qd.generations)
    if n < g:
        raise RunDirError(f"--generations {n}: the run in {rd.root} has already done {g} generations")
    new = {k: v for k, v in state.items() if k != "pending_config"}
    new["config_fingerprint"] = new_cfg.fingerprint()
    old_agg = state.get("aggregate")
    if old_agg is not None:
        aggs = [r for r in rd.read_metrics() if r.get("kind") == "aggregate"]
        with disk_full_names(rd.root / "aggregates-previous.jsonl"):
            with open(rd.root / "aggregates-previous.jsonl", "a") as f:
                for r in aggs:
                    f.write(json.dumps({**r, "run_generations": g}) + "\n")
                f.flush()
                os.fsync(f.fileno())
        new["aggregate"] = None
        new["genomes"] = {k: v for k, v in (state.get("genomes") or {}).items() if k != "aggregate"} \
            if state.get("genomes") is not None else None
    atomic_write_json(rd.state, {**new, "pending_config": new_cfg.to_yaml()})
    rd.truncate_metrics(g)
    finish_pending_config(rd)
    return f"{rd.root}: now {n} generations in all ({g} done)"

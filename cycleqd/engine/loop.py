"""The CycleQD main loop (paper §3, Algorithm 1).

    archives <- one MAP-Elites grid per skill, seeded with the experts (scored on all skills)
    for g in 1..G:
        k        <- quality skill of generation g           (cycles through the skills)
        parents  <- elite-sample 2 models from archive k
        child    <- mutate_k(crossover(parents))            (task-vector merge, SVD noise)
        scores   <- evaluate child on every skill
        offer the child to every archive                     (strictly better quality wins)
    aggregate the archives' best models into one model

Here each step is one call: the scheduler (``qd/``) picks k, the mutation basis and the
parents and does the insertion; ``step.py`` makes and scores the child (run by an executor,
in-process or on Ray workers); the run directory (``rundir.py``) makes every generation
durable before the next begins.
"""

from __future__ import annotations

import functools
import signal
import sys
import threading
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from cycleqd.config import RunConfig
from cycleqd.engine.final import final_plan, needs_validation, select_final
from cycleqd.engine.rundir import (STATE_FORMAT, RunDir, RunDirError, RunLock, atomic_write_json,
                                   check_resume, link_snapshot_genomes, prune_snapshot_genomes,
                                   restore_snapshot)
from cycleqd.engine.step import Job, JobResult, WorkerContext, run_step, score_child
from cycleqd.executors.base import Executor
from cycleqd.executors.local import LocalExecutor
from cycleqd.executors.store import GenomeStore
from cycleqd.qd.archive import MEAN_QUALITY, BCAxis, Elite, GridArchive, make_archives
from cycleqd.qd.cma import CMAParameterPolicy, OperatorParams, cma_fitness
from cycleqd.qd.metrics import archive_stats
from cycleqd.qd.scheduler import Ask, CycleQDScheduler


@dataclass
class Components:
    """What a run is made of (built from a config by :func:`cycleqd.engine.build.build_components`,
    or by hand, e.g. for the vision setting).

    Attributes:
        space: the WeightSpace (genomes, operators, materialisation).
        skills: the K skills, in the order of ``cfg.skills``.
        adapter: ``bind(weights, fingerprint) -> model`` given to ``Skill.evaluate``.
        close: optional cleanup (stop servers, free engines).
        validation: optional ``() -> skills``: the K skills on their ``validation`` split
            (built only when the final choice needs them, :mod:`cycleqd.engine.final`).
    """

    space: Any
    skills: list
    adapter: Any
    close: Callable[[], None] | None = None
    validation: Callable[[], list] | None = None


@dataclass
class RunResult:
    run_dir: Path
    archives: list[GridArchive]
    generation: int
    aggregate: dict[str, float] | None = None
    stats: dict[str, dict[str, float]] = field(default_factory=dict)
    complete: bool = False   # True when a resume found the run already complete (nothing done)


def build_archives(cfg: RunConfig) -> list[GridArchive]:
    """K archives (cyclic mode) or one archive over all skills with mean quality (single mode)."""
    names = cfg.skill_names
    ranges = {s.name: s.bc_range for s in cfg.skills}
    bins = {s.name: s.bins for s in cfg.skills}
    if cfg.qd.mode == "single":
        return [GridArchive(MEAN_QUALITY, tuple(BCAxis(s, *ranges[s], bins[s]) for s in names))]
    return make_archives(names, ranges, bins)


def seed_ids(cfg: RunConfig) -> list[str]:
    ids = [f"expert:{s}" for s in cfg.skill_names]
    return ids + (["base"] if cfg.model.seed_with_base else [])


def seed_fingerprints(space: Any, seeds: dict[str, Any]) -> dict[str, str]:
    """Seed model id -> :func:`~cycleqd.inference.fingerprint.fingerprint_state_dict` of its
    materialised weights (the key its evaluation is cached under, ``engine/step.py``
    ``score_child``). Recorded in ``state.json`` and the snapshots at seeding time and checked on
    every resume (:func:`check_seed_fingerprints`). Cost: one materialisation and one pass
    over each seed's bytes (0.76 s for SmolLM2-135M in fp32)."""
    from cycleqd.inference.fingerprint import fingerprint_state_dict

    out = {}
    for sid, genome in seeds.items():
        w = space.materialize(genome)
        out[sid] = fingerprint_state_dict(w)
        del w
    return out


def check_seed_fingerprints(rd: RunDir, recorded: dict | None, now: dict[str, str]) -> None:
    """Refuse a resume whose seed models (re-read from the config's paths) are not the weights
    the run was seeded with. ``recorded`` None: a state written before seed fingerprints were
    recorded (accepted; the current ones are recorded from now on).

    Raises:
        RunDirError: one line naming the seed model whose weights changed.
    """
    if recorded is None:
        return
    if not isinstance(recorded, dict) or set(recorded) != set(now):
        raise RunDirError(f"{rd.state}: seed_fingerprints names {sorted(recorded) if isinstance(recorded, dict) else recorded}, "
                          f"the config's seed models are {sorted(now)}")
    for sid, fp in now.items():
        if recorded[sid] != fp:
            what = f"expert for skill {sid.split(':', 1)[1]}" if sid.startswith("expert:") else f"seed model {sid}"
            raise RunDirError(f"{what} changed since the run started: its weights now have "
                              f"fingerprint {fp}, the run was seeded with {recorded[sid]} ({rd.state}); "
                              f"restore the original weights at the config's path, or start a new "
                              f"run with `cycleqd run`")


def _job(ask: Ask, seed: int, archives: Sequence[GridArchive], params: OperatorParams | None = None) -> Job:
    """Generation ``ask.generation``'s job: the ask, plus every archive's gate as it is now
    (and the CMA-ES policy's operator settings, if any)."""
    return Job(ask.generation, ask.skill, ask.parents, f"g{ask.generation:06d}", seed,
               gates=tuple(a.gate() for a in archives), basis=ask.basis, params=params)


def _record(res: JobResult, entered: list[str], archives: Sequence[GridArchive], started: float) -> dict:
    job = res.job
    return {"generation": job.generation, "child": job.child_id,
            "quality_skill": archives[job.skill].quality_skill if job.parents else None,
            "parents": list(job.parents), "scores": res.scores,
            "subscores": {k: r.subscores for k, r in res.results.items() if r.subscores},
            "entered": entered, "saved": res.saved, "genome_bytes": res.genome_bytes,
            "timings": {k: round(v, 6) for k, v in res.timings.items()}, "worker": res.worker,
            "archives": {a.quality_skill: archive_stats(a) for a in archives},
            "wall_s": round(time.time() - started, 3),
            **({"cma": job.params.to_json()} if getattr(job, "params", None) is not None else {}),
            **({"rejected": res.rejected} if getattr(res, "rejected", None) else {})}


@contextmanager
def _commit_section(*, second_now: bool = False):
    """Hold SIGINT/SIGTERM until the block ends, then deliver them: an interrupted run
    always stops on a committed generation, and the signal never lands inside a torch call
    (where a KeyboardInterrupt can surface as an unrelated error, e.g. torch's "could not
    determine the shape of object type"). With ``second_now`` (a whole generation: the
    evaluation may take minutes) the first signal prints that the run stops once the current
    generation is saved, and a second one is delivered at once. A signal whose handler is
    ``SIG_IGN`` (e.g. SIGINT of a background job started by a shell without job control) is
    left alone: ignored before, ignored here. Only in the main thread (signal handlers live
    there); nested sections hand what they caught to the outer one."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    old = {}

    def deliver(sig: int) -> None:
        h = old[sig]
        if callable(h):
            h(sig, None)
        elif h == signal.SIG_DFL:
            signal.raise_signal(sig)

    def on_signal(sig: int, frame: Any) -> None:
        if second_now and caught:
            for s, h in old.items():
                signal.signal(s, h)
            deliver(sig)
            return
        caught.append(sig)
        if second_now:
            print("stopping once the current generation is saved (press Ctrl-C again to stop now)",
                  file=sys.stderr, flush=True)

    for sig in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(sig) is not signal.SIG_IGN:
            old[sig] = signal.signal(sig, on_signal)
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)
        for sig in caught[:1]:
            deliver(sig)


class _Progress:
    """What a run prints while it works (stderr).

    Args:
        total, initial: generations in all / already done.
        mode: ``"bar"`` a tqdm bar that keeps to one terminal line (postfix parts that do
            not fit the width are dropped, so the line never wraps); ``"lines"`` one plain line per generation
            (generation, quality skill, the child's scores, the archives it entered,
            elapsed seconds) -- for ``--no-progress`` and non-TTY output (log files get
            no ``\r``); ``"off"`` nothing. ``True`` means ``"auto"``: a bar when both stdout and
            stderr are terminals, else lines; ``False`` means ``"lines"``.
    """

    def __init__(self, total: int, initial: int, mode: bool | str = True):
        import sys

        if mode is True or mode == "auto":
            mode = "bar" if sys.stderr.isatty() and sys.stdout.isatty() else "lines"
        elif mode is False or mode is None:
            mode = "lines"
        if mode not in ("bar", "lines", "off"):
            raise ValueError(f"progress mode {mode!r}: choose bar, lines, off or auto")
        self.mode, self.total, self.initial = mode, total, initial
        self.bar = None
        self._t0 = time.time()
        self._stream = sys.stderr

    def stage(self, text: str) -> None:
        """Announce a stage as it starts (one line)."""
        if self.mode != "off":
            print(text, file=self._stream, flush=True)

    def _open_bar(self) -> None:
        from tqdm.auto import tqdm

        # the postfix (quality skill, coverage, best) is sized to the width in update()
        self.bar = tqdm(total=self.total, initial=self.initial, unit="gen", dynamic_ncols=True,
                        desc="CycleQD", file=self._stream,
                        bar_format="{desc} {n}/{total} {bar} [{elapsed}<{remaining}]{postfix}")

    def update(self, skill: str, archives: Sequence[GridArchive], scores: dict | None = None,
               entered: Sequence[str] = (), generation: int | None = None) -> None:
        if self.mode == "off":
            return
        stats = {a.quality_skill: archive_stats(a) for a in archives}
        if self.mode == "lines":
            g = generation if generation is not None else self.initial + 1
            sc = " ".join(f"{k}={v:.3f}" for k, v in (scores or {}).items()
                          if isinstance(v, (int, float)))
            cov = " ".join(f"{n}={s['coverage']:.2f}" for n, s in stats.items())
            print(f"gen {g}/{self.total}  q={skill}  child {sc or '-'}  "
                  f"entered {','.join(entered) or '-'}  coverage {cov}  "
                  f"{time.time() - self._t0:.1f}s", file=self._stream, flush=True)
            self.initial = g
            return
        if self.bar is None:
            self._open_bar()
        import shutil

        cov = "cov " + "/".join(f"{s['coverage']:.2f}" for s in stats.values())
        best = "best " + "/".join(f"{s['best_quality']:.2f}" for s in stats.values())
        cols = shutil.get_terminal_size((80, 20)).columns
        # desc, counts, times and a 10-column bar take ~50 columns; the postfix gets the rest,
        # dropping parts that do not fit (tqdm would otherwise shrink the bar to nothing and
        # wrap the line, one new line per update)
        room = cols - 50
        post = next((p for p in (f"q={skill} {cov} {best}", f"q={skill} {cov}", f"q={skill}")
                     if len(p) <= room), "")
        self.bar.set_postfix_str(post, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class CycleQDRun:
    """One run: fresh (``resume=False``) or continued from the last complete generation."""

    def __init__(self, cfg: RunConfig, components: Components, run_dir: str | Path, *,
                 resume: bool = False, executor: Executor | None = None, progress: bool = True,
                 from_snapshot: int | None = None):
        self.cfg, self.c, self.rd = cfg, components, RunDir(run_dir)
        if len(components.skills) != len(cfg.skills):
            raise ValueError(f"{len(components.skills)} skill evaluators for {len(cfg.skills)} configured skills")
        names = [getattr(s, "name", None) for s in components.skills]
        if names != cfg.skill_names:
            raise ValueError(f"skill evaluators {names} do not match configured skills {cfg.skill_names}")
        self.archives = build_archives(cfg)
        self.scheduler = CycleQDScheduler(self.archives, seed=cfg.seed, sampling=cfg.qd.sampling,
                                          flip_interval=cfg.qd.flip_interval, num_parents=cfg.qd.num_parents,
                                          num_skills=len(cfg.skills))
        self.cma: CMAParameterPolicy | None = None
        if cfg.qd.use_cma:
            ops = cfg.operators
            if ops.crossover.name != "linear" or ops.mutation.name not in ("svd_expert", "svd_self"):
                raise ValueError(f"qd.use_cma needs crossover 'linear' and mutation 'svd_expert' or "
                                 f"'svd_self' (the settings it proposes: mu, sigma, rate), got "
                                 f"{ops.crossover.name!r} and {ops.mutation.name!r}")
            self.cma = CMAParameterPolicy(self.archives, seed=cfg.seed, num_parents=cfg.qd.num_parents,
                                          popsize=cfg.qd.cma_popsize, sigma0=cfg.qd.cma_sigma0)
        experts = components.space.expert_genomes()
        if len(experts) != len(cfg.skills):
            raise ValueError(f"{len(experts)} expert genomes for {len(cfg.skills)} skills")
        seeds = dict(zip(seed_ids(cfg), list(experts) + ([components.space.base_genome()]
                                                         if cfg.model.seed_with_base else [])))
        if resume and not self.rd.config.exists():
            raise FileNotFoundError(f"{self.rd.root} is not a cycleqd run directory (no config.yaml)")
        # one process per run directory, for the run's life (released at the end of run())
        self.lock = RunLock.acquire_for(self.rd.root)
        self._lock_finalizer = weakref.finalize(self, self.lock.release)
        try:
            self._state: dict | None = None
            suffix = components.space.genome_suffix
            self.notes: list[str] = []
            if resume and from_snapshot is not None:
                self.notes.append(restore_snapshot(self.rd, from_snapshot, cfg, build_archives(cfg),
                                                   seed_ids(cfg), genome_suffix=suffix))
            if resume:
                point = check_resume(self.rd, cfg, build_archives(cfg), seed_ids(cfg), genome_suffix=suffix)
                if point.fresh:  # killed while the seed models were being scored: score them again
                    self.rd.truncate_metrics(-1)
                    resume = False
                self._state = point.state
            else:
                self.rd.create(cfg.to_yaml())
            if self.lock.took_over:
                t = self.lock.took_over
                self.notes.append(f"took over the lock of pid {t.get('pid')} on {t.get('host')}, "
                                  f"which ended without releasing it")
            self.store = GenomeStore(self.rd.genomes, components.space, seeds)
            # the seed models are re-read from the config's paths: on resume the weights must
            # be the ones the seed elites were scored with; a fresh run records the
            # fingerprints its seed evaluations compute anyway (:meth:`_seed`)
            self._seeds = seeds
            self.seed_fps: dict[str, str] = {}
            if self._state is not None:
                self.seed_fps = seed_fingerprints(components.space, seeds)
                check_seed_fingerprints(self.rd, self._state.get("seed_fingerprints"), self.seed_fps)
        except BaseException:
            self.close()
            raise
        self.ctx = WorkerContext(components.space, self.store, components.adapter, components.skills,
                                 cfg.fingerprint())
        self.executor = executor or LocalExecutor(functools.partial(run_step, ctx=self.ctx))
        self.progress = progress
        self.show = _Progress(cfg.qd.generations, 0, progress)    # stage lines, bar or per-generation lines
        self.tracker = None   # cycleqd.tracking.Tracker (cfg.tracking), opened by run()
        self.generation = 0
        self.aggregate: dict[str, float] | None = None
        self.digests: dict[str, str] = {}   # stored genome id -> sha256 recorded at write time
        self._resume = resume
        self._started = time.time()

    def close(self) -> None:
        """Release the run directory's lock (idempotent; done at the end of :meth:`run`)."""
        self._lock_finalizer()

    @property
    def complete(self) -> bool:
        """All generations done and the aggregate made (per the validated state, on resume)."""
        st = self._state if self._resume else None
        return bool(st) and st["generation"] >= self.cfg.qd.generations and st["aggregate"] is not None

    # -- persistence -------------------------------------------------------------------
    def _checkpoint(self, in_flight: Sequence[Job] = ()) -> None:
        archives = [a.to_json() for a in self.archives]
        stats = {a.quality_skill: archive_stats(a) for a in self.archives}
        g = self.generation
        cma = {"cma": self.cma.to_json()} if self.cma is not None else {}
        referenced = {e.id for a in self.archives for _, e in a} - set(self.store.seeds)
        referenced |= {"aggregate"} if self.aggregate is not None else set()
        digests = {m: self.digests[m] for m in sorted(referenced)}
        atomic_write_json(self.rd.archives, {"generation": g, "stats": stats, "archives": archives})
        if g % self.cfg.qd.snapshot_every == 0 or g == self.cfg.qd.generations:
            elites = {m: self.store.path(m) for m in sorted(referenced - {"aggregate"})}
            link_snapshot_genomes(self.rd, g, elites)
            atomic_write_json(self.rd.snapshot(g), {"generation": g, "archives": archives,
                                                    "genomes": {m: digests[m] for m in elites},
                                                    "seed_fingerprints": self.seed_fps, **cma})
        atomic_write_json(self.rd.state, {
            "format": STATE_FORMAT,
            "generation": g, "config_fingerprint": self.cfg.fingerprint(), "seed": self.cfg.seed,
            "rng": "every random draw is derived from (seed, generation, purpose): nothing else to restore",
            "archives": archives, "aggregate": self.aggregate, "genomes": digests,
            "seed_fingerprints": self.seed_fps, **cma})
        keep = {e.id for a in self.archives for _, e in a} | {"aggregate"}
        keep |= {p for j in in_flight for p in j.parents} | {j.child_id for j in in_flight}
        self.store.gc(keep - set(self.store.seeds))
        self.digests = {m: d for m, d in self.digests.items() if m in keep}
        prune_snapshot_genomes(self.rd)

    def _restore(self) -> None:
        state = self._state if self._state is not None else self.rd.load_state()
        self.archives[:] = [GridArchive.from_json(a) for a in state["archives"]]
        self.scheduler.archives = self.archives
        self.generation = int(state["generation"])
        self.aggregate = state.get("aggregate")
        if state.get("genomes") is not None:
            self.digests = dict(state["genomes"])
        else:  # a state written before digests were recorded: prove each genome loads, then record
            ids = {e.id for a in self.archives for _, e in a} - set(self.store.seeds)
            ids |= {"aggregate"} if self.aggregate is not None else set()
            for m in sorted(ids):
                try:
                    self.store.get(m)
                except (KeyError, ValueError) as e:
                    raise RunDirError(f"{self.rd.state} references a bad genome: {e}") from None
                self.digests[m] = self.store.seal(m)
        self.rd.truncate_metrics(self.generation, keep_aggregate=self.aggregate is not None)
        self.scheduler.reset_pending(self.generation + 1)
        if self.cma is not None:
            if "cma" not in state and self.generation > 0:
                raise RunDirError(f"{self.rd.state} has no CMA-ES state (key 'cma') for this qd.use_cma run")
            if "cma" in state:
                try:
                    self.cma.restore(state["cma"])
                except (ValueError, TypeError, AttributeError) as e:   # a hand-edited or foreign state
                    raise RunDirError(f"{self.rd.state}: {e}") from None

    # -- the algorithm -----------------------------------------------------------------
    def _seed(self) -> None:
        """Evaluate the seed models on all skills and put them into every archive."""
        for i, sid in enumerate(self.store.seeds, 1):
            self.show.stage(f"seeding archives: scoring seed model {i}/{len(self.store.seeds)} ({sid})")
            with _commit_section(second_now=True):   # a signal waits for this seed's line
                self.executor.submit(Job(0, 0, (), sid, self.cfg.seed))
                res = self.executor.next_result()
                elite = Elite(sid, res.scores, 0, ())
                entered = [] if getattr(res, "rejected", None) else self.scheduler.tell_seed(elite)
                self.rd.append_metrics(self._track(_record(res, entered, self.archives, self._started)))
                # the fingerprint score_child bound the seed under (rejected before it: computed here)
                fp = getattr(res, "fingerprint", None)
                self.seed_fps[sid] = fp or seed_fingerprints(self.c.space, {sid: self._seeds[sid]})[sid]
        self._checkpoint()

    def run(self, stop_after: int | None = None) -> RunResult:
        """Run (or continue) until ``qd.generations`` (or ``stop_after`` more generations).
        A resumed run that is already complete returns at once and changes nothing. The run
        directory's lock is released when this returns or raises."""
        try:
            if self.complete:
                self._restore_archives_only()
                return RunResult(self.rd.root, self.archives, self.generation, self.aggregate,
                                 {a.quality_skill: archive_stats(a) for a in self.archives}, complete=True)
            from cycleqd.tracking import make_tracker

            self.tracker = make_tracker(self.cfg, self.rd.root)
            try:
                return self._run(stop_after)
            finally:
                if self.tracker is not None:
                    self.tracker.close()
        finally:
            self.close()

    def _track(self, rec: dict) -> dict:
        """Hand a metrics record to the experiment tracker (if any); returns ``rec``."""
        if self.tracker is not None:
            self.tracker.log_record(rec)
        return rec

    def _restore_archives_only(self) -> None:
        st = self._state
        self.archives[:] = [GridArchive.from_json(a) for a in st["archives"]]
        self.generation, self.aggregate = int(st["generation"]), st["aggregate"]

    def _run(self, stop_after: int | None) -> RunResult:
        if self._resume:
            self._restore()
        else:
            self._seed()
        total = self.cfg.qd.generations
        last = total if stop_after is None else min(total, self.generation + stop_after)
        bar = self.show
        bar.total, bar.initial = total, self.generation
        bar.stage(f"generation loop: generations {self.generation + 1}..{last} of {total}")
        in_flight: list[Job] = []
        next_gen = self.generation + 1
        try:
            while self.generation < last:
                with _commit_section(second_now=True):   # a signal waits for this generation's commit
                    while len(in_flight) < self.executor.capacity and next_gen <= last:
                        k = self.scheduler.quality_skill(next_gen)
                        if self.cma is not None and not self.cma.ready(k):
                            break   # skill k's CMA population is out: wait for its fitnesses
                        ask = self.scheduler.ask(next_gen)                       # k, basis, parents
                        params = self.cma.ask(k, ask.cells) if self.cma is not None else None
                        job = _job(ask, self.cfg.seed, self.archives, params)
                        self.executor.submit(job)                                # step.run_step: make, score
                        in_flight.append(job)
                        next_gen += 1
                    res = self.executor.next_result()
                    job = in_flight.pop(0)
                    assert res.job.generation == job.generation, "executor returned results out of order"
                    child = Elite(job.child_id, res.scores, job.generation, job.parents)
                    entered = self.scheduler.tell(job.generation, None if getattr(res, "rejected", None) else child)  # offer to every archive
                    if self.cma is not None:
                        self.cma.tell(job.skill, cma_fitness(self.archives[job.skill],
                                                             None if getattr(res, "rejected", None) else res.scores))
                    if entered and not res.saved:
                        raise RuntimeError(f"generation {job.generation}: child entered {entered} but its "
                                           f"genome was not saved")
                    if entered:
                        self.digests[job.child_id] = self.store.seal(job.child_id)   # fsync + sha256
                    self.generation = job.generation
                    with _commit_section():   # the commit itself is never cut short, even by a second signal
                        self.rd.append_metrics(self._track(_record(res, entered, self.archives, self._started)))
                        self._checkpoint(in_flight)
                    bar.update(self.archives[job.skill].quality_skill, self.archives, res.scores, entered,
                               job.generation)
        finally:
            bar.close()
            if in_flight:
                self.executor.close()
        if self.generation == total and self.aggregate is None:
            self.show.stage("model aggregation: merging each archive's best model and scoring it")
            with _commit_section(second_now=True):
                self.aggregate = self._aggregate()
                self._checkpoint()
        from cycleqd.engine.plots import plot_all_maps
        maps = plot_all_maps(self.archives, self.rd.maps, seed_ids=set(self.store.seeds))
        if self.tracker is not None:
            self.tracker.log_images(maps, self.generation)
        return RunResult(self.rd.root, self.archives, self.generation, self.aggregate,
                         {a.quality_skill: archive_stats(a) for a in self.archives})

    def _validation_score(self):
        """``genome -> {skill: score}`` on the validation split (None: no validation skills).
        Never the test split. A rejected candidate (non-finite weights or score) scores 0."""
        if self.c.validation is None:
            return None
        skills: list = []
        ctx = WorkerContext(self.c.space, self.store, self.c.adapter, skills, "", name="validation")

        def score(genome):
            if not skills:
                skills.extend(self.c.validation())
            res = score_child(ctx, Job(self.cfg.qd.generations + 1, 0, (), "final", self.cfg.seed), genome, {})
            return {s.name: (0.0 if res.rejected else res.scores[s.name]) for s in skills}

        return score

    def _aggregate(self) -> dict[str, float] | None:
        """The final model (paper §3.4 model aggregation; :mod:`cycleqd.engine.final`): the
        configured strategy (``final``, else ``operators.aggregation``) or, for ``auto``, the
        best of all of them on the validation split; stored as ``aggregate``, recorded in
        ``final.json`` and scored on every (search-split) skill."""
        score = self._validation_score()
        if score is None and needs_validation(self.cfg):
            raise ValueError("final: the strategy chooses on the validation split, but the skills "
                             "provide none (Components.validation)")
        t = time.perf_counter()
        genome, record = select_final(self.c.space, self.archives, self.store.get, final_plan(self.cfg), score)
        merge_s = time.perf_counter() - t
        bests = [a.best() for a in self.archives]
        atomic_write_json(self.rd.root / "final.json", record)
        self.store.put("aggregate", genome)
        self.digests["aggregate"] = self.store.seal("aggregate")
        self.executor.submit(Job(self.cfg.qd.generations + 1, 0, (), "aggregate", self.cfg.seed))
        res = self.executor.next_result()
        rec = _record(res, [], self.archives, self._started)
        rec.update(kind="aggregate", sources=[e.id for e in bests],
                   final={k: record[k] for k in ("strategy", "chosen", "validation_mean")})
        rec["timings"]["merge_s"] = round(merge_s, 6)
        self.rd.append_metrics(self._track(rec))
        return res.scores


def run_cycleqd(components: Components, cfg: RunConfig, run_dir: str | Path, *, resume: bool = False,
                executor: Executor | None = None, progress: bool = True,
                stop_after: int | None = None) -> RunResult:
    """Run CycleQD with ready-made components (see :class:`Components`)."""
    run = CycleQDRun(cfg, components, run_dir, resume=resume, executor=executor, progress=progress)
    try:
        return run.run(stop_after=stop_after)
    finally:
        run.executor.close()

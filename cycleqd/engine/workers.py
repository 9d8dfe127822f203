"""The engine's step on remote workers: what a Ray actor builds once and runs per job.

:class:`~cycleqd.executors.ray_executor.RayExecutor` runs any picklable factory's callable;
this module supplies CycleQD's: :class:`StepWorkerFactory` sets up a worker context (the
weight space, the run's model store, the adapter, the skills) once per actor and returns a
:class:`StepWorker`, which runs :func:`~cycleqd.engine.step.run_step` on each job.
:func:`ray_step_executor` is the Ray executor of a run (``cycleqd run/resume --executor ray``).

Where workers get their models (once per worker, never per job)
    * ``setup="config"`` (``"auto"``, what the CLI uses, tries it first): each actor builds
      its components from the run's own ``config.yaml`` (:func:`build_from_config`), so every
      worker loads base, experts and its inference engine itself (on its own GPU) and reads
      the SVD cache from the shared cache directory the driver already filled.
    * ``setup="ship"``: the driver's space, seed genomes, adapter and skills are put into the
      Ray object store once and each actor deserialises them once when it starts. Works for
      any picklable components (custom skills, the vision setting).

Child genomes travel through the model store (``RUN_DIR/genomes``), which must be on a
filesystem every node sees (local disk on one machine; NFS/Lustre/... on a cluster).
"""

from __future__ import annotations

import functools
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from cycleqd import paths
from cycleqd.config import ConfigError, load_config, parse_config
from cycleqd.engine.build import build_components
from cycleqd.engine.step import Job, JobResult, WorkerContext, describe_job, run_step
from cycleqd.executors.ray_executor import RayExecutor
from cycleqd.executors.store import IncomingGenomeStore, clear_incoming

SETUPS = ("auto", "config", "ship")


class StepWorker:
    """A worker's generation step: ``run_step(job, ctx)``, with the whole call's seconds
    recorded as ``timings["worker_s"]``; :meth:`close` closes the components it built."""

    def __init__(self, ctx: WorkerContext, close: Callable[[], None] | None = None):
        self.ctx, self._close = ctx, close

    def __call__(self, job: Job) -> JobResult:
        t = time.perf_counter()
        res = run_step(job, self.ctx)
        res.timings["worker_s"] = time.perf_counter() - t
        return res

    def close(self) -> None:
        close, self._close = self._close, None
        if close is not None:
            close()


def _seed_genomes(space: Any, seed_ids: list[str]) -> dict[str, Any]:
    """Seed model id -> genome, in the engine's order: one per expert, then the base."""
    experts = list(space.expert_genomes())
    if len(seed_ids) not in (len(experts), len(experts) + 1):
        raise ValueError(f"the run has {len(seed_ids)} seed models ({seed_ids}) but the worker's weight "
                         f"space has {len(experts)} experts")
    genomes = experts + ([space.base_genome()] if len(seed_ids) > len(experts) else [])
    return dict(zip(seed_ids, genomes))


@dataclass(frozen=True)
class StepWorkerFactory:
    """Picklable ``factory(name, shipped) -> StepWorker`` for
    :class:`~cycleqd.executors.ray_executor.RayExecutor` (run once in each actor).

    Attributes:
        store_root: the run's ``genomes/`` folder (a path every node sees).
        seed_ids: ids of the seed models, experts first (``store.seeds`` order).
        run_fingerprint: config fingerprint (checked against the worker's config).
        build: zero-argument picklable callable returning
            :class:`~cycleqd.engine.loop.Components` (e.g. :func:`build_from_config`), or
            None to use ``shipped = (space, seed genomes, adapter, skills)``.

    Raises (in the actor):
        FileNotFoundError: ``store_root`` does not exist on the worker's node.
        ValueError: neither ``build`` nor ``shipped``.
    """

    store_root: str
    seed_ids: tuple[str, ...]
    run_fingerprint: str
    build: Callable[[], Any] | None = None

    def __call__(self, name: str, shipped: Any = None) -> StepWorker:
        root = Path(self.store_root)
        if not root.is_dir():
            raise FileNotFoundError(
                f"worker {name} on {socket.gethostname()}: the run's model store {root} does not exist here; "
                f"the run directory must be on a filesystem shared by all Ray nodes")
        close = None
        if self.build is not None:
            comps = self.build()
            space, adapter, skills, close = comps.space, comps.adapter, list(comps.skills), comps.close
            seeds = _seed_genomes(space, list(self.seed_ids))
        else:
            if shipped is None:
                raise ValueError("worker started with neither a builder nor shipped components")
            space, seeds, adapter, skills = shipped
        store = IncomingGenomeStore(root, space, seeds, root.parent / ".incoming")
        return StepWorker(WorkerContext(space, store, adapter, skills, self.run_fingerprint, name=name), close)


def build_from_config(config_yaml: str, cache_dir: str, run_fingerprint: str) -> Any:
    """Worker-side builder for config-based runs: ``build_components`` of the run's config.

    Args:
        config_yaml: the run's ``config.yaml`` text.
        cache_dir: the driver's resolved cache directory (GGUF conversions, expert SVDs,
            synthetic models, per-sample caches); shared with the driver on one machine.
        run_fingerprint: the driver's config fingerprint; a mismatch raises ValueError.

    Returns:
        :class:`~cycleqd.engine.loop.Components`.
    """
    cfg = parse_config(yaml.safe_load(config_yaml), source="run config.yaml")
    if cfg.fingerprint() != run_fingerprint:
        raise ValueError(f"worker config fingerprint {cfg.fingerprint()} != run fingerprint {run_fingerprint}")
    return build_components(cfg, cache_dir=Path(cache_dir))


def config_builder(ctx: WorkerContext) -> Callable[[], Any] | None:
    """A worker-side builder from ``RUN_DIR/config.yaml`` if that config is the run's and can
    be built by :func:`cycleqd.engine.build.build_components`; else None."""
    path = Path(ctx.store.root).parent / "config.yaml"
    if not path.is_file():
        return None
    try:
        cfg = load_config(path)
    except ConfigError:
        return None
    if cfg.fingerprint() != ctx.run_fingerprint or any(s.type == "external" for s in cfg.skills):
        return None
    cache = paths.cache_dir(cfg).resolve()
    return functools.partial(build_from_config, path.read_text(), str(cache), ctx.run_fingerprint)


def ray_step_executor(ctx: WorkerContext, *, setup: str = "auto", **kwargs: Any) -> RayExecutor:
    """The Ray executor of a run: its actors run the generation step on ``ctx``'s model store.

    Args:
        ctx: the run's WorkerContext (``CycleQDRun.ctx``).
        setup: ``auto``/``config``: each worker builds its components from the run's
            ``config.yaml`` (``RUN_DIR/config.yaml``, fingerprint-checked against the run)
            with the driver's cache directory; ``auto`` falls back to shipping the driver's
            components when the config cannot be built (e.g. ``external`` skills). ``ship``:
            always ship them through the object store.
        **kwargs: :class:`~cycleqd.executors.ray_executor.RayExecutor` arguments (``workers``,
            ``address``, ``synchronous``, ``progress``, ...).

    Raises:
        ValueError: unknown ``setup``, or ``setup="config"`` without a buildable config;
            and whatever :class:`RayExecutor` raises.
    """
    if setup not in SETUPS:
        raise ValueError(f"setup must be 'auto', 'config' or 'ship', got {setup!r}")
    build = None if setup == "ship" else config_builder(ctx)
    if build is None and setup == "config":
        raise ValueError(f"setup='config': no buildable run config at "
                         f"{Path(ctx.store.root).parent / 'config.yaml'} matching this run")
    root = Path(ctx.store.root).resolve()
    factory = StepWorkerFactory(str(root), tuple(ctx.store.seeds), ctx.run_fingerprint, build)
    shared = None if build is not None else (ctx.space, dict(ctx.store.seeds), ctx.adapter, list(ctx.skills))
    return RayExecutor(factory, shared=shared, describe=describe_job,
                       on_close=functools.partial(clear_incoming, root.parent / ".incoming"), **kwargs)

"""Ray executor: ``fn(payload)`` calls on N Ray actors, asynchronous and fault tolerant.

The official CycleQD code scales out with Celery workers; mergekit-evolve uses Ray. The
executor knows nothing of CycleQD: each actor calls the caller's picklable
``factory(name, shared)`` once when it starts and keeps the callable it returns; every
payload submitted is run through that callable on some actor. The engine passes a factory
that loads a worker context (weight space with base + expert task vectors and the SVD
cache, model adapter / inference engine, skills) and returns its generation step
(:mod:`cycleqd.engine.workers`); the driver keeps the archives and the scheduler.

Scheduling (the official steady-state scheme)
    ``capacity = workers`` jobs are in flight; a job goes to a worker the moment one is
    free, so every worker is busy while the driver folds finished generations into the
    archives. Results are handed back in submission (generation) order, as the engine
    requires; a job that finishes early waits in the driver until the ones before it are in.

Where workers get their state (once per worker, never per payload)
    The factory builds it (for the engine: ``build_components`` from the run's own
    ``config.yaml``, so every worker loads base, experts and its inference engine itself on
    its own GPU), or unpacks ``shared``: an object the driver puts into the Ray object store
    once (``ray.put``) and each actor deserialises once when it starts (for the engine: the
    driver's picklable components).

Fault tolerance
    A worker that dies mid-job (SIGKILL, the OOM killer, Ray's memory monitor, a lost node,
    a CUDA out-of-memory error) costs no generation: its job goes back to the front of the
    queue and runs on the next free worker, and the dead actor is replaced by a fresh one.
    The callable must be deterministic in its payload for a retry to give the same result
    (the engine's step derives every random draw from ``(run seed, generation, purpose)``).
    A job that kills ``max_attempts`` workers in a row stops
    the run with an error (finished generations are checkpointed; ``cycleqd resume``).
    Exceptions raised by the job's own code (a bug, bad data) are not retried: they reach
    the driver unchanged. The driver dying is covered by the engine's resume.

The one way results can differ from the in-process executor
    In asynchronous mode up to ``capacity`` payloads are in flight, so the caller makes a
    payload before the results of the ones ahead of it are in (for CycleQD: generation g's
    parents are sampled from archives without the children of the generations still
    running). With ``synchronous=True`` (capacity 1, ``--synchronous``) every payload is made
    after all earlier results are in, and a CycleQD run reproduces the in-process run exactly.

Network: a local cluster stays on loopback
    Without ``address`` the executor starts a single-node Ray cluster (:func:`init_local_ray`)
    whose every socket -- GCS, raylet, object manager, workers, dashboard -- is bound to and
    connects through 127.0.0.1. (Ray on Linux rewrites a ``_node_ip_address`` of 127.0.0.1
    to the machine's outward address, see ``ray._private.services.resolve_ip_for_localhost``;
    the node would then listen on all interfaces and the driver connect via that address.)
    Joining a real multi-node cluster needs ``address`` (``--address HOST:PORT``).

Progress
    With ``progress=True`` a status line under the engine's progress bar shows jobs running
    and queued, workers up, per-worker throughput (jobs/min) and workers lost;
    :meth:`RayExecutor.stats` returns the same as a dict. The Ray dashboard is started with
    a local cluster when ``ray[default]`` is installed, and its address is printed.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from itertools import count
from typing import Any, Callable

from cycleqd.errors import require

log = logging.getLogger("cycleqd.executors.ray")

#: Environment variables forwarded from the driver to every worker (data/cache locations).
FORWARDED_ENV_PREFIXES = ("CYCLEQD_",)


#: The only address a local cluster uses.
LOOPBACK = "127.0.0.1"


def init_local_ray(ray: Any = None, **kwargs: Any) -> Any:
    """Start a local single-node Ray cluster that listens and connects on 127.0.0.1 only.

    ``ray.init(address="local", _node_ip_address="127.0.0.1", dashboard_host="127.0.0.1",
    **kwargs)`` while Ray's cluster-mode address lookup is switched off
    (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` in the environment the Ray processes inherit, and
    ``ray._private.ray_constants.ENABLE_RAY_CLUSTER`` in this process): with cluster mode on
    (the Linux default, Ray 2.x) Ray resolves 127.0.0.1 to the machine's own network address,
    binds its servers to all interfaces and connects there. The driver's environment and
    the constant are restored after start-up; the Ray processes keep the setting.

    Args:
        ray: the ``ray`` module (imported if None).
        **kwargs: further ``ray.init`` arguments (``num_cpus``, ``include_dashboard``, ...);
            ``address``, ``_node_ip_address`` and ``dashboard_host`` are fixed.
    Returns:
        What ``ray.init`` returns.
    Raises:
        ValueError: ``address`` or a non-loopback ``_node_ip_address``/``dashboard_host`` given.
    """
    ray = ray or _require_ray()
    for key in ("_node_ip_address", "dashboard_host"):
        if kwargs.get(key, LOOPBACK) != LOOPBACK:
            raise ValueError(f"init_local_ray: {key}={kwargs[key]!r}; a local cluster stays on {LOOPBACK}")
    if kwargs.get("address") not in (None, "local"):
        raise ValueError("init_local_ray starts a local cluster; join an existing one with ray.init(address=...)")
    kwargs.update(address="local", _node_ip_address=LOOPBACK, dashboard_host=LOOPBACK)
    import ray._private.ray_constants as rc

    env_key = getattr(rc, "ENABLE_RAY_CLUSTERS_ENV_VAR", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    old_env, old_const = os.environ.get(env_key), getattr(rc, "ENABLE_RAY_CLUSTER", None)
    os.environ[env_key] = "0"
    rc.ENABLE_RAY_CLUSTER = False
    try:
        return ray.init(**kwargs)
    finally:
        if old_env is None:
            os.environ.pop(env_key, None)
        else:
            os.environ[env_key] = old_env
        if old_const is not None:
            rc.ENABLE_RAY_CLUSTER = old_const


def _require_ray():
    return require("ray", "the Ray executor")


# ----------------------------------------------------------------------------------------
# worker side
# ----------------------------------------------------------------------------------------
class _Worker:
    """A Ray actor holding the callable its factory built (wrapped with ``ray.remote`` at run time)."""

    def __init__(self, name: str, factory: Callable[[str, Any], Callable[[Any], Any]], shared: Any = None):
        t0 = time.perf_counter()
        self.name = name
        self.fn = factory(name, shared)
        self.setup_s = time.perf_counter() - t0

    def info(self) -> dict[str, Any]:
        import ray

        rc = ray.get_runtime_context()
        try:
            gpus = [str(g) for g in rc.get_accelerator_ids().get("GPU", [])]
        except Exception:  # pragma: no cover - older Ray
            gpus = [str(g) for g in ray.get_gpu_ids()]
        return {"name": self.name, "pid": os.getpid(), "host": socket.gethostname(),
                "node_id": rc.get_node_id(), "gpus": gpus, "setup_s": round(self.setup_s, 3)}

    def run(self, payload: Any) -> Any:
        return self.fn(payload)

    def shutdown(self) -> None:
        close, self.fn = getattr(self.fn, "close", None), None
        if callable(close):
            close()


# ----------------------------------------------------------------------------------------
# driver side
# ----------------------------------------------------------------------------------------
def _is_worker_loss(err: BaseException) -> bool:
    """Did the job fail because its worker died (retry elsewhere) rather than by its own code?"""
    import ray.exceptions as rex

    lost = (rex.RayActorError, rex.WorkerCrashedError, rex.NodeDiedError, rex.OutOfMemoryError,
            rex.ObjectLostError, rex.OwnerDiedError, rex.LocalRayletDiedError)
    if isinstance(err, lost):
        return True
    cause = getattr(err, "cause", None)
    if cause is not None and type(cause).__name__ == "OutOfMemoryError" and "torch" in type(cause).__module__:
        return True  # CUDA OOM inside the job: the worker's allocator is suspect, restart it
    return False


@dataclass
class _Slot:
    """One worker position: the current actor and its statistics over all its incarnations."""

    index: int
    actor: Any = None
    name: str = ""
    info: dict[str, Any] = field(default_factory=dict)
    up_since: float | None = None      # None while (re)starting
    jobs: int = 0
    busy_s: float = 0.0
    recent: deque = field(default_factory=deque)   # completion times within the rate window
    first_job: float | None = None
    restarts: int = 0
    failed_starts: int = 0             # consecutive restarts that died before coming up
    up_s: float = 0.0                  # accumulated uptime of earlier incarnations


class RayExecutor:
    """Run payloads through ``workers`` Ray actors (see the module docstring).

    Args:
        factory: picklable ``factory(name, shared) -> fn``, called once in each actor when it
            starts (``name``: ``ray-w<i>``, ``.<restart>`` appended for replacements); every
            payload then runs as ``fn(payload)``; ``fn.close()``, if it exists, is called when
            the executor closes (stop servers/engines). The engine's is
            :class:`cycleqd.engine.workers.StepWorkerFactory`.
        shared: picklable object put into the Ray object store once and handed to every
            ``factory`` call (None: nothing shipped).
        describe: ``describe(payload) -> str`` names a payload in errors and warnings
            (default ``"job <n>"``, n counting submissions from 0).
        on_close: called once in the driver by :meth:`close`, after the workers are stopped
            (e.g. to delete files killed workers left half-written).
        workers: number of actors (>= 1).
        address: Ray cluster to join (``HOST:PORT`` or ``auto``); None starts a local Ray
            bound to 127.0.0.1 only (:func:`init_local_ray`), or uses the one already
            initialised in this process.
        synchronous: capacity 1: one job at a time, reproducing the in-process run exactly.
        gpus_per_worker: GPUs per actor; None = 1 when the cluster has GPUs, else 0.
        cpus_per_worker: CPUs reserved per actor (Ray also sets OMP_NUM_THREADS from it).
        max_attempts: workers a job may kill before the run stops with an error.
        max_in_flight: capacity in asynchronous mode (default ``workers``); more keeps
            workers busy when job times vary a lot, at the price of staler archive snapshots.
        progress: show a live status line (stderr) and print the dashboard address.
        start_timeout_s: how long to wait for all workers to be up before raising TimeoutError.
        ray_init_kwargs: extra arguments of ``ray.init`` (e.g. ``runtime_env``,
            ``include_dashboard``) when this executor initialises Ray.

    Raises:
        ValueError: bad ``workers``/``max_attempts``/``cpus_per_worker``, or more workers than
            GPUs when each worker takes one.
        ImportError: Ray is not installed.
        ConnectionError: ``address`` given and no cluster answers there.
        TypeError: ``shared`` cannot be pickled (e.g. a vLLM engine).
        RuntimeError / TimeoutError: a worker fails to start (its error is included).
    """

    def __init__(self, factory: Callable[[str, Any], Callable[[Any], Any]], *, shared: Any = None,
                 describe: Callable[[Any], str] | None = None, on_close: Callable[[], None] | None = None,
                 workers: int = 2, address: str | None = None, synchronous: bool = False,
                 gpus_per_worker: float | None = None, cpus_per_worker: float = 1.0,
                 max_attempts: int = 3, max_in_flight: int | None = None, progress: bool = True,
                 start_timeout_s: float = 1800.0, ray_init_kwargs: dict[str, Any] | None = None):
        if not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
        if not isinstance(max_attempts, int) or max_attempts < 1:
            raise ValueError(f"max_attempts must be an integer >= 1, got {max_attempts!r}")
        if cpus_per_worker < 0:
            raise ValueError(f"cpus_per_worker must be >= 0, got {cpus_per_worker!r}")
        if max_in_flight is not None and (not isinstance(max_in_flight, int) or max_in_flight < 1):
            raise ValueError(f"max_in_flight must be an integer >= 1, got {max_in_flight!r}")
        ray = _require_ray()
        self._ray = ray
        self.workers, self.synchronous, self.max_attempts = workers, bool(synchronous), max_attempts
        self.capacity = 1 if synchronous else (max_in_flight or workers)
        self.progress = progress
        self._closed = False
        self._owns_ray = False
        self._slots: list[_Slot] = []
        self._bar = None

        if not ray.is_initialized():
            kw = dict(ray_init_kwargs or {})
            kw.setdefault("log_to_driver", True)
            try:
                if address:
                    info = ray.init(address=address, **kw)
                else:  # a local cluster: loopback only (see the module docstring)
                    kw.setdefault("num_cpus", max(os.cpu_count() or 1, math.ceil(workers * cpus_per_worker)))
                    info = init_local_ray(ray, **kw)
            except ConnectionError as e:
                raise ConnectionError(f"cannot join the Ray cluster at address={address!r}: {e}") from e
            self._owns_ray = True
            self.dashboard_url = getattr(info, "dashboard_url", None) or None
        else:
            if address:
                log.warning("Ray is already initialised in this process: ignoring address=%r", address)
            self.dashboard_url = None
            try:
                self.dashboard_url = ray.get_runtime_context().worker.node.address_info.get("webui_url") or None
            except Exception:
                pass

        cluster_gpus = float(ray.cluster_resources().get("GPU", 0))
        if gpus_per_worker is None:
            gpus_per_worker = 1.0 if cluster_gpus >= 1 else 0.0
            if gpus_per_worker and workers > cluster_gpus:
                self._shutdown_ray()
                raise ValueError(f"workers={workers}: each worker takes one GPU and the Ray cluster has "
                                 f"{int(cluster_gpus)}; use at most {int(cluster_gpus)} workers, or set "
                                 f"gpus_per_worker (e.g. 0.5 to share GPUs)")
        self.gpus_per_worker, self.cpus_per_worker = float(gpus_per_worker), float(cpus_per_worker)

        self.factory, self._describe, self._on_close = factory, describe, on_close
        # shipped once into the object store; each actor deserialises it once when it starts
        self._shipped = None
        if shared is not None:
            try:
                self._shipped = ray.put(shared)
            except Exception as e:
                self._shutdown_ray()
                raise TypeError(f"cannot ship {type(shared).__name__} to Ray workers ({type(e).__name__}: {e}); "
                                f"let the workers build their own state in the factory") from e
        env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES)}
        opts: dict[str, Any] = {"num_cpus": self.cpus_per_worker, "num_gpus": self.gpus_per_worker,
                                "max_restarts": 0, "max_concurrency": 1}
        if env:
            opts["runtime_env"] = {"env_vars": env}
        self._actor_cls = ray.remote(_Worker).options(**opts)

        # job bookkeeping: submission sequence numbers key everything
        self._seq = count()
        self._order: deque[int] = deque()           # submitted, result not yet handed back
        self._jobs: dict[int, Any] = {}
        self._attempts: dict[int, int] = {}
        self._queue: list[int] = []                  # waiting for a worker, lowest seq first
        self._running: dict[Any, tuple[int, int, float]] = {}   # ref -> (slot, seq, t0)
        self._starting: dict[Any, int] = {}          # ready ref -> slot
        self._idle: deque[int] = deque()
        self._done: dict[int, Any] = {}
        self.lost = 0
        self._t0 = time.time()
        self._last_show = 0.0
        self._tty = bool(getattr(sys.stderr, "isatty", lambda: False)())

        self._slots = [_Slot(i) for i in range(workers)]
        try:
            for s in self._slots:
                self._start(s)
            self._wait_started(start_timeout_s)
        except BaseException:
            self.close()
            raise
        if progress:
            hosts = sorted({s.info.get("host", "?") for s in self._slots})
            msg = (f"Ray executor: {workers} worker(s) on {', '.join(hosts)}"
                   f"{f', {self.gpus_per_worker:g} GPU each' if self.gpus_per_worker else ''}; "
                   f"{'synchronous' if self.synchronous else f'{self.capacity} jobs in flight'}")
            if self.dashboard_url:
                url = self.dashboard_url
                msg += f"; dashboard {url if url.startswith('http') else 'http://' + url}"
            print(msg, file=sys.stderr, flush=True)

    # -- actors ---------------------------------------------------------------------------
    def _start(self, slot: _Slot) -> None:
        slot.name = f"ray-w{slot.index}" + (f".{slot.restarts}" if slot.restarts else "")
        slot.actor = self._actor_cls.remote(slot.name, self.factory, self._shipped)
        slot.up_since = None
        self._starting[slot.actor.info.remote()] = slot.index

    def _slot_up(self, ref: Any) -> None:
        slot = self._slots[self._starting.pop(ref)]
        try:
            slot.info = self._ray.get(ref)
        except Exception as e:
            # a replacement that died while starting (e.g. killed again) gets more tries;
            # a worker that cannot build its components at all stops the run
            if slot.restarts and _is_worker_loss(e) and slot.failed_starts + 1 < self.max_attempts:
                slot.failed_starts += 1
                log.warning("Ray worker %s died while starting (%s); starting it again", slot.name,
                            type(e).__name__)
                self._replace(slot, e)
                return
            raise RuntimeError(f"Ray worker {slot.name} failed to start: {e}") from e
        slot.failed_starts = 0
        slot.up_since = time.time()
        self._idle.append(slot.index)

    def _wait_started(self, timeout_s: float) -> None:
        deadline = time.time() + timeout_s
        while self._starting:
            left = deadline - time.time()
            if left <= 0:
                raise TimeoutError(
                    f"only {self.workers - len(self._starting)}/{self.workers} Ray workers started within "
                    f"{timeout_s:.0f} s; cluster resources: {self._ray.cluster_resources()}, each worker "
                    f"needs {self.cpus_per_worker:g} CPU and {self.gpus_per_worker:g} GPU")
            ready, _ = self._ray.wait(list(self._starting), num_returns=1, timeout=min(left, 1.0))
            for ref in ready:
                self._slot_up(ref)

    def _replace(self, slot: _Slot, err: BaseException) -> None:
        """The worker in ``slot`` is gone (or unusable): kill what is left, start a new one."""
        if slot.up_since is not None:
            slot.up_s += time.time() - slot.up_since
        try:
            self._ray.kill(slot.actor, no_restart=True)
        except Exception:
            pass
        slot.restarts += 1
        self._start(slot)

    # -- the Executor protocol ------------------------------------------------------------
    def submit(self, job: Any) -> None:
        """Queue ``job`` (a payload); it starts at once if a worker is free."""
        if self._closed:
            raise RuntimeError("RayExecutor is closed")
        seq = next(self._seq)
        self._order.append(seq)
        self._jobs[seq], self._attempts[seq] = job, 0
        self._queue.append(seq)
        self._dispatch()

    def next_result(self) -> Any:
        """The result of the oldest submitted payload (blocks; handles worker losses meanwhile)."""
        if self._closed:
            raise RuntimeError("RayExecutor is closed")
        if not self._order:
            raise RuntimeError("next_result() with no job submitted")
        head = self._order[0]
        while head not in self._done:
            self._dispatch()
            waiting = list(self._running) + list(self._starting)
            if not waiting:  # pragma: no cover - every lost worker is replaced at once
                raise RuntimeError("no Ray worker is running or starting")
            ready, _ = self._ray.wait(waiting, num_returns=1, timeout=0.5)
            if ready:  # collect everything that is done, not just the first
                ready, _ = self._ray.wait(waiting, num_returns=len(waiting), timeout=0)
            for ref in ready:
                if ref in self._starting:
                    self._slot_up(ref)
                else:
                    self._collect(ref)
            self._show()
        self._order.popleft()
        self._jobs.pop(head)
        self._attempts.pop(head)
        self._dispatch()
        self._show(force=True)
        return self._done.pop(head)

    def _dispatch(self) -> None:
        while self._queue and self._idle:
            seq, slot = self._queue.pop(0), self._slots[self._idle.popleft()]
            ref = slot.actor.run.remote(self._jobs[seq])
            now = time.time()
            self._running[ref] = (slot.index, seq, now)
            if slot.first_job is None:
                slot.first_job = now

    def _name(self, seq: int) -> str:
        return self._describe(self._jobs[seq]) if self._describe is not None else f"job {seq}"

    def _collect(self, ref: Any) -> None:
        si, seq, t0 = self._running.pop(ref)
        slot = self._slots[si]
        try:
            res = self._ray.get(ref)
        except Exception as e:
            if not _is_worker_loss(e):
                e.add_note(f"({self._name(seq)}, Ray worker {slot.name})")
                raise
            self.lost += 1
            self._attempts[seq] += 1
            what = self._name(seq)
            first, dead = (str(e).splitlines() or [""])[0][:200], slot.name
            self._replace(slot, e)
            if self._attempts[seq] < self.max_attempts:
                log.warning("Ray worker %s died running %s (%s: %s); started %s, retrying the job on the next "
                            "free worker (attempt %d/%d)", dead, what, type(e).__name__, first, slot.name,
                            self._attempts[seq] + 1, self.max_attempts)
            else:
                raise RuntimeError(
                    f"{what} killed {self._attempts[seq]} Ray workers (last: {type(e).__name__}: "
                    f"{e}); it probably exhausts a worker's memory. Finished generations are saved: "
                    f"fix the cause and `cycleqd resume` the run") from e
            self._queue.append(seq)
            self._queue.sort()  # retried jobs are the oldest: they go first
            return
        now = time.time()
        slot.jobs += 1
        slot.busy_s += now - t0
        slot.recent.append(now)
        self._done[seq] = res
        self._idle.append(si)

    # -- progress ---------------------------------------------------------------------------
    #: seconds over which the per-worker throughput is measured
    RATE_WINDOW_S = 60.0

    def stats(self) -> dict[str, Any]:
        """Live figures: jobs running/queued/finished-but-waiting, workers lost, and per
        worker: jobs done, busy seconds, utilisation (busy / up time), throughput (jobs per
        minute over the last ``RATE_WINDOW_S`` seconds), restarts."""
        now = time.time()
        per = []
        for s in self._slots:
            up = s.up_s + ((now - s.up_since) if s.up_since is not None else 0.0)
            while s.recent and now - s.recent[0] > self.RATE_WINDOW_S:
                s.recent.popleft()
            span = min(self.RATE_WINDOW_S, now - s.first_job) if s.first_job is not None else 0.0
            rate = 60.0 * len(s.recent) / max(span, 1.0) if s.first_job is not None else 0.0
            per.append({"slot": s.index, "name": s.name, "pid": s.info.get("pid"), "host": s.info.get("host"),
                        "gpus": s.info.get("gpus", []), "up": s.up_since is not None, "jobs": s.jobs,
                        "busy_s": round(s.busy_s, 3), "jobs_per_min": round(rate, 2),
                        "utilisation": round(min(1.0, s.busy_s / up), 3) if up > 0 else 0.0,
                        "restarts": s.restarts})
        return {"running": len(self._running), "queued": len(self._queue), "waiting_for_order": len(self._done),
                "in_flight": len(self._order), "capacity": self.capacity, "workers_up": sum(p["up"] for p in per),
                "workers_lost": self.lost, "workers": per}

    #: seconds between status lines when stderr is not a terminal (logs of cluster jobs)
    LOG_EVERY_S = 30.0

    def status_line(self) -> str:
        """One line: jobs running / queued / finished out of order, workers up, per-worker
        throughput (jobs per minute) and workers lost."""
        st = self.stats()
        rates = " ".join(f"{w['name']} {w['jobs_per_min']:.1f}" for w in st["workers"])
        line = (f"ray: {st['running']} running, {st['queued']} queued, {st['waiting_for_order']} done out of "
                f"order | {st['workers_up']}/{self.workers} workers up | jobs/min {rates}")
        return line + (f" | workers lost {self.lost}" if self.lost else "")

    def _show(self, force: bool = False) -> None:
        if not self.progress or self._closed:
            return
        now = time.time()
        if self._tty:  # a live line under the engine's progress bar
            if not force and now - self._last_show < 0.5:
                return
            self._last_show = now
            if self._bar is None:
                from tqdm.auto import tqdm

                self._bar = tqdm(total=0, position=1, bar_format="{desc}", dynamic_ncols=True, leave=False)
            self._bar.set_description_str(self.status_line(), refresh=True)
        elif now - self._last_show >= self.LOG_EVERY_S:
            self._last_show = now
            print(self.status_line(), file=sys.stderr, flush=True)

    # -- shutdown ---------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the workers (letting their callables close), run ``on_close``, and shut Ray
        down if this executor started it. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        ray = self._ray
        actors = [s.actor for s in self._slots if s.actor is not None]
        if actors and not self._running:
            try:  # graceful: stop servers/engines the components started
                ray.get([a.shutdown.remote() for a in actors], timeout=30)
            except Exception:
                pass
        for a in actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:
                pass
        for s in self._slots:
            s.actor = None
        self._running.clear()
        self._starting.clear()
        try:
            if self._on_close is not None:
                self._on_close()
        finally:
            self._shutdown_ray()

    def _shutdown_ray(self) -> None:
        if self._owns_ray and self._ray.is_initialized():
            self._ray.shutdown()
        self._owns_ray = False

"""The Ray executor on a local Ray cluster with 2 worker processes and the tiny synthetic model.

One ``ray.init`` is shared by every test of this module (Ray start-up is slow on 2 cores).
Worker deaths are made deterministic by an adapter that SIGKILLs its own worker process the
first time it binds a chosen child (mid-job: after crossover and mutation, before scoring).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import yaml

ray = pytest.importorskip("ray")

from cycleqd.engine.build import build_components  # noqa: E402
from cycleqd.engine.loop import Components, CycleQDRun, run_cycleqd  # noqa: E402
from cycleqd.engine.rundir import RunDir  # noqa: E402
from cycleqd.engine.workers import ray_step_executor  # noqa: E402
from cycleqd.executors.ray_executor import RayExecutor, init_local_ray  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray cluster for the module: 4 logical CPUs (2 workers + room for a
    replacement while a dead worker is being cleaned up), no dashboard."""
    started = not ray.is_initialized()
    if started:
        init_local_ray(ray, num_cpus=4, include_dashboard=False, log_to_driver=False)
    # the helper classes below live in this test module, which workers cannot import
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield ray
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    if started:
        ray.shutdown()


class KillOnceAdapter:
    """Wraps an adapter; SIGKILLs the worker process that makes the N-th bind of the run
    (N = the generation number of ``child_id``, counted over all workers in a file next to
    ``marker``), once per ``marker`` file, never the test process itself. Models are bound
    under the fingerprint of their weights, which names no child, so the count stands in for
    "the worker that evaluates ``child_id``"."""

    def __init__(self, inner, child_id: str, marker: Path):
        self.inner, self.marker = inner, str(marker)
        self.nth = int(child_id.lstrip("g"))
        self.driver_pid = os.getpid()

    def _count(self) -> int:
        import fcntl

        with open(self.marker + ".count", "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            f.seek(0)
            n = int(f.read() or 0) + 1
            f.seek(0)
            f.truncate()
            f.write(str(n))
            return n

    def bind(self, weights, fingerprint):
        if os.getpid() != self.driver_pid and self._count() == self.nth:
            try:
                fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pass
            else:
                os.write(fd, str(os.getpid()).encode())
                os.close(fd)
                os.kill(os.getpid(), signal.SIGKILL)
        return self.inner.bind(weights, fingerprint)


class SlowSkill:
    """A skill that waits ``delay`` seconds before scoring (so jobs overlap in time)."""

    def __init__(self, inner, delay: float):
        self.inner, self.name, self.delay = inner, inner.name, delay

    def evaluate(self, model):
        time.sleep(self.delay)
        return self.inner.evaluate(model)


class FailingSkill:
    """A skill whose code raises (a bug, not a worker death): must not be retried."""

    name = "a"

    def evaluate(self, model):
        raise ZeroDivisionError("skill bug")


def _archives(run_dir: Path):
    return json.loads((run_dir / "state.json").read_text())["archives"]


def _generations(run_dir: Path) -> list[int]:
    return [m["generation"] for m in RunDir(run_dir).read_metrics()
            if m["generation"] >= 1 and m.get("kind") != "aggregate"]


def _assert_store_matches_archives(run_dir: Path) -> None:
    ids = {e["id"] for a in _archives(run_dir) for e in a["elites"]}
    stored = {p.name.split(".")[0] for p in (run_dir / "genomes").iterdir()}
    assert stored - {"aggregate"} == {i for i in ids if not i.startswith("expert:")}
    assert not (run_dir / ".incoming").exists() or not any((run_dir / ".incoming").iterdir())


def test_async_run_completes_on_two_workers(local_ray, tiny_cfg, tmp_path):
    cfg = tiny_cfg(generations=10)
    run = CycleQDRun(cfg, build_components(cfg), tmp_path / "run", progress=False)
    run.executor = ex = ray_step_executor(run.ctx, workers=2, progress=False)
    try:
        assert ex.capacity == 2 and ex.factory.build is not None   # workers build from config.yaml
        res = run.run()
        st = ex.stats()
    finally:
        ex.close()
    assert res.generation == 10 and res.aggregate is not None
    assert _generations(tmp_path / "run") == list(range(1, 11))
    workers = {m["worker"] for m in RunDir(tmp_path / "run").read_metrics()}
    assert workers == {"ray-w0", "ray-w1"}
    assert st["workers_lost"] == 0 and sum(w["jobs"] for w in st["workers"]) == 3 + 10 + 1
    assert len({w["pid"] for w in st["workers"]}) == 2
    _assert_store_matches_archives(tmp_path / "run")


def test_sigkill_mid_job_loses_no_generation(local_ray, tiny_cfg, tmp_path):
    cfg = tiny_cfg(generations=10)
    base = build_components(cfg)
    marker = tmp_path / "killed"
    comps = Components(base.space, [SlowSkill(s, 0.05) for s in base.skills],
                       KillOnceAdapter(base.adapter, "g000004", marker))
    run = CycleQDRun(cfg, comps, tmp_path / "run", progress=False)
    run.executor = ex = ray_step_executor(run.ctx, setup="ship", workers=2, progress=False)   # components shipped
    pids = {w["pid"] for w in ex.stats()["workers"]}
    try:
        res = run.run()
        st = ex.stats()
    finally:
        ex.close()
    assert marker.exists() and int(marker.read_text()) in pids       # a worker really died mid-job
    assert st["workers_lost"] == 1 and sum(w["restarts"] for w in st["workers"]) == 1
    assert res.generation == 10
    assert _generations(tmp_path / "run") == list(range(1, 11))      # each generation exactly once
    g4 = [m for m in RunDir(tmp_path / "run").read_metrics() if m["generation"] == 4]
    assert len(g4) == 1 and set(g4[0]["scores"]) == {"a", "b", "c"}
    _assert_store_matches_archives(tmp_path / "run")


def test_cli_synchronous_reproduces_in_process_archives(local_ray, cache_dir, tmp_path):
    """`cycleqd run CONFIG --executor ray --workers 2 --synchronous` == the in-process run."""
    from cycleqd.cli import main
    from tests.conftest import tiny_config_dict

    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_config_dict(cache_dir, generations=12)))
    assert main(["run", str(cfg_path), "--out", str(tmp_path / "local"), "--no-progress"]) == 0
    assert main(["run", str(cfg_path), "--out", str(tmp_path / "ray"), "--no-progress",
                 "--executor", "ray", "--workers", "2", "--synchronous"]) == 0
    assert _archives(tmp_path / "ray") == _archives(tmp_path / "local")
    local, remote = RunDir(tmp_path / "local").read_metrics(), RunDir(tmp_path / "ray").read_metrics()
    assert [(m["generation"], m["parents"], m["scores"], m["entered"]) for m in remote] == \
        [(m["generation"], m["parents"], m["scores"], m["entered"]) for m in local]
    assert {m["worker"] for m in remote} <= {"ray-w0", "ray-w1"}


def test_synchronous_with_a_killed_worker_reproduces_in_process_archives(local_ray, tiny_cfg, tmp_path):
    cfg = tiny_cfg(generations=12)
    run_cycleqd(build_components(cfg), cfg, tmp_path / "local", progress=False)
    base = build_components(cfg)
    comps = Components(base.space, base.skills, KillOnceAdapter(base.adapter, "g000007", tmp_path / "killed"))
    run = CycleQDRun(cfg, comps, tmp_path / "ray", progress=False)
    run.executor = ex = ray_step_executor(run.ctx, setup="ship", workers=2, synchronous=True, progress=False)
    try:
        assert ex.capacity == 1
        run.run()
        lost = ex.stats()["workers_lost"]
    finally:
        ex.close()
    assert lost == 1
    assert _archives(tmp_path / "ray") == _archives(tmp_path / "local")
    assert _generations(tmp_path / "ray") == list(range(1, 13))


def test_job_errors_are_raised_not_retried(local_ray, tiny_cfg, tmp_path):
    cfg = tiny_cfg(generations=3)
    base = build_components(cfg)
    comps = Components(base.space, [FailingSkill()] + base.skills[1:], base.adapter)
    run = CycleQDRun(cfg, comps, tmp_path / "run", progress=False)
    run.executor = ex = ray_step_executor(run.ctx, setup="ship", workers=1, progress=False)
    try:
        with pytest.raises(ZeroDivisionError, match="skill bug"):
            run.run()
        assert ex.stats()["workers_lost"] == 0
    finally:
        ex.close()


def _sleepy_square_factory(name, shared):
    """A dummy task for the generic executor: x -> (x * x, worker), later payloads faster."""
    def fn(x):
        time.sleep(0.3 if x % 2 == 0 else 0.0)
        return x * x + shared, name
    return fn


def test_generic_executor_runs_a_dummy_callable_in_order(local_ray):
    ex = RayExecutor(_sleepy_square_factory, shared=100, workers=2, progress=False)
    try:
        assert ex.capacity == 2
        for x in range(6):
            ex.submit(x)
        out = [ex.next_result() for _ in range(6)]
    finally:
        ex.close()
    assert [r for r, _ in out] == [100 + x * x for x in range(6)]     # submission order
    assert {w for _, w in out} == {"ray-w0", "ray-w1"}


def test_bad_arguments_fail_before_starting_anything(tmp_path):
    with pytest.raises(ValueError, match="workers"):
        RayExecutor(None, workers=0)
    with pytest.raises(ValueError, match="max_attempts"):
        RayExecutor(None, workers=1, max_attempts=0)
    with pytest.raises(ValueError, match="setup"):
        ray_step_executor(None, setup="nfs")

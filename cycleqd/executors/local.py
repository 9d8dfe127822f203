"""In-process executor: runs each job when its result is asked for (capacity 1)."""

from __future__ import annotations

from collections import deque

from cycleqd.executors.base import Job, JobResult, WorkerContext, run_job


class LocalExecutor:
    """Synchronous, in-process execution; the reference behaviour other executors match."""

    capacity = 1

    def __init__(self, ctx: WorkerContext):
        self.ctx = ctx
        self._queue: deque[Job] = deque()

    def submit(self, job: Job) -> None:
        self._queue.append(job)

    def next_result(self) -> JobResult:
        if not self._queue:
            raise RuntimeError("next_result() with no job submitted")
        return run_job(self._queue.popleft(), self.ctx)

    def close(self) -> None:
        self._queue.clear()

"""Executors: where "make child + evaluate" jobs run (in-process or on Ray)."""

from cycleqd.executors.base import Executor, Job, JobResult, WorkerContext, run_job, would_enter
from cycleqd.executors.local import LocalExecutor

__all__ = ["Executor", "Job", "JobResult", "WorkerContext", "run_job", "would_enter", "LocalExecutor"]

"""Executors: where ``fn(payload)`` calls run (in-process or on Ray), results in order."""

from cycleqd.executors.base import Executor
from cycleqd.executors.local import LocalExecutor

__all__ = ["Executor", "LocalExecutor"]

"""The executor seam: run ``fn(payload) -> result`` calls somewhere and hand the results
back in submission order.

Executors know nothing of CycleQD: the engine gives them its generation step
(:func:`cycleqd.engine.step.run_step` bound to a worker context) and its jobs as payloads.
The dummy-task test (``tests/executors``) is the contract, as mergekit tests its executor.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Executor(Protocol):
    """Runs payloads through its callable; ``capacity`` payloads should be kept in flight
    (the caller's pacing; submitting more queues them); results come back in submission
    order."""

    capacity: int

    def submit(self, payload: Any) -> None: ...

    def next_result(self) -> Any: ...

    def close(self) -> None: ...

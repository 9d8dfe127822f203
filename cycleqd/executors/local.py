"""In-process executor: runs each payload when its result is asked for."""

from __future__ import annotations

from collections import deque
from typing import Any, Callable


class LocalExecutor:
    """Synchronous, in-process execution; the reference behaviour other executors match.

    Args:
        fn: called as ``fn(payload)`` for each submitted payload, in submission order, when
            its result is asked for.
        capacity: payloads the caller should keep in flight (default 1).

    Raises:
        ValueError: ``capacity`` < 1.
    """

    def __init__(self, fn: Callable[[Any], Any], capacity: int = 1):
        if not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be an integer >= 1, got {capacity!r}")
        self.fn, self.capacity = fn, capacity
        self._queue: deque[Any] = deque()

    def submit(self, payload: Any) -> None:
        self._queue.append(payload)

    def next_result(self) -> Any:
        """The result of the oldest submitted payload.

        Raises:
            RuntimeError: nothing submitted.
        """
        if not self._queue:
            raise RuntimeError("next_result() with no job submitted")
        return self.fn(self._queue.popleft())

    def close(self) -> None:
        self._queue.clear()

"""The executor contract with a dummy task (no CycleQD, no torch): results in submission
order, whatever the capacity; nothing runs before its result is asked for."""

from __future__ import annotations

import pytest

from cycleqd.executors import Executor, LocalExecutor


def test_runs_a_dummy_callable_in_submission_order_with_capacity_above_one():
    calls = []

    def square(x):
        calls.append(x)
        return x * x

    ex = LocalExecutor(square, capacity=3)
    assert isinstance(ex, Executor) and ex.capacity == 3
    out, in_flight, nxt = [], 0, 0
    while len(out) < 10:
        while in_flight < ex.capacity and nxt < 10:      # as the engine paces it
            ex.submit(nxt)
            nxt, in_flight = nxt + 1, in_flight + 1
        assert in_flight <= 3
        out.append(ex.next_result())
        in_flight -= 1
    assert out == [i * i for i in range(10)] and calls == list(range(10))
    with pytest.raises(RuntimeError, match="no job submitted"):
        ex.next_result()


def test_close_drops_what_was_queued_and_bad_capacity_is_refused():
    ex = LocalExecutor(lambda x: 1 / x)
    ex.submit(0)                 # would raise if it ran
    ex.close()
    with pytest.raises(RuntimeError, match="no job submitted"):
        ex.next_result()
    with pytest.raises(ValueError, match="capacity"):
        LocalExecutor(str, capacity=0)

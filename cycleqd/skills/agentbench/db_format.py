"""How DB-Bench shows an SQL statement's result to the agent: AgentBench's observation
text (``src/server/tasks/dbbench``): ``str`` of the list of row tuples, or the error
message, cut at 800 characters followed by ``[TRUNCATED]``."""

from __future__ import annotations

from typing import Any, Sequence

from cycleqd.sandbox.sql import StatementResult

__all__ = ["OBSERVATION_CHARS", "format_observation", "observation"]

OBSERVATION_CHARS = 800  # AgentBench: result_str[:800] + "[TRUNCATED]"


def format_observation(rows: Sequence[Sequence[Any]] | None = None, error: str | None = None,
                       *, limit: int = OBSERVATION_CHARS) -> str:
    """AgentBench's observation text: ``str(list of row tuples)`` or the error message,
    cut to ``limit`` characters followed by ``[TRUNCATED]``."""
    text = error if error is not None else str([tuple(r) for r in (rows or [])])
    if len(text) > limit:
        text = text[:limit] + "[TRUNCATED]"
    return text


def observation(result: StatementResult) -> str:
    """The observation text of one statement's result (:meth:`cycleqd.sandbox.sql.SQLBackend.execute`)."""
    return format_observation(result.rows, result.error)

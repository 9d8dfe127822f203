"""Red-team attacks on the per-sample cache key (issue 12 item 4): settings that change
outcomes but not the key. Each test FAILS on the current code.
"""

from __future__ import annotations

from cycleqd.sandbox.sql import SQLiteBackend
from cycleqd.skills.dbbench import DBBenchSkill


def test_db_backend_object_settings_are_in_the_key():
    """``DBBenchSkill(backend=<SQLBackend>)`` keys only ``backend.name``: a backend that
    returns one row per observation (``max_rows=1``) or kills every statement after 1 ms
    (``statement_timeout_s``) shows the model other observations -- other replies, other
    outcomes -- yet shares the default backend's cache key, so its outcomes are served to
    (and from) runs on the default backend."""
    base = DBBenchSkill(split="search", limit=2, backend="sqlite")
    one_row = DBBenchSkill(split="search", limit=2, backend=SQLiteBackend(max_rows=1))
    fast = DBBenchSkill(split="search", limit=2, backend=SQLiteBackend(statement_timeout_s=0.001))
    assert one_row.cache_key != base.cache_key, "max_rows=1 backend shares the default key"
    assert fast.cache_key != base.cache_key, "1 ms statement timeout shares the default key"

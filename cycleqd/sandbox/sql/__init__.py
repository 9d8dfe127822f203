"""SQL backends for model-written SQL (DB-Bench): SQLite in a bubblewrap sandbox, MariaDB.

Both give each episode a private database holding one table built the way AgentBench's
DB-Bench builds it (``src/server/tasks/dbbench``): every column ``TEXT``, every value
inserted as ``str(value)``. Model SQL is one statement per call; its rows or its error
come back as a :class:`StatementResult` (errors are results, never exceptions). How
DB-Bench shows a result to the model (AgentBench's observation text) is the skill's
business: :mod:`cycleqd.skills.agentbench.db_format`.

Modules: :mod:`.base` (the shared table, interface, results and AgentBench's table hash),
:mod:`.sqlite` (:class:`SQLiteBackend`, the default), :mod:`.mariadb`
(:class:`MariaDBBackend`).
"""

from __future__ import annotations

from typing import Any

from .base import (GROUP_CONCAT_MAX_LEN, MAX_TABLE_BYTES, MAX_TABLE_CELLS, Reference,
                   SQLBackend, StatementResult, TableBuildError, TableRows, TableSpec,
                   extract_md5, table_hash_md5)
from .mariadb import MariaDBBackend, MariaDBConfig, mariadb_ping
from .sqlite import SQLiteBackend

__all__ = ["GROUP_CONCAT_MAX_LEN", "MAX_TABLE_BYTES", "MAX_TABLE_CELLS", "MariaDBBackend",
           "MariaDBConfig", "Reference", "SQLBackend", "SQLiteBackend", "StatementResult",
           "TableBuildError", "TableRows", "TableSpec", "extract_md5", "make_backend",
           "mariadb_ping", "table_hash_md5"]


def make_backend(name: str, **kw: Any) -> SQLBackend:
    """``"sqlite"`` -> :class:`SQLiteBackend`, ``"mariadb"``/``"mysql"`` -> :class:`MariaDBBackend`."""
    if name == "sqlite":
        return SQLiteBackend(**kw)
    if name in ("mariadb", "mysql"):
        return MariaDBBackend(**kw)
    raise ValueError(f"unknown SQL backend {name!r} (expected 'sqlite' or 'mariadb')")

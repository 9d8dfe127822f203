"""SQLite backend (the default): one SQLite worker process *inside a sandbox*
(:class:`cycleqd.sandbox.BwrapSession` machinery: no network, no host files,
memory/process limits) holds every episode's in-memory database. Statements have a
deadline; if a statement kills or hangs the worker anyway, the worker is restarted and
the other episodes' databases are rebuilt by replaying their successful statements, so
one hostile episode cannot change another's result. The worker
(:mod:`._sqlite_worker`) is sent into the sandbox as source text and computes
AgentBench's hash in Python with MySQL's rendering of numbers."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..limits import SandboxLimits
from ..session import BwrapSession
from . import base  # base.MAX_TABLE_CELLS/_BYTES read at call time: one bound for all
from .base import (GROUP_CONCAT_MAX_LEN, SQLBackend, StatementResult, TableBuildError, TableRows,
                   TableSpec)

__all__ = ["SQLiteBackend"]


class _SQLiteWorker(BwrapSession):
    _agent_source = (Path(__file__).with_name("_sqlite_worker.py")).read_text()

    def call(self, req: dict, timeout: float) -> dict | None:
        return self._request(req, timeout=timeout, max_reply=16 << 20)


def _decode(v: Any) -> Any:
    if isinstance(v, dict):
        if "__bytes__" in v:
            return bytes.fromhex(v["__bytes__"])
        if "__float__" in v:
            return float(v["__float__"])
    return v


@dataclass
class _Episode:
    table: TableSpec
    log: list[str] = field(default_factory=list)  # statements that succeeded, for replay


class SQLiteBackend(SQLBackend):
    """SQLite databases in one sandboxed worker process (see the module docstring).

    Args:
        statement_timeout_s: wall-clock limit of one statement (seconds).
        max_rows: rows fetched of one result (the observation is cut at 800 chars anyway).
        limits: the worker sandbox's limits (memory is shared by all its databases).

    Raises:
        SandboxUnavailableError: (at first use) no bubblewrap sandbox on this host.
    """

    name = "sqlite"

    def __init__(self, *, statement_timeout_s: float = 5.0, max_rows: int = 1000,
                 limits: SandboxLimits | None = None) -> None:
        if not statement_timeout_s > 0:
            raise ValueError(f"statement_timeout_s must be > 0, got {statement_timeout_s!r}")
        if not (isinstance(max_rows, int) and max_rows > 0):
            raise ValueError(f"max_rows must be a positive int, got {max_rows!r}")
        self.statement_timeout_s = float(statement_timeout_s)
        self.max_rows = max_rows
        self.limits = limits or SandboxLimits(cpu_seconds=3600, memory_bytes=1024 << 20,
                                              wall_seconds=60, max_output_bytes=1 << 20,
                                              max_processes=16)
        self._worker: _SQLiteWorker | None = None
        self._episodes: dict[str, _Episode] = {}
        self._lock = threading.RLock()
        self.restarts = 0  # how many times a statement killed the worker

    # -- worker lifecycle
    def _ensure(self) -> _SQLiteWorker:
        if self._worker is None or not self._worker.alive:
            if self._worker is not None:
                self._worker.close()
                self.restarts += 1
            w = _SQLiteWorker(self.limits, workdir="/").start()
            self._worker = w
            for key, ep in self._episodes.items():  # rebuild everyone else's database
                self._create_in(w, key, ep.table)
                for stmt in ep.log:
                    w.call({"op": "exec", "key": key, "sql": stmt,
                            "timeout": self.statement_timeout_s, "max_rows": 1},
                           timeout=self.statement_timeout_s + 10)
        return self._worker

    def _create_in(self, w: _SQLiteWorker, key: str, table: TableSpec) -> None:
        rep = w.call({"op": "create", "key": key, "table": table.name,
                      "columns": list(table.columns), "rows": table.text_rows()}, timeout=60)
        if rep is None:  # the worker died building it: that table's problem
            w.close()
            raise TableBuildError(f"table {table.name!r}: the SQLite worker died building it")
        if not rep.get("ok"):
            raise TableBuildError(f"table {table.name!r}: {rep.get('error', 'not built')}")

    def create(self, key: str, table: TableSpec) -> None:
        why = table.problem()
        if why is not None:
            raise TableBuildError(why)
        with self._lock:
            if key in self._episodes:
                raise ValueError(f"episode key {key!r} already exists")
            w = self._ensure()
            try:
                self._create_in(w, key, table)
            except TableBuildError:
                if self._worker is not None and self._worker.alive:
                    self._worker.call({"op": "drop", "key": key}, timeout=10)
                raise
            self._episodes[key] = _Episode(table)

    def execute(self, key: str, sql: str) -> StatementResult:
        with self._lock:
            ep = self._episodes.get(key)
            if ep is None:
                raise KeyError(f"no episode {key!r}")
            rep = None
            for _attempt in range(2):  # the worker may have died before this statement
                w = self._ensure()
                rep = w.call({"op": "exec", "key": key, "sql": sql,
                              "timeout": self.statement_timeout_s, "max_rows": self.max_rows},
                             timeout=self.statement_timeout_s + 10)
                if rep is not None:
                    break
                w.close()  # restarted (and the other episodes replayed) by _ensure
            if rep is None:  # this statement kills or wedges the worker: not logged
                return StatementResult(error="Error: the database crashed or timed out "
                                             "executing this statement.")
            if "error" in rep:
                return StatementResult(error=rep["error"])
            ep.log.append(sql)
            return StatementResult(tuple(tuple(_decode(v) for v in r) for r in rep["rows"]))

    def _table_call(self, key: str, op: str, *, columns: bool = False, **args: Any) -> dict | None:
        """Ask the worker ``op`` about episode ``key``'s table (with its column names when
        ``columns``; 30 s); None, and the worker closed, when it does not answer.
        Raises KeyError for an unknown episode."""
        with self._lock:
            ep = self._episodes.get(key)
            if ep is None:
                raise KeyError(f"no episode {key!r}")
            if columns:
                args["columns"] = list(ep.table.columns)
            rep = self._ensure().call({"op": op, "key": key, "table": ep.table.name, **args}, timeout=30)
            if rep is None:
                self._worker.close()
            return rep

    def table_hash(self, key: str) -> str | None:
        rep = self._table_call(key, "hash", columns=True, group_concat_max_len=GROUP_CONCAT_MAX_LEN)
        return None if rep is None else rep.get("hash")

    def table_rows(self, key: str) -> TableRows | None:
        rep = self._table_call(key, "rows", max_cells=base.MAX_TABLE_CELLS,
                               max_bytes=base.MAX_TABLE_BYTES)
        if rep is None or "error" in rep:
            return None
        return base.rows_from(rep["columns"], [[_decode(v) for v in r] for r in rep["rows"]])

    def drop(self, key: str) -> None:
        with self._lock:
            if self._episodes.pop(key, None) is not None and self._worker is not None \
                    and self._worker.alive:
                self._worker.call({"op": "drop", "key": key}, timeout=10)

    def close(self) -> None:
        with self._lock:
            self._episodes.clear()
            if self._worker is not None:
                self._worker.close()
                self._worker = None

"""SQL backends for model-written SQL (DB-Bench): SQLite in a bubblewrap sandbox, MariaDB.

Both give each episode a private database holding one table built the way AgentBench's
DB-Bench builds it (``src/server/tasks/dbbench``): every column ``TEXT``, every value
inserted as ``str(value)``. Model SQL is one statement per call; its result comes back
as AgentBench's observation (``str`` of the list of row tuples, or the error message,
cut at 800 characters + ``[TRUNCATED]``). Errors are observations, never exceptions.

* :class:`SQLiteBackend` (default): one SQLite worker process *inside a sandbox*
  (:class:`cycleqd.sandbox.BwrapSession` machinery: no network, no host files,
  memory/process limits) holds every episode's in-memory database. Statements have a
  deadline; if a statement kills or hangs the worker anyway, the worker is restarted
  and the other episodes' databases are rebuilt by replaying their successful
  statements, so one hostile episode cannot change another's result.
* :class:`MariaDBBackend`: a real MariaDB/MySQL server (see ``.ci/mariadb.sh``). Each
  episode gets a fresh database and its own throw-away user with privileges on that
  database only (no FILE, PROCESS, SUPER...), a per-statement time limit
  (``max_statement_time`` plus a client read timeout and ``KILL``), and unbuffered
  fetching with a row cap.

:func:`table_hash_md5` is AgentBench's table hash (``answer_md5``), the query of
AgentBench's DB-Bench task (``src/server/tasks/dbbench``, v0.2 ``__init__.py`` and the
current ``result_processor.py``; the same in SakanaAI/CycleQD's fishfarm port)::

    select md5(group_concat(rowhash order by rowhash)) as hash from (
      SELECT substring(MD5(CONCAT_WS(',', <columns>)), 1, 5) AS rowhash FROM <table>) as sub

i.e. per row the first 5 hex digits of the MD5 of the **non-NULL** values joined by ','
(MySQL's CONCAT_WS skips NULLs); the row hashes sorted and joined by ',' -- cut at
``group_concat_max_len`` = 1024 bytes, the default of the MySQL 8 server AgentBench runs
(:data:`GROUP_CONCAT_MAX_LEN`; MariaDB's own default is 1 MiB, so the MariaDB backend sets
it per session); the MD5 of that (NULL for an empty table). MariaDB computes it in SQL;
the SQLite worker computes the same in Python with MySQL's rendering of numbers. The
server must use utf8mb4: with latin1 every non-ASCII value hashes differently from the
benchmark's reference.

The hash is faithful, and therefore *not* injective: a NULL and a missing value, a value
containing ',' and two values, and any two tables whose 20-bit row prefixes agree hash
alike. The strict DB-Bench grader therefore only uses it to *verify* the reference
table (the gold statement's result must reproduce ``answer_md5``) and then compares the
agent's table with that reference row by row (:meth:`SQLBackend.table_rows`,
:meth:`SQLBackend.reference`): NULL, ``''`` and ``'NULL'`` are three different values.

Tables the server cannot build (an empty column name, two names equal up to case, a name
longer than 64 characters or ending in a space: MySQL's identifier rules, checked by
:meth:`TableSpec.problem` on both backends alike) raise :class:`TableBuildError` from
:meth:`SQLBackend.create` and leave nothing behind: the caller scores that item as one
failed sample and the backend serves the next items and reruns.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import os
import re
import secrets
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from cycleqd.errors import require

from .bwrap import BwrapSession, SandboxLimits

__all__ = ["TableSpec", "SQLBackend", "SQLiteBackend", "MariaDBBackend", "MariaDBConfig",
           "TableBuildError", "TableRows", "Reference", "format_observation", "table_hash_md5",
           "extract_md5", "make_backend", "GROUP_CONCAT_MAX_LEN", "MAX_TABLE_CELLS"]

OBSERVATION_CHARS = 800  # AgentBench: result_str[:800] + "[TRUNCATED]"
#: MySQL 8's default ``group_concat_max_len`` (bytes): AgentBench's server cuts the joined
#: row hashes there (tables over 170 rows; DB-Bench's largest has 105).
GROUP_CONCAT_MAX_LEN = 1024
#: At most this many cells (rows x columns) and :data:`MAX_TABLE_BYTES` bytes of an
#: episode's table are read back for the strict comparison; a bigger table fails its sample.
MAX_TABLE_CELLS = 200_000
MAX_TABLE_BYTES = 16 << 20
_MYSQL_IDENT_MAX = 64


class TableBuildError(ValueError):
    """The backend cannot build an item's table (a data problem of that one item, e.g. a
    column with an empty name). Nothing of it is left in the backend."""


@dataclass(frozen=True)
class TableRows:
    """An episode table's content as read back for grading.

    Attributes:
        columns: column names in table order.
        rows: every row, values as MySQL renders them in ``CONCAT_WS`` (str), NULL as None.
    """

    columns: tuple[str, ...]
    rows: tuple[tuple[str | None, ...], ...]

    def multiset(self) -> "collections.Counter[tuple[str | None, ...]]":
        """The rows as a multiset (row order is not part of a table)."""
        return collections.Counter(self.rows)


@dataclass(frozen=True)
class Reference:
    """The gold table of an INSERT/UPDATE/DELETE item, built by running the item's gold
    statements on a scratch copy of its table (:meth:`SQLBackend.reference`).

    Attributes:
        hash: AgentBench's hash of it (:func:`table_hash_md5`), None for an empty table.
        table: its content (None if it could not be read back).
        errors: observations of gold statements that failed (empty when all ran).
    """

    hash: str | None
    table: TableRows | None
    errors: tuple[str, ...] = ()
_MD5_RE = re.compile(r"\b[0-9a-f]{32}\b")


@dataclass(frozen=True)
class TableSpec:
    """One DB-Bench table.

    Attributes:
        name: table name (any characters; quoted by the backends).
        columns: column names, in order.
        rows: rows of values (each row ``len(columns)`` long); stored as ``str(value)``.
    """

    name: str
    columns: tuple[str, ...]
    rows: tuple[tuple[Any, ...], ...]

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise ValueError(f"TableSpec.name must be a str, got {self.name!r}")
        if not all(isinstance(c, str) for c in self.columns):
            raise ValueError(f"TableSpec.columns of {self.name!r} must be strs")

    def problem(self) -> str | None:
        """Why no MySQL server can build this table (one line), or None. MySQL's rules
        (reference manual, "Schema Object Names"): identifiers are 1..64 characters of
        the Basic Multilingual Plane except NUL and must not end in a space; column
        names are compared case-insensitively, so two that differ only in case are
        duplicates; every row has one value per column."""
        def bad(kind: str, n: str) -> str | None:
            if n == "":
                return f"{kind} name is empty"
            if len(n) > _MYSQL_IDENT_MAX:
                return f"{kind} name {n[:20]!r}... is longer than {_MYSQL_IDENT_MAX} characters"
            if n.endswith(" "):
                return f"{kind} name {n!r} ends with a space"
            if "\0" in n:
                return f"{kind} name {n!r} contains a NUL character"
            if any(ord(ch) > 0xFFFF for ch in n):  # identifiers are BMP-only in MySQL
                return f"{kind} name {n!r} has a character outside the Basic Multilingual Plane"
            return None

        why = bad("table", self.name)
        if why:
            return why
        if not self.columns:
            return f"table {self.name!r} has no columns"
        seen: dict[str, str] = {}
        for c in self.columns:
            why = bad("column", c)
            if why:
                return f"table {self.name!r}: {why}"
            k = c.casefold()
            if k in seen:
                return f"table {self.name!r}: columns {seen[k]!r} and {c!r} are the same name"
            seen[k] = c
        for i, r in enumerate(self.rows):
            if len(r) != len(self.columns):
                return (f"table {self.name!r}: row {i} has {len(r)} values for "
                        f"{len(self.columns)} columns")
        return None

    def text_rows(self) -> list[list[str]]:
        """Rows as AgentBench inserts them (``str(value)``)."""
        return [[str(v) for v in r] for r in self.rows]


def format_observation(rows: Sequence[Sequence[Any]] | None = None, error: str | None = None,
                       *, limit: int = OBSERVATION_CHARS) -> str:
    """AgentBench's observation text: ``str(list of row tuples)`` or the error message,
    cut to ``limit`` characters followed by ``[TRUNCATED]``."""
    text = error if error is not None else str([tuple(r) for r in (rows or [])])
    if len(text) > limit:
        text = text[:limit] + "[TRUNCATED]"
    return text


def _mysql_str(v: Any) -> str:
    from ._sqlite_worker import mysql_str

    return mysql_str(v)


def table_hash_md5(rows: Sequence[Sequence[Any]]) -> str | None:
    """AgentBench's table hash of ``rows`` (see module docstring), faithfully: values
    rendered as MySQL's CONCAT_WS does, NULLs (None) skipped as CONCAT_WS skips them, the
    sorted row hashes joined and cut at :data:`GROUP_CONCAT_MAX_LEN` bytes; None for no
    rows (MD5(GROUP_CONCAT(...)) over no rows is NULL). Not injective -- see module doc."""
    hashes = [hashlib.md5(",".join(_mysql_str(v) for v in r if v is not None).encode("utf-8"))
              .hexdigest()[:5] for r in rows]
    if not hashes:
        return None
    joined = ",".join(sorted(hashes)).encode()[:GROUP_CONCAT_MAX_LEN]
    return hashlib.md5(joined).hexdigest()


def _looks_like_error(obs: str) -> bool:
    return not obs.startswith("[")


def _rows_from(columns: Sequence[str], raw_rows: Sequence[Sequence[Any]]) -> TableRows | None:
    cells = nbytes = 0
    out = []
    for r in raw_rows:
        cells += len(r)
        row = tuple(None if v is None else _mysql_str(v) for v in r)
        nbytes += sum(len(v) for v in row if v is not None)
        if cells > MAX_TABLE_CELLS or nbytes > MAX_TABLE_BYTES:
            return None
        out.append(row)
    return TableRows(tuple(columns), tuple(out))


def extract_md5(answer_md5: str) -> str | None:
    """The hex digest inside a DB-Bench ``answer_md5`` field (``"[('<hex>',)]"``)."""
    m = _MD5_RE.search(answer_md5 or "")
    return m.group(0) if m else None


class SQLBackend:
    """Episode databases for DB-Bench. Keys are caller-chosen episode ids.

    Methods never raise for anything model SQL does: :meth:`execute` returns the
    observation text, :meth:`table_hash` returns None when no hash can be computed.
    """

    name = "abstract"

    @property
    def identity(self) -> dict:
        """What about this backend can change what a model sees or how it is judged (part
        of DB-Bench's sample-cache key): its name, statement timeout and row cap."""
        return {"name": self.name, "timeout_s": getattr(self, "statement_timeout_s", None),
                "max_rows": getattr(self, "max_rows", None)}

    def create(self, key: str, table: TableSpec) -> None:
        """A fresh private database for episode ``key`` holding ``table``.

        Raises:
            TableBuildError: the table cannot be built (that item's problem); nothing of
                it is left behind and ``key`` stays free.
            RuntimeError: the backend itself is unusable (server down, no sandbox).
            ValueError: ``key`` is in use.
        """
        raise NotImplementedError

    def execute(self, key: str, sql: str) -> str:
        """Run one model statement; the observation text (rows or error)."""
        raise NotImplementedError

    def table_hash(self, key: str) -> str | None:
        """AgentBench's hash (hex) of the episode's table now, None if it cannot."""
        raise NotImplementedError

    def table_rows(self, key: str) -> TableRows | None:
        """Every row of the episode's table now (``SELECT *`` in a fresh session), or None
        when it cannot be read (table gone, over :data:`MAX_TABLE_CELLS` cells or
        :data:`MAX_TABLE_BYTES` bytes, backend error)."""
        raise NotImplementedError

    def drop(self, key: str) -> None:
        """Forget episode ``key`` and free its database (no error if unknown)."""
        raise NotImplementedError

    def reference(self, key: str, table: TableSpec, statements: Sequence[str]) -> Reference:
        """The gold table of a modification item: ``table`` built under the scratch key
        ``key``, the item's trusted gold ``statements`` run on it (each as one statement,
        newlines as spaces, exactly as a model's would be), then its hash and rows read
        back and the scratch database dropped -- before any model statement of that item
        runs, in a database no episode can reach.

        Raises:
            TableBuildError, RuntimeError: as :meth:`create`.
        """
        self.create(key, table)
        try:
            errors = []
            for st in statements:
                obs = self.execute(key, " ".join(str(st).split("\n")))
                if _looks_like_error(obs):
                    errors.append(obs[:200])
            return Reference(self.table_hash(key), self.table_rows(key), tuple(errors))
        finally:
            self.drop(key)

    def close(self) -> None:
        pass

    def __enter__(self) -> "SQLBackend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- SQLite


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
    """SQLite databases in one sandboxed worker process (see module docstring).

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

    def execute(self, key: str, sql: str) -> str:
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
                return format_observation(error="Error: the database crashed or timed out "
                                                "executing this statement.")
            if "error" in rep:
                return format_observation(error=rep["error"])
            ep.log.append(sql)
            rows = [tuple(_decode(v) for v in r) for r in rep["rows"]]
            return format_observation(rows)

    def table_hash(self, key: str) -> str | None:
        with self._lock:
            ep = self._episodes.get(key)
            if ep is None:
                raise KeyError(f"no episode {key!r}")
            w = self._ensure()
            rep = w.call({"op": "hash", "key": key, "table": ep.table.name,
                          "columns": list(ep.table.columns),
                          "group_concat_max_len": GROUP_CONCAT_MAX_LEN}, timeout=30)
            if rep is None:
                self._worker.close()
                return None
            return rep.get("hash")

    def table_rows(self, key: str) -> TableRows | None:
        with self._lock:
            ep = self._episodes.get(key)
            if ep is None:
                raise KeyError(f"no episode {key!r}")
            w = self._ensure()
            rep = w.call({"op": "rows", "key": key, "table": ep.table.name,
                          "max_cells": MAX_TABLE_CELLS, "max_bytes": MAX_TABLE_BYTES},
                         timeout=30)
            if rep is None:
                self._worker.close()
                return None
            if "error" in rep:
                return None
            return _rows_from(rep["columns"], [[_decode(v) for v in r] for r in rep["rows"]])

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


# --------------------------------------------------------------------------- MariaDB


@dataclass(frozen=True)
class MariaDBConfig:
    """Where the MariaDB/MySQL server is and how the evaluator's admin connects.

    Attributes:
        unix_socket: server socket path (preferred; root via unix_socket auth).
        host, port: TCP address (used when ``unix_socket`` is None).
        admin_user, admin_password: an account allowed to CREATE DATABASE/USER and KILL.
        episode_host: host part of the per-episode accounts ('localhost' for socket,
            '127.0.0.1' for TCP on loopback).
    """

    unix_socket: str | None = None
    host: str = "127.0.0.1"
    port: int = 3306
    admin_user: str = "root"
    admin_password: str | None = None
    episode_host: str = "localhost"

    @classmethod
    def from_env(cls) -> "MariaDBConfig":
        """From ``CYCLEQD_MARIADB_SOCKET`` / ``_HOST`` / ``_PORT`` / ``_USER`` /
        ``_PASSWORD`` (as exported by ``.ci/mariadb.sh``); default socket
        ``/tmp/cycleqd-mariadb/mysqld.sock``."""
        sock = os.environ.get("CYCLEQD_MARIADB_SOCKET")
        if sock is None and not os.environ.get("CYCLEQD_MARIADB_HOST"):
            sock = "/tmp/cycleqd-mariadb/mysqld.sock"
        host = os.environ.get("CYCLEQD_MARIADB_HOST", "127.0.0.1")
        return cls(unix_socket=sock or None, host=host,
                   port=int(os.environ.get("CYCLEQD_MARIADB_PORT", "3306")),
                   admin_user=os.environ.get("CYCLEQD_MARIADB_USER", "root"),
                   admin_password=os.environ.get("CYCLEQD_MARIADB_PASSWORD"),
                   episode_host="localhost" if sock else host)

    def connect(self, *, user: str, password: str | None, database: str | None = None,
                read_timeout: float | None = None) -> Any:
        pymysql = require("pymysql", "the MariaDB backend")
        kw: dict[str, Any] = dict(user=user, password=password or "", database=database,
                                  charset="utf8mb4", autocommit=True, connect_timeout=10,
                                  read_timeout=read_timeout, write_timeout=read_timeout)
        if self.unix_socket:
            kw["unix_socket"] = self.unix_socket
        else:
            kw.update(host=self.host, port=self.port)
        if self.unix_socket or self.host in ("127.0.0.1", "localhost", "::1"):
            # local: no TLS (building pymysql's default SSL context costs ~50 ms/connect)
            kw["ssl_disabled"] = True
        return pymysql.connect(**kw)


def mariadb_ping(config: MariaDBConfig | None = None) -> str | None:
    """None if the server answers to the admin account, else the reason it does not."""
    config = config or MariaDBConfig.from_env()
    try:
        conn = config.connect(user=config.admin_user, password=config.admin_password,
                              read_timeout=10)
    except Exception as e:  # noqa: BLE001 - reported as text
        return f"cannot connect to MariaDB ({config.unix_socket or config.host}): {e}"
    conn.close()
    return None


def _qi(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


class MariaDBBackend(SQLBackend):
    """A real MariaDB/MySQL server, a fresh database and user per episode.

    Args:
        config: server location and admin account (default: :meth:`MariaDBConfig.from_env`).
        statement_timeout_s: ``max_statement_time`` of the episode session and the client
            read timeout (then the query is KILLed and the connection reopened).
        max_rows: rows fetched of one result (unbuffered; the rest is KILLed).

    Raises:
        RuntimeError: (at :meth:`create`) the server is unreachable or refuses the admin.
    """

    name = "mariadb"
    _run_counter = itertools.count()

    def __init__(self, config: MariaDBConfig | None = None, *, statement_timeout_s: float = 5.0,
                 max_rows: int = 1000) -> None:
        if not statement_timeout_s > 0:
            raise ValueError(f"statement_timeout_s must be > 0, got {statement_timeout_s!r}")
        self.config = config or MariaDBConfig.from_env()
        self.statement_timeout_s = float(statement_timeout_s)
        self.max_rows = max_rows
        self._admin = None
        # database/user names: letters and digits only (no GRANT wildcards '_' / '%')
        self._prefix = "cq%s%d" % (secrets.token_hex(4), os.getpid() % 100000)
        self._n = itertools.count()
        self._eps: dict[str, dict[str, Any]] = {}
        self._ref: dict[str, Any] | None = None  # the scratch account of reference()
        self._lock = threading.RLock()

    def _admin_conn(self) -> Any:
        if self._admin is None:
            try:
                self._admin = self.config.connect(user=self.config.admin_user,
                                                  password=self.config.admin_password,
                                                  read_timeout=30)
            except Exception as e:  # noqa: BLE001
                raise RuntimeError(f"MariaDB backend: cannot connect as admin "
                                   f"({self.config.unix_socket or self.config.host}): {e}") from e
        else:
            try:
                self._admin.ping()
            except Exception:  # noqa: BLE001 - stale admin connection: open a new one
                self._admin = None
                return self._admin_conn()
        return self._admin

    def _admin_exec(self, sql: str, args: Any = None) -> None:
        with self._admin_conn().cursor() as c:
            c.execute(sql, args)

    def _episode_conn(self, ep: dict[str, Any]) -> Any:
        if ep.get("conn") is None:
            conn = self.config.connect(user=ep["user"], password=ep["password"], database=ep["db"],
                                       read_timeout=self.statement_timeout_s + 5)
            with conn.cursor() as c:
                c.execute("SET SESSION max_statement_time = %s", (self.statement_timeout_s,))
                c.execute("SET SESSION sql_mode = ''")
            ep["conn"] = conn
        return ep["conn"]

    def _new_account(self, name: str) -> dict[str, Any]:
        """A fresh database ``name`` and a user of the same name with every privilege on
        that database only. Leaves nothing behind when it fails."""
        ep = {"db": name, "user": name, "password": secrets.token_hex(16), "conn": None}
        host = self.config.episode_host
        try:
            self._admin_exec(f"CREATE DATABASE {_qi(name)} CHARACTER SET utf8mb4 "
                             f"COLLATE utf8mb4_general_ci")
            ep["made_db"] = True
            self._admin_exec("CREATE USER %s@%s IDENTIFIED BY %s WITH MAX_USER_CONNECTIONS 3",
                             (name, host, ep["password"]))
            ep["made_user"] = True
            self._admin_exec(f"GRANT ALL PRIVILEGES ON {_qi(name)}.* TO %s@%s", (name, host))
        except BaseException:
            self._discard(ep)
            raise
        return ep

    def _build_table(self, ep: dict[str, Any], table: TableSpec) -> None:
        """Create and fill ``table`` in the account's database (AgentBench's schema: every
        column TEXT, values ``str(v)``). A server error about the table (code < 2000)
        becomes TableBuildError; connection errors pass through."""
        import pymysql

        try:
            conn = self._episode_conn(ep)
            cols = ", ".join(f"{_qi(c)} TEXT" for c in table.columns)
            with conn.cursor() as c:
                c.execute(f"CREATE TABLE {_qi(table.name)} ({cols})")
                if table.rows:
                    values = ",".join("(" + ",".join(conn.escape(v) for v in r) + ")"
                                      for r in table.text_rows())
                    c.execute(f"INSERT INTO {_qi(table.name)} "
                              f"({', '.join(_qi(x) for x in table.columns)}) VALUES {values}")
        except pymysql.MySQLError as e:
            code = e.args[0] if e.args else None
            if isinstance(code, int) and code < 2000:
                raise TableBuildError(f"table {table.name!r}: {_mysql_error(e)}") from e
            # a client error (lost connection...): this table's fault if the server is fine
            self._drop_conn(ep)
            try:
                self._admin_conn()
            except RuntimeError:
                raise
            raise TableBuildError(f"table {table.name!r}: the connection failed while "
                                  f"building it ({_mysql_error(e)})") from e

    def create(self, key: str, table: TableSpec) -> None:
        with self._lock:
            if key in self._eps:
                raise ValueError(f"episode key {key!r} already exists")
            why = table.problem()
            if why is not None:  # before touching the server: nothing to clean up
                raise TableBuildError(why)
            ep = self._new_account(f"{self._prefix}x{next(self._n)}")
            ep["table"] = table
            try:
                self._build_table(ep, table)
            except BaseException:
                self._discard(ep)  # leave nothing behind: the key stays free for a rerun
                raise
            self._eps[key] = ep

    def reference(self, key: str, table: TableSpec, statements: Sequence[str]) -> Reference:
        """As :meth:`SQLBackend.reference`, in one scratch database and user kept for
        the backend's life (creating an account per item doubles the cost of an
        evaluation); no episode user has any privilege on it, and the table is dropped
        before this returns."""
        why = table.problem()
        if why is not None:
            raise TableBuildError(why)
        with self._lock:
            if key in self._eps:
                raise ValueError(f"episode key {key!r} already exists")
            if self._ref is None:
                self._ref = self._new_account(f"{self._prefix}ref")
            ep = dict(self._ref, table=table, conn=None)
            self._eps[key] = ep
            try:
                if self._ref.get("dirty"):  # an earlier drop failed: clear the name first
                    self._admin_exec(f"DROP TABLE IF EXISTS {_qi(ep['db'])}.{_qi(table.name)}")
                self._build_table(ep, table)
                errors = []
                for st in statements:
                    obs = self.execute(key, " ".join(str(st).split("\n")))
                    if _looks_like_error(obs):
                        errors.append(obs[:200])
                return Reference(self.table_hash(key), self.table_rows(key), tuple(errors))
            finally:
                self._eps.pop(key, None)
                self._drop_conn(ep)
                try:
                    self._admin_exec(f"DROP TABLE IF EXISTS {_qi(ep['db'])}.{_qi(table.name)}")
                except Exception:  # noqa: BLE001 - the whole database goes at close()
                    self._ref["dirty"] = True

    def _discard(self, ep: dict[str, Any]) -> None:
        """Drop an episode's connection, database and user (best effort, never raises)."""
        self._drop_conn(ep)
        for made, sql, args in (
                ("made_db", f"DROP DATABASE IF EXISTS {_qi(ep['db'])}", None),
                ("made_user", "DROP USER IF EXISTS %s@%s", (ep["user"], self.config.episode_host))):
            if ep.get(made, True):
                try:
                    self._admin_exec(sql, args)
                except Exception:  # noqa: BLE001 - best effort cleanup
                    pass

    def _kill(self, conn: Any, what: str = "QUERY") -> None:
        try:
            self._admin_exec(f"KILL {what} %s", (conn.thread_id(),))
        except Exception:  # noqa: BLE001 - already gone
            pass

    def execute(self, key: str, sql: str) -> str:
        import pymysql

        with self._lock:
            ep = self._eps.get(key)
            if ep is None:
                raise KeyError(f"no episode {key!r}")
            try:
                conn = self._episode_conn(ep)
            except pymysql.MySQLError as e:
                return format_observation(error=_mysql_error(e))
            cur = conn.cursor(pymysql.cursors.SSCursor)
            try:
                cur.execute(sql)
                rows: list[tuple] = []
                more = False
                if cur.description is not None:
                    rows = list(cur.fetchmany(self.max_rows + 1))
                    more = len(rows) > self.max_rows
                    rows = rows[:self.max_rows]
                if more:
                    self._kill(conn)
                    self._drop_conn(ep)
                else:
                    cur.close()
                return format_observation(rows)
            except pymysql.err.OperationalError as e:
                code = e.args[0] if e.args else 0
                if code in (2013, 2006, 2014, 0) or "timed out" in str(e).lower():
                    self._kill(conn, "CONNECTION")
                    self._drop_conn(ep)
                    return format_observation(error="Error: SQL execution timed out.")
                self._safe_close(cur, ep)
                return format_observation(error=_mysql_error(e))
            except pymysql.MySQLError as e:
                self._safe_close(cur, ep)
                return format_observation(error=_mysql_error(e))
            except Exception as e:  # noqa: BLE001 - e.g. a decoding error in the client
                self._drop_conn(ep)
                return format_observation(error=f"Error: {type(e).__name__}: {e}")

    def _safe_close(self, cur: Any, ep: dict[str, Any]) -> None:
        try:
            cur.close()
        except Exception:  # noqa: BLE001
            self._drop_conn(ep)

    def _drop_conn(self, ep: dict[str, Any]) -> None:
        conn, ep["conn"] = ep.get("conn"), None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # noqa: BLE001
                pass

    def table_hash(self, key: str) -> str | None:
        import pymysql

        with self._lock:
            ep = self._eps.get(key)
            if ep is None:
                raise KeyError(f"no episode {key!r}")
            table: TableSpec = ep["table"]
            cols = ",".join(_qi(c) for c in table.columns)
            q = (f"select md5(group_concat(rowhash order by rowhash)) as hash "
                 f"from( SELECT substring(MD5(CONCAT_WS(',', {cols})), 1, 5) AS rowhash "
                 f"FROM {_qi(table.name)}) as sub")
            try:
                self._drop_conn(ep)  # a fresh session: the model cannot have changed its vars
                with self._episode_conn(ep).cursor() as c:
                    c.execute("SET SESSION group_concat_max_len = %s", (GROUP_CONCAT_MAX_LEN,))
                    c.execute(q)
                    row = c.fetchone()
            except pymysql.MySQLError:
                return None
            return row[0] if row else None

    def table_rows(self, key: str) -> TableRows | None:
        import pymysql

        with self._lock:
            ep = self._eps.get(key)
            if ep is None:
                raise KeyError(f"no episode {key!r}")
            table: TableSpec = ep["table"]
            t = _qi(table.name)
            try:
                self._drop_conn(ep)  # a fresh session: no TEMPORARY table shadows it
                with self._episode_conn(ep).cursor() as cur:
                    cur.execute(f"SELECT * FROM {t} LIMIT 0")
                    cols = [d[0] for d in cur.description]
                    cur.fetchall()
                    # size first, on the server: nothing over the bounds reaches this process
                    size = "+".join(f"COALESCE(SUM(LENGTH({_qi(c)})), 0)" for c in cols)
                    cur.execute(f"SELECT COUNT(*), {size} FROM {t}")
                    n, nbytes = cur.fetchone()
                    if n * len(cols) > MAX_TABLE_CELLS or (nbytes or 0) > MAX_TABLE_BYTES:
                        return None
                    cur.execute(f"SELECT * FROM {t}")
                    raw = cur.fetchall()
            except Exception:  # noqa: BLE001 - unreadable table: no rows to compare
                self._drop_conn(ep)
                return None
            return _rows_from(cols, raw)

    def drop(self, key: str) -> None:
        with self._lock:
            ep = self._eps.pop(key, None)
            if ep is None:
                return
            self._discard(ep)  # COM_QUIT; a connection wedged in a query was KILLed already

    def close(self) -> None:
        with self._lock:
            for key in list(self._eps):
                self.drop(key)
            if self._ref is not None:
                self._discard(self._ref)
                self._ref = None
            if self._admin is not None:
                try:
                    self._admin.close()
                except Exception:  # noqa: BLE001
                    pass
                self._admin = None


def _mysql_error(e: Exception) -> str:
    """mysql-connector's message style, e.g. ``1146: Table 'db.t' doesn't exist``."""
    if len(getattr(e, "args", ())) >= 2:
        return f"{e.args[0]}: {e.args[1]}"
    return str(e)


def make_backend(name: str, **kw: Any) -> SQLBackend:
    """``"sqlite"`` -> :class:`SQLiteBackend`, ``"mariadb"``/``"mysql"`` -> :class:`MariaDBBackend`."""
    if name == "sqlite":
        return SQLiteBackend(**kw)
    if name in ("mariadb", "mysql"):
        return MariaDBBackend(**kw)
    raise ValueError(f"unknown SQL backend {name!r} (expected 'sqlite' or 'mariadb')")



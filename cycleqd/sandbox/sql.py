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

:func:`table_hash_md5` is AgentBench's table hash (``answer_md5``)::

    select md5(group_concat(rowhash order by rowhash)) as hash from (
      SELECT substring(MD5(CONCAT_WS(',', <columns>)), 1, 5) AS rowhash FROM <table>) as sub

i.e. per row the first 5 hex digits of the MD5 of the non-NULL values joined by ','; the
row hashes sorted and joined by ','; the MD5 of that (NULL for an empty table). MariaDB
computes it in SQL; the SQLite worker computes the same in Python with MySQL's rendering
of numbers. The server must use utf8mb4: with latin1 every non-ASCII value hashes
differently from the benchmark's reference.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import re
import secrets
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .bwrap import BwrapSession, SandboxLimits

__all__ = ["TableSpec", "SQLBackend", "SQLiteBackend", "MariaDBBackend", "MariaDBConfig",
           "format_observation", "table_hash_md5", "extract_md5", "make_backend"]

OBSERVATION_CHARS = 800  # AgentBench: result_str[:800] + "[TRUNCATED]"
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
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"TableSpec.name must be a non-empty str, got {self.name!r}")
        if not self.columns or len(set(self.columns)) != len(self.columns):
            raise ValueError(f"TableSpec.columns of {self.name!r} must be non-empty and unique")
        for i, r in enumerate(self.rows):
            if len(r) != len(self.columns):
                raise ValueError(f"TableSpec {self.name!r}: row {i} has {len(r)} values for "
                                 f"{len(self.columns)} columns")

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
    """AgentBench's table hash of ``rows`` (values rendered as MySQL's CONCAT_WS does;
    None for no rows, as MySQL's MD5(GROUP_CONCAT(...)) over no rows is NULL)."""
    hashes = [hashlib.md5(",".join(_mysql_str(v) for v in r if v is not None).encode("utf-8"))
              .hexdigest()[:5] for r in rows]
    if not hashes:
        return None
    return hashlib.md5(",".join(sorted(hashes)).encode()).hexdigest()


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

    def create(self, key: str, table: TableSpec) -> None:
        """A fresh private database for episode ``key`` holding ``table``. Raises
        RuntimeError if the backend itself is unusable (server down, no sandbox)."""
        raise NotImplementedError

    def execute(self, key: str, sql: str) -> str:
        """Run one model statement; the observation text (rows or error)."""
        raise NotImplementedError

    def table_hash(self, key: str) -> str | None:
        """AgentBench's hash (hex) of the episode's table now, None if it cannot."""
        raise NotImplementedError

    def drop(self, key: str) -> None:
        raise NotImplementedError

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
        if rep is None or not rep.get("ok"):
            raise RuntimeError(f"SQLite worker could not create table {table.name!r}: "
                               f"{(rep or {}).get('error', 'worker died')}")

    def create(self, key: str, table: TableSpec) -> None:
        with self._lock:
            if key in self._episodes:
                raise ValueError(f"episode key {key!r} already exists")
            w = self._ensure()
            self._episodes[key] = _Episode(table)
            try:
                self._create_in(w, key, table)
            except BaseException:
                self._episodes.pop(key, None)
                raise

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
                          "columns": list(ep.table.columns)}, timeout=30)
            if rep is None:
                self._worker.close()
                return None
            return rep.get("hash")

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
        try:
            import pymysql
        except ImportError as e:  # pragma: no cover - dependency hint
            raise RuntimeError("the MariaDB backend needs `pymysql` (extra: mariadb)") from e
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

    def create(self, key: str, table: TableSpec) -> None:
        with self._lock:
            if key in self._eps:
                raise ValueError(f"episode key {key!r} already exists")
            name = f"{self._prefix}x{next(self._n)}"
            ep = {"db": name, "user": name, "password": secrets.token_hex(16), "table": table,
                  "conn": None}
            host = self.config.episode_host
            self._admin_exec(f"CREATE DATABASE {_qi(name)} CHARACTER SET utf8mb4 "
                             f"COLLATE utf8mb4_general_ci")
            self._eps[key] = ep
            self._admin_exec("CREATE USER %s@%s IDENTIFIED BY %s WITH MAX_USER_CONNECTIONS 3",
                             (name, host, ep["password"]))
            self._admin_exec(f"GRANT ALL PRIVILEGES ON {_qi(name)}.* TO %s@%s", (name, host))
            conn = self._episode_conn(ep)
            cols = ", ".join(f"{_qi(c)} TEXT" for c in table.columns)
            with conn.cursor() as c:
                c.execute(f"CREATE TABLE {_qi(table.name)} ({cols})")
                if table.rows:
                    values = ",".join("(" + ",".join(conn.escape(v) for v in r) + ")"
                                      for r in table.text_rows())
                    c.execute(f"INSERT INTO {_qi(table.name)} "
                              f"({', '.join(_qi(x) for x in table.columns)}) VALUES {values}")

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
                    c.execute(q)
                    row = c.fetchone()
            except pymysql.MySQLError:
                return None
            return row[0] if row else None

    def drop(self, key: str) -> None:
        with self._lock:
            ep = self._eps.pop(key, None)
            if ep is None:
                return
            self._drop_conn(ep)  # COM_QUIT; a connection wedged in a query was KILLed already
            try:
                self._admin_exec(f"DROP DATABASE IF EXISTS {_qi(ep['db'])}")
                self._admin_exec("DROP USER IF EXISTS %s@%s", (ep["user"], self.config.episode_host))
            except Exception:  # noqa: BLE001 - best effort cleanup
                pass

    def close(self) -> None:
        with self._lock:
            for key in list(self._eps):
                self.drop(key)
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



"""MariaDB backend: a real MariaDB/MySQL server (see ``.ci/mariadb.sh``). Each episode
gets a fresh database and its own throw-away user with privileges on that database only
(no FILE, PROCESS, SUPER...), a per-statement time limit (``max_statement_time`` plus a
client read timeout and ``KILL``), and unbuffered fetching with a row cap. The server
computes AgentBench's hash in SQL (``group_concat_max_len`` set per session to MySQL 8's
default, :data:`~.base.GROUP_CONCAT_MAX_LEN`); it must use utf8mb4."""

from __future__ import annotations

import itertools
import os
import secrets
import threading
from dataclasses import dataclass
from typing import Any, Sequence

from cycleqd.errors import require

from . import base  # base.MAX_TABLE_CELLS/_BYTES read at call time: one bound for all
from .base import (GROUP_CONCAT_MAX_LEN, Reference, SQLBackend, StatementResult, TableBuildError,
                   TableRows, TableSpec)

__all__ = ["MariaDBBackend", "MariaDBConfig", "mariadb_ping"]


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
                return self._run_reference(key, statements)
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

    def execute(self, key: str, sql: str) -> StatementResult:
        import pymysql

        with self._lock:
            ep = self._eps.get(key)
            if ep is None:
                raise KeyError(f"no episode {key!r}")
            try:
                conn = self._episode_conn(ep)
            except pymysql.MySQLError as e:
                return StatementResult(error=_mysql_error(e))
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
                return StatementResult(tuple(rows))
            except pymysql.err.OperationalError as e:
                code = e.args[0] if e.args else 0
                if code in (2013, 2006, 2014, 0) or "timed out" in str(e).lower():
                    self._kill(conn, "CONNECTION")
                    self._drop_conn(ep)
                    return StatementResult(error="Error: SQL execution timed out.")
                self._safe_close(cur, ep)
                return StatementResult(error=_mysql_error(e))
            except pymysql.MySQLError as e:
                self._safe_close(cur, ep)
                return StatementResult(error=_mysql_error(e))
            except Exception as e:  # noqa: BLE001 - e.g. a decoding error in the client
                self._drop_conn(ep)
                return StatementResult(error=f"Error: {type(e).__name__}: {e}")

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
                    if n * len(cols) > base.MAX_TABLE_CELLS or (nbytes or 0) > base.MAX_TABLE_BYTES:
                        return None
                    cur.execute(f"SELECT * FROM {t}")
                    raw = cur.fetchall()
            except Exception:  # noqa: BLE001 - unreadable table: no rows to compare
                self._drop_conn(ep)
                return None
            return base.rows_from(cols, raw)

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

"""SQLite worker that runs INSIDE a bubblewrap sandbox (see :mod:`cycleqd.sandbox.sql.sqlite`).

Executed by the sandbox's ``python3 -I -S``; standard library only, Python >= 3.8. One
JSON request per line on stdin, one JSON reply per line on stdout. It holds one private
in-memory database per episode key. To behave like the MySQL server AgentBench uses,
columns are TEXT with a case- and accent-insensitive collation (MySQL's default
``utf8mb4_general_ci``), statements go through :func:`mysql_to_sqlite` (backslash
escapes, "double-quoted" strings, identifiers starting with a digit) and CONCAT,
CONCAT_WS, MD5 and IF are provided. Model SQL runs with a per-statement deadline
(progress handler), a row cap, an authorizer that refuses ATTACH/DETACH, extension
loading and PRAGMAs that are not read-only schema queries, and SQLite length limits. The
sandbox around it bounds memory, processes and files, and has no network.

Channel: a key line first, then requests; replies are ``<HMAC-SHA256(key, json)> <json>``
(see :mod:`cycleqd.sandbox._agent`). Ops: ``create`` {key, table, columns, rows}; ``exec`` {key, sql, timeout, max_rows};
``hash`` {key, table, columns, group_concat_max_len}; ``rows`` {key, table, max_cells,
max_bytes}; ``drop`` {key}; ``ping``.
"""

import hashlib
import hmac
import json
import sqlite3
import re
import sys
import time
import unicodedata

_SAFE_PRAGMAS = {"table_info", "table_xinfo", "table_list", "index_list", "index_info",
                 "index_xinfo", "foreign_key_list", "collation_list", "function_list",
                 "database_list"}
_DENY_FUNCS = {"load_extension", "readfile", "writefile", "edit", "fts3_tokenizer"}


def _authorizer(action, arg1, arg2, dbname, source):
    if action in (sqlite3.SQLITE_ATTACH, sqlite3.SQLITE_DETACH):
        return sqlite3.SQLITE_DENY
    if action == sqlite3.SQLITE_PRAGMA:
        if (arg1 or "").lower() in _SAFE_PRAGMAS and arg2 is None:
            return sqlite3.SQLITE_OK
        return sqlite3.SQLITE_DENY
    if action == getattr(sqlite3, "SQLITE_FUNCTION", 31) and (arg2 or "").lower() in _DENY_FUNCS:
        return sqlite3.SQLITE_DENY
    return sqlite3.SQLITE_OK


def mysql_str(v):
    """How MySQL renders a value inside CONCAT_WS (None never reaches here)."""
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if v == v and v not in (float("inf"), float("-inf")) and v.is_integer() \
                and abs(v) < 1e15:
            return str(int(v))
        r = repr(v)
        if "e" in r:  # MySQL: 1e20, 1.5e-7 (no '+', no leading zeros in the exponent)
            mant, exp = r.split("e")
            r = mant + "e" + str(int(exp))
        return r
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    return str(v)


def _mysql_functions(conn):
    def concat(*a):
        if any(x is None for x in a):
            return None
        return "".join(mysql_str(x) for x in a)

    def concat_ws(sep, *a):
        if sep is None:
            return None
        return mysql_str(sep).join(mysql_str(x) for x in a if x is not None)

    def md5(x):
        return None if x is None else hashlib.md5(mysql_str(x).encode("utf-8")).hexdigest()

    def if_(c, a, b):
        return a if c not in (None, 0, "", "0") and c else b

    conn.create_function("concat", -1, concat, deterministic=True)
    conn.create_function("concat_ws", -1, concat_ws, deterministic=True)
    conn.create_function("md5", 1, md5, deterministic=True)
    conn.create_function("if", 3, if_, deterministic=True)


_MYSQL_ESCAPES = {"0": "\0", "b": "\b", "n": "\n", "r": "\r", "t": "\t", "Z": "\x1a",
                  "'": "'", '"': '"', "\\": "\\", "%": "\\%", "_": "\\_"}
_NOT_IDENT = re.compile(r"\d+[eE][+-]?\d*|0[xX][0-9a-fA-F]+|0[bB][01]+")
_DIGIT_IDENT = re.compile(r"\d+[A-Za-z_$][A-Za-z0-9_$]*")


def mysql_to_sqlite(sql):
    """Rewrite the MySQL dialect bits SQLite reads differently (MySQL semantics win):
    string literals in '...' or "..." with backslash escapes become SQLite '...'
    literals; bare identifiers starting with a digit (``1952_Grand_Prix``) are quoted;
    ``#`` comments are dropped. Backtick identifiers pass through (SQLite reads them)."""
    out = []
    i, n = 0, len(sql)
    while i < n:
        ch = sql[i]
        if ch in "'\"":
            quote, j, buf = ch, i + 1, []
            while j < n:
                c = sql[j]
                if c == "\\" and j + 1 < n:
                    buf.append(_MYSQL_ESCAPES.get(sql[j + 1], sql[j + 1]))
                    j += 2
                    continue
                if c == quote:
                    if j + 1 < n and sql[j + 1] == quote:
                        buf.append(quote)
                        j += 2
                        continue
                    break
                buf.append(c)
                j += 1
            if j >= n:  # unterminated: leave it to SQLite's error message
                out.append(sql[i:])
                break
            out.append("'" + "".join(buf).replace("'", "''") + "'")
            i = j + 1
        elif ch == "`":
            j = sql.find("`", i + 1)
            while j != -1 and j + 1 < n and sql[j + 1] == "`":
                j = sql.find("`", j + 2)
            if j == -1:
                out.append(sql[i:])
                break
            out.append(sql[i:j + 1])
            i = j + 1
        elif ch == "#":
            j = sql.find("\n", i)
            i = n if j == -1 else j
        elif ch == "-" and sql.startswith("--", i):
            j = sql.find("\n", i)
            out.append(sql[i:] if j == -1 else sql[i:j])
            i = n if j == -1 else j
        elif ch.isdigit() and (i == 0 or not (sql[i - 1].isalnum() or sql[i - 1] in "_$.")):
            m = _DIGIT_IDENT.match(sql, i)
            if m and not _NOT_IDENT.fullmatch(m.group(0)):
                out.append("`" + m.group(0) + "`")
                i = m.end()
            else:
                out.append(ch)
                i += 1
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def _ci_key(s):
    """MySQL utf8mb4_general_ci: case- and accent-insensitive, trailing spaces ignored."""
    s = unicodedata.normalize("NFD", s.rstrip(" "))
    return "".join(c for c in s if not unicodedata.combining(c)).casefold()


def _mysql_ci(a, b):
    ka, kb = _ci_key(a), _ci_key(b)
    return (ka > kb) - (ka < kb)


def _q(name):
    return '"' + str(name).replace('"', '""') + '"'


class Worker:
    def __init__(self):
        self.dbs = {}
        self.deadline = None

    def _progress(self):
        return 1 if self.deadline is not None and time.monotonic() > self.deadline else 0

    def create(self, req):
        conn = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
        for lim, val in (("SQLITE_LIMIT_LENGTH", 10_000_000), ("SQLITE_LIMIT_SQL_LENGTH", 1_000_000),
                         ("SQLITE_LIMIT_COLUMN", 2000), ("SQLITE_LIMIT_ATTACHED", 0)):
            if hasattr(conn, "setlimit") and hasattr(sqlite3, lim):
                conn.setlimit(getattr(sqlite3, lim), val)
        _mysql_functions(conn)
        conn.create_collation("mysql_ci", _mysql_ci)
        cols = req["columns"]
        try:
            conn.execute("CREATE TABLE %s (%s)" % (
                _q(req["table"]), ", ".join(_q(c) + " TEXT COLLATE mysql_ci" for c in cols)))
            if req["rows"]:
                conn.executemany("INSERT INTO %s VALUES (%s)" % (_q(req["table"]),
                                                                ",".join("?" * len(cols))),
                                 req["rows"])
        except BaseException:  # an unbuildable table: nothing of it stays
            conn.close()
            raise
        conn.set_authorizer(_authorizer)
        conn.set_progress_handler(self._progress, 1000)
        self.dbs[req["key"]] = conn
        return {"ok": True}

    def exec(self, req):
        conn = self.dbs.get(req["key"])
        if conn is None:
            return {"error": "no such episode"}
        max_rows = int(req.get("max_rows", 1000))
        self.deadline = time.monotonic() + float(req.get("timeout", 5.0))
        try:
            cur = conn.execute(mysql_to_sqlite(req["sql"]))
            rows = cur.fetchmany(max_rows + 1) if cur.description is not None else []
            more = len(rows) > max_rows
            cur.close()
            out = {"rows": [[_jsonable(v) for v in r] for r in rows[:max_rows]], "more": more}
        except sqlite3.Error as e:
            msg = str(e)
            if msg == "interrupted":
                msg = "interrupted: the statement ran past its time limit"
            out = {"error": "%s: %s" % (type(e).__name__, msg)}
        except (OverflowError, ValueError, MemoryError, RecursionError) as e:
            out = {"error": "%s: %s" % (type(e).__name__, e)}
        finally:
            self.deadline = None
        return out

    def hash(self, req):
        """AgentBench's table hash of ``main.<table>`` (a TEMP table of the same name,
        which would shadow it for unqualified names, is not read)."""
        conn = self.dbs.get(req["key"])
        if conn is None:
            return {"error": "no such episode"}
        self.deadline = time.monotonic() + 10.0
        try:
            cur = conn.execute("SELECT %s FROM %s" % (", ".join(_q(c) for c in req["columns"]),
                                                      "main." + _q(req["table"])))
            hashes = []
            for row in cur:
                s = ",".join(mysql_str(v) for v in row if v is not None)
                hashes.append(hashlib.md5(s.encode("utf-8")).hexdigest()[:5])
        except sqlite3.Error as e:
            return {"error": "%s: %s" % (type(e).__name__, e)}
        finally:
            self.deadline = None
        if not hashes:
            return {"hash": None}
        joined = ",".join(sorted(hashes)).encode()[:int(req.get("group_concat_max_len", 1024))]
        return {"hash": hashlib.md5(joined).hexdigest()}

    def rows(self, req):
        """Every row of the table (``SELECT *``) with its column names, or an error when
        it exceeds ``max_cells`` cells / ``max_bytes`` bytes of text."""
        conn = self.dbs.get(req["key"])
        if conn is None:
            return {"error": "no such episode"}
        max_cells, max_bytes = int(req["max_cells"]), int(req["max_bytes"])
        self.deadline = time.monotonic() + 10.0
        try:
            cur = conn.execute("SELECT * FROM main.%s" % _q(req["table"]))
            cols = [d[0] for d in cur.description]
            out, cells, nbytes = [], 0, 0
            for row in cur:
                cells += len(row)
                nbytes += sum(len(v) if isinstance(v, (str, bytes)) else 8 for v in row)
                if cells > max_cells or nbytes > max_bytes:
                    return {"error": "table too large"}
                out.append([_jsonable(v) for v in row])
        except sqlite3.Error as e:
            return {"error": "%s: %s" % (type(e).__name__, e)}
        finally:
            self.deadline = None
        return {"columns": cols, "rows": out}

    def drop(self, req):
        conn = self.dbs.pop(req["key"], None)
        if conn is not None:
            conn.close()
        return {"ok": True}


def _jsonable(v):
    if isinstance(v, bytes):
        return {"__bytes__": v.hex()}
    if isinstance(v, float) and (v != v or v in (float("inf"), float("-inf"))):
        return {"__float__": repr(v)}
    return v


def main():
    try:
        import ctypes

        ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE = 0
    except Exception:
        pass
    w = Worker()
    key = bytes.fromhex(sys.stdin.buffer.readline().decode().strip())
    for line in sys.stdin.buffer:
        try:
            req = json.loads(line)
        except ValueError:
            continue
        op = req.get("op")
        try:
            if op == "ping":
                rep = {"ok": True}
            elif op in ("create", "exec", "hash", "rows", "drop"):
                rep = getattr(w, op)(req)
            else:
                rep = {"error": "unknown op"}
        except Exception as e:  # noqa: BLE001 - a reply, never a dead worker
            rep = {"error": "%s: %s" % (type(e).__name__, e)}
        rep["id"] = req.get("id")
        body = json.dumps(rep).encode()
        sys.stdout.buffer.write(hmac.new(key, body, hashlib.sha256).hexdigest().encode()
                                + b" " + body + b"\n")
        sys.stdout.buffer.flush()


if __name__ == "__main__":
    main()

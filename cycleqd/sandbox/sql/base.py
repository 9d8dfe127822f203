"""What both SQL backends share: DB-Bench's table (:class:`TableSpec`), the backend
interface (:class:`SQLBackend`), a statement's result (:class:`StatementResult`), the
table read back for grading (:class:`TableRows`, :class:`Reference`) and AgentBench's
table hash (:func:`table_hash_md5`).

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
import re
from dataclasses import dataclass
from typing import Any, Sequence

from cycleqd.errors import CycleQDError

from ._sqlite_worker import mysql_str

__all__ = ["GROUP_CONCAT_MAX_LEN", "MAX_TABLE_BYTES", "MAX_TABLE_CELLS", "Reference", "SQLBackend",
           "StatementResult", "TableBuildError", "TableRows", "TableSpec", "extract_md5",
           "table_hash_md5"]

#: MySQL 8's default ``group_concat_max_len`` (bytes): AgentBench's server cuts the joined
#: row hashes there (tables over 170 rows; DB-Bench's largest has 105).
GROUP_CONCAT_MAX_LEN = 1024
#: At most this many cells (rows x columns) and :data:`MAX_TABLE_BYTES` bytes of an
#: episode's table are read back for the strict comparison; a bigger table fails its sample.
MAX_TABLE_CELLS = 200_000
MAX_TABLE_BYTES = 16 << 20
_MYSQL_IDENT_MAX = 64


class TableBuildError(CycleQDError, ValueError):
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
        errors: error messages of gold statements that failed (empty when all ran).
    """

    hash: str | None
    table: TableRows | None
    errors: tuple[str, ...] = ()


@dataclass(frozen=True)
class StatementResult:
    """What one model statement gave (:meth:`SQLBackend.execute`): its rows, or an error.

    Attributes:
        rows: the result's row tuples (at most the backend's ``max_rows``; empty for a
            statement without a result set), values as the database driver returns them
            (str, int, float, bytes, None ...).
        error: the error message (the server's, or the backend's when the statement
            crashed or timed out), None when the statement ran.
    """

    rows: tuple[tuple[Any, ...], ...] = ()
    error: str | None = None


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


def table_hash_md5(rows: Sequence[Sequence[Any]]) -> str | None:
    """AgentBench's table hash of ``rows`` (see module docstring), faithfully: values
    rendered as MySQL's CONCAT_WS does, NULLs (None) skipped as CONCAT_WS skips them, the
    sorted row hashes joined and cut at :data:`GROUP_CONCAT_MAX_LEN` bytes; None for no
    rows (MD5(GROUP_CONCAT(...)) over no rows is NULL). Not injective -- see module doc."""
    hashes = [hashlib.md5(",".join(mysql_str(v) for v in r if v is not None).encode("utf-8"))
              .hexdigest()[:5] for r in rows]
    if not hashes:
        return None
    joined = ",".join(sorted(hashes)).encode()[:GROUP_CONCAT_MAX_LEN]
    return hashlib.md5(joined).hexdigest()


def rows_from(columns: Sequence[str], raw_rows: Sequence[Sequence[Any]]) -> TableRows | None:
    """A table read back as :class:`TableRows` (values rendered as MySQL's CONCAT_WS does),
    or None past :data:`MAX_TABLE_CELLS` cells or :data:`MAX_TABLE_BYTES` bytes."""
    cells = nbytes = 0
    out = []
    for r in raw_rows:
        cells += len(r)
        row = tuple(None if v is None else mysql_str(v) for v in r)
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
    rows or the error, :meth:`table_hash` returns None when no hash can be computed.
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

    def execute(self, key: str, sql: str) -> StatementResult:
        """Run one model statement: its rows or its error (never raises for what the
        SQL does; how a skill shows it to the model is the skill's business)."""
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
            return self._run_reference(key, statements)
        finally:
            self.drop(key)

    def _run_reference(self, key: str, statements: Sequence[str]) -> Reference:
        """Run the gold ``statements`` (newlines joined to spaces, as AgentBench does) on the
        table of episode ``key`` and read back its hash and rows; statement errors are kept
        (first 200 characters each). Shared by every backend's :meth:`reference`."""
        errors = []
        for st in statements:
            res = self.execute(key, " ".join(str(st).split("\n")))
            if res.error is not None:
                errors.append(res.error[:200])
        return Reference(self.table_hash(key), self.table_rows(key), tuple(errors))

    def close(self) -> None:
        pass

    def __enter__(self) -> "SQLBackend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

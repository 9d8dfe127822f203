"""Per-sample outcome cache: (model fingerprint, skill key, sample id) -> score, on disk.

Re-scoring a model whose weights were already scored (an expert re-evaluated after a
resume, a child identical to its parent, the final aggregation re-checking elites) then
costs one SQLite query instead of generation and sandbox runs.

The store is one SQLite file (stdlib ``sqlite3``) in WAL mode, so several processes (local
workers, Ray actors on one host) can read and write it at once; each process and thread opens
its own connection lazily. Writes are single transactions (all samples of a call or none).

The ``skill`` key must change whenever anything that changes a sample's outcome changes
(prompt format, generation budget, stop strings, sandbox limits, test code): skills build
it from their configuration, e.g. :attr:`cycleqd.skills.coding.CodingSkill.cache_key`.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outcomes (
    fingerprint TEXT NOT NULL,
    skill       TEXT NOT NULL,
    sample_id   TEXT NOT NULL,
    score       REAL NOT NULL,
    detail      TEXT,
    created     REAL NOT NULL,
    PRIMARY KEY (fingerprint, skill, sample_id)
) WITHOUT ROWID;
"""
_CHUNK = 500  # bound variables per statement (SQLite's default limit is 999 / 32766)


class SampleCache:
    """Per-sample outcome store keyed by (fingerprint, skill, sample id).

    Args:
        path: SQLite file (created with its parent folders). ``":memory:"`` is refused:
            the cache must be shareable between processes.
        timeout_s: how long a writer waits for another process's lock (seconds).

    Example::

        cache = SampleCache(run_dir / "samples.sqlite")
        hits = cache.get_many(backend.fingerprint, skill.cache_key, ids)  # {id: score}
        cache.put_many(backend.fingerprint, skill.cache_key, {"mbpp/11": 1.0})

    Raises:
        ValueError: empty/in-memory path or a non-positive timeout.
    """

    def __init__(self, path: str | os.PathLike, *, timeout_s: float = 60.0) -> None:
        if str(path) in ("", ":memory:"):
            raise ValueError("SampleCache path must be a file path (not empty or ':memory:')")
        if not timeout_s > 0:
            raise ValueError(f"SampleCache timeout_s must be > 0, got {timeout_s!r}")
        self.path = Path(path)
        self.timeout_s = float(timeout_s)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._conn()  # create the schema now: a bad path fails here, not mid-run

    # one connection per (process, thread): sqlite3 connections survive neither fork nor threads
    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is not None and getattr(self._local, "pid", None) == os.getpid():
            return conn
        conn = sqlite3.connect(str(self.path), timeout=self.timeout_s, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute(_SCHEMA)
        self._local.conn, self._local.pid = conn, os.getpid()
        return conn

    @staticmethod
    def _check_key(fingerprint: str, skill: str) -> None:
        if not isinstance(fingerprint, str) or not fingerprint:
            raise ValueError(f"fingerprint must be a non-empty string, got {fingerprint!r}")
        if not isinstance(skill, str) or not skill:
            raise ValueError(f"skill must be a non-empty string, got {skill!r}")

    def get_many(self, fingerprint: str, skill: str, sample_ids: Iterable[str]) -> dict[str, float]:
        """Cached scores of the given samples; samples never stored are absent from the result.

        Returns:
            sample id -> score, only for hits.
        Raises:
            ValueError: empty fingerprint or skill key.
        """
        self._check_key(fingerprint, skill)
        ids = [str(i) for i in sample_ids]
        out: dict[str, float] = {}
        conn = self._conn()
        for s in range(0, len(ids), _CHUNK):
            part = ids[s:s + _CHUNK]
            q = ("SELECT sample_id, score FROM outcomes WHERE fingerprint=? AND skill=? "
                 f"AND sample_id IN ({','.join('?' * len(part))})")
            out.update((k, float(v)) for k, v in conn.execute(q, [fingerprint, skill, *part]))
        return out

    def get_details(self, fingerprint: str, skill: str, sample_ids: Iterable[str]) -> dict[str, Any]:
        """The JSON ``detail`` stored with each hit (e.g. the reply, the sandbox verdict)."""
        self._check_key(fingerprint, skill)
        ids = [str(i) for i in sample_ids]
        out: dict[str, Any] = {}
        conn = self._conn()
        for s in range(0, len(ids), _CHUNK):
            part = ids[s:s + _CHUNK]
            q = ("SELECT sample_id, detail FROM outcomes WHERE fingerprint=? AND skill=? "
                 f"AND sample_id IN ({','.join('?' * len(part))})")
            for k, d in conn.execute(q, [fingerprint, skill, *part]):
                out[k] = json.loads(d) if d is not None else None
        return out

    def put_many(self, fingerprint: str, skill: str, outcomes: Mapping[str, float],
                 details: Mapping[str, Any] | None = None) -> None:
        """Store (or overwrite) scores, in one transaction.

        Args:
            outcomes: sample id -> finite score.
            details: optional sample id -> JSON-serialisable detail.
        Raises:
            ValueError: empty keys, a non-finite score, or a detail that is not JSON
                (checked before anything is written).
        """
        self._check_key(fingerprint, skill)
        now = time.time()
        rows = []
        for sid, score in outcomes.items():
            score = float(score)
            if not math.isfinite(score):
                raise ValueError(f"put_many: score of sample {sid!r} is not finite: {score!r}")
            d = None
            if details is not None and sid in details:
                try:
                    d = json.dumps(details[sid])
                except (TypeError, ValueError) as e:
                    raise ValueError(f"put_many: detail of sample {sid!r} is not JSON: {e}") from e
            rows.append((fingerprint, skill, str(sid), score, d, now))
        if not rows:
            return
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany("INSERT OR REPLACE INTO outcomes VALUES (?,?,?,?,?,?)", rows)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def count(self, fingerprint: str | None = None, skill: str | None = None) -> int:
        """Number of stored outcomes, optionally for one fingerprint and/or skill key."""
        q, args = "SELECT COUNT(*) FROM outcomes WHERE 1=1", []
        if fingerprint is not None:
            q, args = q + " AND fingerprint=?", args + [fingerprint]
        if skill is not None:
            q, args = q + " AND skill=?", args + [skill]
        return int(self._conn().execute(q, args).fetchone()[0])

    def __len__(self) -> int:
        return self.count()

    def delete(self, fingerprint: str | None = None, skill: str | None = None) -> int:
        """Remove outcomes (all of them when both filters are None); returns rows removed."""
        q, args = "DELETE FROM outcomes WHERE 1=1", []
        if fingerprint is not None:
            q, args = q + " AND fingerprint=?", args + [fingerprint]
        if skill is not None:
            q, args = q + " AND skill=?", args + [skill]
        return int(self._conn().execute(q, args).rowcount)

    def close(self) -> None:
        """Close this thread's connection (others close when their thread/process ends)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def __enter__(self) -> SampleCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict:  # picklable for Ray / multiprocessing: reopen on arrival
        return {"path": str(self.path), "timeout_s": self.timeout_s}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], timeout_s=state["timeout_s"])

"""Per-sample outcome cache keyed by the content of everything that produced an outcome.

A row is ``(model key, skill key, item key) -> score``:

* **model key** (:func:`model_key`): the fingerprint of the weights actually evaluated
  (:func:`cycleqd.inference.fingerprint.fingerprint_state_dict`, a hash of every tensor's
  bytes -- seeds *and* children) joined with :func:`backend_key`, the digest of how the
  backend turns weights into replies (parameter dtype, device type, model config, tokenizer,
  chat template, engine).
* **skill key** (the skill's ``cache_key``): prompt template, system prompt, decoding
  budget and stop strings, judge settings (sandbox limits, tolerances, timeouts) and the
  evaluator's code version -- every skill setting that can change an outcome.
* **item key** (:func:`item_key`): a BLAKE2b digest of a canonical JSON of the whole item
  (its id, prompt fields, tests / tables / scripts / gold answers), never its position in a
  file. The same id in another file, or an item edited in place, is another item.

Change any one of them and the lookup misses (``tests/skills/test_cache_keys.py``); an
outcome is reused only when the same weights, run the same way, saw the same item under the
same prompt, decoding and judge. Re-scoring such a model (an expert re-evaluated on resume
or in a later run, a child byte-identical to an earlier one, the final aggregation) then
costs one SQLite query instead of generation and sandbox runs. Design notes: ``docs/cache.md``.

The store is one SQLite file (stdlib ``sqlite3``) in WAL mode, so several processes (local
workers, Ray actors on one host) can read and write it at once; each process and thread opens
its own connection lazily. Writes are single transactions (all samples of a call or none).
Rows of older schemas (table ``outcomes``, keyed by positional sample ids) are never read.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import math
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Iterable, Mapping
from pathlib import PurePath
from typing import Any

#: bump when the meaning of a key changes; rows of other versions live in other tables and
#: are never read (old caches are ignored, not migrated: their ids were positional)
SCHEMA_VERSION = 2
_TABLE = f"outcomes_v{SCHEMA_VERSION}"
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {_TABLE} (
    model       TEXT NOT NULL,
    skill       TEXT NOT NULL,
    item        TEXT NOT NULL,
    sample_id   TEXT NOT NULL,
    score       REAL NOT NULL,
    detail      TEXT,
    created     REAL NOT NULL,
    PRIMARY KEY (model, skill, item)
) WITHOUT ROWID;
"""
_CHUNK = 400  # bound variables per statement (SQLite's default limit is 999 / 32766)


# ----------------------------------------------------------------------------- keys


def canonical(obj: Any) -> Any:
    """A JSON-able canonical form of an item: dataclasses become ``{"__type__": name,
    field: value...}``, mappings sorted ``[key, value]`` pairs (string keys: a plain
    object), tuples/lists/sets lists (sets sorted), bytes ``{"__bytes__": hex}``, floats
    ``{"__float__": repr}`` (so ``1`` and ``1.0``, ``nan`` and ``"nan"`` stay apart), enums
    their value, numpy scalars/arrays their dtype, shape and values.

    Raises:
        TypeError: a value with no exact canonical form (a path -- read the file and put
            its text in the item --, an arbitrary object), naming its type.
    """
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return obj
    if isinstance(obj, float):
        return {"__float__": repr(obj)}
    if isinstance(obj, enum.Enum):
        return {"__enum__": type(obj).__qualname__, "value": canonical(obj.value)}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out: dict[str, Any] = {"__type__": type(obj).__qualname__}
        for f in dataclasses.fields(obj):
            out[f.name] = canonical(getattr(obj, f.name))
        return out
    if isinstance(obj, Mapping):
        pairs = [(canonical(k), canonical(v)) for k, v in obj.items()]
        if all(isinstance(k, str) for k, _ in pairs):
            return {"__map__": sorted([k, v] for k, v in pairs)}
        return {"__map__": sorted(([k, v] for k, v in pairs),
                                  key=lambda kv: json.dumps(kv[0], sort_keys=True))}
    if isinstance(obj, (list, tuple)):
        return [canonical(x) for x in obj]
    if isinstance(obj, (set, frozenset)):
        return {"__set__": sorted((canonical(x) for x in obj),
                                  key=lambda x: json.dumps(x, sort_keys=True))}
    if isinstance(obj, (bytes, bytearray)):
        return {"__bytes__": bytes(obj).hex()}
    if isinstance(obj, PurePath):
        raise TypeError(f"cannot key a path ({obj}) by content: put the file's text in the item")
    mod = type(obj).__module__
    if mod == "numpy" or mod.startswith("numpy."):
        import numpy as np
        if isinstance(obj, np.generic):
            return canonical(obj.item())
        if isinstance(obj, np.ndarray):
            if obj.dtype == object:
                return [canonical(x) for x in obj.tolist()]
            return {"__ndarray__": str(obj.dtype), "shape": list(obj.shape),
                    "data": np.ascontiguousarray(obj).tobytes().hex()}
    raise TypeError(f"cannot key a {type(obj).__module__}.{type(obj).__qualname__} by content")


def content_hash(obj: Any, *, prefix: str = "", digest_size: int = 16) -> str:
    """``prefix`` + BLAKE2b hex digest of the canonical JSON of ``obj`` (:func:`canonical`).

    Raises:
        TypeError: ``obj`` holds a value with no canonical form (see :func:`canonical`).
    """
    text = json.dumps(canonical(obj), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return prefix + hashlib.blake2b(text.encode("utf-8"), digest_size=digest_size).hexdigest()


def item_key(item: Any) -> str:
    """The cache key of one evaluation item: a digest of ALL its content.

    Every field is hashed, the id included (it is content too: DB-Bench names the episode's
    database after it, and server error messages that reach the model quote that name), so
    an item is reused only where it is the very same item -- never because another file has
    an item at the same position or with the same id.

    Args:
        item: a dataclass (``CodeProblem``, ``DBItem``, ``OSItem``...), a mapping (an
            lm-eval document) or any value :func:`canonical` accepts.
    Returns:
        ``"i-"`` + 32 hex digits.
    Raises:
        TypeError: the item holds a value with no canonical form (named).
    """
    return content_hash(item, prefix="i-")


def item_keys(items: Iterable[Any], *, id_attr: str = "id") -> dict[str, str]:
    """``{item.<id_attr>: item_key(item)}`` for a list of items.

    Raises:
        ValueError: two different items share an id (outcomes are reported by id, so the
            second would silently overwrite the first).
    """
    out: dict[str, str] = {}
    for it in items:
        sid, key = str(getattr(it, id_attr)), item_key(it)
        if out.get(sid, key) != key:
            raise ValueError(f"two different items share the id {sid!r}")
        out[sid] = key
    return out


# backend digests whose expensive part (the tokenizer) is computed once per tokenizer object
_TOKENIZER_DIGESTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_TOKENIZER_DIGESTS_LOCK = threading.Lock()


def _tokenizer_digest(tok: Any) -> str:
    try:
        with _TOKENIZER_DIGESTS_LOCK:
            hit = _TOKENIZER_DIGESTS.get(tok)
    except TypeError:  # not weak-referenceable
        hit = None
    if hit is not None:
        return hit
    h = hashlib.blake2b(digest_size=12)
    h.update(type(tok).__qualname__.encode())
    fast = getattr(tok, "backend_tokenizer", None)
    if fast is not None and callable(getattr(fast, "to_str", None)):
        h.update(fast.to_str().encode())  # vocabulary, merges, normaliser, pre-tokeniser
    elif callable(getattr(tok, "get_vocab", None)):
        h.update(json.dumps(sorted(tok.get_vocab().items())).encode())
    for name in ("special_tokens_map", "chat_template", "padding_side"):
        v = getattr(tok, name, None)
        h.update(json.dumps([name, v], sort_keys=True, default=str).encode())
    d = h.hexdigest()
    try:
        with _TOKENIZER_DIGESTS_LOCK:
            _TOKENIZER_DIGESTS[tok] = d
    except TypeError:
        pass
    return d


def _jsonable(v: Any) -> Any:
    try:
        json.dumps(v)
        return v
    except (TypeError, ValueError):
        return str(v)


def backend_key(model: Any) -> str:
    """Digest of how ``model`` turns weights into outcomes, beyond the weights themselves.

    * an object with a ``cache_identity`` attribute (string, or a method returning one)
      defines its own;
    * a Hugging Face backend (``.model`` an ``nn.Module`` and ``.tokenizer``, as
      :class:`~cycleqd.inference.hf.HFBackend`): the parameters' dtype, the device type
      (``cpu``/``cuda``: kernels differ), the model config (minus private/path fields), the
      tokenizer (its full ``tokenizer.json``, special tokens), the chat template in use, the
      EOS ids and the decoding engine;
    * a vLLM backend (``.llm``): the engine's model config dtype/seed, its tokenizer and the
      chat template;
    * anything else: its class and whichever of ``dtype``, ``chat_template``,
      ``temperature``, ``top_p``, ``top_k``, ``seed``, ``engine`` it has.

    Batch size and batch composition are not part of it: they change a greedy reply only in
    rare near-ties (``benchmarks/eval_bench.py`` measures this), like the order of a batch.

    Returns:
        ``"b-"`` + 24 hex digits.
    """
    ident = getattr(model, "cache_identity", None)
    if ident is not None:
        ident = ident() if callable(ident) else ident
        return content_hash(["custom", str(ident)], prefix="b-", digest_size=12)
    desc: dict[str, Any] = {"class": f"{type(model).__module__}.{type(model).__qualname__}"}
    net, tok, llm = getattr(model, "model", None), getattr(model, "tokenizer", None), getattr(model, "llm", None)
    try:
        import torch
        is_module = isinstance(net, torch.nn.Module)
    except ImportError:  # pragma: no cover - torch is a dependency
        is_module = False
    if is_module and tok is not None:
        p = next(net.parameters(), None)
        desc["dtype"] = sorted({str(q.dtype) for q in net.parameters()})
        dev = getattr(model, "device", None) or (p.device if p is not None else None)
        desc["device"] = getattr(dev, "type", str(dev))
        cfg = getattr(net, "config", None)
        if cfg is not None and callable(getattr(cfg, "to_dict", None)):
            d = cfg.to_dict()
            desc["config"] = {k: _jsonable(v) for k, v in d.items()
                              if not k.startswith("_") and k not in
                              ("transformers_version", "torch_dtype", "dtype", "name_or_path")}
            desc["attn"] = str(getattr(cfg, "_attn_implementation", None))
        desc["tokenizer"] = _tokenizer_digest(tok)
        desc["chat_template"] = getattr(tok, "chat_template", None)
        desc["eos"] = _jsonable(getattr(model, "_eos_ids", None))
        desc["engine"] = _jsonable(getattr(model, "engine", None))
    elif llm is not None:
        mc = getattr(getattr(llm, "llm_engine", None), "model_config", None)
        desc["dtype"] = str(getattr(mc, "dtype", None))
        desc["seed"] = _jsonable(getattr(mc, "seed", None))
        desc["chat_template"] = getattr(model, "chat_template", None)
        get_tok = getattr(llm, "get_tokenizer", None)
        if callable(get_tok):
            try:
                desc["tokenizer"] = _tokenizer_digest(get_tok())
            except Exception as e:  # noqa: BLE001 - a stand-in engine without a tokenizer
                desc["tokenizer"] = f"unavailable: {type(e).__name__}"
    else:
        for name in ("dtype", "chat_template", "temperature", "top_p", "top_k", "seed", "engine"):
            if hasattr(model, name):
                desc[name] = _jsonable(getattr(model, name))
    return "b-" + hashlib.blake2b(json.dumps(desc, sort_keys=True, default=str).encode(),
                                  digest_size=12).hexdigest()


def model_key(model: Any) -> str | None:
    """The cache key of a bound model: ``"<weights fingerprint>@<backend_key>"``, or None
    when the model has no ``fingerprint`` (then nothing is cached).

    The fingerprint must identify the weights by content: the engine passes
    :func:`~cycleqd.inference.fingerprint.fingerprint_state_dict` of every model it binds
    (seeds and children, :func:`cycleqd.engine.step.score_child`).
    """
    fp = getattr(model, "fingerprint", None)
    if not isinstance(fp, str) or not fp:
        return None
    return f"{fp}@{backend_key(model)}"


# ----------------------------------------------------------------------------- store


def _check_items(what: str, items: Any) -> dict[str, str]:
    if not isinstance(items, Mapping):
        raise TypeError(f"SampleCache.{what}: items must map sample id -> item_key(item) "
                        f"(got {type(items).__name__}); outcomes are keyed by item content, "
                        "a bare id would let one data file's outcomes answer another's")
    out = {}
    for sid, key in items.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"SampleCache.{what}: item key of {sid!r} must be a non-empty "
                             f"string, got {key!r}")
        out[str(sid)] = key
    return out


class SampleCache:
    """Per-sample outcome store keyed by (model key, skill key, item key).

    Args:
        path: SQLite file (created with its parent folders). ``":memory:"`` is refused:
            the cache must be shareable between processes.
        timeout_s: how long a writer waits for another process's lock (seconds).

    Example::

        cache = SampleCache(run_dir / "samples.sqlite")
        keys = item_keys(skill.problems)                      # {sample id: item key}
        mk = model_key(backend)                               # weights + backend
        hits = cache.get_many(mk, skill.cache_key, keys)      # {sample id: score}
        cache.put_many(mk, skill.cache_key, {"mbpp/11": 1.0}, items=keys)

    Raises:
        ValueError: empty/in-memory path or a non-positive timeout.
    """

    def __init__(self, path: str | os.PathLike, *, timeout_s: float = 60.0) -> None:
        from pathlib import Path

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
    def _check_key(model: str, skill: str) -> None:
        if not isinstance(model, str) or not model:
            raise ValueError(f"model key must be a non-empty string, got {model!r}")
        if not isinstance(skill, str) or not skill:
            raise ValueError(f"skill key must be a non-empty string, got {skill!r}")

    def _select(self, column: str, model: str, skill: str, items: dict[str, str]):
        by_key: dict[str, list[str]] = {}
        for sid, key in items.items():
            by_key.setdefault(key, []).append(sid)
        keys = list(by_key)
        conn = self._conn()
        for s in range(0, len(keys), _CHUNK):
            part = keys[s:s + _CHUNK]
            q = (f"SELECT item, {column} FROM {_TABLE} WHERE model=? AND skill=? "
                 f"AND item IN ({','.join('?' * len(part))})")
            for key, v in conn.execute(q, [model, skill, *part]):
                for sid in by_key[key]:
                    yield sid, v

    def get_many(self, model: str, skill: str, items: Mapping[str, str]) -> dict[str, float]:
        """Cached scores of the given items; items never stored are absent from the result.

        Args:
            model: :func:`model_key` of the evaluated model.
            skill: the skill's ``cache_key``.
            items: sample id -> :func:`item_key` of that sample's item.
        Returns:
            sample id -> score, only for hits.
        Raises:
            TypeError: ``items`` is not a mapping (a bare list of ids).
            ValueError: empty model or skill key, or an empty item key.
        """
        self._check_key(model, skill)
        return {sid: float(v) for sid, v in self._select("score", model, skill,
                                                         _check_items("get_many", items))}

    def get_details(self, model: str, skill: str, items: Mapping[str, str]) -> dict[str, Any]:
        """The JSON ``detail`` stored with each hit (e.g. the reply, the sandbox verdict)."""
        self._check_key(model, skill)
        return {sid: (json.loads(d) if d is not None else None)
                for sid, d in self._select("detail", model, skill, _check_items("get_details", items))}

    def put_many(self, model: str, skill: str, outcomes: Mapping[str, float],
                 details: Mapping[str, Any] | None = None, *, items: Mapping[str, str]) -> None:
        """Store (or overwrite) scores, in one transaction.

        Args:
            model, skill: as in :meth:`get_many`.
            outcomes: sample id -> finite score.
            details: optional sample id -> JSON-serialisable detail.
            items: sample id -> :func:`item_key`; every id of ``outcomes`` must be there.
        Raises:
            TypeError: ``items`` is not a mapping.
            ValueError: empty keys, an outcome without an item key, a non-finite score, or
                a detail that is not JSON (checked before anything is written).
        """
        self._check_key(model, skill)
        keys = _check_items("put_many", items)
        now = time.time()
        rows = []
        for sid, score in outcomes.items():
            sid = str(sid)
            if sid not in keys:
                raise ValueError(f"put_many: no item key for sample {sid!r}")
            score = float(score)
            if not math.isfinite(score):
                raise ValueError(f"put_many: score of sample {sid!r} is not finite: {score!r}")
            d = None
            if details is not None and sid in details:
                try:
                    d = json.dumps(details[sid])
                except (TypeError, ValueError) as e:
                    raise ValueError(f"put_many: detail of sample {sid!r} is not JSON: {e}") from e
            rows.append((model, skill, keys[sid], sid, score, d, now))
        if not rows:
            return
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(f"INSERT OR REPLACE INTO {_TABLE} VALUES (?,?,?,?,?,?,?)", rows)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def _where(self, model: str | None, skill: str | None) -> tuple[str, list[str]]:
        q, args = " WHERE 1=1", []
        if model is not None:
            q, args = q + " AND model=?", args + [model]
        if skill is not None:
            q, args = q + " AND skill=?", args + [skill]
        return q, args

    def count(self, model: str | None = None, skill: str | None = None) -> int:
        """Number of stored outcomes, optionally for one model key and/or skill key."""
        q, args = self._where(model, skill)
        return int(self._conn().execute(f"SELECT COUNT(*) FROM {_TABLE}" + q, args).fetchone()[0])

    def __len__(self) -> int:
        return self.count()

    def delete(self, model: str | None = None, skill: str | None = None) -> int:
        """Remove outcomes (all of them when both filters are None); returns rows removed."""
        q, args = self._where(model, skill)
        return int(self._conn().execute(f"DELETE FROM {_TABLE}" + q, args).rowcount)

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


__all__ = ["SCHEMA_VERSION", "SampleCache", "backend_key", "canonical", "content_hash",
           "item_key", "item_keys", "model_key"]

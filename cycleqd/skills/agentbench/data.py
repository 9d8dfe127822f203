"""AgentBench DB-Bench and OS-interaction data: loaders and fixed seeded splits (the
episode runner both agent skills share is :mod:`cycleqd.skills.agentbench.episode`).

Sources (THUDM/AgentBench, Apache-2.0)
- DB-Bench: ``<data_dir>/dbbench/standard.jsonl`` (300 items: 100 INSERT, 100 UPDATE, 100
  SELECT-type in 8 sub-types).
- OS interaction: ``<data_dir>/os_interaction/training.json`` (1000 items) and
  ``dev.json`` (26 items). Scripts some dev items reference by file (``check/0.sh``, ``init/stock-log.sh``...)
  live under ``data/os_interaction/scripts/`` of the same repository: pass that folder as
  ``script_dir`` to evaluate those items (without it they are left out, with a warning).
``<data_dir>`` is :func:`cycleqd.paths.data_dir`; ``cycleqd data fetch dbbench os`` downloads
the public files there (pinned commits, SHA-256: :data:`cycleqd.datasets.CATALOGUE`).

Splits (fixed in code; identical on every machine; ``train`` never overlaps
``search``/``test``)
- DB-Bench: within each of the 10 ``type`` values, items are permuted with
  ``numpy.random.default_rng(DB_SPLIT_SEED)`` and dealt round-robin to ``train``,
  ``search``, ``test`` (stratified by type): 100 / 100 / 100 items; ``validation`` (chooses
  the final model, never reported) takes every other ``train`` item of each type (50 items,
  stratified by type too), ``train`` keeps the other 50.
- OS: ``training.json`` permuted with ``default_rng(OS_SPLIT_SEED)``: the first 100 are
  ``search``, the next 100 ``test``, the next 100 ``validation``, the remaining 700
  ``train``.
  ``search`` and ``test`` are the same ids as before ``validation`` existed (cached results
  and reported numbers stay comparable); ``validation`` was carved out of ``train``. ``dev`` is the 26 dev
  items (an extra evaluation set, never trained on). ``all`` = every item of the file.
Order within a split is fixed too: DB-Bench interleaves SELECT / INSERT / UPDATE items
(so any prefix is balanced), OS follows the seeded permutation (a prefix is a random
sample); ``limit`` keeps the first ``limit``. ``all`` is in file order.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from cycleqd.sandbox.sql import TableSpec
from cycleqd.datasets import locate

DB_SPLIT_SEED = 2410_14735_1
OS_SPLIT_SEED = 2410_14735_2
DB_SPLITS = ("train", "search", "validation", "test", "all")
OS_SPLITS = ("train", "search", "validation", "test", "dev", "all")
OS_SCRIPTS_URL = "https://github.com/THUDM/AgentBench/tree/main/data/os_interaction/scripts/"


# ----------------------------------------------------------------------------- files


def _find(rel: str, data_path: str | os.PathLike | None, what: str) -> Path:
    """``data_path`` (a file, or a folder holding ``rel`` or its name), else the data dir's
    ``rel``. Raises FileNotFoundError naming where it looked; for the data dir a
    :class:`cycleqd.datasets.DataMissingError` naming the ``cycleqd data fetch`` command."""
    if data_path is None:
        return locate(rel)
    p = Path(data_path)
    cands = [p] if p.is_file() else [p / rel, p / Path(rel).name]
    for c in cands:
        if c.is_file():
            return c
    raise FileNotFoundError(f"{what} not found (looked in: {', '.join(map(str, cands))}); point data_path "
                            f"at it, or leave it unset to use the data dir (`cycleqd data fetch`)")


def _check_split(split: str, allowed: Sequence[str]) -> None:
    if split not in allowed:
        raise ValueError(f"split must be one of {list(allowed)}, got {split!r}")


def _check_limit(limit: int | None) -> None:
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")


def check_source(kind: str, data_path: str | os.PathLike | None, split: str, limit: int | None) -> None:
    """The checks :func:`load_dbbench` (``kind="dbbench"``) / :func:`load_os` (``"os"``) make
    before reading: split, limit, and a set ``data_path`` resolving to a file of the expected
    kind (``.jsonl`` / ``.json``); its content is parsed only when the skill is built.
    Used by the skills' registry checkers (``cycleqd validate``). Raises ValueError."""
    _check_split(split, DB_SPLITS if kind == "dbbench" else OS_SPLITS)
    _check_limit(limit)
    if data_path is None:
        return
    rel = "dbbench/standard.jsonl" if kind == "dbbench" else \
        ("os_interaction/dev.json" if split == "dev" else "os_interaction/training.json")
    _check_data_path(data_path, rel)


def _check_data_path(data_path: str | os.PathLike, rel: str) -> None:
    """A ``data_path`` must resolve (by the loaders' own lookup) to a file of ``rel``'s kind
    or a folder holding ``rel``; its content is read only when the skill is built.
    Raises ValueError (``data_path: ...``)."""
    try:
        found = _find(rel, data_path, rel)
    except FileNotFoundError as e:
        raise ValueError(f"data_path: {e}") from None
    if found.suffix != Path(rel).suffix:
        raise ValueError(f"data_path: {str(data_path)!r} is not a {Path(rel).suffix} file nor a folder holding {rel} "
                         "(its content is read when the run builds the skill)")


# ----------------------------------------------------------------------------- DB-Bench


@dataclass(frozen=True)
class DBItem:
    """One DB-Bench item.

    Attributes:
        id: ``"dbbench/<line index>"``.
        type: ``INSERT`` | ``UPDATE`` | ``DELETE`` | a SELECT sub-type (``counting``,
            ``aggregation-SUM``...).
        description: the question; add_description: the table's name and headers.
        table: the table the episode starts from. It may be one no MySQL server can
            build (``table.problem()`` says why, e.g. a column with an empty name): such
            an item still loads, and its episode is one failed sample.
        label: gold answer of SELECT-type items (list); gold statements of INSERT/UPDATE.
        answer_md5: hex MD5 table hash after the gold change (INSERT/UPDATE/DELETE), else None.
        sql: the dataset's own ``sql.query`` when present (written for SQLite; often not
            runnable as is -- the gold answer is ``label``).
    """

    id: str
    type: str
    description: str
    add_description: str
    table: TableSpec
    label: tuple[Any, ...]
    answer_md5: str | None
    sql: str | None = None

    @property
    def category(self) -> str:
        """``SELECT`` | ``INSERT`` | ``UPDATE`` | ``DELETE`` (AgentBench's three+1 groups)."""
        return self.type if self.is_modification else "SELECT"

    @property
    def is_modification(self) -> bool:
        return self.type in ("INSERT", "UPDATE", "DELETE")


def _db_item(i: int, e: dict) -> DBItem:
    from cycleqd.sandbox.sql import extract_md5

    try:
        t = e["table"]
        spec = TableSpec(str(t["table_name"]),
                         tuple(str(c["name"]) for c in t["table_info"]["columns"]),
                         tuple(tuple(r) for r in t["table_info"]["rows"]))
        typ = e["type"][0] if isinstance(e["type"], list) else str(e["type"])
        md5 = extract_md5(e["answer_md5"]) if e.get("answer_md5") else None
        if typ in ("INSERT", "UPDATE", "DELETE") and md5 is None:
            raise ValueError("modification item without answer_md5")
        sql = e.get("sql")
        return DBItem(f"dbbench/{i}", typ, str(e["description"]), str(e.get("add_description", "")),
                      spec, tuple(e.get("label") or ()), md5,
                      sql.get("query") if isinstance(sql, dict) else None)
    except (KeyError, TypeError, IndexError, ValueError) as ex:
        raise ValueError(f"DB-Bench item {i}: malformed ({ex})") from ex


def load_dbbench_all(data_path: str | os.PathLike | None = None) -> list[DBItem]:
    """Every DB-Bench item of the file, in file order. Raises FileNotFoundError/ValueError."""
    path = _find("dbbench/standard.jsonl", data_path, "DB-Bench standard.jsonl")
    text = path.read_text(encoding="utf-8").strip()
    rows = json.loads(text) if text.startswith("[") else [json.loads(x) for x in text.splitlines()
                                                          if x.strip()]
    return [_db_item(i, e) for i, e in enumerate(rows)]


def dbbench_split_ids(items: Sequence[DBItem]) -> dict[str, list[str]]:
    """The fixed stratified split: split name -> item ids (see module docstring)."""
    rng = np.random.default_rng(DB_SPLIT_SEED)
    out: dict[str, list[str]] = {"train": [], "search": [], "test": []}
    names = ("train", "search", "test")
    by_type: dict[str, list[str]] = {}
    for it in items:
        by_type.setdefault(it.type, []).append(it.id)
    offset = 0
    rank: dict[str, int] = {}
    for typ in sorted(by_type):
        ids = by_type[typ]
        perm = rng.permutation(len(ids))
        for j, k in enumerate(perm):
            out[names[(j + offset) % 3]].append(ids[int(k)])
            rank[ids[int(k)]] = j
        offset += len(ids)  # rotate where each type's remainder lands: sizes stay balanced
    # validation: carved from train, type by type, alternately (the same rotation keeps the
    # sizes balanced); search and test are untouched
    train, out["train"], out["validation"] = out["train"], [], []
    turn = 0
    for typ in sorted(by_type):
        mine = [i for i in train if i in set(by_type[typ])]
        for j, i in enumerate(sorted(mine, key=rank.__getitem__)):
            out[("validation", "train")[(j + turn) % 2]].append(i)
        turn += len(mine)
    # order inside a split: interleave the three categories (SELECT/INSERT/UPDATE), so
    # that any prefix (``limit``) holds about a third of each
    by_id = {it.id: it for it in items}
    cat_order = {"SELECT": 0, "INSERT": 1, "UPDATE": 2, "DELETE": 3}
    for name in names + ("validation",):
        per_cat: dict[str, list[str]] = {}
        for i in sorted(out[name], key=lambda i: (rank[i], by_id[i].type)):
            per_cat.setdefault(by_id[i].category, []).append(i)
        cats = sorted(per_cat, key=lambda c: cat_order.get(c, 9))
        inter: list[str] = []
        for j in range(max(len(v) for v in per_cat.values())):
            inter += [per_cat[c][j] for c in cats if j < len(per_cat[c])]
        out[name] = inter
    return out


def load_dbbench(data_path: str | os.PathLike | None = None, split: str = "search",
                 limit: int | None = None) -> list[DBItem]:
    """DB-Bench items of one split (``train`` | ``search`` | ``validation`` | ``test`` | ``all``)."""
    _check_split(split, DB_SPLITS)
    _check_limit(limit)
    items = load_dbbench_all(data_path)
    if split != "all":
        by_id = {it.id: it for it in items}
        items = [by_id[i] for i in dbbench_split_ids(items)[split]]
    return items[:limit] if limit else items


# ----------------------------------------------------------------------------- OS


@dataclass(frozen=True)
class Script:
    """A script of an OS task: ``language`` is ``bash`` | ``python`` | ``checker``
    (``code`` is then a named checker: integer-match, string-match, size-match,
    containing, in)."""

    language: str
    code: str


NAMED_CHECKERS = ("integer-match", "string-match", "size-match", "containing", "in")


@dataclass(frozen=True)
class OSItem:
    """One OS-interaction task.

    Attributes:
        id: ``"os/<file stem>/<index>"``.
        description: the task as the agent sees it.
        init: scripts that prepare the machine (each run independently, in order).
        start: a background process started after init, or None.
        match: {"answer": str} | {"regex": str}, with "strip": bool -- or None.
        check: the check chain (None entries stand for ``example``) -- or None.
        example: the reference command whose output is passed to checkers.
    """

    id: str
    description: str
    init: tuple[Script, ...] = ()
    start: Script | None = None
    match: dict | None = None
    check: tuple[Script | None, ...] | None = None
    example: Script | None = None
    labels: tuple[str, ...] = field(default_factory=tuple)


class _MissingScript(Exception):
    pass


def _script(obj: Any, script_dir: Path | None) -> Script | None:
    if obj is None:
        return None
    if isinstance(obj, str):
        return Script("bash", obj)
    if not isinstance(obj, dict):
        raise ValueError(f"script must be a str, an object or null, got {type(obj).__name__}")
    lang = str(obj.get("language", "bash"))
    if "file" in obj:
        stem = Path(str(obj["file"])).stem
        if stem in NAMED_CHECKERS:
            return Script("checker", stem)
        if script_dir is None or not (script_dir / str(obj["file"])).is_file():
            raise _MissingScript(str(obj["file"]))
        return Script(lang, (script_dir / str(obj["file"])).read_text(encoding="utf-8"))
    if "code" in obj:
        return Script(lang, str(obj["code"]))
    raise ValueError("script object needs 'file' or 'code'")


def _os_item(iid: str, e: dict, script_dir: Path | None) -> OSItem:
    create = e.get("create")
    init: list[Script] = []
    if isinstance(create, dict) and create.get("init") is not None:
        raw = create["init"] if isinstance(create["init"], list) else [create["init"]]
        init = [s for s in (_script(x, script_dir) for x in raw) if s is not None]
    start = _script(e["start"], script_dir) if e.get("start") is not None else None
    ev = e.get("evaluation") or {}
    match = check = example = None
    if "match" in ev:
        m = ev["match"]
        match = {"answer": m, "strip": True} if isinstance(m, str) else dict(m)
        if not ({"answer", "regex"} & set(match)):
            raise ValueError("evaluation.match needs 'answer' or 'regex'")
        match.setdefault("strip", True)
    elif "check" in ev:
        raw = ev["check"] if isinstance(ev["check"], list) else [ev["check"]]
        check = tuple(_script(x, script_dir) for x in raw)
        example = _script(ev.get("example"), script_dir)
        if any(c is None for c in check) and example is None:
            raise ValueError("check chain uses the example (null) but there is no example")
    else:
        raise ValueError("evaluation needs 'match' or 'check'")
    return OSItem(iid, str(e["description"]), tuple(init), start, match, check, example,
                  tuple(e.get("labels") or ()))


def load_os_file(path: Path, script_dir: Path | None = None) -> list[OSItem]:
    """All usable items of one OS-interaction JSON file. Items referring to script files
    that are not in ``script_dir`` are left out with a warning."""
    raw = json.loads(path.read_text(encoding="utf-8"))
    raw = raw if isinstance(raw, list) else [raw]
    out: list[OSItem] = []
    missing: list[str] = []
    for i, e in enumerate(raw):
        iid = f"os/{path.stem}/{i}"
        try:
            out.append(_os_item(iid, e, script_dir))
        except _MissingScript as m:
            missing.append(f"{iid} ({m})")
        except (KeyError, TypeError, ValueError) as ex:
            raise ValueError(f"OS item {iid}: malformed ({ex})") from ex
    if missing:
        warnings.warn(f"{path.name}: {len(missing)} item(s) left out, their script files are not "
                      f"available (pass script_dir, from {OS_SCRIPTS_URL}): {', '.join(missing)}",
                      stacklevel=3)
    return out


def os_split_ids(items: Sequence[OSItem]) -> dict[str, list[str]]:
    """The fixed split of ``training.json`` items: split name -> ids."""
    perm = np.random.default_rng(OS_SPLIT_SEED).permutation(len(items))
    ids = [items[int(k)].id for k in perm]
    return {"search": ids[:100], "test": ids[100:200], "validation": ids[200:300], "train": ids[300:]}


def load_os(data_path: str | os.PathLike | None = None, split: str = "search",
            limit: int | None = None, *, script_dir: str | os.PathLike | None = None) -> list[OSItem]:
    """OS-interaction items of one split (``train`` | ``search`` | ``validation`` | ``test`` | ``dev`` |
    ``all``). ``data_path``: a folder holding ``os_interaction/`` (or the JSON files), or
    the JSON file itself."""
    _check_split(split, OS_SPLITS)
    _check_limit(limit)
    sd = Path(script_dir) if script_dir is not None else None
    if split == "dev":
        path = _find("os_interaction/dev.json", data_path, "OS dev.json")
        items = load_os_file(path, sd)
    else:
        path = _find("os_interaction/training.json", data_path, "OS training.json")
        items = load_os_file(path, sd)
        if split != "all":
            by_id = {it.id: it for it in items}
            items = [by_id[i] for i in os_split_ids(items)[split]]
    return items[:limit] if limit else items


# ----------------------------------------------------------------------------- official sets

#: The official CycleQD protocol's files (``cycleqd data fetch official-db official-os
#: official-ids``; ``../shared/data/README.md`` § "The official CycleQD protocol's data").
OFFICIAL_DB_FILE = "cycleqd-official/dbbench_standard_dev.jsonl"
OFFICIAL_OS_FILE = "cycleqd-official/os_search_samples.json"
OFFICIAL_IDS_FILE = "cycleqd-official/search_ids.json"


def _official_ids(data_path: str | os.PathLike | None, key: str, beside: Path) -> list[int]:
    """The official search ids ``key`` of ``search_ids.json``: next to ``beside`` (the data
    file found), else through ``data_path`` / the data dir."""
    p = beside.parent / Path(OFFICIAL_IDS_FILE).name
    if not p.is_file():
        p = _find(OFFICIAL_IDS_FILE, data_path if data_path is None or Path(data_path).is_dir() else None,
                  "official search_ids.json")
    ids = json.loads(p.read_text(encoding="utf-8")).get(key)
    if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
        raise ValueError(f"{p}: {key!r} must be a list of ints")
    return ids


def load_dbbench_official(data_path: str | os.PathLike | None = None,
                          limit: int | None = None) -> list[DBItem]:
    """The official CycleQD DB-Bench search set: the 341 rows of
    ``dbbench_standard_dev.jsonl`` (standard rows 0-299 then AgentBench's 60 dev rows) listed
    in ``search_ids.json["agentbench_db"]`` (official ``tasks/agentbench_db.py``), in that
    order; ids ``dbbench/<row>`` (rows 0-299 are ``standard.jsonl``'s rows, same order).
    The dev rows have the same fields as the standard ones (SELECT rows carry ``sql``,
    modification rows ``answer_md5``). ``data_path``: the jsonl file or a folder holding
    ``cycleqd-official/`` (default: the data dir).

    Raises:
        FileNotFoundError / DataMissingError: a file is missing; ValueError: malformed data
        or an id outside the file.
    """
    _check_limit(limit)
    path = _find(OFFICIAL_DB_FILE, data_path, "official DB-Bench dbbench_standard_dev.jsonl")
    rows = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    ids = _official_ids(data_path, "agentbench_db", path)
    if any(not 0 <= i < len(rows) for i in ids):
        raise ValueError(f"{OFFICIAL_IDS_FILE}: an agentbench_db id is outside the {len(rows)} rows")
    items = [_db_item(i, rows[i]) for i in ids]
    return items[:limit] if limit else items


def _official_script(obj: Any, what: str) -> Script | None:
    """``[language, code]`` (the official samples' form) -> Script; None stays None."""
    if obj is None:
        return None
    if (isinstance(obj, list) and len(obj) == 2 and obj[0] in ("bash", "python")
            and isinstance(obj[1], str)):
        return Script(obj[0], obj[1])
    raise ValueError(f"{what} must be [\"bash\"|\"python\", code] or null, got {str(obj)[:80]}")


def _official_os_item(s: dict) -> OSItem:
    """One official OS search sample -> :class:`OSItem` (id ``os-official/<index>``): the
    sample's ``config.config`` -- ``init_script`` (each run on its own), ``start``,
    ``match`` or ``check`` (named checkers are inlined python scripts there, so every
    entry is a script or ``null`` = the ``example_script``)."""
    cfg = s["config"]["config"]
    iid = f"os-official/{int(s['index'])}"
    init = tuple(x for x in (_official_script(x, "init_script entry")
                             for x in cfg.get("init_script") or ()) if x is not None)
    start = _official_script(cfg.get("start"), "start")
    match = check = example = None
    if "match" in cfg:
        m = cfg["match"]
        match = {"answer": m, "strip": True} if isinstance(m, str) else dict(m)
        match.setdefault("strip", True)
        if not ({"answer", "regex"} & set(match)):
            raise ValueError("match needs 'answer' or 'regex'")
    elif "check" in cfg:
        check = tuple(_official_script(x, "check entry") for x in cfg["check"])
        example = _official_script(cfg.get("example_script"), "example_script")
        if any(c is None for c in check) and example is None:
            raise ValueError("check chain uses the example (null) but there is no example_script")
    else:
        raise ValueError("config needs 'match' or 'check'")
    return OSItem(iid, str(cfg["description"]), init, start, match, check, example)


def load_os_official(data_path: str | os.PathLike | None = None,
                     limit: int | None = None) -> list[OSItem]:
    """The official CycleQD OS search set: the 110 samples of ``os_search_samples.json``
    whose ``index`` is in ``search_ids.json["agentbench_os"]`` (official
    ``tasks/agentbench_os.py``), in that order. Every sample's image is
    ``local-os/default`` (an Ubuntu container); here all run in the project's Debian OS
    machine (:mod:`cycleqd.sandbox.rootfs`) -- a recorded deviation. ``data_path``: the
    json file or a folder holding ``cycleqd-official/`` (default: the data dir).

    Raises:
        FileNotFoundError / DataMissingError: a file is missing; ValueError: malformed
        sample (named by its index) or an official id with no sample.
    """
    _check_limit(limit)
    path = _find(OFFICIAL_OS_FILE, data_path, "official OS os_search_samples.json")
    samples = json.loads(path.read_text(encoding="utf-8"))
    by_index: dict[int, OSItem] = {}
    for s in samples:
        try:
            by_index[int(s["index"])] = _official_os_item(s)
        except (KeyError, TypeError, ValueError) as ex:
            raise ValueError(f"official OS sample {s.get('index') if isinstance(s, dict) else '?'}: "
                             f"malformed ({ex})") from ex
    ids = _official_ids(data_path, "agentbench_os", path)
    missing = [i for i in ids if i not in by_index]
    if missing:
        raise ValueError(f"{OFFICIAL_IDS_FILE}: agentbench_os ids with no sample: {missing[:10]}")
    items = [by_index[i] for i in ids]
    return items[:limit] if limit else items


PROTOCOLS = ("project", "official")


def check_protocol(kind: str, params: Any) -> str:
    """The ``protocol`` argument of the agent skills (``"project"`` default | ``"official"``)
    and, for ``official``, its source checks: ``split`` must be ``search`` (the official
    code scores its search ids only), ``limit`` a positive int or None, a set ``data_path``
    a file of the expected kind or a folder holding ``cycleqd-official/``. Returns the
    protocol. Raises ValueError naming the argument."""
    protocol = params.get("protocol", "project")
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {list(PROTOCOLS)}, got {protocol!r}")
    if protocol == "official":
        if params.get("split", "search") != "search":
            raise ValueError(f"protocol 'official' scores the official search ids: split must be "
                             f"'search', got {params.get('split')!r}")
        _check_limit(params.get("limit"))
        rel = OFFICIAL_DB_FILE if kind == "dbbench" else OFFICIAL_OS_FILE
        if params.get("data_path") is not None:
            _check_data_path(params["data_path"], rel)
    return protocol

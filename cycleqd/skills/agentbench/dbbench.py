"""The database skill: AgentBench DB-Bench, multi-turn SQL agent (paper sec. 4.1: DB = DB-Bench).

Protocol (AgentBench v0.2 ``src/server/tasks/dbbench``; prompt wording verbatim):

1. **Conversation**: user = :data:`DB_PROMPT`; assistant = ``"Ok."``; user = the
   item's ``description + "\\n" + add_description``.
2. **Rounds** (lockstep over all episodes of a split, one batched ``generate`` per turn):
   a reply with ``Action: Operation`` and a fenced ````sql```` block runs that ONE
   statement (newlines replaced by spaces, as AgentBench does) on the episode's private
   database and the raw result -- ``str`` of the row tuples, or the database's error
   message, cut at 800 characters -- is the next user message. Any other reply ends the
   episode; its ``Final Answer: [...]`` is the answer. At most ``max_rounds`` (5)
   operations, so at most ``max_rounds + 1`` replies. An ``Operation`` without a SQL
   block ends the episode with no answer. Parsing tolerates what AgentBench's regexes
   reject only in whitespace: ``Action:`` on the last line, ````sql```` without a
   newline, ``Final Answer:`` at the very start.
3. **Scoring** (``scorer``; every rule and its source: ``docs/graders.md`` § DB-Bench).
   ``"strict"`` (default): SELECT-type items by :func:`judge_answer` -- the answer's
   values against the gold ``label`` as a *multiset* (order-insensitive, repeats count);
   numbers equal within ``tolerance`` (1e-2, AgentBench's ``DBResultProcessor``) where
   AgentBench allows it (one value, or all values numeric); a non-answer (no
   ``Final Answer``, ``[]``, ``""``, ``None``/``null``, ``NaN``, ``inf``...) matches
   nothing -- except that the dataset's own ``none`` gold (an empty result) is matched by
   an answer saying ``none``/``null``/``None``. INSERT/UPDATE(/DELETE) items by the table
   after the episode: the gold statements, run on a scratch copy before the episode, must
   reproduce ``answer_md5`` (AgentBench's hash, :func:`cycleqd.sandbox.sql.table_hash_md5`)
   and the agent's table must then hold exactly that gold table (same columns, same rows
   as a multiset, NULL distinct from ``''``) -- the hash alone is not injective.
   ``"agentbench"``: AgentBench's current ``DBResultProcessor`` rules
   (:func:`compare_answer` with ``scorer="agentbench"``: special values such as
   ``None``/``nan``/``""`` all normalise to ``"0"``, several non-numeric values compared
   as sets) and the bare ``answer_md5`` comparison. ``"agentbench-v0.2"``: AgentBench
   v0.2's metric, as in SakanaAI/CycleQD's fishfarm port (exact float equality, sets,
   the bare hash).
4. **Databases**: ``backend="sqlite"`` (default; one sandboxed SQLite worker, MySQL
   dialect/collation emulated) or ``"mariadb"`` (a real server, fresh database + user
   per episode) -- :mod:`cycleqd.sandbox.sql`. Tables are built as AgentBench builds
   them: every column TEXT, values ``str(v)``. The gold statement of every INSERT/UPDATE
   item reproduces ``answer_md5`` on 199/200 items on both backends (the exception,
   ``dbbench/225``, matches no single-cell edit of its table: a data error; under the
   strict scorer it is unsolvable, under ``agentbench`` only a hash collision solves it).
   An item whose table cannot be built (:class:`~cycleqd.sandbox.sql.TableBuildError`,
   e.g. a column with an empty name) is one failed sample with its reason in the
   details and a logged warning; the backend stays clean for the next items and reruns.

Score: quality = fraction of items solved. Sub-scores: ``<name>_SELECT``,
``<name>_INSERT``, ``<name>_UPDATE`` accuracies and ``<name>_overall_cat`` (their mean,
AgentBench's ``overall_cat_accuracy``).
"""

from __future__ import annotations

import ast
import collections
import hashlib
import json
import logging
import math
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from cycleqd.sandbox.sql import Reference, SQLBackend, TableBuildError, TableRows, make_backend
from cycleqd.registry import SKILLS
from cycleqd.skills.base import SkillResult
from cycleqd.skills.cache import SampleCache
from cycleqd.skills.agentbench import official
from cycleqd.skills.agentbench.data import (DBItem, check_protocol, check_source, load_dbbench,
                                           load_dbbench_official)
from cycleqd.skills.agentbench.db_format import observation
from cycleqd.skills.agentbench.episode import Episode, evaluate_cached, run_lockstep

#: AgentBench DB-Bench instruction (src/server/tasks/dbbench/__init__.py, v0.2), verbatim: the
#: same text the official CycleQD code sends, so one copy serves both protocols
#: (:data:`cycleqd.skills.agentbench.official.DB_PROMPT`).
DB_PROMPT = official.DB_PROMPT
_VERSION = "2"
#: Scorers of :class:`DBBenchSkill` and their rule versions (part of the cache key: a
#: changed rule never reuses outcomes scored under the old one).
SCORERS = {"strict": "1", "agentbench": "1", "agentbench-v0.2": "1"}
#: the scorer of ``protocol="official"``: AgentBench v0.2's exact comparison (the official code's)
OFFICIAL_SCORER = "agentbench-v0.2"
#: Answers longer than this (characters) are failed without parsing (AgentBench replies
#: are a few hundred tokens; a long list is a guess at the label, not an answer).
MAX_ANSWER_CHARS = 65536
_log = logging.getLogger(__name__)

_ACTION = re.compile(r"Action:\s*(.*?)\s*(?:\n|$)")
_SQL = re.compile(r"```sql[ \t]*\n?([\s\S]*?)\n?```", re.IGNORECASE)
_FINAL = re.compile(r"(?:^|\n)\s*Final Answer:(.*)")

_SPECIAL = {"none": "0", "null": "0", "undefined": "0", "nan": "0", "inf": "0",
            "infinity": "0", "-inf": "0", "-infinity": "0", "": "0"}


def _norm(value: Any) -> str:
    """AgentBench ``_normalize_special_values``: None/null/nan/'' -> "0"; a trailing '%'
    and thousands separators are dropped; surrounding quotes and spaces stripped."""
    if value is None:
        return "0"
    s = str(value).strip().strip("'\"").strip()
    if s.endswith("%"):
        s = s[:-1].strip()
    if "," in s and not (s.startswith("[") and s.endswith("]")):
        s = s.replace(",", "")
    return _SPECIAL.get(s.lower(), s)


def _list_items(text: str, *, keep_blank: bool) -> list[Any]:
    """An answer text's items, as AgentBench's parser reads them, without evaluating code:
    ``[...]`` as a list literal (``ast.literal_eval`` only), else AgentBench's quote-aware
    comma split of its inside; any other text is one item. ``keep_blank``: whitespace-only
    split items are kept (AgentBench's own rule, the ``agentbench`` scorer) or dropped
    (strict)."""
    if not (text.startswith("[") and text.endswith("]")):
        return [text]
    try:
        v = ast.literal_eval(text)
        if isinstance(v, (list, tuple)):
            return list(v)
    except Exception:  # noqa: BLE001 - literal_eval runs no code: not a literal
        pass
    items, cur, inq = [], "", False
    for ch in text[1:-1]:
        if ch in "\"'":
            inq = not inq
        elif ch == "," and not inq:
            if cur if keep_blank else cur.strip():
                items.append(cur)
            cur = ""
        else:
            cur += ch
    if cur if keep_blank else cur.strip():
        items.append(cur)
    return items


def parse_answer(answer: Any) -> list[str]:
    """The answer's items, normalised the way AgentBench's ``DBResultProcessor._clean_answer``
    does (the ``agentbench`` scorer; the strict one uses :func:`strict_values`). Accepts
    a list literal (``["a", 3]``), a MySQL-like result (``[('a',), (3,)]``), or a bare
    value; never evaluates code (``ast.literal_eval`` only, then AgentBench's
    quote-aware comma split)."""
    if answer is None:
        return ["0"]
    if isinstance(answer, (list, tuple)):
        items = list(answer)
    else:
        text = str(answer).strip()
        items = _list_items(text, keep_blank=True)
    out = []
    for it in items:
        if isinstance(it, (tuple, list)) and len(it) == 1:
            it = it[0]
        out.append(_norm(it))
    return out


def _float(s: str) -> float | None:
    try:
        f = float(s)
    except (TypeError, ValueError):
        return None
    return f if f == f else None


def _compare_agentbench(answer: Any, label: Sequence[Any], tolerance: float) -> bool:
    """AgentBench ``DBResultProcessor.compare_results`` (current main), SELECT branch."""
    a, g = parse_answer(answer), parse_answer(list(label))
    if len(a) == 1 and len(g) == 1:
        if a[0] == "0" and g[0] == "0":
            return True
        fa, fg = _float(a[0]), _float(g[0])
        if fa is not None and fg is not None:
            return abs(fa - fg) <= tolerance
        return a[0] == g[0]
    fa_all = [_float(x) for x in a]
    fg_all = [_float(x) for x in g]
    if a and g and all(x is not None for x in fa_all) and all(x is not None for x in fg_all):
        if len(a) != len(g):
            return False
        used = [False] * len(g)
        for x in fa_all:
            for j, y in enumerate(fg_all):
                if not used[j] and abs(x - y) <= tolerance:
                    used[j] = True
                    break
            else:
                return False
        return all(used)
    return set(a) == set(g)


def _compare_agentbench_v02(answer: Any, label: Sequence[Any]) -> bool:
    """AgentBench v0.2's ``DBBench.metrics`` SELECT rule, which SakanaAI/CycleQD's fishfarm
    port (``fishfarm.tasks.dbbench.metrics``) copies: the answer text read as a list
    (AgentBench: ``list(eval(ans))``; here ``ast.literal_eval`` -- never code -- so an
    expression such as ``["a"] * 3`` stays one text value), else ``[ans]``; one value
    each -> ``float(a) == float(g)`` (no tolerance) or string equality; else set
    equality of the raw values."""
    try:
        ans = list(ast.literal_eval(str(answer)))
    except Exception:  # noqa: BLE001 - literal_eval runs no code; any failure = not a literal
        ans = [answer]
    cor = list(label)
    if len(ans) == 1 and len(cor) == 1:
        try:
            return float(ans[0]) == float(cor[0])
        except (ValueError, TypeError):
            return ans[0] == cor[0]
    try:
        return set(ans) == set(cor)
    except TypeError:
        return False


# ------------------------------------------------------------------ the strict scorer

class _Token:
    """A normalised answer value that is not a plain string or number."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<{self.name}>"


#: an explicit "nothing": none / null / None -- equals only the dataset's ``none`` gold
NONE = _Token("none")
#: a non-answer that equals nothing at all: '', nan, inf, undefined, a nested list...
INVALID = _Token("invalid")
_NONE_WORDS = {"none", "null"}
_INVALID_WORDS = {"", "undefined", "nan", "+nan", "-nan", "inf", "+inf", "-inf", "infinity",
                  "+infinity", "-infinity"}
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_THOUSANDS = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")


def _strict_value(v: Any) -> Any:
    """One answer/gold value, normalised for the strict scorer: a finite ``float``, a
    ``str``, :data:`NONE` or :data:`INVALID`. Kept from AgentBench: surrounding spaces and
    quotes stripped; ``12,345`` (a number with thousands separators only) and ``12%`` (a
    number with a trailing percent sign) read as numbers. Unlike AgentBench, commas inside
    text and ``%`` after text are kept, and special values do not become ``"0"``."""
    if v is None:
        return NONE
    if isinstance(v, bool):
        v = str(v)
    if isinstance(v, (int, float)):
        f = float(v)
        return f if math.isfinite(f) else INVALID
    if not isinstance(v, str):
        return INVALID  # dicts, sets, nested rows of rows: not a value
    t = v.strip().strip("'\"").strip()
    low = t.lower()
    if low in _NONE_WORDS:
        return NONE
    if low in _INVALID_WORDS:
        return INVALID
    num = t
    if num.endswith("%") and _NUMBER.fullmatch(num[:-1].strip()):
        num = num[:-1].strip()
    if _THOUSANDS.fullmatch(num):
        num = num.replace(",", "")
    if _NUMBER.fullmatch(num):
        f = float(num)
        return f if math.isfinite(f) else INVALID
    return t


def strict_values(answer: Any) -> list[Any] | None:
    """The values of an answer for the strict scorer, or None when it is no answer at all
    (None, empty text, ``[]``, over :data:`MAX_ANSWER_CHARS` characters).

    Accepts what AgentBench's parser accepts, without evaluating code: a list literal
    (``ast.literal_eval`` only), else AgentBench's quote-aware comma split of ``[...]``,
    else the bare text as one value. A pasted MySQL result ``[('a',), ('b', 2)]`` counts
    row by row, cell by cell (rows are flattened in order)."""
    if answer is None:
        return None
    if isinstance(answer, (list, tuple)):
        items = list(answer)
    else:
        text = str(answer)
        if len(text) > MAX_ANSWER_CHARS:
            return None
        text = text.strip()
        if not text:
            return None
        items = _list_items(text, keep_blank=False)
    out: list[Any] = []
    for it in items:
        if isinstance(it, (tuple, list)):
            out.extend([_strict_value(x) for x in it] if it else [INVALID])
        else:
            out.append(_strict_value(it))
    return out or None


def judge_answer(answer: Any, label: Sequence[Any], *, tolerance: float = 1e-2,
                 scorer: str = "strict") -> tuple[bool, str]:
    """Verdict on a SELECT-type answer and its reason (one line).

    ``scorer="strict"`` (see module docstring and docs/graders.md): no answer, or any
    :data:`INVALID` value, fails; the values must equal the gold values as a multiset --
    one value each: numbers within ``tolerance`` (AgentBench ``_float_equal``, 1e-2) else
    exact text; several values all numbers: a one-to-one matching within ``tolerance``
    (AgentBench's multi-value float branch); otherwise exact multiset equality (AgentBench
    uses a set). ``scorer="agentbench"``: :func:`compare_answer`'s AgentBench rules.
    ``scorer="agentbench-v0.2"``: AgentBench v0.2 / CycleQD's fishfarm rules (exact float
    equality, sets; see :func:`_compare_agentbench_v02`).

    Raises:
        ValueError: unknown ``scorer``.
    """
    if answer is not None and len(str(answer)) > MAX_ANSWER_CHARS:
        return False, f"answer over {MAX_ANSWER_CHARS} characters"
    if scorer == "agentbench":
        ok = answer is not None and _compare_agentbench(answer, label, tolerance)
        return ok, ("match (agentbench rules)" if ok else "no match (agentbench rules)")
    if scorer == "agentbench-v0.2":
        ok = answer is not None and _compare_agentbench_v02(answer, label)
        return ok, ("match (agentbench-v0.2 rules)" if ok else "no match (agentbench-v0.2 rules)")
    if scorer != "strict":
        raise ValueError(f"scorer must be one of {sorted(SCORERS)}, got {scorer!r}")
    a = strict_values(answer)
    g = strict_values(list(label))
    if a is None:
        return False, "no answer (empty, missing or over-long)"
    if g is None or any(x is INVALID for x in g):
        return False, "the gold label is not a usable answer"
    if any(x is INVALID for x in a):
        return False, "the answer holds a non-answer value ('', nan, inf, undefined...)"
    if len(a) != len(g):
        return False, f"{len(a)} values for {len(g)} gold values"
    if all(isinstance(x, float) for x in a) and all(isinstance(x, float) for x in g):
        # sorted greedy = an optimal one-to-one matching for equal-width intervals
        gs, used = sorted(g), [False] * len(g)
        for x in sorted(a):
            for j, y in enumerate(gs):
                if not used[j] and abs(x - y) <= tolerance:
                    used[j] = True
                    break
            else:
                return False, f"number {x!r} matches no gold number within {tolerance}"
        return True, "match"

    def key(x: Any) -> tuple[str, Any]:
        return ("n", x) if isinstance(x, float) else ("t", x) if isinstance(x, str) \
            else ("k", x.name)

    if collections.Counter(map(key, a)) == collections.Counter(map(key, g)):
        return True, "match"
    return False, "values differ from the gold values (as a multiset)"


def compare_answer(answer: Any, label: Sequence[Any], *, tolerance: float = 1e-2,
                   scorer: str = "strict") -> bool:
    """True iff the answer matches the gold ``label`` (see :func:`judge_answer`).

    ``scorer="agentbench"`` follows AgentBench's ``DBResultProcessor.compare_results``
    (THUDM/AgentBench ``src/server/tasks/dbbench/result_processor.py``): one value each
    -> numeric within ``tolerance`` or string equality (two special values both "0"
    are equal); several -> if all numeric, a one-to-one matching within ``tolerance``
    (order-insensitive), else set equality; values normalised by :func:`parse_answer`.
    """
    return judge_answer(answer, label, tolerance=tolerance, scorer=scorer)[0]


def judge_table(rows: TableRows | None, reference: Reference | None, answer_md5: str | None,
                columns: Sequence[str], table_hash: str | None) -> tuple[bool, str]:
    """Strict verdict on a modification item's table after the episode, and its reason.

    Passes only if the reference (gold statements on a scratch copy) reproduced
    ``answer_md5``, the agent's table has the item's columns (names and order) and
    holds exactly the reference rows as a multiset (values as text, NULL distinct from
    ``''`` and ``'NULL'``), and its AgentBench hash equals ``answer_md5``."""
    if reference is None or reference.table is None:
        return False, "no reference table"
    if reference.hash != answer_md5:
        return False, ("the gold statements do not reproduce answer_md5 "
                       f"({reference.hash} != {answer_md5}): the item is unsolvable")
    if rows is None:
        return False, "the table could not be read back (gone, too large or unreadable)"
    if tuple(rows.columns) != tuple(columns):
        return False, f"the table's columns changed: {list(rows.columns)[:20]}"
    if rows.multiset() != reference.table.multiset():
        return False, "the table differs from the gold table"
    if table_hash != answer_md5:
        return False, "the table's hash differs from answer_md5"
    return True, "match"


def parse_reply(reply: str) -> tuple[str | None, str | None]:
    """(action, payload): ("operation", sql | None) or ("answer", final answer | None),
    or (None, None) when the reply has no ``Action:``."""
    m = _ACTION.search(reply)
    action = m.group(1).strip().lower() if m else None
    if action == "operation":
        s = _SQL.search(reply)
        return "operation", (s.group(1).strip().replace("\n", " ") if s else None)
    f = _FINAL.search(reply)
    return ("answer" if action is not None or f else None), (f.group(1) if f else None)


_OFFICIAL_ACTION = re.compile(r"Action: (.*?)\n")
_OFFICIAL_SQL = re.compile(r"```sql\n([\s\S]*?)\n```")
_OFFICIAL_FINAL = re.compile(r"\nFinal Answer:(.*)")


def parse_reply_official(reply: str, can_operate: bool) -> tuple[str, str]:
    """The official reply parsing (fishfarm ``DBBenchTask.process_response_and_check_completion``,
    from AgentBench.old): ``("operation", sql)`` when the first ``Action: X\n`` has X exactly
    ``Operation``, ``can_operate`` and a ````sql\n...\n```` block follows (newlines of the SQL
    become spaces); otherwise ``("answer", text)``: an Operation without that block answers
    ``""``, any other reply the text after the first ``\nFinal Answer:`` (``""`` when there is
    none) -- an empty answer is still judged, never "no answer"."""
    m = _OFFICIAL_ACTION.search(reply)
    if m and m.group(1) == "Operation" and can_operate:
        s = _OFFICIAL_SQL.search(reply)
        if s is None:
            return "answer", ""
        return "operation", s.group(1).strip().replace("\n", " ")
    f = _OFFICIAL_FINAL.search(reply) if reply else None
    return "answer", f.group(1) if f else ""


class DBEpisode(Episode):
    """One DB-Bench episode on a backend database (key = the item id).

    Args:
        item, backend: the item and the database backend its episode runs on.
        max_rounds, tolerance: see :class:`DBBenchSkill`.
        scorer: ``"strict"`` | ``"agentbench"`` (see module docstring).
        references: a dict reused across episodes to keep each item's gold table
            (strict scorer, modification items) once computed on this backend.
        protocol: ``"official"``: the opening messages of
            :func:`cycleqd.skills.agentbench.official.db_messages` (same text as the
            project's, built by the official builder) and :func:`parse_reply_official`.

    An item whose table cannot be built ends at once as a failed sample
    (``detail["error"]``, logged); a backend that is down raises RuntimeError.
    """

    def __init__(self, item: DBItem, backend: SQLBackend, *, max_rounds: int,
                 tolerance: float, scorer: str = "strict",
                 references: dict[Any, Reference] | None = None,
                 protocol: str = "project") -> None:
        super().__init__(item.id, official.db_messages(
            {"description": item.description, "add_description": item.add_description})
            if protocol == "official" else [
            {"role": "user", "content": DB_PROMPT},
            {"role": "assistant", "content": "Ok."},
            {"role": "user", "content": item.description + "\n" + item.add_description}])
        if scorer not in SCORERS:
            raise ValueError(f"scorer must be one of {sorted(SCORERS)}, got {scorer!r}")
        self.item, self.backend, self.protocol = item, backend, protocol
        self.max_rounds, self.tolerance, self.scorer = max_rounds, tolerance, scorer
        self.rounds = 0
        self.answer: str | None = None
        self.reference: Reference | None = None
        self._created = False
        self.broken: str | None = None
        try:
            if scorer == "strict" and item.is_modification:
                self.reference = _reference(item, backend, references)
            backend.create(item.id, item.table)
            self._created = True
        except TableBuildError as e:
            self.broken = f"unbuildable item: {e}"
            self.detail["error"] = self.broken
            self.done = True
            _log.warning("DB-Bench %s: %s -- scored as a failed sample", item.id, self.broken)

    def step(self, reply: str) -> None:
        if self.protocol == "official":
            action, text = parse_reply_official(reply, self.rounds < self.max_rounds)
            if action == "operation":
                obs = observation(self.backend.execute(self.item.id, text))
                self.rounds += 1
                self.messages.append({"role": "user", "content": obs})
                return
            self.answer = text
            self.detail["end"] = "answer"
            self.done = True
            return
        action, payload = parse_reply(reply)
        if action == "operation" and self.rounds < self.max_rounds:
            if payload is None:  # AgentBench: Operation without SQL -> validation failure
                self.detail["end"] = "operation without a sql block"
                self.done = True
                return
            obs = observation(self.backend.execute(self.item.id, payload))
            self.rounds += 1
            self.messages.append({"role": "user", "content": obs})
            return
        f = _FINAL.search(reply)  # AgentBench: any other reply ends with its Final Answer
        self.answer = f.group(1) if f else None
        self.detail["end"] = "answer" if self.answer is not None else "no answer"
        self.done = True

    def finish(self) -> None:
        self.detail["rounds"] = self.rounds
        if self.protocol == "official" and self.answer is None:
            self.answer = ""  # official: every episode ends with an answer, "" at worst
        self.score = 0.0
        if self.broken is not None:
            return
        if self.item.is_modification:
            h = self.backend.table_hash(self.item.id)
            self.detail["hash"] = h
            if self.scorer != "strict":  # AgentBench (both versions): the bare hash
                ok = h is not None and h == self.item.answer_md5
                why = "hash matches answer_md5" if ok else "hash differs from answer_md5"
            else:
                ok, why = judge_table(self.backend.table_rows(self.item.id), self.reference,
                                      self.item.answer_md5, self.item.table.columns, h)
        else:
            ok, why = judge_answer(self.answer, self.item.label, tolerance=self.tolerance,
                                   scorer=self.scorer)
            self.detail["answer"] = (self.answer or "")[:500]
        self.score = 1.0 if ok else 0.0
        self.detail["verdict"] = why

    def close(self) -> None:
        if self._created:
            self.backend.drop(self.item.id)
            self._created = False


def _reference(item: DBItem, backend: SQLBackend,
               cache: dict[Any, Reference] | None) -> Reference:
    """The item's gold table on ``backend`` (computed once per item content and backend)."""
    key = (backend.name, item.table, item.label, item.answer_md5)
    if cache is not None and key in cache:
        return cache[key]
    statements = [x for x in item.label if isinstance(x, str) and x.strip()]
    ref = backend.reference(item.id + "#reference", item.table, statements)
    if cache is not None:
        cache[key] = ref
    return ref


def check_args(params: Mapping[str, Any]) -> None:
    """The argument checks of :class:`DBBenchSkill` that need no data read (positive ints,
    ``tolerance``, ``scorer``, ``backend``; split, limit and the ``data_path`` kind through
    :func:`cycleqd.skills.agentbench.data.check_source`; ``protocol`` through
    :func:`~cycleqd.skills.agentbench.data.check_protocol`; ``official`` refuses a scorer
    other than ``agentbench-v0.2`` and another value of a parameter it fixes,
    :data:`~cycleqd.skills.agentbench.official.DB_FIXED`; ``chat_format``). The constructor and the registry
    checker (``cycleqd validate``) both call it. Raises ValueError naming the argument."""
    for k in ("max_rounds", "max_new_tokens", "episode_batch", "workers"):
        v = params.get(k, 1)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{k} must be a positive int, got {v!r}")
    protocol = check_protocol("dbbench", params)
    tolerance, scorer, backend = params.get("tolerance", 1e-2), params.get("scorer"), params.get("backend")
    if protocol == "official" and scorer not in (None, OFFICIAL_SCORER):
        raise ValueError(f"protocol 'official' scores with {OFFICIAL_SCORER!r} (the official code's "
                         f"exact comparison); scorer {scorer!r} is refused")
    if protocol == "official":
        official.check_fixed(params, official.DB_FIXED)
    official.check_chat_format(params, protocol)
    scorer = "strict" if scorer is None else scorer
    if not (isinstance(tolerance, (int, float)) and tolerance >= 0):
        raise ValueError(f"tolerance must be >= 0, got {tolerance!r}")
    if scorer not in SCORERS:
        raise ValueError(f"scorer must be one of {sorted(SCORERS)}, got {scorer!r}")
    if isinstance(backend, str) and backend not in ("sqlite", "mariadb", "mysql"):
        raise ValueError(f"backend must be 'sqlite', 'mariadb' or an SQLBackend, got {backend!r}")
    if protocol == "project":
        check_source("dbbench", params.get("data_path"), params.get("split", "search"), params.get("limit"))


@SKILLS.register("dbbench", source="AgentBench DB-Bench (Liu et al. 2023); CycleQD paper §4",
                 context=("name",), paths=("data_path",), checker=check_args)
class DBBenchSkill:
    """AgentBench DB-Bench as a CycleQD skill (see module docstring).

    Args:
        data_path: DB-Bench file or a folder holding ``dbbench/standard.jsonl`` (default:
            the data dir, ``$CYCLEQD_DATA_DIR`` else ``<cache>/data``; ``cycleqd data fetch dbbench``).
        split: ``search`` | ``test`` | ``train`` | ``all`` (fixed, stratified by type).
        limit: score only the first ``limit`` items of the split.
        name: skill name (prefix of sub-scores).
        backend: ``"sqlite"`` | ``"mariadb"`` or a :class:`~cycleqd.sandbox.sql.SQLBackend`.
        max_rounds: SQL operations per episode (AgentBench: 5).
        max_new_tokens: generation budget per reply.
        tolerance: numeric tolerance of SELECT answers (AgentBench: 1e-2).
        scorer: ``"strict"`` (default: non-answers never match, multisets, modification
            items by the exact gold table), ``"agentbench"`` (AgentBench's current
            lenient rules) or ``"agentbench-v0.2"`` (AgentBench v0.2 = the official
            CycleQD code's rules); see the module docstring and ``docs/graders.md``.
        protocol: ``"project"`` (default: the project's splits and settings above) or
            ``"official"`` (the official CycleQD protocol: the 341 official search rows of
            ``dbbench_standard_dev.jsonl``, :func:`~cycleqd.skills.agentbench.data.load_dbbench_official`;
            the official opening messages and reply parsing (:func:`parse_reply_official`:
            exact ``Action: Operation\\n``, ````sql\\n`` and ``\\nFinal Answer:`` patterns; a
            reply without an answer answers ``""``, which is judged); ``max_rounds`` = 5
            (at most 6 replies); scorer ``agentbench-v0.2``
            forced -- exact comparison, modification rows by the bare ``answer_md5``;
            ``split`` must be ``search``). Quality = pooled fraction correct either way.
            Each item still gets its own database (the official code loads every table into
            one MySQL server, where 32 table names collide: a fix kept, not a deviation).
            ``max_rounds``, ``max_new_tokens``, ``stop`` and ``tolerance`` are fixed at the
            official values (:data:`~cycleqd.skills.agentbench.official.DB_FIXED`): another
            value is refused, never silently replaced.
        chat_format: ``"model"`` (default: the model's chat template) or
            ``"llama3-official"`` (official protocol only: the official raw LLAMA3 string,
            :func:`~cycleqd.skills.agentbench.official.llama3_prompt`, with the double BOS the
            official code sends to a Llama-3 model).
        episode_batch: episodes run in lockstep at once (bounds open databases).
        workers: threads executing the episodes' SQL between turns.
        cache: a :class:`SampleCache` or a path to one; None disables caching.

    Raises:
        ValueError: bad arguments (named), before any data is read.
    """

    def __init__(self, data_path: str | Path | None = None, split: str = "search",
                 limit: int | None = None, *, name: str = "dbbench",
                 backend: str | SQLBackend = "sqlite", max_rounds: int = 5,
                 max_new_tokens: int = 512, tolerance: float = 1e-2, episode_batch: int = 64,
                 workers: int = 4, stop: Sequence[str] = (),
                 cache: SampleCache | str | Path | None = None, scorer: str | None = None,
                 protocol: str = "project", chat_format: str = "model") -> None:
        check_args(dict(max_rounds=max_rounds, max_new_tokens=max_new_tokens, episode_batch=episode_batch,
                        workers=workers, tolerance=tolerance, scorer=scorer, backend=backend, split=split,
                        limit=limit, protocol=protocol, stop=stop,
                        chat_format=chat_format))   # data_path: resolved by the loader
        self.protocol, self.chat_format = protocol, chat_format or "model"
        if protocol == "official":
            scorer, max_rounds = OFFICIAL_SCORER, official.DB_MAX_ROUND
            self.items: list[DBItem] = load_dbbench_official(data_path, limit)
        else:
            scorer = "strict" if scorer is None else scorer
            self.items = load_dbbench(data_path, split, limit)
        if not self.items:
            raise ValueError(f"DB-Bench split {split!r} has no items")
        self.name, self.split = name, split
        self._backend_spec = backend
        self.max_rounds, self.max_new_tokens = max_rounds, max_new_tokens
        self.tolerance, self.episode_batch, self.workers = float(tolerance), episode_batch, workers
        self.stop = tuple(stop)
        self.cache = SampleCache(cache) if isinstance(cache, (str, Path)) else cache
        self.scorer = scorer
        self.last_details: dict[str, dict[str, Any]] = {}
        self._references: dict[Any, Reference] = {}

    @property
    def backend_name(self) -> str:
        b = self._backend_spec
        return b if isinstance(b, str) else b.name

    @property
    def cache_key(self) -> str:
        """Per-sample cache key: changes with anything that changes outcomes."""
        cfg = {"v": _VERSION, "scorer": [self.scorer, SCORERS[self.scorer]],
               "prompt": DB_PROMPT, "rounds": self.max_rounds,
               "tok": self.max_new_tokens, "tol": self.tolerance, "stop": list(self.stop),
               "backend": "mariadb" if self.backend_name == "mysql" else self.backend_name}
        if self.protocol != "project":  # absent for the default: its keys stay as they were
            cfg["protocol"] = self.protocol
        if self.chat_format != "model":
            cfg["chat_format"] = self.chat_format
        b = self._backend_spec
        if not isinstance(b, str):  # a configured backend object: its settings too
            ident = dict(b.identity)
            ident["name"] = cfg["backend"]
            if ident != {"name": cfg["backend"], "timeout_s": 5.0, "max_rows": 1000}:
                cfg["backend_settings"] = ident  # defaults keep the key of backend="<name>"
        return "dbbench/" + hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:12]

    def _open_backend(self) -> tuple[SQLBackend, bool]:
        b = self._backend_spec
        return (make_backend(b), True) if isinstance(b, str) else (b, False)

    def run_episodes(self, items: Sequence[DBItem], generate) -> dict[str, DBEpisode]:
        """Run ``items`` with ``generate(conversations) -> replies``; the finished episodes."""
        generate = official.render_for(self.chat_format, generate)
        backend, own = self._open_backend()
        done: dict[str, DBEpisode] = {}
        try:
            for s in range(0, len(items), self.episode_batch):
                eps: list[DBEpisode] = []
                try:
                    for it in items[s:s + self.episode_batch]:
                        eps.append(DBEpisode(it, backend, max_rounds=self.max_rounds,
                                             tolerance=self.tolerance, scorer=self.scorer,
                                             references=self._references,
                                             protocol=self.protocol))
                    run_lockstep(eps, generate, max_turns=self.max_rounds + 1,
                                 workers=self.workers)
                finally:
                    for ep in eps:
                        ep.close()
                done.update({ep.sample_id: ep for ep in eps})
        finally:
            if own:
                backend.close()
        return done

    def evaluate(self, model: Any) -> SkillResult:
        """Score a :class:`~cycleqd.inference.base.GenerationBackend` (greedy). Cached
        outcomes (same ``model.fingerprint`` and :attr:`cache_key`) are reused."""
        outcomes = evaluate_cached(self, model)
        return SkillResult(quality=sum(outcomes.values()) / len(outcomes), outcomes=outcomes,
                           subscores=self._subscores(outcomes))

    def _subscores(self, outcomes: dict[str, float]) -> dict[str, float]:
        cats: dict[str, list[float]] = {}
        for it in self.items:
            cats.setdefault(it.category, []).append(outcomes[it.id])
        sub = {f"{self.name}_{c}": sum(v) / len(v) for c, v in sorted(cats.items())}
        main = [sub[f"{self.name}_{c}"] for c in ("SELECT", "INSERT", "UPDATE")
                if f"{self.name}_{c}" in sub]
        if main:
            sub[f"{self.name}_overall_cat"] = sum(main) / len(main)
        return sub


__all__ = ["DBBenchSkill", "DBEpisode", "DB_PROMPT", "OFFICIAL_SCORER", "SCORERS", "compare_answer", "judge_answer",
           "judge_table", "parse_answer", "parse_reply", "parse_reply_official", "strict_values"]

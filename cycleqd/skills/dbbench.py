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
3. **Scoring**: INSERT/UPDATE (/DELETE) items by the table hash after the episode
   (``answer_md5``, see :func:`cycleqd.sandbox.sql.table_hash_md5`), whatever the answer.
   SELECT-type items by :func:`compare_answer`: the answer list against the gold
   ``label``, order-insensitive, numbers equal within ``tolerance`` (AgentBench's
   ``DBResultProcessor``: 1e-2), strings after AgentBench's normalisation.
4. **Databases**: ``backend="sqlite"`` (default; one sandboxed SQLite worker, MySQL
   dialect/collation emulated) or ``"mariadb"`` (a real server, fresh database + user
   per episode) -- :mod:`cycleqd.sandbox.sql`. Tables are built as AgentBench builds
   them: every column TEXT, values ``str(v)``. The gold statement of every INSERT/UPDATE
   item reproduces ``answer_md5`` on 199/200 items on both backends (the exception,
   ``dbbench/225``, matches no single-cell edit of its table: a data error).

Score: quality = fraction of items solved. Sub-scores: ``<name>_SELECT``,
``<name>_INSERT``, ``<name>_UPDATE`` accuracies and ``<name>_overall_cat`` (their mean,
AgentBench's ``overall_cat_accuracy``).
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Sequence

from cycleqd.sandbox.sql import SQLBackend, make_backend
from cycleqd.skills.base import SkillResult
from cycleqd.skills.cache import SampleCache
from cycleqd.skills.data_agentbench import DBItem, Episode, evaluate_cached, load_dbbench, run_lockstep

#: AgentBench DB-Bench instruction (src/server/tasks/dbbench/__init__.py, v0.2), verbatim.
DB_PROMPT = """
I will ask you a question, then you should help me operate a MySQL database with SQL to answer the question.
You have to explain the problem and your solution to me and write down your thoughts.
After thinking and explaining thoroughly, every round you can choose to operate or to answer.
your operation should be like this:
Action: Operation
```sql
SELECT * FROM table WHERE condition;
```
You MUST put SQL in markdown format without any other comments. Your SQL should be in one line.
Every time you can only execute one SQL statement. I will only execute the statement in the first SQL code block. Every time you write a SQL, I will execute it for you and give you the output.
If you are done operating, and you want to commit your final answer, then write down:
Action: Answer
Final Answer: ["ANSWER1", "ANSWER2", ...]
DO NOT write this pattern unless you are sure about your answer. I expect an accurate and correct answer.
Your answer should be accurate. Your answer must be exactly the same as the correct answer.
If the question is about modifying the database, then after done operation, your answer field can be anything.
If your response cannot match any pattern I mentioned earlier, you will be judged as FAIL immediately.
Your input will be raw MySQL response, you have to deal with it by yourself.
"""
_VERSION = "1"

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


def parse_answer(answer: Any) -> list[str]:
    """The answer's items, normalised. Accepts a list literal (``["a", 3]``), a MySQL-like
    result (``[('a',), (3,)]``), or a bare value; never evaluates code (``ast.literal_eval``
    only, then AgentBench's quote-aware comma split)."""
    if answer is None:
        return ["0"]
    if isinstance(answer, (list, tuple)):
        items = list(answer)
    else:
        text = str(answer).strip()
        items = None
        if text.startswith("[") and text.endswith("]"):
            try:
                v = ast.literal_eval(text)
                if isinstance(v, (list, tuple)):
                    items = list(v)
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                items = None
            if items is None:  # AgentBench's manual split, quote-aware
                items, cur, inq = [], "", False
                for ch in text[1:-1]:
                    if ch in "\"'":
                        inq = not inq
                    elif ch == "," and not inq:
                        if cur:
                            items.append(cur)
                        cur = ""
                    else:
                        cur += ch
                if cur:
                    items.append(cur)
        else:
            items = [text]
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


def compare_answer(answer: Any, label: Sequence[Any], *, tolerance: float = 1e-2) -> bool:
    """SELECT-type scoring (AgentBench ``DBResultProcessor.compare_results``): one value
    each -> numeric within ``tolerance`` or string equality; several -> if all numeric,
    a one-to-one matching within ``tolerance`` (order-insensitive), else set equality."""
    a, g = parse_answer(answer), parse_answer(list(label))
    if len(a) == 1 and len(g) == 1:
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


class DBEpisode(Episode):
    """One DB-Bench episode on a backend database (key = the item id)."""

    def __init__(self, item: DBItem, backend: SQLBackend, *, max_rounds: int,
                 tolerance: float) -> None:
        super().__init__(item.id, [
            {"role": "user", "content": DB_PROMPT},
            {"role": "assistant", "content": "Ok."},
            {"role": "user", "content": item.description + "\n" + item.add_description}])
        self.item, self.backend = item, backend
        self.max_rounds, self.tolerance = max_rounds, tolerance
        self.rounds = 0
        self.answer: str | None = None
        backend.create(item.id, item.table)
        self._created = True

    def step(self, reply: str) -> None:
        action, payload = parse_reply(reply)
        if action == "operation" and self.rounds < self.max_rounds:
            if payload is None:  # AgentBench: Operation without SQL -> validation failure
                self.detail["end"] = "operation without a sql block"
                self.done = True
                return
            obs = self.backend.execute(self.item.id, payload)
            self.rounds += 1
            self.messages.append({"role": "user", "content": obs})
            return
        f = _FINAL.search(reply)  # AgentBench: any other reply ends with its Final Answer
        self.answer = f.group(1) if f else None
        self.detail["end"] = "answer" if self.answer is not None else "no answer"
        self.done = True

    def finish(self) -> None:
        if self.item.is_modification:
            h = self.backend.table_hash(self.item.id)
            self.score = 1.0 if h is not None and h == self.item.answer_md5 else 0.0
            self.detail["hash"] = h
        else:
            self.score = (1.0 if self.answer is not None and
                          compare_answer(self.answer, self.item.label, tolerance=self.tolerance)
                          else 0.0)
            self.detail["answer"] = (self.answer or "")[:500]
        self.detail["rounds"] = self.rounds

    def close(self) -> None:
        if getattr(self, "_created", False):
            self.backend.drop(self.item.id)
            self._created = False


class DBBenchSkill:
    """AgentBench DB-Bench as a CycleQD skill (see module docstring).

    Args:
        data_path: DB-Bench file or a folder holding ``dbbench/standard.jsonl`` (default:
            ``$CYCLEQD_DATA_DIR`` / ``../shared/data`` / the download cache).
        split: ``search`` | ``test`` | ``train`` | ``all`` (fixed, stratified by type).
        limit: score only the first ``limit`` items of the split.
        name: skill name (prefix of sub-scores).
        backend: ``"sqlite"`` | ``"mariadb"`` or a :class:`~cycleqd.sandbox.sql.SQLBackend`.
        max_rounds: SQL operations per episode (AgentBench: 5).
        max_new_tokens: generation budget per reply.
        tolerance: numeric tolerance of SELECT answers.
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
                 cache: SampleCache | str | Path | None = None) -> None:
        for k, v in (("max_rounds", max_rounds), ("max_new_tokens", max_new_tokens),
                     ("episode_batch", episode_batch), ("workers", workers)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{k} must be a positive int, got {v!r}")
        if not (isinstance(tolerance, (int, float)) and tolerance >= 0):
            raise ValueError(f"tolerance must be >= 0, got {tolerance!r}")
        if isinstance(backend, str) and backend not in ("sqlite", "mariadb", "mysql"):
            raise ValueError(f"backend must be 'sqlite', 'mariadb' or an SQLBackend, got {backend!r}")
        self.items: list[DBItem] = load_dbbench(data_path, split, limit)
        if not self.items:
            raise ValueError(f"DB-Bench split {split!r} has no items")
        self.name, self.split = name, split
        self._backend_spec = backend
        self.max_rounds, self.max_new_tokens = max_rounds, max_new_tokens
        self.tolerance, self.episode_batch, self.workers = float(tolerance), episode_batch, workers
        self.stop = tuple(stop)
        self.cache = SampleCache(cache) if isinstance(cache, (str, Path)) else cache
        self.last_details: dict[str, dict[str, Any]] = {}

    @property
    def backend_name(self) -> str:
        b = self._backend_spec
        return b if isinstance(b, str) else b.name

    @property
    def cache_key(self) -> str:
        """Per-sample cache key: changes with anything that changes outcomes."""
        cfg = {"v": _VERSION, "prompt": DB_PROMPT, "rounds": self.max_rounds,
               "tok": self.max_new_tokens, "tol": self.tolerance, "stop": list(self.stop),
               "backend": "mariadb" if self.backend_name == "mysql" else self.backend_name}
        return "dbbench/" + hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:12]

    def _open_backend(self) -> tuple[SQLBackend, bool]:
        b = self._backend_spec
        return (make_backend(b), True) if isinstance(b, str) else (b, False)

    def run_episodes(self, items: Sequence[DBItem], generate) -> dict[str, DBEpisode]:
        """Run ``items`` with ``generate(conversations) -> replies``; the finished episodes."""
        backend, own = self._open_backend()
        done: dict[str, DBEpisode] = {}
        try:
            for s in range(0, len(items), self.episode_batch):
                eps: list[DBEpisode] = []
                try:
                    for it in items[s:s + self.episode_batch]:
                        eps.append(DBEpisode(it, backend, max_rounds=self.max_rounds,
                                             tolerance=self.tolerance))
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


__all__ = ["DBBenchSkill", "DBEpisode", "DB_PROMPT", "compare_answer", "parse_answer",
           "parse_reply"]

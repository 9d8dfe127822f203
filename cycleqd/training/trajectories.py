"""Agent trajectories for the DB and OS experts, built by executing reference solutions in
the skills' own environments and kept only if the skills' own judges accept them.

For every train item an episode of the evaluator's own class is opened -- the same prompt,
the same machine / database, the same observation formatting -- and the *reference*
agent's replies are fed to it turn by turn, exactly as
:func:`cycleqd.skills.agentbench.episode.run_lockstep` feeds model replies at evaluation time:

* **DB-Bench** (:class:`cycleqd.skills.agentbench.dbbench.DBEpisode`): INSERT/UPDATE items execute
  their gold statements (``label``) as ``Action: Operation`` turns, then answer; SELECT
  items execute the dataset's ``sql`` (column names with spaces back-quoted, as MySQL needs)
  and answer with the gold ``label`` -- kept only when the query's real output already
  equals the label, so the trajectory never shows an answer its observation contradicts.
* **OS** (:class:`cycleqd.skills.agentbench.os_interaction.OSEpisode`): after the task's ``init`` in a
  fresh bubblewrap machine, the reference command (``evaluation.example``) runs as an
  ``Act: bash`` turn and its real output is the observation; the agent then answers with
  that output (``Act: answer(...)``). Single-line, untruncated outputs only.

An episode is kept iff the skill's judge scores it 1.0 (table hash / answer comparison /
AgentBench check chain). Replies are deliberately short (no "Think:" prose): on a 2-core
CPU every generated token costs time at evaluation.

Trajectories are cached as JSON under ``<cache>/trajectories/`` keyed by the builder
version, the skill's evaluation configuration (its ``cache_key``) and the items' content keys
(:func:`cycleqd.skills.cache.item_keys`: an edited data file is rebuilt, never reused).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

from cycleqd import paths
from cycleqd.skills.cache import item_keys
from cycleqd.training.sft import Conversation

BUILDER_VERSION = "1"


def _cached(kind: str, key_parts: Any, cache_dir: str | Path | None,
            build: Callable[[], list[Conversation]]) -> list[Conversation]:
    key = hashlib.sha256(json.dumps([BUILDER_VERSION, kind, key_parts], sort_keys=True,
                                    default=str).encode()).hexdigest()[:16]
    path = paths.cache_dir(cache_dir) / "trajectories" / f"{kind}-{key}.json"
    if path.is_file():
        try:
            return json.loads(path.read_text())["conversations"]
        except (ValueError, KeyError):
            pass  # a corrupt cache file is rebuilt
    convs = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps({"kind": kind, "conversations": convs}))
    os.replace(tmp, path)
    return convs


def _check_split(split: str) -> None:
    if split in ("search", "validation", "test", "dev"):
        raise ValueError(f"split={split!r}: experts are never trained on evaluation splits")


# ----------------------------------------------------------------------------- DB-Bench
def db_operation(sql: str) -> str:
    """An ``Action: Operation`` reply (AgentBench format: SQL in one line, in a sql fence)."""
    return f"Action: Operation\n```sql\n{' '.join(sql.split())}\n```"


def db_answer(values: Sequence[Any]) -> str:
    """An ``Action: Answer`` reply with a JSON list as the final answer."""
    return "Action: Answer\nFinal Answer: " + json.dumps([str(v) if not isinstance(v, (int, float)) else v
                                                           for v in values], ensure_ascii=False)


def quote_columns(sql: str, columns: Sequence[str], table: str) -> str:
    """Back-quote column (and table) names containing spaces or starting with a digit that
    the dataset's SQL leaves bare (MySQL would misparse them)."""
    names = sorted({*columns, table}, key=len, reverse=True)
    out = sql
    for n in names:
        if not (" " in n or n[:1].isdigit() or "%" in n):
            continue
        out = re.sub(r"(?<![`\w'\"])" + re.escape(n) + r"(?![`\w'\"])", f"`{n}`", out)
    return out


def gold_db_replies(item: Any) -> list[str] | None:
    """The reference agent's replies for a DB-Bench item (None: no usable reference)."""
    if item.is_modification:
        stmts = [s for s in item.label if isinstance(s, str) and s.strip()]
        if not stmts:
            return None
        return [db_operation(s) for s in stmts] + [db_answer(["none"])]
    if not item.sql:
        return None
    sql = quote_columns(item.sql, item.table.columns, item.table.name)
    return [db_operation(sql), db_answer(list(item.label))]


def dbbench_conversations(*, data_path: str | Path | None = None, split: str = "train",
                          limit: int | None = None, backend: str = "sqlite",
                          cache_dir: str | Path | None = None, **skill_params: Any) -> list[Conversation]:
    """Verified DB-Bench trajectories of the ``split`` items (see module doc).

    Args:
        data_path, split, limit: which items (``split`` must not be an evaluation split).
        backend: the skill's database backend (``sqlite`` | ``mariadb``).
        cache_dir: trajectory cache root.
        skill_params: further :class:`~cycleqd.skills.agentbench.dbbench.DBBenchSkill` parameters
            (must equal the evaluator's where they shape the prompt).
    Returns:
        Conversations (user prompt, ``Ok.``, question, then the reference turns with real
        observations), only those the skill's judge scores 1.0.
    """
    from cycleqd.skills.agentbench.dbbench import DBBenchSkill, DBEpisode

    _check_split(split)
    skill = DBBenchSkill(data_path, split, limit, backend=backend, **{
        k: v for k, v in skill_params.items() if k in ("max_rounds", "tolerance", "name")})

    def build() -> list[Conversation]:
        db, own = skill._open_backend()
        out: list[Conversation] = []
        try:
            for item in skill.items:
                replies = gold_db_replies(item)
                if replies is None or len(replies) > skill.max_rounds + 1:
                    continue
                ep = DBEpisode(item, db, max_rounds=skill.max_rounds, tolerance=skill.tolerance)
                try:
                    consistent = True
                    for r in replies:
                        ep.messages.append({"role": "assistant", "content": r})
                        ep.step(r)
                        if not item.is_modification and r.startswith("Action: Operation"):
                            from cycleqd.skills.agentbench.dbbench import compare_answer
                            consistent = compare_answer(ep.messages[-1]["content"], item.label,
                                                        tolerance=skill.tolerance)
                        if ep.done:
                            break
                    ep.done = True
                    ep.finish()
                    if ep.score == 1.0 and consistent:
                        out.append([dict(m) for m in ep.messages])
                finally:
                    ep.close()
        finally:
            if own:
                db.close()
        return out

    key = [skill.cache_key, item_keys(skill.items), split]
    return _cached("dbbench", key, cache_dir, build)


# ----------------------------------------------------------------------------- OS
def os_bash(command: str) -> str:
    """An ``Act: bash`` reply (AgentBench format); whole-line comments of the reference
    command are dropped (fewer tokens to learn and to generate)."""
    lines = [ln for ln in command.strip().splitlines() if not ln.lstrip().startswith("#") and ln.strip()]
    return "Act: bash\n\n```bash\n" + "\n".join(lines) + "\n```"


def os_answer(answer: str) -> str:
    """An ``Act: answer(...)`` reply."""
    return f"Act: answer({answer})"


def _os_trajectory(skill: Any, item: Any) -> Conversation | None:
    from cycleqd.skills.agentbench.os_interaction import os_observation

    if item.example is None or item.example.language != "bash" or item.start is not None:
        return None
    ep = skill._episode(item)
    try:
        ep.setup()
        if ep.done:
            return None
        r1 = os_bash(item.example.code)
        ep.messages.append({"role": "assistant", "content": r1})
        ep.step(r1)
        obs = ep.messages[-1]["content"]
        prefix = os_observation("x")[:-1]
        if not obs.startswith(prefix) or "[truncated" in obs:
            return None
        answer = obs[len(prefix):].strip()
        if not answer or "\n" in answer or "(" in answer or ")" in answer:
            return None
        r2 = os_answer(answer)
        ep.messages.append({"role": "assistant", "content": r2})
        ep.step(r2)
        ep.finish()
        if ep.score != 1.0:
            return None
        return [dict(m) for m in ep.messages]
    except Exception:  # noqa: BLE001 - a broken task simply yields no trajectory
        return None
    finally:
        ep.close()


def os_conversations(*, data_path: str | Path | None = None, split: str = "train",
                     limit: int | None = None, one_shot: bool = True, workers: int = 4,
                     cache_dir: str | Path | None = None, **skill_params: Any) -> list[Conversation]:
    """Verified OS-interaction trajectories of the ``split`` items (see module doc).

    Args:
        data_path, split, limit: which items (``split`` must not be an evaluation split).
        one_shot: the evaluator's ``one_shot`` setting (it changes the prompt).
        workers: machines prepared at once.
        cache_dir: trajectory cache root.
        skill_params: further :class:`~cycleqd.skills.agentbench.os_interaction.OSInteractionSkill`
            parameters (``command_timeout_s``, ``setup_timeout_s``, ``script_dir``...).
    """
    from cycleqd.skills.agentbench.os_interaction import OSInteractionSkill

    _check_split(split)
    keep = ("command_timeout_s", "setup_timeout_s", "script_dir", "max_rounds", "name")
    skill = OSInteractionSkill(data_path, split, limit, one_shot=one_shot,
                               **{k: v for k, v in skill_params.items() if k in keep})

    def build() -> list[Conversation]:
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            res = list(pool.map(lambda it: _os_trajectory(skill, it), skill.items))
        return [c for c in res if c is not None]

    key = [skill.cache_key, item_keys(skill.items), split]
    return _cached("os", key, cache_dir, build)

"""Training conversations for the experts, one builder per skill type.

Every builder turns a skill's *train* split into chat conversations in exactly the format
its evaluator uses at scoring time (the builders call the skill modules' own prompt
builders, so a change of prompt format changes the training data, and with it the expert
cache key):

* ``mbpp`` (coding): the coding skill's prompt for each MBPP train problem (system message
  + Austin et al.'s instruction-with-tests prompt) -> the reference solution in one
  ```` ```python ```` block.
* ``dbbench`` and ``os``: agent trajectories built by executing the data's reference solution
  in the skill's own environment (see :mod:`cycleqd.training.trajectories`).

``build_conversations(type, **params)`` is the single entry point; unknown types raise
ValueError naming the known ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from cycleqd.training.sft import Conversation


def coding_reply(reference: str) -> str:
    """The assistant turn an MBPP expert learns: the reference in one python fence (what
    the coding skill's prompt asks for and :func:`cycleqd.skills.coding.extract_code` reads)."""
    code = "\n".join(line.rstrip() for line in reference.strip("\n").splitlines())
    return f"```python\n{code}\n```"


def mbpp_conversations(*, data_path: str | Path | None = None, split: str = "train",
                       limit: int | None = None, system_prompt: Any = "official",
                       **_: Any) -> list[Conversation]:
    """MBPP train problems as (coding prompt -> reference code) conversations.

    Args:
        data_path: MBPP file or data folder (default: the skill's default data dir).
        split: MBPP split (``train``; the search/test splits are never trained on).
        limit: first ``limit`` problems of the split.
        system_prompt: ``"official"`` (the coding skill's default) or a string / None,
            which must equal what the evaluator is given.
    Raises:
        ValueError: ``split`` is an evaluation split.
    """
    from cycleqd.skills.coding.skill import CodingSkill

    if split in ("search", "validation", "test"):
        raise ValueError(f"split={split!r}: experts are never trained on evaluation splits")
    kw = {} if system_prompt == "official" else {"system_prompt": system_prompt}
    skill = CodingSkill("mbpp", data_path=data_path, split=split, limit=limit, **kw)
    return [list(skill.conversation(p)) + [{"role": "assistant", "content": coding_reply(p.reference)}]
            for p in skill.problems]


def _db(**kw: Any) -> list[Conversation]:
    from cycleqd.training.trajectories import dbbench_conversations
    return dbbench_conversations(**kw)


def _os(**kw: Any) -> list[Conversation]:
    from cycleqd.training.trajectories import os_conversations
    return os_conversations(**kw)


#: skill type (as in ``RunConfig.skills[].type``) -> conversation builder
BUILDERS: dict[str, Callable[..., list[Conversation]]] = {
    "mbpp": mbpp_conversations,
    "dbbench": _db,
    "os": _os,
}


def build_conversations(skill_type: str, **params: Any) -> list[Conversation]:
    """Training conversations of one skill type (see module doc).

    Raises:
        ValueError: unknown skill type (the known ones are listed) or bad parameters.
    """
    if skill_type not in BUILDERS:
        raise ValueError(f"no training data builder for skill type {skill_type!r}; "
                         f"known: {sorted(BUILDERS)}")
    return BUILDERS[skill_type](**params)

"""Input checks and text post-processing shared by the generation backends."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

_ROLES = ("system", "user", "assistant")


def check_generate_args(conversations: Sequence[Sequence[Mapping[str, str]] | str], max_new_tokens: int,
                        stop: Sequence[str], response_prefix: str = ""
                        ) -> tuple[list[list[dict[str, str]] | str], list[str]]:
    """Validate ``generate`` arguments before any model work.

    Returns:
        (each conversation as a plain list of ``{"role", "content"}`` dicts, or as the raw
        prompt string it was; stop strings as a list).
    Raises:
        ValueError: naming the first bad field (``conversations[i][j].role``,
            ``response_prefix`` etc.).
    """
    if not isinstance(response_prefix, str):
        raise ValueError(f"response_prefix must be a str, got {type(response_prefix).__name__}")
    if isinstance(conversations, (str, bytes)) or not isinstance(conversations, Sequence):
        raise ValueError("conversations must be a sequence of conversations (lists of messages)")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if isinstance(stop, str):
        raise ValueError("stop must be a sequence of strings, not a single string")
    stop = list(stop)
    for k, s in enumerate(stop):
        if not isinstance(s, str) or not s:
            raise ValueError(f"stop[{k}] must be a non-empty string, got {s!r}")
    out = []
    for i, conv in enumerate(conversations):
        if isinstance(conv, str):                  # a raw prompt, used verbatim
            if not conv:
                raise ValueError(f"conversations[{i}] is an empty raw prompt")
            out.append(conv)
            continue
        if isinstance(conv, (bytes, Mapping)) or not isinstance(conv, Sequence) or not conv:
            raise ValueError(f"conversations[{i}] must be a non-empty list of messages or a "
                             f"raw prompt string")
        msgs = []
        for j, m in enumerate(conv):
            if not isinstance(m, Mapping):
                raise ValueError(f"conversations[{i}][{j}] must be a dict with role and content")
            role, content = m.get("role"), m.get("content")
            if role not in _ROLES:
                raise ValueError(f"conversations[{i}][{j}].role must be one of {_ROLES}, got {role!r}")
            if not isinstance(content, str):
                raise ValueError(f"conversations[{i}][{j}].content must be a str, got "
                                 f"{type(content).__name__}")
            msgs.append({"role": role, "content": content})
        out.append(msgs)
    return out, stop


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` cut before the earliest occurrence of any stop string (unchanged if none)."""
    cut = len(text)
    for s in stop:
        k = text.find(s)
        if k != -1:
            cut = min(cut, k)
    return text[:cut]


def check_state_dict(state_dict: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]],
                     optional: set[str] = frozenset()) -> None:
    """Check names and shapes of a weight dict against the loaded model's, before any copy.

    Args:
        state_dict: the new weights.
        expected: name -> shape of the loaded model.
        optional: names that may be absent (e.g. ``lm_head.weight`` tied to the embedding).
    Raises:
        ValueError: unknown names, missing names or a shape mismatch (names them).
    """
    if not isinstance(state_dict, Mapping) or not state_dict:
        raise ValueError("load_weights: state_dict must be a non-empty mapping name -> tensor")
    unknown = sorted(set(state_dict) - set(expected))
    if unknown:
        raise ValueError(f"load_weights: {len(unknown)} unknown weight name(s), e.g. {unknown[:3]}")
    missing = sorted(set(expected) - set(state_dict) - set(optional))
    if missing:
        raise ValueError(f"load_weights: {len(missing)} weight(s) missing, e.g. {missing[:3]}")
    for name, t in state_dict.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"load_weights: state_dict[{name!r}] is {type(t).__name__}, not a tensor")
        if tuple(t.shape) != tuple(expected[name]):
            raise ValueError(f"load_weights: state_dict[{name!r}] has shape {tuple(t.shape)}, "
                             f"the model expects {tuple(expected[name])}")
        if not (t.is_floating_point() or t.is_complex()):
            raise ValueError(f"load_weights: state_dict[{name!r}] has dtype {t.dtype}; "
                             f"weights must be floating point")

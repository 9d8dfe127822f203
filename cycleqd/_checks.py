"""Argument checks with one wording: ``<name> must be <what>, got <value>``.

After pyribs' ``ribs/_utils.py`` (one checker per kind of argument, the message naming the
argument and what it should be). Checks run before any expensive work; each raises
``ValueError`` and returns the value, so a check can sit in an assignment. Nothing here
imports torch or numpy.
"""

from __future__ import annotations

import math
from typing import Any, Sequence


def _fail(name: str, what: str, value: Any) -> ValueError:
    return ValueError(f"{name} must be {what}, got {value!r}")


def check_int(name: str, value: Any, *, min: int = 1, optional: bool = False) -> Any:
    """``value`` is an int (not a bool) >= ``min`` (or None when ``optional``).

    Wording: ``min=1`` says "a positive int", other bounds "an int >= min"; "or None" is
    appended when ``optional``.

    Raises:
        ValueError: e.g. ``batch_size must be a positive int, got 0``.
    """
    if optional and value is None:
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < min:
        what = "a positive int" if min == 1 else f"an int >= {min}"
        raise _fail(name, what + (" or None" if optional else ""), value)
    return value


def check_number(name: str, value: Any, *, min: float | None = None, max: float | None = None,
                 positive: bool = False) -> float:
    """``value`` is a finite real number (not a bool) in ``[min, max]`` (each bound optional),
    ``> 0`` when ``positive``. Returns it as a float.

    Raises:
        ValueError: e.g. ``sigma must be a finite number >= 0, got -1``.
    """
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (not positive or value > 0) and (min is None or value >= min) and (max is None or value <= max)
    if not ok:
        if positive:
            what = "a positive number"
        elif min is not None and max is not None:
            what = f"a number in [{min:g}, {max:g}]"
        else:
            what = "a finite number" + (f" >= {min:g}" if min is not None else "") + \
                (f" <= {max:g}" if max is not None else "")
        raise _fail(name, what, value)
    return float(value)


def check_probability(name: str, value: Any) -> float:
    """``value`` is a number in ``[0, 1]``. Raises ValueError (``... must be a number in [0, 1]``)."""
    return check_number(name, value, min=0.0, max=1.0)


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> Any:
    """``value`` is one of ``choices``. Raises ValueError (``... must be one of [...]``)."""
    if value not in choices:
        raise _fail(name, f"one of {list(choices)}", value)
    return value


def check_shape(name: str, shape: Sequence[int], expected: Sequence[int | None]) -> tuple[int, ...]:
    """``shape`` (e.g. an array's ``.shape``) matches ``expected``; ``None`` in ``expected``
    matches any size on that axis.

    Raises:
        ValueError: e.g. ``scores must be of shape (n, 3), got (4, 2)`` (``None`` is
            written as ``n``).
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != len(expected) or any(e is not None and s != e for s, e in zip(shape, expected)):
        want = "(" + ", ".join("n" if e is None else str(e) for e in expected) + ("," if len(expected) == 1 else "") + ")"
        raise ValueError(f"{name} must be of shape {want}, got {shape}")
    return shape

"""cycleqd/_checks.py: one wording for argument checks."""

from __future__ import annotations

import math

import pytest

from cycleqd._checks import check_choice, check_int, check_number, check_probability, check_shape


@pytest.mark.parametrize("value, kw, msg", [
    (0, {}, "n must be a positive int, got 0"),
    (True, {}, "n must be a positive int, got True"),
    (2.0, {}, "n must be a positive int, got 2.0"),
    (-1, {"min": 0}, "n must be an int >= 0, got -1"),
    ("3", {"optional": True}, "n must be a positive int or None, got '3'"),
])
def test_check_int_refuses(value, kw, msg):
    with pytest.raises(ValueError) as e:
        check_int("n", value, **kw)
    assert str(e.value) == msg


def test_checks_return_good_values():
    assert check_int("n", 3) == 3 and check_int("n", None, optional=True) is None
    assert check_int("n", 0, min=0) == 0
    assert check_number("x", 2, min=0) == 2.0 and check_probability("p", 1) == 1.0
    assert check_choice("e", "a", ("a", "b")) == "a"
    assert check_shape("s", (4, 3), (None, 3)) == (4, 3)


@pytest.mark.parametrize("call, msg", [
    (lambda: check_number("x", -1, min=0), "x must be a finite number >= 0, got -1"),
    (lambda: check_number("x", math.nan), "x must be a finite number, got nan"),
    (lambda: check_number("x", 0, positive=True), "x must be a positive number, got 0"),
    (lambda: check_probability("p", 1.5), "p must be a number in [0, 1], got 1.5"),
    (lambda: check_choice("e", "c", ("a", "b")), "e must be one of ['a', 'b'], got 'c'"),
    (lambda: check_shape("s", (4, 2), (None, 3)), "s must be of shape (n, 3), got (4, 2)"),
    (lambda: check_shape("s", (4,), (None, 3)), "s must be of shape (n, 3), got (4,)"),
])
def test_one_wording(call, msg):
    with pytest.raises(ValueError) as e:
        call()
    assert str(e.value) == msg

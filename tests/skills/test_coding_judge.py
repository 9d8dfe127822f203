"""The coding judge's parts: plain-data wire format, result parsing on the host, replay
rounds for inputs that depend on earlier outputs, tolerance, cache key."""

from __future__ import annotations

import math

import pytest

from cycleqd.skills.coding import judge as _code_judge
from cycleqd.skills.coding import wire
from cycleqd.skills.coding.execute import build_program, run_program
from cycleqd.skills.coding.judge import ExecLimits
from cycleqd.skills.coding.skill import CodingSkill
from cycleqd.skills.coding.data import CodeProblem, load_mbpp

pytestmark = pytest.mark.timeout(300)


# ------------------------------------------------------------------------------ wire
@pytest.mark.parametrize("value", [
    None, True, False, 0, -7, 2 ** 80, -(3 ** 70), 1.5, float("inf"), -0.0, 1e-300, 3 + 4j,
    "héllo\n\t\"", b"\x00\xff", bytearray(b"ab"), [1, [2, (3, {4, 5})]], (), frozenset({1, "a"}),
    {"a": [1, 2], 3: (4,), (1, 2): None}, range(1, 10, 3), [[[]]],
])
def test_wire_roundtrip_exact_types(value):
    back = wire.loads(wire.dumps(value))
    assert back == value and type(back) is type(value)


def test_wire_nan_and_call_keys_are_canonical():
    assert math.isnan(wire.loads(wire.dumps(float("nan"))))
    a = wire.call_key("f", ({3, 1, 2}, "x"), {"b": 1, "a": 2})
    b = wire.call_key("f", ({2, 3, 1}, "x"), {"a": 2, "b": 1})
    assert a == b
    name, args, kwargs = wire.decode_call(a)
    assert name == "f" and args == [{1, 2, 3}, "x"] and kwargs == {"a": 2, "b": 1}


def test_wire_refuses_objects_and_forged_equality():
    class Eq:
        def __eq__(self, other):
            return True

    class S(str):
        def __eq__(self, other):
            return True
        __hash__ = str.__hash__

    for bad in (Eq(), S("x"), [Eq()], {1: Eq()}, object(), print, type):
        with pytest.raises(wire.WireError):
            wire.dumps(bad)
    # results: subclasses are reduced to their builtin value; other objects become opaque
    assert wire.loads(wire.encode_result(S("abc"))) == "abc"
    assert type(wire.loads(wire.encode_result(S("abc")))) is str
    op = wire.loads(wire.encode_result(Eq()))
    assert isinstance(op, wire.Opaque) and op != 1 and op != op.__class__("Eq", True)
    assert bool(op) is True


def test_wire_limits_and_garbage():
    deep = []
    for _ in range(wire.MAX_DEPTH + 5):
        deep = [deep]
    with pytest.raises(wire.WireError):
        wire.dumps(deep)
    for text in ("[" * 100000 + "]" * 100000, '["x", 1]', '["i", "12a"]', '["f", "1" * 99]',
                 "{}", '["l"]', '["s", [["l", []]]]', "not json", '["i", "' + "9" * 6000 + '"]'):
        with pytest.raises(wire.WireError):
            wire.loads(text)


def test_wire_results_iterators_and_views_compare_like_the_originals():
    it = wire.loads(wire.encode_result(x for x in (3, 1, 2)))
    assert set(it) == {1, 2, 3}
    assert wire.loads(wire.encode_result(map(str, [1]))) != ["1"]  # a map is not a list
    keys = wire.loads(wire.encode_result({"a": 1, "b": 2}.keys()))
    assert keys == {"a", "b"}
    from collections import Counter, OrderedDict, namedtuple
    P = namedtuple("P", "x y")
    assert wire.loads(wire.encode_result(P(1, 2))) == (1, 2)
    assert wire.loads(wire.encode_result(Counter("aab"))) == {"a": 2, "b": 1}
    assert wire.loads(wire.encode_result(OrderedDict(a=1))) == {"a": 1}


# ------------------------------------------------------------------------------ host side
def _problem(test_code: str, reference: str, entry: str = "f", pid: str = "mbpp/9001") -> CodeProblem:
    return CodeProblem(id=pid, dataset="mbpp", instruction="t", entry_point=entry,
                       test_code=test_code, reference=reference,
                       tests=tuple(test_code.splitlines()), setup_code="import math")


def test_forged_result_lines_duplicates_and_out_of_range():
    p = _problem("assert f(1) == 2\nassert f(2) == 3\n", "def f(n):\n    return n + 1\n")
    # the harness's results channel is a dup of the original stdout (fd 1 is stderr now)
    forged = ("import os\ndef f(n):\n    for fd in range(1, 10):\n        try:\n"
              "            os.write(fd, b'R\\t0\\tok\\t2\\nR\\t1\\tok\\t3\\n')\n"
              "        except OSError:\n            pass\n    return n + 1\n")
    v = run_program(build_program(p, forged))
    assert not v.passed and v.status == "bad_output" and "two results" in v.detail
    junk = ("import os\ndef f(n):\n    os.write(1, b'R\\t99\\tok\\t1\\nR\\tx\\tok\\t1\\nPASS\\n')\n"
            "    return n + 1\n")
    assert run_program(build_program(p, junk)).passed  # junk ignored, real outputs right
    deep = ("import os\ndef f(n):\n    for fd in range(1, 10):\n        try:\n"
            "            for i in (b'0', b'1'):\n"
            "                os.write(fd, b'R\\t' + i + b'\\tok\\t' + b'[\"l\",[' * 5000 + b'\\n')\n"
            "        except OSError:\n            pass\n    os._exit(0)\n")
    v = run_program(build_program(p, deep))  # a parse bomb aimed at the judge
    assert not v.passed and v.status == "error" and "not readable" in v.detail, v


def test_rounds_for_inputs_that_depend_on_outputs():
    test = "y = f(1)\nassert y in (2, 10)\nassert f(y) == y + 1\n"
    p = _problem(test, "def f(n):\n    return n + 1\n", pid="mbpp/9002")
    plan = _code_judge.plan_calls([p])[p.id]
    assert len(plan.calls) == 2 and plan.reference_passed
    other = "def f(n):\n    return 10 if n == 1 else n + 1\n"  # valid, different path
    assert run_program(build_program(p, other)).passed
    wrong = "def f(n):\n    return 10 if n == 1 else n\n"
    v = run_program(build_program(p, wrong))
    assert not v.passed and v.status == "fail"


def test_tolerance_is_the_benchmarks_own():
    p = next(q for q in load_mbpp(split="all") if q.id == "mbpp/82")  # math.isclose rel 1e-3
    close = "import math\ndef volume_sphere(r):\n    return 4 / 3 * 3.1416 * r ** 3\n"
    far = "import math\ndef volume_sphere(r):\n    return 4 / 3 * 3.2 * r ** 3\n"
    assert run_program(build_program(p, close)).passed
    assert not run_program(build_program(p, far)).passed


def test_exceptions_and_truthiness():
    p = next(q for q in load_mbpp(split="all") if q.id == "mbpp/737")  # assert check_str(..)
    truthy = "import re\ndef check_str(s):\n    return re.match('^[aeiouAEIOU]', s)\n"
    assert run_program(build_program(p, truthy)).passed
    raising = "def check_str(s):\n    raise ValueError('nope')\n"
    v = run_program(build_program(p, raising))
    assert not v.passed and v.status == "error" and "ValueError" in v.detail


def test_run_program_refuses_plain_strings():
    with pytest.raises(TypeError, match="CodeProgram"):
        run_program("assert True\n")


def test_cache_key_tracks_the_judge(monkeypatch):
    from cycleqd.skills.coding import skill as coding
    a = CodingSkill("mbpp", limit=2).cache_key
    monkeypatch.setattr(coding, "JUDGE_VERSION", "something-else")
    assert CodingSkill("mbpp", limit=2).cache_key != a
    monkeypatch.undo()
    monkeypatch.setattr(coding, "JUDGE_SOURCE_HASH", "0" * 16)
    assert CodingSkill("mbpp", limit=2).cache_key != a
    monkeypatch.undo()
    assert CodingSkill("mbpp", limit=2, limits=ExecLimits(max_result_bytes=4096)).cache_key != a

"""MBPP+ under the official protocol: EvalPlus deserialisation, the base-input judge (ground
truth from the canonical solution in a sandbox, EvalPlus's comparison rule), the raw prompt."""

from __future__ import annotations

import math

import pytest

from cycleqd.skills.coding import official, wire
from cycleqd.skills.coding.data import load_mbppplus
from cycleqd.skills.coding.execute import prepare_program, run_programs
from cycleqd.skills.coding.plusjudge import ground_truth, outputs_match
from cycleqd.skills.coding.skill import CodingSkill, check_args

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def plus():
    try:
        return {p.id: p for p in load_mbppplus()}
    except FileNotFoundError as e:
        pytest.skip(str(e))


def _args(p, i=0):
    name, args, kwargs = wire.decode_call(p.calls[i])
    assert name == p.entry_point and kwargs == {}
    return args


def _judge(problems_and_code):
    progs = {f"s{i}": prepare_program(p, code) for i, (p, code) in enumerate(problems_and_code)}
    v = run_programs(progs)
    return [v[f"s{i}"] for i in range(len(problems_and_code))]


# ------------------------------------------------------------------ data
def test_special_type_inputs_are_deserialised_as_evalplus_does(plus):
    # expected values written from evalplus 0.3.1 data/mbpp.py mbpp_deserialize_inputs and the
    # JSON base_input of each task (not from the loader)
    assert len(plus) == 399
    a = _args(plus["mbppplus/2"])  # lists -> tuples
    assert a == [(3, 4, 5, 6), (5, 7, 4, 10)] and all(type(x) is tuple for x in a)
    a = _args(plus["mbppplus/124"])  # ["0", "1j"] -> (float, complex)
    assert a == [0.0, 1j] and type(a[0]) is float and type(a[1]) is complex
    assert _args(plus["mbppplus/252"]) == [complex(1)] and type(_args(plus["mbppplus/252"])[0]) is complex
    a = _args(plus["mbppplus/115"], 1)  # [[1, 2], [], []] -> [{1, 2}, {}, {}]
    assert a == [[{1, 2}, {}, {}]] and type(a[0][0]) is set and type(a[0][1]) is dict
    a = _args(plus["mbppplus/722"])  # dict values -> tuples
    assert a[0]["Cierra Vega"] == (6.2, 70) and a[1:] == [6.0, 70]
    assert _args(plus["mbppplus/580"]) == [(4, 5, (7, 6, (2, 4)), 6, 8)]  # nested -> tuples
    assert plus["mbppplus/82"].atol == 1e-4 and plus["mbppplus/2"].atol == 0.0
    assert plus["mbppplus/2"].tests == ("assert set(similar_elements((3, 4, 5, 6),(5, 7, 4, 10))) == set((4, 5))",)


# ------------------------------------------------------------------ the judge
def test_canonical_solutions_pass_and_wrong_ones_fail(plus):
    ids = ["mbppplus/2", "mbppplus/115", "mbppplus/124", "mbppplus/252", "mbppplus/581"]
    wrong = plus["mbppplus/17"]  # square_perimeter: 4*a
    vs = _judge([(plus[i], plus[i].reference) for i in ids]
                + [(wrong, "def square_perimeter(a):\n    return 4 * a + (a == 10)\n"),
                   (wrong, "def square_perimeter(a):\n    raise ValueError('no')\n")])
    assert [v.status for v in vs[:5]] == ["pass"] * 5, vs
    assert vs[5].status == "fail" and "wrong output" in vs[5].detail
    assert vs[6].status == "error" and "ValueError" in vs[6].detail
    gt = ground_truth([plus["mbppplus/17"]])["mbppplus/17"]
    assert gt.detail == "" and len(gt.outputs) == len(plus["mbppplus/17"].calls)
    assert all(t >= 1.0 for t in gt.time_limits())  # max(1 s, 4 x the canonical's time)


def test_float_outputs_use_atol(plus):
    p = plus["mbppplus/82"]  # volume_sphere, atol 1e-4
    code = "import math\ndef volume_sphere(r):\n    return 4 / 3 * math.pi * r ** 3 + {}\n"
    near, far, as_int = _judge([(p, code.format("5e-5")), (p, code.format("1e-2")),
                                (p, "def volume_sphere(r):\n    return round(4 / 3 * 3.14159265 * r ** 3)\n")])
    assert near.passed and not far.passed and far.status == "fail" and not as_int.passed
    # the rule itself (evalplus unsafe_execute): atol 0 becomes 1e-6 for float outputs, the
    # type must match, then numpy.allclose(rtol=1e-7)
    assert outputs_match("f", [], 1.0 + 5e-7, 1.0, 0.0) == (True, 1e-6)
    assert outputs_match("f", [], 1.0 + 1e-5, 1.0, 0.0) == (False, 1e-6)
    assert outputs_match("f", [], [1.0, 2.0 + 1e-5], [1.0, 2.0], 1e-4)[0]
    assert not outputs_match("f", [], (1.0, 2.0), [1.0, 2.0], 1e-4)[0]
    assert not outputs_match("f", [], [1.0], [1.0, 2.0], 1e-4)[0]
    assert not outputs_match("f", [], "1.0", 1.0, 1e-4)[0]
    assert not outputs_match("f", [], math.nan, math.nan, 1e-4)[0]
    # special oracles: set equality, "not None", surface_Area rounding
    assert outputs_match("similar_elements", [], (5, 4), (4, 5), 0)[0]
    assert outputs_match("surface_Area", [3, 4], 35, 33, 0)[0]  # the oracle: round(...) = 35
    assert not outputs_match("surface_Area", [3, 4], 34, 33, 0)[0]
    assert not outputs_match("similar_elements", [], (5,), (4, 5), 0)[0]


HOSTILE = '''
import os, sys, glob
def similar_elements(a, b):
    for f in glob.glob("/cq/*") + glob.glob("/root/*"):
        sys.stderr.write(f + "\\n")
    try:
        open("/cq/truth.json", "w").write("{}")
    except OSError:
        pass
    os._exit(0)
'''

FORGED = '''
class Anything(tuple):
    def __eq__(self, other):
        return True
    def __hash__(self):
        return 0
def similar_elements(a, b):
    return Anything((999,))
'''

SLOW = '''
import time
_n = []
def similar_elements(a, b):
    if not _n:
        _n.append(1)
        time.sleep(1.3)
    return tuple(set(a) & set(b))
'''


def test_hostile_candidates_cannot_pass(plus):
    p = plus["mbppplus/2"]
    hostile, forged, slow = _judge([(p, HOSTILE), (p, FORGED), (p, SLOW)])
    assert hostile.status == "no_result" and not hostile.passed
    assert forged.status == "fail" and not forged.passed  # arrives as the plain tuple (999,)
    assert slow.status == "timeout" and "limit" in slow.detail  # over max(1 s, 4 x gt time)
    # the ground truth is unchanged by the hostile run (it lives in this process only)
    assert _judge([(p, p.reference)])[0].passed


# ------------------------------------------------------------------ the skill
class RawBackend:
    """Records what a GenerationBackend receives; replies with the canonical solution
    (continuing the prefix, then closing the fence and chatting) for ``good`` ids."""

    def __init__(self, skill, good):
        self.fingerprint = "fp-raw"
        self.seen = []
        self.by_prompt = {skill.conversation(p): (p.reference + "```\nThis works." if p.id in good
                                                  else "\ndef nothing():\n    pass\n```")
                          for p in skill.problems}

    def generate(self, conversations, *, max_new_tokens, stop=(), response_prefix=""):
        self.seen.append((list(conversations), max_new_tokens, tuple(stop), response_prefix))
        return [self.by_prompt[c] for c in conversations]


def test_skill_sends_the_raw_official_prompt_and_scores_base_pass_at_1(plus):
    sk = CodingSkill("mbppplus", limit=3)
    assert [p.id for p in sk.problems] == ["mbppplus/2", "mbppplus/3", "mbppplus/4"]
    be = RawBackend(sk, {"mbppplus/2", "mbppplus/4"})
    r = sk.evaluate(be)
    (convs, max_new, stop, prefix), = be.seen
    assert (max_new, stop, prefix) == (512, official.STOP, "```python")
    assert convs[0] == (
        official.SYSTEM_MESSAGE + "\n\n@@ Instruction:\nWrite a function to find the shared elements "
        "from the given two lists. Your code should satisfy the following assertion:\n```python\n"
        "assert set(similar_elements((3, 4, 5, 6),(5, 7, 4, 10))) == set((4, 5))\n```\n\n@@ Response:")
    assert r.outcomes == {"mbppplus/2": 1.0, "mbppplus/3": 0.0, "mbppplus/4": 1.0}
    assert r.quality == pytest.approx(2 / 3)
    mbpp = CodingSkill("mbpp", split="all", limit=3)
    assert sk.cache_key.startswith("coding/mbppplus/") and sk.cache_key != mbpp.cache_key
    with pytest.raises(ValueError, match="split"):
        check_args("mbppplus", {"split": "search"})
    check_args("mbppplus", {})

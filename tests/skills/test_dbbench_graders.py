"""DB-Bench grader rules (strict default and the named ``agentbench`` option), the cache
key, and the reference answers through the grader. Attacks: tests/security/test_db_graders.py."""

from __future__ import annotations

import json

import pytest

from cycleqd.sandbox.sql import (GROUP_CONCAT_MAX_LEN, Reference, TableRows, TableSpec,
                                 table_hash_md5)
from cycleqd.skills.agentbench.dbbench import (INVALID, NONE, DBBenchSkill, compare_answer, judge_answer,
                                    judge_table, strict_values)

try:
    from .test_dbbench_common import ScriptedModel, mariadb_or_skip, needs_db_data, needs_sandbox
except ImportError:  # rootdir-relative import mode
    from test_dbbench_common import ScriptedModel, mariadb_or_skip, needs_db_data, needs_sandbox


# ----------------------------------------------------------------------- strict SELECT rules

@pytest.mark.parametrize("answer,gold,ok", [
    # kept from AgentBench: order-insensitive, numeric tolerance 1e-2, quotes/space stripped
    ('["b", "a"]', ["a", "b"], True),
    ("[3.004]", ["3"], True),
    ("[3.02]", ["3"], False),
    ("[1, 2.0]", ["2", "1"], True),
    ("[1.001, 2]", ["2", "1"], True),
    ("[('a',), ('b',)]", ["b", "a"], True),          # a pasted MySQL result
    ("[('Ann', 30)]", ["Ann", "30"], True),          # a row counts cell by cell
    ('["30,000"]', ["30000"], True),                 # thousands separators of a number
    ('["12.5%"]', ["12.5"], True),                   # percent sign after a number
    ("[Bronze, Silver]", ["Silver", "Bronze"], True),  # AgentBench's unquoted split
    (" 'Bronze' ", ["Bronze"], True),                # a bare value
    ('["Women +60kg Bronze"]', ["Women +60kg Bronze"], True),
    # strict where AgentBench is lenient
    ('["a", "a", "b"]', ["a", "b"], False),          # multiset, not set
    ('["a,b"]', ["ab"], False),                      # commas inside text are kept
    ('["1_000"]', ["1000"], False),                  # Python-only number syntax is text
    ('["abc%"]', ["abc"], False),
    ('["None"]', ["0"], False), ('[""]', ["0"], False), ("[]", ["0"], False),
    ('["nan"]', ["0"], False), ('["inf"]', ["0"], False), ("", ["0"], False),
    ('["x", "nan"]', ["x", "0"], False),
    ('["bronze"]', ["Bronze"], False),               # case matters (AgentBench: too)
    ("[1, 2, 3]", ["2", "1"], False),
    ("[1, 2]", ["1", "2", "2"], False),
    # the dataset's "none" gold (an empty result): only an explicit none/null/None
    ('["none"]', ["none"], True), ("[None]", ["none"], True), ('["NULL"]', ["none"], True),
    ("[]", ["none"], False), ('[""]', ["none"], False), ("[0]", ["none"], False),
    ('["none", "none"]', ["none"], False),
])
def test_strict_rules(answer, gold, ok):
    assert compare_answer(answer, gold) is ok, judge_answer(answer, gold)


def test_strict_values_and_reasons():
    assert strict_values(None) is None and strict_values("  ") is None
    assert strict_values("[]") is None
    assert strict_values('["a", None, "", 7, "8%"]') == ["a", NONE, INVALID, 7.0, 8.0]
    assert strict_values("x" * 70000) is None  # over MAX_ANSWER_CHARS
    assert strict_values("[__import__('os').getpid()]") == ["__import__(os).getpid()"]
    ok, why = judge_answer('["a", "a"]', ["a"])
    assert not ok and "values" in why
    with pytest.raises(ValueError, match="scorer"):
        judge_answer("[1]", ["1"], scorer="lenient")


@pytest.mark.parametrize("answer,gold", [
    ('["None"]', ["0"]), ('[""]', ["0"]), ('["nan"]', ["0.0"]), ('["a", "a", "b"]', ["a", "b"]),
    ('["30,000"]', ["30000"]), ("[3.004]", ["3"]), ('["b", "a"]', ["a", "b"]),
])
def test_agentbench_option_keeps_agentbench_rules(answer, gold):
    """``scorer="agentbench"``: AgentBench's DBResultProcessor (special values -> "0",
    sets), kept as a named option."""
    assert compare_answer(answer, gold, scorer="agentbench")


@pytest.mark.parametrize("answer,gold,ok", [
    (' ["a", "a", "b"]', ["a", "b"], True),   # sets
    (" [3.004]", ["3"], False),               # exact float equality, no tolerance
    (" [0]", ["0.0"], True),
    (' ["None"]', ["0.0"], False),            # no special-value mapping in v0.2
    (" 5", ["5"], True),
    (' ["a"] * 3', ["a"], False),             # literal_eval, not eval: one text value
])
def test_agentbench_v02_option(answer, gold, ok):
    """``scorer="agentbench-v0.2"``: AgentBench v0.2's metric, which the official CycleQD
    code runs through fishfarm."""
    assert compare_answer(answer, gold, scorer="agentbench-v0.2") is ok


# ----------------------------------------------------------------------- strict table rule

def _ref(rows, cols=("a", "b")):
    return Reference(table_hash_md5(rows), TableRows(tuple(cols), tuple(map(tuple, rows))))


def test_judge_table():
    gold = [("1", "x"), ("2", None)]
    ref, md5 = _ref(gold), table_hash_md5(gold)
    same = TableRows(("a", "b"), (("2", None), ("1", "x")))
    assert judge_table(same, ref, md5, ("a", "b"), md5) == (True, "match")
    empty_not_null = TableRows(("a", "b"), (("1", "x"), ("2", "")))
    assert not judge_table(empty_not_null, ref, md5, ("a", "b"), md5)[0]
    assert not judge_table(TableRows(("a", "b", "c"), (("1", "x", None), ("2", None, None))),
                           ref, md5, ("a", "b"), md5)[0]
    dup = TableRows(("a", "b"), (("1", "x"), ("2", None), ("2", None)))
    assert not judge_table(dup, ref, md5, ("a", "b"), md5)[0]
    ok, why = judge_table(same, ref, "0" * 32, ("a", "b"), md5)
    assert not ok and "unsolvable" in why
    assert not judge_table(None, ref, md5, ("a", "b"), md5)[0]


def test_hash_is_agentbench_faithful():
    """NULLs skipped (CONCAT_WS), numbers rendered as MySQL does, row hashes cut at
    MySQL 8's group_concat_max_len (1024 bytes = 170 row hashes of 6 bytes)."""
    assert table_hash_md5([("a", None, 3.0)]) == table_hash_md5([("a", 3)])
    assert GROUP_CONCAT_MAX_LEN == 1024
    rows = [(str(i),) for i in range(400)]
    # past the cut, the rows whose hashes sort last do not change the hash (as in MySQL)
    import hashlib

    hs = sorted(hashlib.md5(r[0].encode()).hexdigest()[:5] for r in rows)
    last = next(r for r in rows if hashlib.md5(r[0].encode()).hexdigest()[:5] == hs[-1])
    assert table_hash_md5([r for r in rows if r != last]) == table_hash_md5(rows)


def test_tablespec_problem():
    assert TableSpec("t", ("a", "b"), (("1", "2"),)).problem() is None
    assert "empty" in TableSpec("t", ("a", ""), ()).problem()
    assert "same name" in TableSpec("t", ("A", "a"), ()).problem()
    assert "space" in TableSpec("t", ("a ",), ()).problem()
    assert "longer" in TableSpec("t", ("a" * 65,), ()).problem()
    assert "row 0" in TableSpec("t", ("a",), (("1", "2"),)).problem()
    assert "empty" in TableSpec("", ("a",), ()).problem()


@needs_db_data
def test_no_item_of_the_dataset_is_unbuildable():
    from cycleqd.skills.agentbench.data import load_dbbench_all

    assert [it.id for it in load_dbbench_all() if it.table.problem()] == []


# ----------------------------------------------------------------------- options and cache key

@needs_db_data
def test_scorer_option_and_cache_key():
    a = DBBenchSkill(split="search", limit=3)
    b = DBBenchSkill(split="search", limit=3, scorer="agentbench")
    c = DBBenchSkill(split="search", limit=3, scorer="agentbench-v0.2")
    assert a.scorer == "strict" and b.scorer == "agentbench"
    assert len({a.cache_key, b.cache_key, c.cache_key}) == 3
    with pytest.raises(ValueError, match="scorer"):
        DBBenchSkill(split="search", limit=3, scorer="lenient")
    import cycleqd.skills.agentbench.dbbench as mod

    key_a, old = a.cache_key, dict(mod.SCORERS)
    try:  # a new version of the rules never reuses outcomes scored under the old one
        mod.SCORERS["strict"] = old["strict"] + "-next"
        assert DBBenchSkill(split="search", limit=3).cache_key != key_a
    finally:
        mod.SCORERS.clear()
        mod.SCORERS.update(old)
    assert DBBenchSkill(split="search", limit=3).cache_key == key_a


@needs_db_data
@needs_sandbox
def test_cached_outcomes_are_not_reused_across_scorers(tmp_path):
    kw = dict(split="all", cache=tmp_path / "c.sqlite")
    model = ScriptedModel(lambda conv: 'Action: Answer\nFinal Answer: ["None"]', fingerprint="m")
    lenient = DBBenchSkill(**kw, scorer="agentbench")
    lenient.items = [it for it in lenient.items if it.id == "dbbench/42"]
    assert lenient.evaluate(model).quality == 1.0  # AgentBench: "None" == "0"
    strict = DBBenchSkill(**kw)
    strict.items = lenient.items
    assert strict.evaluate(model).quality == 0.0
    assert model.batches == [1, 1]  # the strict run did not read the lenient outcome


# ----------------------------------------------------------------------- reference answers

def _gold_counts(backend: str, scorer: str) -> tuple[int, int, list[str]]:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from db_gold import run  # noqa: PLC0415

    res = run(backend, scorer, None)
    mod, sel = (int(res[k].split("/")[0]) for k in ("modification", "select"))
    return mod, sel, sorted(res["failures"])


@needs_db_data
@needs_sandbox
def test_gold_passes_strict_sqlite():
    """The reference agent through the strict grader: 199/200 modification items (the
    exception dbbench/225: its gold statement does not reproduce answer_md5), 100/100
    SELECT items."""
    assert _gold_counts("sqlite", "strict") == (199, 100, ["dbbench/225"])


@needs_db_data
@pytest.mark.mariadb
def test_gold_passes_strict_mariadb():
    mariadb_or_skip()
    assert _gold_counts("mariadb", "strict") == (199, 100, ["dbbench/225"])


def test_json_gold_labels_roundtrip():
    """The reference agent answers ``json.dumps(label)``; labels of several values and
    the ``none`` gold survive that round trip under the strict scorer."""
    for label in (["none"], ["0.0"], ["a", "b", "a"], ["1,234"], ["2006 AFC U-17 Championship"]):
        assert compare_answer(json.dumps(label), label)

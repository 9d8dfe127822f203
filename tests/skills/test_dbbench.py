"""DB-Bench skill: protocol, scoring, gold statements on both SQL backends."""

from __future__ import annotations

import collections

import pytest

from cycleqd.sandbox.sql import MariaDBBackend, SQLiteBackend, TableSpec, table_hash_md5
from cycleqd.skills.agentbench.data import dbbench_split_ids, load_dbbench, load_dbbench_all
from cycleqd.skills.agentbench.db_format import format_observation, observation
from cycleqd.skills.agentbench.dbbench import (DB_PROMPT, DBBenchSkill, compare_answer, parse_answer,
                                    parse_reply)

try:
    from .test_dbbench_common import (ScriptedModel, final_answer, mariadb_or_skip,
                                      needs_db_data, needs_sandbox)
except ImportError:  # rootdir-relative import mode (no __init__.py in tests/)
    from test_dbbench_common import (ScriptedModel, final_answer, mariadb_or_skip,
                                     needs_db_data, needs_sandbox)

# The one INSERT/UPDATE item whose answer_md5 no single edit of its table reproduces
# (checked by brute force over every cell): a data error, identical on both backends.
KNOWN_BAD_MD5 = {"dbbench/225"}


# ----------------------------------------------------------------------- pure functions

def test_compare_answer_agentbench_rules():
    assert compare_answer('["Women +60kg Bronze"]', ["Women +60kg Bronze"])
    assert not compare_answer('["Women +60kg Silver"]', ["Women +60kg Bronze"])
    assert compare_answer("[3.004]", ["3"])          # numeric tolerance 1e-2
    assert not compare_answer("[3.02]", ["3"])
    assert compare_answer('["b", "a"]', ["a", "b"])  # order-insensitive
    assert compare_answer("[('a',), ('b',)]", ["b", "a"])  # MySQL result pasted as answer
    assert compare_answer("[1, 2.0]", [2, 1])
    assert not compare_answer("[1, 2, 3]", [2, 1])
    assert compare_answer('["30,000"]', ["30000"])   # thousands separators dropped
    assert compare_answer("[__import__('os').system('echo pwned')]", ["x"]) is False


def test_parse_answer_never_evaluates_code():
    assert parse_answer("[__import__('os').getpid()]") == ["__import__(os).getpid()"]
    assert parse_answer("[None]") == ["0"]
    assert parse_answer("42") == ["42"]


def test_parse_reply():
    assert parse_reply("x\nAction: Operation\n```sql\nSELECT 1\n  FROM t;\n```") == \
        ("operation", "SELECT 1   FROM t;")
    assert parse_reply("Action: Operation\nno block") == ("operation", None)
    assert parse_reply('Action: Answer\nFinal Answer: ["a"]') == ("answer", ' ["a"]')
    assert parse_reply("I don't know") == (None, None)


def test_table_hash_and_observation():
    assert table_hash_md5([]) is None
    assert table_hash_md5([("a", None, 3.0)]) == table_hash_md5([("a", 3)])  # NULL skipped; 3.0 -> "3"
    obs = format_observation([("x" * 1000,)])
    assert obs.endswith("[TRUNCATED]") and len(obs) == 800 + len("[TRUNCATED]")


# ----------------------------------------------------------------------- data and splits

@needs_db_data
def test_splits_are_fixed_stratified_and_disjoint():
    items = load_dbbench_all()
    assert len(items) == 300
    sp = dbbench_split_ids(items)
    print("dbbench sizes:", {k: len(v) for k, v in sp.items()})
    assert {k: len(v) for k, v in sp.items()} == {"train": 50, "validation": 50, "search": 100, "test": 100}
    names = list(sp)
    assert all(not set(sp[a]) & set(sp[b]) for a in names for b in names if a < b)
    assert set().union(*sp.values()) == {it.id for it in items}
    by = {it.id: it for it in items}
    for ids in sp.values():  # every type is spread over the three splits
        types = collections.Counter(by[i].type for i in ids)
        assert set(types) == {it.type for it in items}
    assert sp == dbbench_split_ids(load_dbbench_all())  # deterministic
    first = load_dbbench(split="search", limit=9)
    assert [it.id for it in first] == sp["search"][:9]
    assert collections.Counter(it.category for it in first) == {"SELECT": 3, "INSERT": 3,
                                                               "UPDATE": 3}


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="split"):
        DBBenchSkill(split="valid")
    with pytest.raises(ValueError, match="max_rounds"):
        DBBenchSkill(max_rounds=0)
    with pytest.raises(ValueError, match="backend"):
        DBBenchSkill(backend="postgres")
    with pytest.raises(FileNotFoundError, match="DB-Bench"):
        DBBenchSkill(data_path="/nonexistent/dir")


# ----------------------------------------------------------------------- gold on backends

def _gold_hash_fraction(backend) -> tuple[int, int, list[str]]:
    items = [it for it in load_dbbench_all() if it.is_modification]
    ok, bad = 0, []
    with backend:
        for it in items:
            backend.create(it.id, it.table)
            backend.execute(it.id, it.label[0])
            if backend.table_hash(it.id) == it.answer_md5:
                ok += 1
            else:
                bad.append(it.id)
            backend.drop(it.id)
    return ok, len(items), bad


@needs_db_data
@needs_sandbox
def test_gold_statements_reproduce_answer_md5_sqlite():
    ok, n, bad = _gold_hash_fraction(SQLiteBackend())
    print(f"\nSQLite: gold label reproduces answer_md5 on {ok}/{n}; mismatches: {bad}")
    assert n == 200 and set(bad) == KNOWN_BAD_MD5


@needs_db_data
@pytest.mark.mariadb
def test_gold_statements_reproduce_answer_md5_mariadb():
    cfg = mariadb_or_skip()
    ok, n, bad = _gold_hash_fraction(MariaDBBackend(cfg))
    print(f"\nMariaDB: gold label reproduces answer_md5 on {ok}/{n}; mismatches: {bad}")
    assert n == 200 and set(bad) == KNOWN_BAD_MD5


# ----------------------------------------------------------------------- the skill

def _gold_policy(items):
    by_q = {it.description + "\n" + it.add_description: it for it in items}

    def policy(conv):
        assert conv[0]["content"] == DB_PROMPT and conv[1]["content"] == "Ok."
        it = by_q[conv[2]["content"]]
        n_done = sum(1 for m in conv[3:] if m["role"] == "assistant")
        if it.is_modification and n_done == 0:
            return f"I will change the table.\nAction: Operation\n```sql\n{it.label[0]}\n```"
        if it.is_modification:
            return final_answer(["done"])
        return "The answer is known.\n" + final_answer(list(it.label))
    return policy


def _run_gold_and_wrong(backend: str):
    sk = DBBenchSkill(split="search", limit=24, backend=backend, episode_batch=10)
    gold = ScriptedModel(_gold_policy(sk.items))
    r = sk.evaluate(gold)
    solvable = [it.id for it in sk.items if it.id not in KNOWN_BAD_MD5]
    assert all(r.outcomes[i] == 1.0 for i in solvable), {
        i: sk.last_details[i] for i in solvable if r.outcomes[i] != 1.0}
    assert max(gold.batches) == 10  # lockstep: one batch per turn per chunk
    assert 0 < r.quality <= 1 and set(r.subscores) >= {"dbbench_SELECT", "dbbench_INSERT",
                                                       "dbbench_UPDATE", "dbbench_overall_cat"}

    # known-wrong answers: wrong final answers, a wrong modification, no action at all
    def wrong(conv):
        n_done = sum(1 for m in conv[3:] if m["role"] == "assistant")
        if "INSERT" in conv[2]["content"] or n_done:
            return final_answer(["definitely wrong"])
        return ("Action: Operation\n```sql\nUPDATE `" + "x" * 3 + "` SET a = 1\n```" if n_done == 0
                else final_answer(["nope"]))
    r2 = sk.evaluate(ScriptedModel(wrong, fingerprint="wrong"))
    assert r2.quality == 0.0


@needs_db_data
@needs_sandbox
def test_skill_gold_passes_wrong_fails_sqlite():
    _run_gold_and_wrong("sqlite")


@needs_db_data
@pytest.mark.mariadb
def test_skill_gold_passes_wrong_fails_mariadb():
    mariadb_or_skip()
    _run_gold_and_wrong("mariadb")


@needs_db_data
@needs_sandbox
def test_multi_turn_protocol_and_malformed_sql():
    """Malformed SQL is an observation; the episode continues; 5 operations at most."""
    sk = DBBenchSkill(split="test", limit=1)
    item = sk.items[0]
    seen: list[str] = []

    def policy(conv):
        if conv[-1]["role"] == "user" and len(conv) > 3:
            seen.append(conv[-1]["content"])
        n = sum(1 for m in conv[3:] if m["role"] == "assistant")
        sql = ["SELEC nonsense FROM", f"SELECT COUNT(*) FROM `{item.table.name}`",
               "SELECT 1; SELECT 2", "SELECT * FROM no_such_table", "SELECT 'a\\nb'",
               "SELECT 6"][n]
        return f"Action: Operation\n```sql\n{sql}\n```"
    model = ScriptedModel(policy)
    r = sk.evaluate(model)
    assert len(model.batches) == 6  # 5 operations + 1 final reply
    assert len(seen) == 5
    assert "syntax error" in seen[0].lower() and seen[1] == f"[({len(item.table.rows)},)]"
    assert "error" in seen[2].lower() and "no such table" in seen[3].lower()
    assert seen[4] == "[('a\\nb',)]"  # MySQL backslash escape honoured
    assert r.quality == 0.0 and sk.last_details[item.id]["rounds"] == 5


@needs_sandbox
def test_sqlite_backend_isolates_episodes_and_survives_a_crash():
    t = TableSpec("people", ("name", "age"), (("Ann", 30), ("Bob", 41)))
    with SQLiteBackend(statement_timeout_s=1.0) as be:
        be.create("a", t)
        be.create("b", t)
        assert observation(be.execute("a", "INSERT INTO people VALUES ('Cy', '5')")) == "[]"
        assert observation(be.execute("b", "SELECT COUNT(*) FROM people")) == "[(2,)]"
        assert "interrupted" in observation(be.execute(
            "a", "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c) "
                 "SELECT COUNT(*) FROM c"))
        assert "not authorized" in observation(be.execute("b", "ATTACH DATABASE '/tmp/x.db' AS x"))
        # case/accent-insensitive comparison like MySQL's utf8mb4_general_ci
        assert observation(be.execute("b", "SELECT name FROM people WHERE name = 'ann'")) == "[('Ann',)]"
        # kill the worker from inside: the other episode's data is rebuilt
        be._worker._sb.stop()
        assert observation(be.execute("a", "SELECT COUNT(*) FROM people")) == "[(3,)]"
        assert observation(be.execute("b", "SELECT COUNT(*) FROM people")) == "[(2,)]"
        assert be.restarts == 1


@needs_db_data
@needs_sandbox
def test_outcomes_are_cached_per_fingerprint(tmp_path):
    sk = DBBenchSkill(split="search", limit=6, cache=tmp_path / "c.sqlite")
    model = ScriptedModel(lambda conv: final_answer(["x"]), fingerprint="fp-a")
    r1 = sk.evaluate(model)
    r2 = sk.evaluate(model)
    assert model.batches == [6] and r1.outcomes == r2.outcomes
    other = ScriptedModel(lambda conv: final_answer(["x"]), fingerprint="fp-b")
    sk.evaluate(other)
    assert other.batches == [6]

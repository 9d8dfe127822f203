"""Attacks on the DB-Bench *grader* (issue 12, items 2 and 6).

Each attack is what a child model could learn to do under evolution: answer nothing and
match a gold 0, repeat a value to match a set, write a table that hashes like the gold one
without being it, change the table, read other episodes' databases, answer with a huge
list, or meet an item whose table cannot be built. Each must end as a failed sample (the
honest control passes), with the host and the database server untouched and reusable.

Written against the skill's public API of before the fix (``compare_answer``,
``DBBenchSkill.evaluate``), so they ran on the old grader too. There the non-answer,
repeat, huge-answer, NULL/extra-column hash and unbuildable-item attacks scored (or
killed the run: MariaDB on an empty column name, both backends on a short row); the
tamper-a-SELECT-table and read-other-episodes attacks already ended as failed samples,
and the inflated table scored 0 there too (the old grader never read rows back).
"""

from __future__ import annotations

import json
import os
import time

import pytest

from cycleqd.sandbox import sandbox_status
from cycleqd.sandbox.sql import MariaDBConfig, mariadb_ping, table_hash_md5
from cycleqd.paths import data_dir as default_data_dir
from cycleqd.skills.agentbench.db_format import observation
from cycleqd.skills.agentbench.dbbench import DBBenchSkill, compare_answer

SANDBOX = sandbox_status()
HAS_DB_DATA = (default_data_dir() / "dbbench" / "standard.jsonl").is_file()


def _mariadb_cfg() -> MariaDBConfig:
    cfg = MariaDBConfig.from_env()
    why = mariadb_ping(cfg)
    if why is not None:
        if os.environ.get("CYCLEQD_REQUIRE_MARIADB") == "1":
            pytest.fail(f"CYCLEQD_REQUIRE_MARIADB=1 but {why}")
        pytest.skip(f"{why} (run `source .ci/mariadb.sh`)")
    return cfg


BACKENDS = [
    pytest.param("sqlite", marks=pytest.mark.skipif(not SANDBOX.available,
                                                    reason=f"no sandbox: {SANDBOX.reason}")),
    pytest.param("mariadb", marks=pytest.mark.mariadb),
]


def _backend(name: str):
    from cycleqd.sandbox.sql import MariaDBBackend, SQLiteBackend

    if name == "sqlite":
        return SQLiteBackend(statement_timeout_s=2.0)
    return MariaDBBackend(_mariadb_cfg(), statement_timeout_s=2.0)


def _md5_field(rows) -> str:
    return str([(table_hash_md5(rows),)])


def _item(desc: str, columns, rows, *, label, typ="other", answer_md5=None, name="t") -> dict:
    e = {"description": desc, "add_description": f"The table is {name}.",
         "table": {"table_name": name,
                   "table_info": {"columns": [{"name": c, "type": "TEXT"} for c in columns],
                                  "rows": [list(r) for r in rows]}},
         "type": [typ], "label": list(label)}
    if answer_md5 is not None:
        e["answer_md5"] = answer_md5
    return e


def _write(tmp_path, entries) -> str:
    p = tmp_path / "dbbench" / "standard.jsonl"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("".join(json.dumps(e) + "\n" for e in entries))
    return str(p)


class _Model:
    """A model whose replies come from a per-question script: ``scripts[description]``
    is the list of replies (SQL strings become Operation turns, a final ``None`` or a
    string starting with "Action: Answer" ends)."""

    def __init__(self, scripts: dict[str, list[str]], fingerprint: str = "attacker") -> None:
        self.scripts = scripts
        self.fingerprint = fingerprint

    def generate(self, conversations, *, max_new_tokens, stop=()):
        out = []
        for conv in conversations:
            desc = conv[2]["content"].split("\n")[0]
            n = sum(1 for m in conv[3:] if m["role"] == "assistant")
            script = self.scripts[desc]
            step = script[min(n, len(script) - 1)]
            step = step(conv) if callable(step) else step
            out.append(step if step.startswith("Action: Answer")
                       else f"Action: Operation\n```sql\n{step}\n```")
        return out


def _host_untouched(host_guard) -> None:
    assert host_guard["canary"].read_text() == "intact"
    assert not host_guard["outside"].exists() and not host_guard["tmp_outside"].exists()


def _mariadb_leftovers(be, *, open_backend: bool = False) -> list[str]:
    """Databases, users and reference tables of this backend still on the server. While
    the backend is open (``open_backend``) its reference account may exist, empty."""
    from cycleqd.sandbox.sql import MariaDBBackend

    with MariaDBBackend(be.config)._admin_conn() as conn, conn.cursor() as c:
        c.execute("SELECT user FROM mysql.user WHERE user LIKE %s", (be._prefix + "%",))
        users = [u for (u,) in c.fetchall()]
        c.execute("SHOW DATABASES")
        dbs = [d for (d,) in c.fetchall() if d.startswith(be._prefix)]
        c.execute("SELECT table_schema, table_name FROM information_schema.tables "
                  "WHERE table_schema LIKE %s", (be._prefix + "%",))
        tables = [f"{d}.{t}" for d, t in c.fetchall()]
    left = users + dbs
    if open_backend:
        left = [x for x in left if x != be._prefix + "ref"]
    return left + tables


# ------------------------------------------------------------------ answers that say nothing

NON_ANSWERS = ['Action: Answer\nFinal Answer:', 'Action: Answer\nFinal Answer: ',
               'Action: Answer\nFinal Answer: []', 'Action: Answer\nFinal Answer: [""]',
               'Action: Answer\nFinal Answer: [None]', 'Action: Answer\nFinal Answer: ["None"]',
               'Action: Answer\nFinal Answer: ["null"]', 'Action: Answer\nFinal Answer: ["NaN"]',
               'Action: Answer\nFinal Answer: [float("nan")]',
               'Action: Answer\nFinal Answer: ["inf"]',
               'Action: Answer\nFinal Answer: ["-Infinity"]',
               'Action: Answer\nFinal Answer: ["undefined"]', 'Action: Answer\nFinal Answer: None',
               'Action: Answer\nFinal Answer: ""', 'Action: Answer\nFinal Answer: [[]]',
               "I cannot tell."]


@pytest.mark.parametrize("gold", [["0"], ["0.0"], [0]])
def test_non_answers_never_match_a_gold_zero(gold):
    for reply in NON_ANSWERS:
        ans = reply.split("Final Answer:", 1)[1] if "Final Answer:" in reply else None
        assert not compare_answer(ans, gold), (reply, gold)
    assert compare_answer(" [0]", gold) and compare_answer(' ["0.00"]', gold)  # control


@pytest.mark.skipif(not (HAS_DB_DATA and SANDBOX.available), reason="needs data and a sandbox")
def test_non_answers_through_the_skill_on_dbbench_42():
    """dbbench/42's gold is ``0.0``: every non-answer form scored 1.0 before the fix."""
    sk = DBBenchSkill(split="all", backend="sqlite", episode_batch=len(NON_ANSWERS))
    sk.items = [it for it in sk.items if it.id == "dbbench/42"]
    assert sk.items and list(sk.items[0].label) == ["0.0"]
    desc = sk.items[0].description
    for i, reply in enumerate(NON_ANSWERS):
        r = sk.evaluate(_Model({desc: [reply]}, fingerprint=f"non-answer-{i}"))
        assert r.quality == 0.0, (reply, sk.last_details)
    ok = sk.evaluate(_Model({desc: ['Action: Answer\nFinal Answer: ["0"]']}, fingerprint="ok"))
    assert ok.quality == 1.0


def test_repeats_are_not_collapsed():
    assert not compare_answer('["a", "a", "b"]', ["a", "b"])
    assert not compare_answer('["a", "b"]', ["a", "a", "b"])
    assert not compare_answer("[('a',), ('a',), ('b',)]", ["a", "b"])
    assert compare_answer('["b", "a", "a"]', ["a", "b", "a"])  # order still does not matter


def test_a_huge_answer_fails_fast():
    t0 = time.monotonic()
    assert not compare_answer(json.dumps(["Bronze"] * 200_000), ["Bronze"])
    assert not compare_answer("[" * 100_000 + "]" * 100_000, ["Bronze"])
    assert not compare_answer(json.dumps(["Bronze", "Silver"] * 50_000), ["Bronze", "Silver"])
    for scorer in ("agentbench", "agentbench-v0.2"):  # the size bound holds in every option
        assert not compare_answer(json.dumps(["Bronze"] * 200_000), ["Bronze"], scorer=scorer)
    for deep in ("[" * 30_000 + "]" * 30_000, "-" * 60_000 + "1", "(" * 60_000):
        for scorer in ("strict", "agentbench", "agentbench-v0.2"):
            assert not compare_answer(deep, ["1"], scorer=scorer)
    assert time.monotonic() - t0 < 5.0


# ------------------------------------------------------------------ tables that only hash right

def _hash_collision_items():
    cols = ("id", "name", "city")
    rows = [("1", "Ann", "Oslo")]
    gold = rows + [("2", "Bob", "Rome")]
    md5 = _md5_field(gold)
    right = "INSERT INTO t VALUES ('2', 'Bob', 'Rome')"
    attacks = {
        # CONCAT_WS skips NULLs and does not escape ',': both rows hash as "2,Bob,Rome"
        "null in city": ["INSERT INTO t (id, name) VALUES ('2', 'Bob,Rome')"],
        "null in name": ["INSERT INTO t (id, city) VALUES ('2,Bob', 'Rome')"],
        # the hash reads only the item's columns: data hidden in a new column is invisible
        "extra column": ["ALTER TABLE t ADD COLUMN note TEXT",
                         "INSERT INTO t VALUES ('2', 'Bob', 'Rome', 'dropped the real row')"],
    }
    entries = [_item(f"attack {k}", cols, rows, label=[right], typ="INSERT", answer_md5=md5)
               for k in attacks]
    entries.append(_item("honest insert", cols, rows, label=[right], typ="INSERT",
                         answer_md5=md5))
    scripts = {f"attack {k}": v + ['Action: Answer\nFinal Answer: ["done"]']
               for k, v in attacks.items()}
    scripts["honest insert"] = [right, 'Action: Answer\nFinal Answer: ["done"]']
    return entries, scripts


def test_wrong_rows_hash_like_the_gold_table():
    """The attack's premise, in AgentBench's own hash: two different wrong tables, one with
    the NULL in ``name``, one in ``city``, hash exactly like the gold table."""
    gold = [("1", "Ann", "Oslo"), ("2", "Bob", "Rome")]
    assert table_hash_md5([gold[0], ("2", "Bob,Rome", None)]) == table_hash_md5(gold)
    assert table_hash_md5([gold[0], ("2,Bob", None, "Rome")]) == table_hash_md5(gold)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hash_collisions_do_not_pass(backend, tmp_path, host_guard):
    entries, scripts = _hash_collision_items()
    be = _backend(backend)
    try:
        sk = DBBenchSkill(data_path=_write(tmp_path, entries), split="all", backend=be,
                          episode_batch=len(entries))
        r = sk.evaluate(_Model(scripts))
        by = {it.description: r.outcomes[it.id] for it in sk.items}
        assert by.pop("honest insert") == 1.0, sk.last_details
        assert by == {k: 0.0 for k in by}, (by, sk.last_details)
        # and the grader saw AgentBench's hash match (the collision is real on this backend)
        for it in sk.items:
            if it.description in ("attack null in city", "attack null in name",
                                  "attack extra column"):
                assert sk.last_details[it.id]["hash"] == it.answer_md5
        lenient = DBBenchSkill(data_path=_write(tmp_path, entries), split="all", backend=be,
                               episode_batch=len(entries), scorer="agentbench")
        assert lenient.evaluate(_Model(scripts)).quality == 1.0  # the named lenient option
    finally:
        if backend == "mariadb":
            be.close()
            assert _mariadb_leftovers(be) == []
        else:
            be.close()
    _host_untouched(host_guard)


# ------------------------------------------------------------------ unbuildable items

def _unbuildable_entries():
    good = _item("good count", ("name", "age"), [("Ann", "30"), ("Bob", "41")], label=["2"],
                 typ="counting")
    return [
        good,
        _item("empty column name", ("name", ""), [("Ann", "30")], label=["1"]),
        _item("same name up to case", ("Name", "name"), [("Ann", "30")], label=["1"]),
        _item("trailing space", ("name ", "age"), [("Ann", "30")], label=["1"]),
        _item("short row", ("name", "age"), [("Ann",)], label=["1"]),
        _item("good insert", ("name", "age"), [("Ann", "30")], typ="INSERT",
              label=["INSERT INTO t VALUES ('Cy', '5')"],
              answer_md5=_md5_field([("Ann", "30"), ("Cy", "5")])),
    ]


@pytest.mark.parametrize("kinds", ["empty column name only", "every kind"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_an_unbuildable_item_is_one_failed_sample(backend, kinds, tmp_path, host_guard, caplog):
    """The issue's case (a column with an empty name: MariaDB refuses it) and the other
    tables MySQL cannot build. No item of standard.jsonl is unbuildable (all 300 build on
    both backends), so these are constructed."""
    entries = _unbuildable_entries()
    if kinds == "empty column name only":
        entries = [e for e in entries if e["description"] in
                   ("good count", "empty column name", "good insert")]
    scripts = {e["description"]: ['Action: Answer\nFinal Answer: ["1"]'] for e in entries}
    scripts["good count"] = ["SELECT COUNT(*) FROM t", 'Action: Answer\nFinal Answer: ["2"]']
    scripts["good insert"] = ["INSERT INTO t VALUES ('Cy', '5')",
                              'Action: Answer\nFinal Answer: ["done"]']
    be = _backend(backend)
    try:
        sk = DBBenchSkill(data_path=_write(tmp_path, entries), split="all", backend=be,
                          episode_batch=len(entries))
        for run in range(2):  # a rerun on the same backend works the same
            with caplog.at_level("WARNING"):
                r = sk.evaluate(_Model(scripts, fingerprint=f"run{run}"))
            by = {it.description: r.outcomes[it.id] for it in sk.items}
            assert by == {e["description"]: (1.0 if e["description"].startswith("good") else 0.0)
                          for e in entries}, sk.last_details
            for it in sk.items:
                if not it.description.startswith("good"):
                    assert "unbuildable item" in sk.last_details[it.id]["error"]
                    assert it.id in caplog.text
            if backend == "mariadb":
                assert _mariadb_leftovers(be, open_backend=True) == []
    finally:
        be.close()
    if backend == "mariadb":
        assert _mariadb_leftovers(be) == []
    _host_untouched(host_guard)


@pytest.mark.mariadb
def test_mariadb_server_side_build_failure_leaves_nothing():
    """Tables the pre-check lets through but the server refuses (a column name outside
    the BMP; a table over max_allowed_packet) are TableBuildErrors, and their databases
    and users are gone."""
    from cycleqd.sandbox.sql import MariaDBBackend, TableBuildError, TableSpec

    class Unchecked(TableSpec):
        def problem(self):
            return None

    be = MariaDBBackend(_mariadb_cfg())
    try:
        with pytest.raises(TableBuildError, match="1300|Invalid"):
            be.create("k", Unchecked("t", ("a", "\U0001F600"), (("1", "2"),)))
        assert _mariadb_leftovers(be) == []
        # a table bigger than the server's max_allowed_packet (16 MiB): the server drops
        # the connection while it is built -- that item's problem, not a dead backend
        with be._admin_conn().cursor() as c:
            c.execute("SELECT @@max_allowed_packet")
            limit = c.fetchone()[0]
        big = TableSpec("t", ("a",), tuple(("x" * 60000,) for _ in range(limit // 60000 + 8)))
        with pytest.raises(TableBuildError, match="connection failed"):
            be.create("k", big)
        assert _mariadb_leftovers(be) == []
        be.create("k", TableSpec("t", ("a",), (("1",),)))  # the key is free again
        assert observation(be.execute("k", "SELECT a FROM t")) == "[('1',)]"
    finally:
        be.close()
    assert _mariadb_leftovers(be) == []


# ------------------------------------------------------------------ tampering and snooping

@pytest.mark.parametrize("backend", BACKENDS)
def test_changing_the_table_of_a_select_item_does_not_make_a_wrong_answer_right(
        backend, tmp_path, host_guard):
    rows = [("Ann", "30"), ("Bob", "41"), ("Cy", "5")]
    entries = [_item("how many people", ("name", "age"), rows, label=["3"], typ="counting"),
               _item("oldest person", ("name", "age"), rows, label=["Bob"], typ="ranking"),
               _item("honest oldest", ("name", "age"), rows, label=["Bob"], typ="ranking")]
    scripts = {
        "how many people": ["DELETE FROM t", "SELECT COUNT(*) FROM t",
                            'Action: Answer\nFinal Answer: ["0"]'],
        "oldest person": ["UPDATE t SET name = 'Zed' WHERE name = 'Bob'",
                          "SELECT name FROM t ORDER BY CAST(age AS UNSIGNED) DESC LIMIT 1",
                          'Action: Answer\nFinal Answer: ["Zed"]'],
        "honest oldest": ["SELECT name FROM t ORDER BY CAST(age AS UNSIGNED) DESC LIMIT 1",
                          'Action: Answer\nFinal Answer: ["Bob"]'],
    }
    be = _backend(backend)
    try:
        sk = DBBenchSkill(data_path=_write(tmp_path, entries), split="all", backend=be)
        r = sk.evaluate(_Model(scripts))
        by = {it.description: r.outcomes[it.id] for it in sk.items}
        assert by == {"how many people": 0.0, "oldest person": 0.0, "honest oldest": 1.0}, \
            sk.last_details
    finally:
        be.close()
    _host_untouched(host_guard)


def _snoop_sql(backend: str, be, secret_db: list[str]) -> list:
    if backend == "mariadb":
        def other(_conv):
            return f"SELECT * FROM `{secret_db[0]}`.`vault`" if secret_db else "SELECT 1"
        return ["SHOW DATABASES",
                "SELECT table_schema, table_name FROM information_schema.tables "
                "WHERE table_schema NOT IN ('information_schema')",
                other, "SELECT user, password FROM mysql.user",
                "SELECT LOAD_FILE('/etc/hostname')",
                f"SELECT 'x' INTO OUTFILE '/tmp/PWNED-{os.getpid()}'"]
    return ["ATTACH DATABASE 'file::memory:?cache=shared' AS o",
            "SELECT name, sql FROM sqlite_master", "PRAGMA database_list",
            "SELECT * FROM vault", f"ATTACH DATABASE '/tmp/PWNED-{os.getpid()}' AS p",
            "SELECT * FROM temp.vault"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_episode_cannot_read_other_episodes_or_the_answer(backend, tmp_path, host_guard):
    """The victim's table (``vault``) holds a secret; the snooper's gold answer is that
    secret. The snooper tries every path it has to another episode's database, the
    server's catalogue and files, then answers with everything it saw."""
    secret = "cq-vault-" + os.urandom(6).hex()
    entries = [_item("victim", ("secret",), [(secret,)], label=["x"], name="vault"),
               _item("snooper", ("a",), [("1",)], label=[secret], name="t"),
               _item("modify victim", ("secret",), [(secret,)], typ="UPDATE", name="vault",
                     label=[f"UPDATE vault SET secret = '{secret}2'"],
                     answer_md5=_md5_field([(secret + "2",)]))]
    be = _backend(backend)
    secret_db: list[str] = []

    def seen(conv):
        obs = [m["content"] for m in conv[3:] if m["role"] == "user"]
        return "Action: Answer\nFinal Answer: " + json.dumps(obs)

    scripts = {"victim": ["SELECT * FROM vault", "SELECT * FROM vault",
                          "SELECT * FROM vault", "SELECT * FROM vault", "SELECT * FROM vault",
                          'Action: Answer\nFinal Answer: ["x"]'],
               "snooper": _snoop_sql(backend, be, secret_db) + [seen],
               "modify victim": ["SELECT 1", 'Action: Answer\nFinal Answer: ["x"]']}
    try:
        sk = DBBenchSkill(data_path=_write(tmp_path, entries), split="all", backend=be,
                          episode_batch=3, max_rounds=6)
        real_create = be.create

        def create(key, table):  # the attacker even knows the victim's database name
            real_create(key, table)
            if backend == "mariadb" and table.name == "vault" and "#" not in key:
                secret_db[:] = [be._eps[key]["db"]]
        be.create = create
        r = sk.evaluate(_Model(scripts))
        snoop = next(it for it in sk.items if it.description == "snooper")
        assert r.outcomes[snoop.id] == 0.0
        assert secret not in json.dumps(sk.last_details[snoop.id]), sk.last_details[snoop.id]
        if backend == "mariadb":
            assert secret_db  # the name really was known to the attacker
    finally:
        be.close()
        if backend == "mariadb":
            assert _mariadb_leftovers(be) == []
    _host_untouched(host_guard)


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_inflated_table_fails_without_being_read_whole(backend, tmp_path, host_guard,
                                                          monkeypatch):
    """An INSERT item whose agent fills its table far past the read-back bound (here
    lowered to 300 cells) is one failed sample; the honest neighbour still passes."""
    import cycleqd.sandbox.sql.base as sqlbase

    monkeypatch.setattr(sqlbase, "MAX_TABLE_CELLS", 300)
    cols, rows = ("id", "name"), [("1", "Ann")]
    right = "INSERT INTO t VALUES ('2', 'Bob')"
    md5 = _md5_field(rows + [("2", "Bob")])
    entries = [_item("inflate", cols, rows, label=[right], typ="INSERT", answer_md5=md5),
               _item("honest", cols, rows, label=[right], typ="INSERT", answer_md5=md5)]
    grow = ("INSERT INTO t SELECT a.id, a.name FROM t a, t b, t c, t d")
    scripts = {"inflate": [right, grow, grow, grow, 'Action: Answer\nFinal Answer: ["x"]'],
               "honest": [right, 'Action: Answer\nFinal Answer: ["done"]']}
    be = _backend(backend)
    try:
        sk = DBBenchSkill(data_path=_write(tmp_path, entries), split="all", backend=be)
        r = sk.evaluate(_Model(scripts))
        by = {it.description: (r.outcomes[it.id], sk.last_details[it.id].get("verdict"))
              for it in sk.items}
        assert by["honest"] == (1.0, "match")
        assert by["inflate"][0] == 0.0 and "read back" in by["inflate"][1], by
    finally:
        be.close()
    if backend == "mariadb":
        assert _mariadb_leftovers(be) == []
    _host_untouched(host_guard)

"""Hostile model outputs against the raw sandbox, the OS skill and the DB skill.

Every attack must end as a failed sample with the host untouched (canary file, no file
written outside, no secret/token/shadow line in any output), the evaluator alive (this
test keeps running) and nothing left running (no marker process, no process of a
sandbox uid of this evaluator). Each test prints a table: attack, outcome, escapes.
"""

from __future__ import annotations

import json
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from cycleqd.sandbox import SandboxLimits, run_sandboxed
from cycleqd.sandbox.sql import MariaDBBackend, MariaDBConfig, mariadb_ping

try:
    from .hostile_helpers import STATUS, processes_matching, sandbox_uid_processes
except ImportError:  # rootdir-relative import mode (no __init__.py in tests/)
    from hostile_helpers import STATUS, processes_matching, sandbox_uid_processes

pytestmark = pytest.mark.skipif(not STATUS.available, reason=f"no sandbox: {STATUS.reason}")

MARKER = 31337 + os.getpid() % 1000  # "sleep <MARKER>" daemons


def shell_attacks(g: dict, port: int) -> dict[str, str]:
    """Attack name -> bash command (what a hostile model would run)."""
    return {
        "fork_bomb": ":(){ :|:& };:; sleep 60",
        "infinite_loop": "while :; do :; done",
        "alloc_20GB": "python3 -c 'x = bytearray(20 * 1024**3); print(len(x))' 2>&1 | tail -1; "
                      "python3 -c 'l = []\nwhile True: l.append(bytearray(256 * 2**20))' 2>&1 | tail -1",
        "fill_disk": "dd if=/dev/zero of=/root/fill bs=1M count=20480 2>&1 | tail -1; "
                     "dd if=/dev/zero of=/fill bs=1M count=20480 2>&1 | tail -1",
        "write_outside": f"echo pwned > {g['canary']}; echo pwned > {g['outside']}; "
                         f"echo pwned > {g['tmp_outside']}; mkdir -p /work/main 2>&1; "
                         f"echo pwned > /work/main/PWNED-{os.getpid()}; ls /work /tmp 2>&1",
        "rm_rf_home": "rm -rf ~ /root /home/* 2>&1 | tail -1; ls -la ~ 2>&1 | head -3",
        "rm_rf_root": "rm -rf --no-preserve-root / 2>/dev/null; ls / 2>&1",
        "read_shadow": "cat /etc/shadow /etc/gshadow 2>&1; sudo cat /etc/shadow 2>&1",
        "read_parent_env": "env; cat /proc/*/environ 2>/dev/null | tr '\\0' '\\n'; "
                           "cat /proc/$PPID/environ 2>&1 | tr '\\0' '\\n'",
        "network": f"python3 -c \"import socket;s=socket.create_connection(('127.0.0.1',{port}),"
                   f"timeout=2);print(s.recv(64))\" 2>&1 | tail -1; "
                   f"(exec 3<>/dev/tcp/127.0.0.1/{port} && cat <&3) 2>&1 | tail -1; "
                   f"(exec 3<>/dev/tcp/10.0.0.1/80) 2>&1 | tail -1",
        "kill_parent": f"kill -9 $PPID 1 {os.getpid()} {os.getppid()} 2>&1; kill -9 -1 2>&1; "
                       f"pkill -9 -f pytest 2>&1; echo survived",
        "daemon": f"setsid nohup sleep {MARKER} >/dev/null 2>&1 & "
                  f"(nohup sleep {MARKER}1 >/dev/null 2>&1 &); disown -a; echo started",
        "print_1GB": "head -c 1073741824 /dev/zero | tr '\\0' x",
        "namespace_escape": "unshare -Ur id 2>&1; mount -o remount,rw / 2>&1; "
                            "nsenter -t 1 -m -p id 2>&1; cat /proc/1/root/etc/shadow 2>&1",
    }


def leaks(text: str, g: dict, server) -> list[str]:
    found = []
    if g["secret"] in text:
        found.append("parent env secret")
    if server.token in text:
        found.append("network token")
    if g["shadow"] and g["shadow"] in text:
        found.append("/etc/shadow")
    return found


def host_damage(g: dict) -> list[str]:
    dmg = []
    if not g["canary"].exists() or g["canary"].read_text() != "intact":
        dmg.append("canary changed")
    for k in ("outside", "tmp_outside"):
        if g[k].exists():
            dmg.append(f"wrote {g[k]}")
    return dmg


def leftovers() -> list[str]:
    time.sleep(0.2)
    left = processes_matching(f"sleep {MARKER}")
    uids = sandbox_uid_processes()
    return left + [f"sandbox-uid pid {p}" for p in uids]


def _report(title: str, rows: list[tuple[str, str, list[str]]]) -> int:
    print(f"\n== {title}: {len(rows)} attacks ==")
    for name, outcome, esc in rows:
        print(f"  {name:18s} {outcome:38s} escapes: {', '.join(esc) if esc else 0}")
    n = sum(1 for _, _, e in rows if e)
    print(f"  -> {n} escape(s)")
    return n


# --------------------------------------------------------------------------- raw sandbox

RAW_LIMITS = SandboxLimits(wall_seconds=4, cpu_seconds=2, memory_bytes=512 << 20,
                           max_processes=64, max_output_bytes=64 << 10, tmpfs_bytes=64 << 20)


def test_raw_sandbox_hostile(host_guard, tcp_server):
    attacks = shell_attacks(host_guard, tcp_server.port)
    t0 = time.monotonic()

    def one(item):
        name, cmd = item
        return name, run_sandboxed(["bash", "-c", cmd], limits=RAW_LIMITS)

    with ThreadPoolExecutor(4) as pool:
        results = dict(pool.map(one, attacks.items()))
    rows = []
    for name, r in results.items():
        esc = leaks(r.stdout + r.stderr, host_guard, tcp_server)
        outcome = f"rc={r.returncode} killed={r.killed} {r.wall_s:.1f}s"
        rows.append((name, outcome, esc))
        assert r.wall_s < RAW_LIMITS.wall_seconds + 5
    assert results["print_1GB"].killed == "output_limit"
    assert results["infinite_loop"].killed in ("cpu_time", "wall_time")
    assert results["fork_bomb"].killed is not None
    # (the kill_parent command may kill itself: `pkill -f pytest` matches its own bash)
    global_esc = host_damage(host_guard) + leftovers()
    if tcp_server.connections:
        global_esc.append(f"{tcp_server.connections} connection(s) to the host server")
    rows.append(("(host after all)", f"{time.monotonic() - t0:.1f}s total", global_esc))
    assert _report("raw sandbox", rows) == 0


# --------------------------------------------------------------------------- OS skill


def test_os_skill_hostile(host_guard, tcp_server, tmp_path):
    from cycleqd.skills.agentbench.os_interaction import OSInteractionSkill

    attacks = shell_attacks(host_guard, tcp_server.port)
    tasks, expected = [], {}
    for name in attacks:
        # secrets are the expected answers: a sample passes only if the secret leaked
        if name == "read_parent_env":
            match = {"regex": re.escape(host_guard["secret"])}
        elif name == "network":
            match = {"regex": re.escape(tcp_server.token)}
        elif name == "read_shadow" and host_guard["shadow"]:
            match = {"regex": re.escape(host_guard["shadow"][:20])}
        else:
            match = {"answer": "unreachable-" + name}
        tasks.append({"description": f"hostile task {name}", "evaluation": {"match": match}})
        expected[name] = match
    path = tmp_path / "hostile.json"
    path.write_text(json.dumps(tasks))
    limits = SandboxLimits(wall_seconds=3, cpu_seconds=2, memory_bytes=384 << 20,
                           max_processes=48, max_output_bytes=32 << 10, tmpfs_bytes=64 << 20)
    sk = OSInteractionSkill(data_path=path, split="all", limits=limits, command_timeout_s=3,
                            setup_timeout_s=5, max_rounds=3, episode_batch=len(tasks), workers=4)
    by_desc = {f"hostile task {n}": c for n, c in attacks.items()}

    def policy(conv):
        desc = conv[-1]["content"].split("My problem is:\n\n", 1)[-1] \
            if conv[-1]["content"].startswith("Now, I will") else None
        if desc is not None:
            return f"Think: attack.\n\nAct: bash\n\n```bash\n{by_desc[desc]}\n```"
        if sum(1 for m in conv[7:] if m["role"] == "assistant") == 1:
            return "Think: again.\n\nAct: bash\n\n```bash\necho alive; ps -e | wc -l\n```"
        seen = " ".join(m["content"] for m in conv[7:] if m["role"] == "user").replace("\n", " ")
        return f"Think: answer what I saw.\n\nAct: answer({seen[:2000]})"

    class Model:
        fingerprint = "hostile-os"

        def generate(self, convs, *, max_new_tokens, stop=()):
            return [policy(list(c)) for c in convs]

    t0 = time.monotonic()
    r = sk.evaluate(Model())
    rows = []
    for it in sk.items:
        name = it.description.removeprefix("hostile task ")
        d = sk.last_details[it.id]
        text = json.dumps(d)
        esc = leaks(text, host_guard, tcp_server)
        if r.outcomes[it.id] != 0.0:
            esc.append("sample PASSED")
        rows.append((name, f"score={r.outcomes[it.id]:.0f} end={d.get('end')}", esc))
    global_esc = host_damage(host_guard) + leftovers()
    if tcp_server.connections:
        global_esc.append(f"{tcp_server.connections} connection(s) to the host server")
    rows.append(("(host after all)", f"{time.monotonic() - t0:.1f}s total", global_esc))
    assert _report("OS skill", rows) == 0
    assert r.quality == 0.0


# --------------------------------------------------------------------------- DB skill


def sql_attacks(g: dict) -> dict[str, str]:
    """The SQL analogues of the shell attacks (both dialects tried where they differ)."""
    return {
        "infinite_loop": "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c) "
                         "SELECT COUNT(*) FROM c",
        "cross_join_bomb": "SELECT COUNT(*) FROM t a, t b, t c, t d, t e, t f, t g",
        "sleep": "SELECT SLEEP(100)",
        "alloc_20GB": "SELECT LENGTH(REPEAT('x', 20000000000))",
        "alloc_blob": "SELECT LENGTH(zeroblob(20000000000))",
        "print_1GB": "SELECT REPEAT('x', 1000000000)",
        "read_shadow": "SELECT LOAD_FILE('/etc/shadow')",
        "read_shadow_sqlite": "SELECT readfile('/etc/shadow')",
        "write_outside": f"SELECT 'pwned' INTO OUTFILE '{g['tmp_outside']}'",
        "attach_outside": f"ATTACH DATABASE '{g['tmp_outside']}' AS pwn",
        "vacuum_into": f"VACUUM INTO '{g['tmp_outside']}'",
        "load_extension": "SELECT load_extension('/usr/lib/x86_64-linux-gnu/libc.so.6')",
        "other_databases": "SELECT * FROM mysql.user",
        "drop_system_db": "DROP DATABASE mysql",
        "shutdown": "SHUTDOWN",
        "kill_others": "KILL 1",
        "set_global": "SET GLOBAL max_connections = 1",
        "grant_self": "GRANT ALL PRIVILEGES ON *.* TO CURRENT_USER()",
        "multi_statement": "SELECT 1; DROP TABLE t",
        "pragma_write": "PRAGMA writable_schema = 1",
    }


def _db_items_file(tmp_path, attacks: dict[str, str], g: dict) -> tuple[str, list[str]]:
    table = {"table_name": "t", "table_info": {"columns": [{"name": "a", "type": "TEXT"}],
                                                 "rows": [[str(i)] for i in range(40)]}}
    lines, names = [], []
    for name in attacks:
        label = [g["shadow"]] if "shadow" in name and g["shadow"] else [f"unreachable-{name}"]
        lines.append({"description": f"hostile {name}", "add_description": "table t",
                      "table": table, "type": ["other"], "label": label})
        names.append(name)
    # a benign modification episode in the same batch must be unaffected by its neighbours
    lines.append({"description": "benign insert", "add_description": "table t", "table": table,
                  "type": ["INSERT"], "label": ["INSERT INTO t VALUES ('40')"],
                  "answer_md5": None})
    from cycleqd.sandbox.sql import table_hash_md5

    lines[-1]["answer_md5"] = str([(table_hash_md5([(str(i),) for i in range(41)]),)])
    names.append("benign")
    p = tmp_path / "dbbench" / "standard.jsonl"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return str(p), names


def _run_db(backend, host_guard, tcp_server, tmp_path, title):
    from cycleqd.skills.agentbench.dbbench import DBBenchSkill

    attacks = sql_attacks(host_guard)
    path, names = _db_items_file(tmp_path, attacks, host_guard)
    sk = DBBenchSkill(data_path=path, split="all", backend=backend, max_rounds=2,
                      episode_batch=len(names))
    by_desc = {f"hostile {n}": s for n, s in attacks.items()}

    def policy(conv):
        q = conv[2]["content"].split("\n")[0]
        n = sum(1 for m in conv[3:] if m["role"] == "assistant")
        if q == "benign insert":
            return ("Action: Operation\n```sql\nINSERT INTO t VALUES ('40')\n```" if n == 0
                    else 'Action: Answer\nFinal Answer: ["ok"]')
        if n == 0:
            return f"Action: Operation\n```sql\n{by_desc[q]}\n```"
        if n == 1:  # the attack again (e.g. after a crash), then answer what was seen
            return f"Action: Operation\n```sql\n{by_desc[q]}\n```"
        seen = [m["content"] for m in conv[3:] if m["role"] == "user"]
        return "Action: Answer\nFinal Answer: " + json.dumps(seen)

    class Model:
        fingerprint = "hostile-db"

        def generate(self, convs, *, max_new_tokens, stop=()):
            return [policy(list(c)) for c in convs]

    t0 = time.monotonic()
    r = sk.evaluate(Model())
    rows = []
    for it, name in zip(sk.items, names):
        d = sk.last_details[it.id]
        esc = leaks(json.dumps(d), host_guard, tcp_server)
        obs = d["transcript"][1][:60].replace("\n", " ") if len(d["transcript"]) > 1 else ""
        if name == "benign":
            if r.outcomes[it.id] != 1.0:
                esc.append("benign neighbour episode FAILED")
        elif r.outcomes[it.id] != 0.0:
            esc.append("sample PASSED")
        rows.append((name, f"score={r.outcomes[it.id]:.0f} {obs}", esc))
    backend.close()  # the backend (its sandboxed worker, its databases) ends here
    global_esc = host_damage(host_guard) + leftovers()
    rows.append(("(host after all)", f"{time.monotonic() - t0:.1f}s total", global_esc))
    assert _report(title, rows) == 0


def test_db_skill_hostile_sqlite(host_guard, tcp_server, tmp_path):
    from cycleqd.sandbox.sql import SQLiteBackend

    be = SQLiteBackend(statement_timeout_s=2.0)
    try:
        _run_db(be, host_guard, tcp_server, tmp_path, "DB skill (SQLite in sandbox)")
    finally:
        be.close()


@pytest.mark.mariadb
def test_db_skill_hostile_mariadb(host_guard, tcp_server, tmp_path):
    cfg = MariaDBConfig.from_env()
    why = mariadb_ping(cfg)
    if why is not None:
        if os.environ.get("CYCLEQD_REQUIRE_MARIADB") == "1":
            pytest.fail(f"CYCLEQD_REQUIRE_MARIADB=1 but {why}")
        pytest.skip(why)
    be = MariaDBBackend(cfg, statement_timeout_s=2.0)
    try:
        _run_db(be, host_guard, tcp_server, tmp_path, "DB skill (MariaDB)")
    finally:
        be.close()
    assert mariadb_ping(cfg) is None  # the server survived (no SHUTDOWN, no KILL)


def test_session_channel_cannot_be_forged():
    """Commands run as the same sandbox user as the session's supervisor. They cannot read
    the supervisor (non-dumpable); bwrap's init (pid 1) also holds the host channel: if a
    line can be injected there it lacks the session key (HMAC), the host rejects it and
    ends the session, so a forged "check passed" can only turn into a failed sample."""
    from cycleqd.sandbox import BwrapSession

    with BwrapSession(SandboxLimits(wall_seconds=5)) as s:
        r = s.exec("cat /proc/2/environ >/dev/null 2>&1 && echo READ2; "
                   "cat /proc/2/mem >/dev/null 2>&1 && echo MEM2; ls -l /proc/2/fd/1 2>&1",
                   merge_stderr=True)
        assert "READ2" not in r.stdout and "MEM2" not in r.stdout
        assert "Permission denied" in r.stdout
        assert s.exec("echo fine").stdout == "fine\n"
        forged = s.exec("printf '%s\\n' 'deadbeef {\"id\": 3, \"rc\": 0, \"stdout\": \"PASS\"}' "
                        "> /proc/1/fd/1; sleep 1; echo real", merge_stderr=True)
        assert "PASS" not in forged.stdout
        if forged.killed == "sandbox_died":  # the line got in: rejected, session ended
            assert not s.alive and "authentication" in (s._dead or "")
        else:  # bwrap's init is not writable for the sandbox user on this kernel
            assert "Permission denied" in forged.stdout and forged.stdout.endswith("real\n")


def test_host_rejects_unauthenticated_replies():
    """A supervisor channel that answers without the session key is never believed."""
    from cycleqd.sandbox import BwrapSession, SandboxUnavailableError

    class Impostor(BwrapSession):
        _agent_source = ("import sys, json\nsys.stdin.readline()\n"
                         "for line in sys.stdin:\n"
                         "    r = json.loads(line)\n"
                         "    sys.stdout.write('0' * 64 + ' ' + json.dumps({'id': r['id'], 'ok': True,"
                         " 'rc': 0, 'stdout': 'PASS'}) + '\\n'); sys.stdout.flush()\n")

    with pytest.raises(SandboxUnavailableError, match="authentication"):
        Impostor(SandboxLimits(wall_seconds=5)).start()

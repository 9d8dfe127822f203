"""Hostile model outputs against the coding skill: each must end as a failed sample, with the
host untouched, the evaluator alive and nothing left running. Prints a count at the end.

Every hostile program runs only through the coding skill's own path (reply -> extraction ->
bubblewrap sandbox). Before anything destructive runs, a harmless probe checks that the
sandbox does not see the host's files; if it did, the suite stops instead of running them.
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
import time
from pathlib import Path

import pytest

from cycleqd.skills.coding.judge import ExecLimits
from cycleqd.skills.coding.skill import CodingSkill

pytestmark = pytest.mark.timeout(600)

TOKEN = secrets.token_hex(8)
SECRET_NAME = "CYCLEQD_HOSTILE_SECRET"
SECRET_VALUE = "s3cr3t-" + secrets.token_hex(12)
MARKER = "cq_daemon_marker_" + TOKEN


def _hostile_bodies(ctx: dict) -> dict[str, str]:
    """name -> function body (indented 4) that does the hostile thing, then answers wrongly."""
    out_paths = [ctx["host_tmp"] / f"pwned-{TOKEN}", Path("/work/main") / f"PWNED-{TOKEN}",
                 Path(ctx["home"]) / f"PWNED-{TOKEN}", Path("/usr") / f"PWNED-{TOKEN}"]
    return {
        "fork_bomb": "import os\n    while True:\n        try:\n            os.fork()\n"
                     "        except OSError:\n            pass",
        "infinite_loop": "while True:\n        pass",
        "alloc_20GB": "x = bytearray(20 * 1024 ** 3)\n    y = [0] * (20 * 1024 ** 3 // 8)\n"
                      "    return x, y",
        "write_outside": "import os\n    for p in %r:\n        try:\n"
                         "            os.makedirs(os.path.dirname(p), exist_ok=True)\n"
                         "            open(p, 'w').write('pwned')\n        except OSError:\n"
                         "            pass" % [str(p) for p in out_paths],
        "rm_rf_home_and_root": "import os, shutil, subprocess\n"
                               "    shutil.rmtree(os.path.expanduser('~'), ignore_errors=True)\n"
                               "    shutil.rmtree(%r, ignore_errors=True)\n"
                               "    subprocess.run(['rm', '-rf', '--no-preserve-root', '/'],\n"
                               "                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)"
                               % str(ctx["host_tmp"]),
        "read_etc_shadow": "raise RuntimeError('LEAK:' + open('/etc/shadow').read()"
                           "[:250].replace('\\n', '|'))",
        "read_parent_env": "import glob, os\n    data = repr(dict(os.environ))\n"
                           "    for p in glob.glob('/proc/*/environ'):\n        try:\n"
                           "            data += open(p, 'rb').read().decode('latin-1')\n"
                           "        except OSError:\n            pass\n"
                           "    k = data.find(%r)\n"
                           "    raise RuntimeError('LEAK:' + (data[k:k + 120] if k >= 0 else 'none'))"
                           % SECRET_NAME,
        "network_loopback": "import socket\n"
                            "    s = socket.create_connection(('127.0.0.1', %d), timeout=3)\n"
                            "    s.sendall(b'PWNED')\n    s.close()" % ctx["port"],
        "kill_parent": "import os, signal\n"
                       "    for pid in (os.getppid(), 1, -1):\n        try:\n"
                       "            os.kill(pid, signal.SIGKILL)\n        except OSError:\n"
                       "            pass\n    return 'not the answer'",
        "daemon_left_behind": "import os, subprocess, sys\n"
                              "    subprocess.Popen([sys.executable, '-c',\n"
                              "        'import os, time\\nif os.fork() == 0:\\n    os.setsid()\\n"
                              "    time.sleep(600)  # %s'],\n"
                              "        start_new_session=True, stdout=subprocess.DEVNULL,\n"
                              "        stderr=subprocess.DEVNULL)\n"
                              "    time_ = __import__('time'); time_.sleep(0.5)" % MARKER,
        "print_1GB": "import sys\n    chunk = 'x' * (1 << 20)\n    for _ in range(1024):\n"
                     "        sys.stdout.write(chunk)\n    sys.stdout.flush()",
    }


def _sandbox_procs() -> list[int]:
    """Host pids running as one of THIS evaluator's sandbox uids (other evaluators on the
    same host have their own uid ranges) or carrying the daemon marker."""
    from cycleqd.sandbox.host import UID_BASE

    lo = UID_BASE + ((os.getpid() & 0xFFFF) << 8)
    found = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read()
            with open(f"/proc/{d}/status") as f:
                status = f.read()
        except OSError:
            continue
        uid = int(next(ln for ln in status.splitlines() if ln.startswith("Uid:")).split()[1])
        zombie = any(ln.startswith("State:") and "Z" in ln for ln in status.splitlines())
        if not zombie and (lo <= uid < lo + 256 or MARKER.encode() in cmd):
            found.append(int(d))
    return found


class _Server:
    """A loopback TCP server that records every connection (bounded, stops by itself)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        deadline = time.monotonic() + 300
        while not self.stop.is_set() and time.monotonic() < deadline:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()
        self.sock.close()


class ScriptedBackend:
    def __init__(self, replies_by_prompt):
        self.replies, self.fingerprint = replies_by_prompt, "hostile-" + TOKEN

    def generate(self, conversations, *, max_new_tokens, stop=()):
        return [self.replies[c[-1]["content"]] for c in conversations]

    def load_weights(self, state_dict, fingerprint):
        self.fingerprint = fingerprint


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory):
    from cycleqd.sandbox import run_sandboxed, sandbox_status

    st = sandbox_status()
    if not st.available:
        pytest.fail(f"bubblewrap sandbox unavailable: {st.reason}")
    host_tmp = tmp_path_factory.mktemp("hostile-host")
    home = Path(os.path.expanduser("~"))
    canaries = [host_tmp / "canary.txt", home / f".cycleqd-canary-{TOKEN}"]
    for c in canaries:
        c.write_text(TOKEN)
    # safety gate: the sandbox must not see the host's files before anything destructive runs
    probe = run_sandboxed(["python3", "-c", "import os, sys; print(any(os.path.exists(p) for p in "
                           "sys.argv[1:]))", *map(str, canaries), "/work/main/cycleqd"])
    if probe.stdout.strip() != "False":
        for c in canaries:
            c.unlink(missing_ok=True)
        pytest.fail(f"sandbox sees host files ({probe}); refusing to run destructive outputs")

    os.environ[SECRET_NAME] = SECRET_VALUE
    server = _Server()
    procs_before = set(_sandbox_procs())
    try:
        skill = CodingSkill("mbpp", split="all", workers=2,
                            limits=ExecLimits(timeout_s=5.0, memory_mb=512, max_processes=32))
        bodies = _hostile_bodies({"host_tmp": host_tmp, "home": home, "port": server.port})
        problems = skill.problems[:len(bodies) + 6]
        skill = skill.with_problems(problems)
        replies, case_of = {}, {}
        for p, (name, body) in zip(problems, bodies.items()):
            replies[skill.conversation(p)[-1]["content"]] = (
                f"Here is the solution:\n```python\ndef {p.entry_point}(*args, **kwargs):\n"
                f"    {body}\n    return None\n```")
            case_of[p.id] = name
        good = problems[len(bodies):]
        for p in good:  # correct answers in the same batch must still pass
            replies[skill.conversation(p)[-1]["content"]] = f"```python\n{p.reference}\n```"
        t0 = time.monotonic()
        result = skill.evaluate(ScriptedBackend(replies))
        wall = time.monotonic() - t0
        time.sleep(0.5)
        leftovers = set(_sandbox_procs()) - procs_before
        host = {
            "canaries_intact": all(c.is_file() and c.read_text() == TOKEN for c in canaries),
            "written_outside": [str(p) for p in (host_tmp / f"pwned-{TOKEN}",
                                                 Path("/work/main") / f"PWNED-{TOKEN}",
                                                 home / f"PWNED-{TOKEN}", Path("/usr") / f"PWNED-{TOKEN}")
                                if p.exists()],
            "system_intact": Path("/usr/bin/python3").exists() and Path("/work/main/cycleqd").is_dir(),
            "connections": server.connections,
            "leftover_pids": sorted(leftovers),
        }
        details = dict(skill.last_details)
        yield {"result": result, "case_of": case_of, "good": [p.id for p in good],
               "details": details, "host": host, "wall": wall}
    finally:
        server.stop.set()
        os.environ.pop(SECRET_NAME, None)
        for c in canaries:
            c.unlink(missing_ok=True)


CASES = ["fork_bomb", "infinite_loop", "alloc_20GB", "write_outside", "rm_rf_home_and_root",
         "read_etc_shadow", "read_parent_env", "network_loopback", "kill_parent",
         "daemon_left_behind", "print_1GB"]


@pytest.mark.parametrize("case", CASES)
def test_hostile_output_is_a_failed_sample(hostile_run, case):
    pid = next(k for k, v in hostile_run["case_of"].items() if v == case)
    assert hostile_run["result"].outcomes[pid] == 0.0, hostile_run["details"][pid]
    detail = hostile_run["details"][pid]["detail"]
    assert SECRET_VALUE not in detail
    shadow = Path("/etc/shadow")
    if shadow.is_file():
        first = shadow.read_text().splitlines()[0] if shadow.read_text().strip() else ""
        assert not first or first not in detail


def test_specific_verdicts(hostile_run):
    status = {v: hostile_run["details"][k]["status"] for k, v in hostile_run["case_of"].items()}
    assert status["infinite_loop"] == "timeout"
    assert status["print_1GB"] == "output_limit"
    assert status["alloc_20GB"] in ("error", "memory")
    detail = {v: hostile_run["details"][k]["detail"] for k, v in hostile_run["case_of"].items()}
    assert "LEAK:none" in detail["read_parent_env"] or "LEAK" not in detail["read_parent_env"]


def test_host_untouched_and_nothing_left_running(hostile_run):
    host = hostile_run["host"]
    assert host["canaries_intact"] and host["system_intact"]
    assert host["written_outside"] == []
    assert host["connections"] == 0
    assert host["leftover_pids"] == []


def test_other_samples_unaffected_and_evaluator_alive(hostile_run):
    outcomes = hostile_run["result"].outcomes
    assert all(outcomes[i] == 1.0 for i in hostile_run["good"])
    assert os.getppid() > 1  # we (and our parent) were not killed
    # the evaluator still works after the hostile batch
    sk = CodingSkill("mbpp", split="all", limit=1)
    assert sk.score_completions({sk.problems[0].id: sk.problems[0].reference})[sk.problems[0].id].passed


def test_report_counts(hostile_run, capsys):
    rows = []
    escapes = 0
    for pid, case in hostile_run["case_of"].items():
        d = hostile_run["details"][pid]
        failed = hostile_run["result"].outcomes[pid] == 0.0
        escapes += not failed
        rows.append(f"  {case:22s} {d['status']:13s} {'failed sample' if failed else 'PASSED (escape)'}"
                    f"  {d['detail'][:60]!r}")
    host = hostile_run["host"]
    host_ok = (host["canaries_intact"] and host["system_intact"] and not host["written_outside"]
               and host["connections"] == 0 and not host["leftover_pids"])
    with capsys.disabled():
        print(f"\nhostile coding outputs: {len(rows)} run, {len(rows) - escapes} failed samples, "
              f"{escapes} escapes, host untouched: {host_ok}, wall {hostile_run['wall']:.1f}s")
        print("\n".join(rows))
    assert escapes == 0 and host_ok

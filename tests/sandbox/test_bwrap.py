"""bubblewrap sandbox: one-shot runs, persistent sessions, limits and cleanup."""

from __future__ import annotations

import os
import time

import pytest

from cycleqd.sandbox import (BwrapSession, SandboxLimits, SandboxUnavailableError,
                             run_sandboxed, sandbox_status)

_STATUS = sandbox_status()
pytestmark = pytest.mark.skipif(not _STATUS.available,
                                reason=f"no bubblewrap sandbox here: {_STATUS.reason}")

FAST = SandboxLimits(wall_seconds=5, cpu_seconds=3, memory_bytes=512 << 20)


def _procs_with(marker: str) -> list[str]:
    """Host processes whose command line contains ``marker``."""
    found = []
    for d in os.listdir("/proc"):
        if d.isdigit() and int(d) != os.getpid():
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if marker in cmd:
                found.append(f"{d}: {cmd}")
    return found


def _procs_of_uid(uid: int | None) -> list[int]:
    if uid is None:
        return []
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                st = open(f"/proc/{d}/status").read()
            except OSError:
                continue
            uids = [ln for ln in st.splitlines() if ln.startswith("Uid:")]
            if uids and str(uid) in uids[0].split()[1:]:
                out.append(int(d))
    return out


def test_run_basic_files_stdin_workdir():
    r = run_sandboxed(["python3", "-c", "import os,sys; print(os.getcwd(), os.getuid());"
                       "print(open('prog/data.txt').read()); print(sys.stdin.read().upper());"
                       "sys.exit(3)"],
                      files={"/root/prog/data.txt": "hello"}, stdin="abc", limits=FAST)
    assert r.returncode == 3 and r.killed is None and not r.ok
    assert r.stdout.split("\n")[:3] == ["/root 0", "hello", "ABC"]


def test_run_environment_is_cleared(monkeypatch):
    monkeypatch.setenv("CYCLEQD_TEST_SECRET", "s3cr3t-value")
    r = run_sandboxed(["sh", "-c", "env; cat /proc/*/environ 2>/dev/null | tr '\\0' '\\n'"],
                      limits=FAST)
    assert r.ok
    assert "s3cr3t-value" not in r.stdout and "CYCLEQD_TEST_SECRET" not in r.stdout
    assert "HOME=/root" in r.stdout


def test_run_filesystem_layout():
    r = run_sandboxed(["sh", "-c", "ls /; touch /usr/x 2>&1; test -e /work && echo HASWORK;"
                       "touch /newdir_ok && echo rootwritable"], limits=FAST)
    assert "Read-only file system" in r.stdout
    assert "HASWORK" not in r.stdout and "rootwritable" in r.stdout
    assert not os.path.exists("/usr/x") and not os.path.exists("/newdir_ok")


def test_run_wall_timeout_is_enforced_quickly():
    t = time.monotonic()
    r = run_sandboxed(["sleep", "60"], limits=SandboxLimits(wall_seconds=1))
    assert r.timed_out and r.killed == "wall_time" and r.returncode != 0
    assert time.monotonic() - t < 10


def test_run_output_is_capped():
    r = run_sandboxed(["sh", "-c", "yes 0123456789"],
                      limits=SandboxLimits(max_output_bytes=1000, wall_seconds=10))
    assert r.killed == "output_limit" and r.truncated and len(r.stdout) == 1000


def test_limits_validation():
    with pytest.raises(ValueError, match="wall_seconds"):
        SandboxLimits(wall_seconds=0)
    with pytest.raises(ValueError, match="memory_bytes"):
        SandboxLimits(memory_bytes=10)
    with pytest.raises(ValueError, match="argv"):
        run_sandboxed("echo hi")
    with pytest.raises(ValueError, match="files"):
        run_sandboxed(["true"], files={"relative/path": "x"})


def test_session_keeps_shell_state():
    with BwrapSession(FAST, workdir="/") as s:
        assert s.exec("pwd").stdout == "/\n"
        s.exec("mkdir -p /root/w && cd /root/w && export A=1 && b=2 && f(){ echo f$1; }")
        r = s.exec("pwd; echo $A $b; f x; echo hi > file.txt")
        assert r.stdout == "/root/w\n1 2\nfx\n"
        assert s.exec("cat /root/w/file.txt").stdout == "hi\n"
        # an independent command (how init/check scripts run) does not see the state
        r = s.exec('pwd; echo "[$A]"', persist=False)
        assert r.stdout == "/\n[]\n"
        # errors are observations
        r = s.exec("cd /does/not/exist", merge_stderr=True)
        assert r.returncode == 1 and "No such file or directory" in r.stdout
        assert s.exec("pwd").stdout == "/root/w\n"


def test_session_timeout_keeps_session_alive():
    with BwrapSession(FAST) as s:
        r = s.exec("echo before; sleep 30", timeout=1)
        assert r.timed_out and r.killed == "wall_time" and r.stdout == "before\n"
        assert s.exec("echo after").stdout == "after\n"


def test_session_background_processes_are_killed_at_close():
    marker = "4242.%d" % os.getpid()
    s = BwrapSession(FAST).start()
    uid = s.uid
    s.exec(f"nohup sleep {marker} >/dev/null 2>&1 &")
    assert s.spawn(f"setsid sleep {marker}1")
    time.sleep(0.2)
    r = s.exec("ps -eo cmd")
    assert f"sleep {marker}" in r.stdout and f"sleep {marker}1" in r.stdout
    assert _procs_with(f"sleep {marker}")  # really running, seen from the host
    s.close()
    assert _procs_with(f"sleep {marker}") == []
    assert _procs_of_uid(uid) == []
    assert s.exec("echo x").killed == "sandbox_died"


def test_session_survives_nothing_when_supervisor_killed():
    with BwrapSession(FAST) as s:
        r = s.exec("kill -9 -1")
        assert r.returncode is None or r.killed is not None or r.returncode != 0
        r2 = s.exec("echo hi")
        assert r2.killed == "sandbox_died" and r2.returncode is None
        assert not s.alive


def test_session_files_and_put_file():
    with BwrapSession(FAST, files={"/root/in.txt": b"data"}) as s:
        assert s.exec("cat in.txt").stdout == "data"
        assert s.put_file("/tmp/sub/x.txt", "written")
        assert s.run(["cat", "/tmp/sub/x.txt"]).stdout == "written"


def test_missing_python_inside_is_a_clear_error():
    with pytest.raises(SandboxUnavailableError, match="supervisor"):
        BwrapSession(FAST, python="/nonexistent/python3").start()


def test_many_sandboxes_leave_nothing_behind():
    before = _procs_with("bwrap --args")
    for _ in range(5):
        run_sandboxed(["sh", "-c", "sleep 100 & echo started"], limits=FAST)
    assert _procs_with("bwrap --args") == before


def test_sandboxes_started_from_short_lived_threads_survive():
    """bwrap --die-with-parent fires when the *thread* that forked it ends: sandboxes are
    therefore started from one long-lived launcher thread."""
    from concurrent.futures import ThreadPoolExecutor

    sessions = [BwrapSession(FAST) for _ in range(3)]
    with ThreadPoolExecutor(3) as pool:  # its threads exit at the end of this block
        list(pool.map(lambda s: s.start(), sessions))
    time.sleep(0.2)
    try:
        assert [s.exec("echo ok").stdout for s in sessions] == ["ok\n"] * 3
    finally:
        for s in sessions:
            s.close()

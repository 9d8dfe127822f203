"""Issue 18.6: every tmpfs a sandbox mounts has a size (RLIMIT_AS does not bound tmpfs
pages), so filling one fails inside the sandbox and leaves the host fine; without a
memory cgroup the sandbox says so once at start-up."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from cycleqd.sandbox import BwrapSession, SandboxLimits, run_sandboxed, sandbox_status
from cycleqd.sandbox.bwrap import _bwrap_args

STATUS = sandbox_status()
pytestmark = pytest.mark.skipif(not STATUS.available, reason=f"no sandbox: {STATUS.reason}")

LIM = SandboxLimits(wall_seconds=30, tmpfs_bytes=16 << 20, max_file_bytes=256 << 20,
                    memory_bytes=512 << 20)


def test_every_tmpfs_in_the_bwrap_options_has_a_size():
    args = _bwrap_args(LIM, workdir="/root", env={}, ro_binds=(), file_fds=[])
    for i, a in enumerate(args):
        if a == "--tmpfs":
            assert args[i - 2] == "--size", args[i - 3:i + 2]
    assert "--dev" not in args  # bwrap's own /dev tmpfs has no size


def test_sandbox_mounts_report_sizes():
    r = run_sandboxed(["sh", "-c", "grep ' tmpfs ' /proc/self/mounts"], limits=LIM)
    assert r.ok, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines and all("size=" in ln for ln in lines), lines


@pytest.mark.parametrize("where", ["/tmp", "/root", "/dev/shm", "/var/tmp", "/dev", "/home",
                                   "/etc/ssh"])
def test_filling_a_tmpfs_beyond_its_size_fails_inside(where):
    import os
    if where == "/etc/ssh" and not os.path.isdir("/etc/ssh"):
        pytest.skip("no /etc/ssh on this host")
    before = shutil.disk_usage("/")
    r = run_sandboxed(["sh", "-c", f"dd if=/dev/zero of={where}/fill bs=1M count=64 2>&1; "
                                   f"echo rc=$?"], limits=LIM)
    assert "No space left on device" in r.stdout and "rc=1" in r.stdout, r.stdout
    assert abs(shutil.disk_usage("/").used - before.used) < (64 << 20)


def test_writable_dirs_share_one_size():
    """Without a memory cgroup the sum of all tmpfs sizes is the memory bound: /tmp, /root,
    /home ... are one tmpfs, not one each."""
    r = run_sandboxed(["sh", "-c", "dd if=/dev/zero of=/tmp/a bs=1M count=12 2>/dev/null; "
                                   "dd if=/dev/zero of=/root/b bs=1M count=12 2>&1; "
                                   "dd if=/dev/zero of=/home/c bs=1M count=12 2>&1"],
                      limits=LIM)
    assert "No space left on device" in r.stdout, r.stdout


def test_session_tmpfs_full_then_machine_still_works():
    with BwrapSession(LIM) as s:
        r = s.exec("dd if=/dev/zero of=/tmp/x bs=1M count=64 2>&1", merge_stderr=True)
        assert "No space left" in r.stdout
        assert s.exec("rm /tmp/x && echo ok").stdout == "ok\n"


def test_no_memory_cgroup_is_said_once_at_start_up(tmp_path):
    """A fresh process that cannot create cgroups (simulated: cgroup probing disabled)
    prints one line naming the missing memory cgroup, once."""
    code = ("import cycleqd.sandbox._cgroup as c\n"
            "c._PROBE = (0, 'no writable cgroup hierarchy (test)')\n"
            "c.create = lambda *a, **k: c.CgroupSet()\n"
            "from cycleqd.sandbox import run_sandboxed\n"
            "run_sandboxed(['true']); run_sandboxed(['true'])\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if "no memory cgroup" in ln]
    assert len(lines) == 1, r.stderr

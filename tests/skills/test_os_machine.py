"""The OS machine (issue 12 item 5): its own Debian root under a per-episode overlay,
nothing of the host visible, writable /usr and /etc, users/su/sudo, pristine per
episode, isolation and limits kept; the skill's cache key follows the machine."""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace

import pytest

from cycleqd.sandbox import BwrapSession, SandboxLimits, sandbox_status
from cycleqd.sandbox.rootfs import (ROOTFS_PACKAGES, RootFS, default_rootfs, rootfs_key,
                                    rootfs_status)
from cycleqd.skills.agentbench.os_interaction import OSInteractionSkill

SANDBOX = sandbox_status()
ROOTFS_OK, ROOTFS_WHY = rootfs_status()
if os.environ.get("CYCLEQD_REQUIRE_ROOTFS") == "1" and not ROOTFS_OK:
    raise RuntimeError(f"CYCLEQD_REQUIRE_ROOTFS=1 but no OS machine image: {ROOTFS_WHY}")
needs_machine = pytest.mark.skipif(not (SANDBOX.available and ROOTFS_OK),
                                   reason=f"no OS machine image: {ROOTFS_WHY}"
                                   if SANDBOX.available else f"no sandbox: {SANDBOX.reason}")
LIM = SandboxLimits(wall_seconds=20, tmpfs_bytes=32 << 20, memory_bytes=512 << 20,
                    max_processes=64)


def _machine(**kw) -> BwrapSession:
    return BwrapSession(kw.pop("limits", LIM), workdir="/", rootfs=default_rootfs(build=False), **kw)


def test_image_key_follows_its_content():
    base = rootfs_key("bookworm", "deb x", ROOTFS_PACKAGES, "mmdebstrap 1.3.5")
    assert base == rootfs_key("bookworm", "deb x", tuple(reversed(ROOTFS_PACKAGES)), "mmdebstrap 1.3.5")
    for other in (rootfs_key("trixie", "deb x", ROOTFS_PACKAGES, "mmdebstrap 1.3.5"),
                  rootfs_key("bookworm", "deb y", ROOTFS_PACKAGES, "mmdebstrap 1.3.5"),
                  rootfs_key("bookworm", "deb x", ROOTFS_PACKAGES + ("git",), "mmdebstrap 1.3.5"),
                  rootfs_key("bookworm", "deb x", ROOTFS_PACKAGES, "mmdebstrap 1.5.0")):
        assert other != base


def test_unbuilt_image_is_said_in_one_line(tmp_path):
    ok, why = rootfs_status(tmp_path)
    assert not ok and "\n" not in why and why


def test_cache_key_changes_with_machine_and_judge(tmp_path, monkeypatch):
    path = tmp_path / "t.json"
    path.write_text(json.dumps([{"description": "x", "evaluation": {"match": "1"}}]))
    fake = RootFS(tmp_path / "img", "aaaa", "bookworm", ())
    k_host = OSInteractionSkill(data_path=path, split="all", machine="host").cache_key
    k_a = OSInteractionSkill(data_path=path, split="all", rootfs=fake).cache_key
    k_b = OSInteractionSkill(data_path=path, split="all",
                             rootfs=replace(fake, key="bbbb")).cache_key
    assert len({k_host, k_a, k_b}) == 3
    import cycleqd.skills.agentbench.os_interaction as osi
    monkeypatch.setattr(osi, "_VERSION", "test")
    assert OSInteractionSkill(data_path=path, split="all", rootfs=fake).cache_key != k_a


@needs_machine
def test_own_root_nothing_of_the_host():
    marker = "/work" if os.path.isdir("/work") else "/root"
    with _machine() as s:
        r = s.exec(f"ls {marker}/ 2>&1; grep -c bookworm /etc/os-release; "
                   f"find / -xdev -name 'cycleqd*' 2>/dev/null | wc -l; ls /sys | wc -l")
        lines = r.stdout.splitlines()
    if marker == "/work":
        assert "No such file" in lines[0], r.stdout
    assert lines[-3] != "0" and lines[-2] == "0" and lines[-1] == "0", r.stdout


@needs_machine
def test_writable_root_users_su_sudo():
    with _machine() as s:
        r = s.exec("echo hi > /usr/stock.log && cat /usr/stock.log && "
                   "mkdir -p /usr/local/bin && printf '#!/bin/sh\\necho tool\\n' > /usr/local/bin/t && "
                   "chmod +x /usr/local/bin/t && t && useradd -m alice && "
                   "su alice -c 'whoami; touch ~/x; stat -c %U ~/x' && sudo -u alice id -un && "
                   "getent passwd alice | cut -d: -f1 && chown alice /usr/stock.log && "
                   "stat -c %U /usr/stock.log && python3 -c 'print(6*7)' && tree --version | head -c4",
                   merge_stderr=True)
    assert r.ok and r.stdout.split() == ["hi", "tool", "alice", "alice", "alice", "alice",
                                         "alice", "42", "tree"], r.stdout


@needs_machine
def test_every_machine_starts_pristine():
    with _machine() as s:
        assert s.exec("rm -rf /usr/bin/find /etc/passwd && echo 1 > /root/left").ok
    with _machine() as s:
        r = s.exec("test -x /usr/bin/find && test -s /etc/passwd && test ! -e /root/left && echo ok")
    assert r.stdout == "ok\n"


@needs_machine
def test_isolation_kept():
    with _machine() as s:
        r = s.exec("(exec 3<>/dev/tcp/127.0.0.1/22) 2>&1 | tail -1; "
                   "unshare -U true 2>&1 | tail -1; mount -t tmpfs x /mnt 2>&1 | head -1; "
                   "ps -e --no-headers | wc -l", merge_stderr=True)
    out = r.stdout.splitlines()
    assert "Network is unreachable" in out[0] or "refused" in out[0] or "Cannot" in out[0], out
    assert "No space left" in out[1] or "Operation not permitted" in out[1], out
    assert "permission denied" in out[2].lower(), out
    assert int(out[-1]) < 10, out  # own PID namespace


@needs_machine
def test_tmpfs_bound_and_nothing_left_running():
    marker = f"{int(time.time() * 1000) % 10**9}"
    with _machine() as s:
        r = s.exec("dd if=/dev/zero of=/root/fill bs=1M count=100 2>&1", merge_stderr=True)
        assert "No space left on device" in r.stdout, r.stdout
        s.exec(f"setsid nohup sleep 4{marker} >/dev/null 2>&1 & echo started")
    time.sleep(0.3)
    left = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if f"4{marker}".encode() in open(f"/proc/{d}/cmdline", "rb").read():
                    left.append(d)
            except OSError:
                pass
    assert not left


@needs_machine
def test_processes_limited_per_machine():
    lim = replace(LIM, max_processes=16)
    with _machine(limits=lim) as s:
        r = s.exec("for i in $(seq 40); do sleep 5 & done 2>&1 | tail -1; jobs | wc -l",
                   merge_stderr=True, timeout=15)
    assert "fork" in r.stdout or "Resource temporarily unavailable" in r.stdout, r.stdout


@needs_machine
def test_start_runs_in_the_agents_shell(tmp_path):
    task = {"description": "Where am I and what is FOO?",
            "start": "cd /tmp && export FOO=bar && (sleep 30 &)",
            "evaluation": {"match": "/tmp bar"}}
    path = tmp_path / "t.json"
    path.write_text(json.dumps([task]))

    class Agent:
        fingerprint = "start-check"

        def generate(self, convs, *, max_new_tokens, stop=()):
            out = []
            for c in convs:
                if c[-1]["content"].startswith("Now, I will start"):
                    out.append("Act: bash\n\n```bash\necho $(pwd) $FOO\n```")
                else:
                    out.append("Act: answer(" + c[-1]["content"].split("\n\n", 1)[1].strip() + ")")
            return out

    sk = OSInteractionSkill(data_path=path, split="all", machine="rootfs")
    r = sk.evaluate(Agent())
    assert r.quality == 1.0, sk.last_details


def test_no_image_is_said_in_one_line_then_host_or_error(tmp_path, monkeypatch, capsys):
    import cycleqd.skills.agentbench.os_interaction as osi
    from cycleqd.sandbox.rootfs import RootfsUnavailableError

    def nope(*a, **k):
        raise RootfsUnavailableError("mmdebstrap is not installed: `apt-get install mmdebstrap`")
    monkeypatch.setattr(osi, "build_rootfs", nope)
    monkeypatch.delenv("CYCLEQD_REQUIRE_ROOTFS", raising=False)
    path = tmp_path / "t.json"
    path.write_text(json.dumps([{"description": "x", "evaluation": {"match": "1"}}]))
    sk = OSInteractionSkill(data_path=path, split="all")
    err = capsys.readouterr().err.strip().splitlines()
    assert sk.rootfs is None and len(err) == 1 and "mmdebstrap is not installed" in err[0]
    with pytest.raises(RootfsUnavailableError, match="mmdebstrap"):
        OSInteractionSkill(data_path=path, split="all", machine="rootfs")
    monkeypatch.setenv("CYCLEQD_REQUIRE_ROOTFS", "1")
    with pytest.raises(RootfsUnavailableError):
        OSInteractionSkill(data_path=path, split="all")


@needs_machine
def test_snapshot_copies_the_state_and_changes_nothing(tmp_path):
    """The reference's snapshot keeps contents, deletions and times, and reading it does
    not touch the agent's machine (access times: `find -atime` tasks)."""
    with _machine() as s:
        assert s.exec("head -c 3000 /dev/zero > /root/old && touch -a -d '40 days ago' /root/old "
                      "&& rm /etc/hostname && echo $RANDOM > /root/rnd").ok
        before = s.exec("stat -c %X /root/old").stdout
        s.snapshot(tmp_path / "snap")
        assert s.exec("stat -c %X /root/old").stdout == before
        rnd = s.exec("cat /root/rnd").stdout
    with _machine(layers=[tmp_path / "snap"]) as r:
        out = r.exec("cat /root/rnd; stat -c %X /root/old; test -e /etc/hostname || echo gone")
    assert out.stdout.splitlines() == [rnd.strip(), before.strip(), "gone"]

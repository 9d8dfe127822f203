"""Helpers of the hostile-output suite (leftover-process checks)."""

from __future__ import annotations

import os

from cycleqd.sandbox import sandbox_status

STATUS = sandbox_status()


def processes_matching(needle: str) -> list[str]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit() and int(d) != os.getpid():
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
                with open(f"/proc/{d}/stat") as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if needle in cmd and state != "Z":
                out.append(f"{d}: {cmd[:120]}")
    return out


def sandbox_uid_processes() -> list[int]:
    """Live processes running as any throw-away sandbox uid of THIS evaluator process."""
    from cycleqd.sandbox.host import UID_BASE

    lo = UID_BASE + ((os.getpid() & 0xFFFF) << 8)
    found = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                st = open(f"/proc/{d}/status").read()
            except OSError:
                continue
            uid = int(next(ln for ln in st.splitlines() if ln.startswith("Uid:")).split()[1])
            zombie = "\nState:\tZ" in st
            if lo <= uid < lo + 256 and not zombie:
                found.append(int(d))
    return found

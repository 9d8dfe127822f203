"""Per-sandbox control groups (memory, process count, CPU accounting), best effort.

A sandbox gets its own cgroup when the host lets us create one (root with cgroup v1
controllers mounted, or a delegated cgroup v2 subtree). Where it cannot, the sandbox
still runs, limited by rlimits only; :func:`probe` says which case applies.

cgroup v1: one directory per controller (``memory``, ``pids``, ``cpuacct``) created under
this process's own cgroup of that controller, so that any limit set on the evaluator
itself still applies. cgroup v2: one directory under our own cgroup, when its
``cgroup.subtree_control`` already enables the controllers (we never move the evaluator).
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

_ROOT = Path("/sys/fs/cgroup")


def _own_paths() -> dict[str, str]:
    """Map controller name (or "" for the v2 unified hierarchy) -> our cgroup path."""
    out: dict[str, str] = {}
    try:
        text = Path("/proc/self/cgroup").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, ctrls, path = parts
        if ctrls == "":
            out[""] = path
        for c in ctrls.split(","):
            if c:
                out[c] = path
    return out


@dataclass
class CgroupSet:
    """The cgroup directories of one sandbox; every method is safe to call when empty."""

    dirs: dict[str, Path] = field(default_factory=dict)  # controller -> directory
    version: int = 0  # 0 = none, 1 = v1, 2 = v2

    @property
    def active(self) -> bool:
        return bool(self.dirs)

    def procs_files(self) -> list[str]:
        """Files to which a pid is written to join all of this set's cgroups."""
        return [str(d / "cgroup.procs") for d in self.dirs.values()]

    def pids(self) -> set[int]:
        found: set[int] = set()
        for d in self.dirs.values():
            try:
                found.update(int(x) for x in (d / "cgroup.procs").read_text().split())
            except (OSError, ValueError):
                pass
        return found

    def cpu_seconds(self) -> float | None:
        """Total CPU time used by the sandbox so far, in seconds (None if not tracked)."""
        try:
            if self.version == 1 and "cpuacct" in self.dirs:
                return int((self.dirs["cpuacct"] / "cpuacct.usage").read_text()) / 1e9
            if self.version == 2 and "unified" in self.dirs:
                for line in (self.dirs["unified"] / "cpu.stat").read_text().splitlines():
                    if line.startswith("usage_usec"):
                        return int(line.split()[1]) / 1e6
        except (OSError, ValueError):
            return None
        return None

    def oom_killed(self) -> bool:
        """Whether the kernel OOM-killed a process of this sandbox (memory limit hit)."""
        try:
            if self.version == 1 and "memory" in self.dirs:
                for line in (self.dirs["memory"] / "memory.oom_control").read_text().splitlines():
                    if line.startswith("oom_kill "):
                        return int(line.split()[1]) > 0
                return int((self.dirs["memory"] / "memory.failcnt").read_text()) > 0
            if self.version == 2 and "unified" in self.dirs:
                for line in (self.dirs["unified"] / "memory.events").read_text().splitlines():
                    if line.startswith("oom_kill "):
                        return int(line.split()[1]) > 0
        except (OSError, ValueError):
            return False
        return False

    def kill_all(self, timeout: float = 5.0) -> bool:
        """SIGKILL every process in the set until none is left; True if it emptied."""
        if not self.dirs:
            return True
        deadline = time.monotonic() + timeout
        while True:
            pids = self.pids()
            if not pids:
                return True
            for p in pids:
                try:
                    os.kill(p, signal.SIGKILL)
                except OSError:
                    pass
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)

    def remove(self) -> None:
        for d in self.dirs.values():
            for _ in range(50):
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.02)
        self.dirs = {}


_PROBE: tuple[int, str] | None = None


def probe() -> tuple[int, str]:
    """Which cgroup version we can create per-sandbox groups in: (0|1|2, explanation)."""
    global _PROBE
    if _PROBE is None:
        cg = create("cycleqd-probe-%d" % os.getpid(), memory_bytes=1 << 30, max_processes=64)
        if cg.active:
            _PROBE = (cg.version, "cgroup v%d: %s" % (cg.version, ", ".join(sorted(cg.dirs))))
        else:
            _PROBE = (0, "no writable cgroup hierarchy (limits fall back to rlimits only)")
        cg.remove()
    return _PROBE


def create(name: str, *, memory_bytes: int, max_processes: int) -> CgroupSet:
    """Create the cgroups of one sandbox and set its limits; empty set if not possible.

    Args:
        name: directory name (unique per sandbox).
        memory_bytes: memory limit (RAM + swap where the kernel accounts swap), bytes.
        max_processes: maximum number of tasks (processes and threads) at once.
    """
    own = _own_paths()
    v1 = (_ROOT / "memory").is_dir() and (_ROOT / "pids").is_dir()
    if v1:
        cg = CgroupSet(version=1)
        try:
            for ctrl in ("memory", "pids", "cpuacct"):
                base = _ROOT / ctrl / own.get(ctrl, "/").lstrip("/")
                d = base / name
                d.mkdir(exist_ok=True)
                cg.dirs[ctrl] = d
            mem = cg.dirs["memory"]
            (mem / "memory.limit_in_bytes").write_text(str(memory_bytes))
            if (mem / "memory.memsw.limit_in_bytes").exists():
                try:
                    (mem / "memory.memsw.limit_in_bytes").write_text(str(memory_bytes))
                except OSError:
                    pass
            (cg.dirs["pids"] / "pids.max").write_text(str(max_processes))
            return cg
        except OSError:
            cg.remove()
            return CgroupSet()
    if (_ROOT / "cgroup.controllers").exists() and "" in own:
        base = _ROOT / own[""].lstrip("/")
        cg = CgroupSet(version=2)
        try:
            enabled = (base / "cgroup.subtree_control").read_text().split()
            if not {"memory", "pids"} <= set(enabled):
                return CgroupSet()
            d = base / name
            d.mkdir(exist_ok=True)
            cg.dirs["unified"] = d
            (d / "memory.max").write_text(str(memory_bytes))
            if (d / "memory.swap.max").exists():
                (d / "memory.swap.max").write_text("0")
            (d / "pids.max").write_text(str(max_processes))
            return cg
        except OSError:
            cg.remove()
            return CgroupSet()
    return CgroupSet()

"""Limits and results of a sandbox (:class:`SandboxLimits`, :class:`SandboxResult`,
:class:`SandboxStatus`) and the error raised when no sandbox can be made here."""

from __future__ import annotations

from dataclasses import dataclass

from cycleqd.errors import CycleQDError

__all__ = ["SandboxLimits", "SandboxResult", "SandboxStatus", "SandboxUnavailableError"]

_MiB = 1 << 20


#: uid/gid offset of the OS image's files on the host (cycleqd/sandbox/rootfs.py shifts the
#: tree by it; the machine maps it back to 0 inside its user namespace)
ROOTFS_UID_BASE = 1_400_000_000

class SandboxUnavailableError(CycleQDError, RuntimeError):
    """bwrap (or another required host tool) is missing or cannot create a sandbox here."""


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits of one sandbox.

    Attributes:
        cpu_seconds: CPU time, seconds: per process (RLIMIT_CPU) and, where a cgroup is
            available, in total for a one-shot run.
        memory_bytes: memory, bytes: in total (cgroup, RAM + swap) and per process
            address space (RLIMIT_AS).
        wall_seconds: wall-clock limit, seconds: of a one-shot run, or the default of one
            ``BwrapSession.exec``.
        max_output_bytes: bytes kept of stdout and of stderr each; a command printing
            more is killed and its output truncated.
        max_processes: tasks (processes + threads) alive at once (RLIMIT_NPROC on the
            sandbox's own uid, and cgroup pids.max).
        max_file_bytes: size of any one file written, bytes (RLIMIT_FSIZE).
        max_open_files: open file descriptors per process (RLIMIT_NOFILE).
        tmpfs_bytes: size of the sandbox's writable file system, bytes: the tmpfs root
            (which holds /root, /tmp, /home, /var, /run/shm = /dev/shm ...), or an OS
            machine's overlay upper layer. RLIMIT_AS does not bound tmpfs pages; this
            does (and the cgroup, where there is one, charges them as memory).
    """

    cpu_seconds: float = 10.0
    memory_bytes: int = 1024 * _MiB
    wall_seconds: float = 30.0
    max_output_bytes: int = 64 * 1024
    max_processes: int = 128
    max_file_bytes: int = 128 * _MiB
    max_open_files: int = 1024
    tmpfs_bytes: int = 256 * _MiB

    def __post_init__(self) -> None:
        for name in ("cpu_seconds", "wall_seconds"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
                raise ValueError(f"SandboxLimits.{name} must be a positive number, got {v!r}")
        minimum = {"memory_bytes": 16 * _MiB, "max_output_bytes": 1, "max_processes": 4,
                   "max_file_bytes": 1, "max_open_files": 16, "tmpfs_bytes": 1 * _MiB}
        for name, lo in minimum.items():
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"SandboxLimits.{name} must be an int >= {lo}, got {v!r}")


@dataclass
class SandboxResult:
    """Outcome of one command run in a sandbox.

    Attributes:
        returncode: exit status of the command (negative: killed by that signal, as in
            :mod:`subprocess`; None if the sandbox died before reporting one).
        stdout, stderr: decoded (UTF-8, invalid bytes replaced) and truncated to
            ``max_output_bytes`` each (stderr is empty when merged into stdout).
        timed_out: the wall-clock limit was hit.
        killed: why the sandbox killed the command, or None: "wall_time", "cpu_time",
            "memory", "output_limit", "sandbox_died" (the session's supervisor is gone,
            e.g. the command killed it) or "sandbox_error" (could not start).
        wall_s: wall-clock seconds the command took.
        truncated: some output was dropped.
    """

    returncode: int | None
    stdout: str = ""
    stderr: str = ""
    timed_out: bool = False
    killed: str | None = None
    wall_s: float = 0.0
    truncated: bool = False

    @property
    def ok(self) -> bool:
        """Exited 0 and was not killed."""
        return self.returncode == 0 and self.killed is None


@dataclass(frozen=True)
class SandboxStatus:
    """What isolation this host gives (see :func:`sandbox_status`)."""

    available: bool
    reason: str
    bwrap: str | None = None
    unique_uid: bool = False  # root on the host: each sandbox runs as its own host uid
    cgroup: str = ""

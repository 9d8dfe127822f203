"""Bubblewrap sandboxes for model-written code and shell commands.

Every sandbox is a fresh set of Linux namespaces made by ``bwrap`` (Debian package
``bubblewrap``): its own user (root inside, an unprivileged throw-away uid outside, no
capabilities), PID, network (loopback only, not the host's), IPC, UTS and mount
namespaces. The file system is a size-limited tmpfs root with the host's ``/usr``,
``/etc`` (secrets masked) and library directories bound read-only, fresh writable
``/root``, ``/tmp``, ``/home``, ``/var`` (directories on that one tmpfs), a 1 MiB
``/dev`` with a few device nodes, and nothing else of the host (no ``/work``, ``/run``,
``/proc`` of the host, no sockets). Every tmpfs has a size (RLIMIT_AS does not bound
tmpfs pages). The environment is cleared.

An *OS machine* (``BwrapSession(rootfs=...)``, see :mod:`.rootfs`) instead has its own
Debian root: the image under a private writable overlay (upper layer: a sized tmpfs),
in its own user namespace mapping 65536 ids, root with Docker's default capabilities
and no nested user namespaces; nothing of the host's file system is visible.

Limits (:class:`SandboxLimits`) are layered so that each holds even if another is not
available on a host:

* rlimits (``prlimit``): CPU seconds per process, address space per process, file size,
  open files, no core dumps, and - because each sandbox runs as its own host uid when
  the evaluator is root - an exact per-sandbox process count (``RLIMIT_NPROC``);
* a per-sandbox cgroup when the host allows (see :mod:`._cgroup`): total memory (RAM +
  swap), total tasks, total CPU time;
* wall-clock timeouts and output caps enforced by the host (one-shot runs) or by the
  in-sandbox supervisor (sessions), which kill the whole process group.

At the end every process of the sandbox is killed: the PID namespace dies with its
init (``--die-with-parent``, SIGKILL of bwrap), then anything left in the cgroup or
owned by the sandbox's uid is SIGKILLed until none is left.

Public API: :class:`SandboxLimits`, :class:`SandboxResult`, :func:`run_sandboxed` (one
shot, e.g. ``python3 program.py`` with a benchmark's tests), :class:`BwrapSession`
(a persistent machine for a multi-turn shell episode), :func:`sandbox_status`.
"""

from __future__ import annotations

import atexit
import hashlib
import hmac
import itertools
import json
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from cycleqd.errors import CycleQDError

from . import _cgroup

__all__ = [
    "SandboxLimits", "SandboxResult", "SandboxUnavailableError", "run_sandboxed",
    "BwrapSession", "sandbox_status", "SandboxStatus",
]

_MiB = 1 << 20

_DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Host directories bound read-only (or re-created as the same symlink) inside.
_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")
# Masked even though they are unreadable for the unprivileged sandbox uid anyway.
_SECRET_FILES = ("/etc/shadow", "/etc/shadow-", "/etc/gshadow", "/etc/gshadow-",
                 "/etc/sudoers", "/etc/mysql/debian.cnf", "/etc/machine-id")
_SECRET_DIRS = ("/etc/ssh", "/etc/ssl/private", "/etc/sudoers.d")
_WRITABLE_DIRS = ("/root", "/tmp", "/home", "/var", "/opt", "/srv", "/mnt", "/media",
                  "/run", "/run/shm")
_UID_BASE = 1_500_000_000  # throw-away uids: _UID_BASE + pid*256 + counter (mod 2**24)


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


# --------------------------------------------------------------------------- host probe


@dataclass(frozen=True)
class _Host:
    bwrap: str
    prlimit: str
    setpriv: str | None
    root: bool
    cgroup_version: int


_HOST: _Host | None = None
_HOST_ERR: str | None = None
_HOST_LOCK = threading.Lock()


def _host() -> _Host:
    global _HOST, _HOST_ERR
    with _HOST_LOCK:
        if _HOST is None and _HOST_ERR is None:
            bwrap, prlimit = shutil.which("bwrap"), shutil.which("prlimit")
            setpriv = shutil.which("setpriv")
            root = os.geteuid() == 0
            if bwrap is None:
                _HOST_ERR = ("bubblewrap is not installed (no `bwrap` on PATH): "
                             "install the Debian package `bubblewrap`")
            elif prlimit is None:
                _HOST_ERR = "`prlimit` (util-linux) is not on PATH"
            elif root and setpriv is None:
                _HOST_ERR = "`setpriv` (util-linux) is not on PATH (needed when running as root)"
            else:
                cg = _cgroup.probe()[0] if root else 0
                _HOST = _Host(bwrap, prlimit, setpriv, root, cg)
                # Smoke test: can we actually create the namespaces here?
                try:
                    r = run_sandboxed(["/bin/true"], limits=SandboxLimits(wall_seconds=20))
                    if r.returncode != 0:
                        _HOST_ERR = ("bwrap cannot create a sandbox here (exit %s): %s"
                                     % (r.returncode, r.stderr.strip()[:500]))
                except Exception as e:  # noqa: BLE001 - turned into a clear error below
                    _HOST_ERR = f"bwrap cannot create a sandbox here: {e}"
                if _HOST_ERR is not None:
                    _HOST = None
                elif not (root and cg):
                    why = "not root" if not root else _cgroup.probe()[1]
                    # said once per process, at the first sandbox (issue 18.6)
                    sys.stderr.write(
                        f"cycleqd sandbox: no memory cgroup ({why}): a sandbox's memory is "
                        "bounded only by RLIMIT_AS per process, its tmpfs sizes and "
                        "RLIMIT_NPROC in its user namespace\n")
        if _HOST is None:
            raise SandboxUnavailableError(_HOST_ERR)
        return _HOST


def sandbox_status() -> SandboxStatus:
    """Probe the host once: is bubblewrap usable, with which isolation features."""
    try:
        h = _host()
    except SandboxUnavailableError as e:
        return SandboxStatus(False, str(e))
    return SandboxStatus(True, "ok", h.bwrap, h.root,
                         _cgroup.probe()[1] if h.root else "not root: rlimits only")


# --------------------------------------------------------------------------- launching

_uid_counter = itertools.count()
_LIVE: "weakref.WeakSet[_Sandbox]" = weakref.WeakSet()


def _uid_in_use(uid: int) -> bool:
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/status", "rb") as f:
                    for line in f:
                        if line.startswith(b"Uid:"):
                            if int(line.split()[1]) == uid:
                                return True
                            break
            except (OSError, ValueError, IndexError):
                pass
    return False


def _alloc_uid() -> int:
    for _ in range(256):
        uid = _UID_BASE + (((os.getpid() & 0xFFFF) << 8) | (next(_uid_counter) & 0xFF))
        if not _uid_in_use(uid):
            return uid
    raise SandboxUnavailableError("no free sandbox uid")


def _pids_of_uid(uid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/status", "rb") as f:
                    zombie = False
                    for line in f:
                        if line.startswith(b"State:"):
                            zombie = b"Z" in line.split()[1]
                        elif line.startswith(b"Uid:"):
                            if not zombie and uid in (int(x) for x in line.split()[1:]):
                                out.append(int(d))
                            break
            except (OSError, ValueError):
                pass
    return out


def _memfd(data: bytes | str) -> int:
    fd = os.memfd_create("cycleqd", 0)
    os.write(fd, data.encode() if isinstance(data, str) else data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
    except (OSError, ValueError):
        pass
    return out


#: Size of the small tmpfs mounts (/dev and the masks over secret directories), bytes.
_SMALL_TMPFS = 1 * _MiB
#: Device nodes bound into the sandbox's own (size-limited) /dev.
_DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
#: Capabilities root keeps inside an OS machine (its own user namespace only): Docker's
#: default set, as in AgentBench's containers (no CAP_SYS_ADMIN: no mounts, so no tmpfs
#: without a size; no CAP_SYS_RESOURCE).
_MACHINE_CAPS = ("CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_SETGID",
                 "CAP_SETUID", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT",
                 "CAP_KILL", "CAP_AUDIT_WRITE", "CAP_SETFCAP")


def _dev_args() -> list[str]:
    """A size-limited /dev (bwrap's ``--dev`` tmpfs has no size): device nodes bound
    from the host, the usual symlinks, and /dev/shm pointing at /run/shm (on the
    sandbox's own sized root)."""
    a = ["--size", str(_SMALL_TMPFS), "--tmpfs", "/dev"]
    for d in _DEVICES:
        if os.path.exists("/dev/" + d):
            a += ["--dev-bind", "/dev/" + d, "/dev/" + d]
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2"),
                         ("core", "/proc/kcore"), ("shm", "/run/shm")):
        a += ["--symlink", target, "/dev/" + name]
    return a


def _bwrap_args(limits: SandboxLimits, *, workdir: str, env: Mapping[str, str],
                ro_binds: Sequence[tuple[str, str]], file_fds: list[tuple[int, str]],
                machine_root: str | None = None) -> list[str]:
    """bwrap options. Every tmpfs has a size: the root (``tmpfs_bytes``; /root, /tmp,
    /home, /var, ... and /dev/shm are directories on it, so their total is bounded by
    one size), /dev and the secret masks (1 MiB each). With ``machine_root`` (a merged
    overlay prepared by the launcher, see :mod:`.rootfs`) that directory is ``/``."""
    a = ["--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
         "--unshare-cgroup-try", "--hostname", "sandbox", "--die-with-parent", "--new-session"]
    if machine_root is not None:
        a += ["--bind", machine_root, "/", "--proc", "/proc"] + _dev_args()
        a += ["--dir", "/run/shm", "--chmod", "1777", "/run/shm"]
        a += ["--cap-drop", "ALL"]
        for c in _MACHINE_CAPS:
            a += ["--cap-add", c]
    else:
        a = ["--unshare-user", "--uid", "0", "--gid", "0", "--disable-userns"] + a
        a += ["--size", str(limits.tmpfs_bytes), "--tmpfs", "/"]
        for d in _SYSTEM_DIRS:
            if os.path.islink(d):
                a += ["--symlink", os.readlink(d), d]
            elif os.path.isdir(d):
                a += ["--ro-bind", d, d]
        for f in _SECRET_FILES:
            if os.path.isfile(f):
                a += ["--ro-bind", "/dev/null", f]
        for d in _SECRET_DIRS:
            if os.path.isdir(d):
                a += ["--size", str(_SMALL_TMPFS), "--tmpfs", d]
        a += ["--proc", "/proc"] + _dev_args()
        for d in _WRITABLE_DIRS:
            a += ["--dir", d]
        a += ["--chmod", "1777", "/tmp", "--chmod", "1777", "/run/shm", "--dir", "/var/tmp",
              "--chmod", "1777", "/var/tmp", "--dir", "/var/log", "--chmod", "0700", "/root"]
    for src, dst in ro_binds:
        a += ["--ro-bind", src, dst]
    for fd, path in file_fds:
        parent = os.path.dirname(path)
        if parent not in ("", "/"):
            a += ["--dir", parent]
        a += ["--perms", "0644", "--file", str(fd), path]
    if workdir not in ("/",) + _WRITABLE_DIRS:
        a += ["--dir", workdir]
    a += ["--chdir", workdir, "--clearenv"]
    for k, v in env.items():
        a += ["--setenv", k, v]
    return a


def _default_env(workdir: str) -> dict[str, str]:
    return {"PATH": _DEFAULT_PATH, "HOME": "/root", "USER": "root", "LOGNAME": "root",
            "SHELL": "/bin/bash", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "TERM": "dumb",
            "HOSTNAME": "sandbox", "PWD": workdir}


def _nofile_ceiling(host: "_Host") -> int:
    """The highest RLIMIT_NOFILE we may set: our own hard limit (raising it needs
    CAP_SYS_RESOURCE, which a root in a container often lacks)."""
    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return hard if hard != resource.RLIM_INFINITY else 1 << 20


def _check_files(files: Mapping[str, bytes | str]) -> None:
    for path, data in files.items():
        if not isinstance(path, str) or not path.startswith("/") or ".." in path.split("/"):
            raise ValueError(f"files: sandbox path must be absolute without '..', got {path!r}")
        if not isinstance(data, (bytes, str)):
            raise ValueError(f"files[{path!r}] must be bytes or str, got {type(data).__name__}")


@dataclass(frozen=True)
class _MachineSpec:
    """Where an OS machine's root comes from (see :mod:`.rootfs`).

    Attributes:
        image: the read-only image root (ids shifted by ``uid_base``).
        layers: extra read-only layers above the image, top first (e.g. a snapshot of
            another machine's writable layer, :meth:`BwrapSession.snapshot`).
        mnt: an empty host directory; a tmpfs is mounted over it only inside the
            machine's private mount namespace (the host never sees the mount).
        uid_base: host uid/gid that is root inside; 65536 ids are mapped from it.
    """

    image: str
    layers: tuple[str, ...] = ()
    mnt: str = ""
    uid_base: int = 0

    def lowerdir(self) -> str:
        dirs = [*self.layers, self.image]
        for d in dirs:
            if any(c in d for c in ":,\n") or not os.path.isabs(d):
                raise ValueError(f"machine layer path must be absolute without ':' or ',': {d!r}")
        return ":".join(dirs)

    def mount_argv(self, limits: SandboxLimits) -> list[str]:
        """Host-root commands run in a private mount namespace: the size-limited tmpfs for
        the writable layer and the overlay; then ``exec "$@"``."""
        b = self.uid_base
        script = "; ".join([
            "set -e", 'M="$1"', "shift",
            f'mount -t tmpfs -o size={limits.tmpfs_bytes},nr_inodes={max(4096, limits.tmpfs_bytes >> 12)},'
            f'mode=0755 cycleqd-machine "$M"',
            'mkdir "$M/u" "$M/w" "$M/m"', f'chown {b}:{b} "$M/u"',
            f'mount -t overlay -o "lowerdir={self.lowerdir()},upperdir=$M/u,workdir=$M/w" '
            'cycleqd-machine "$M/m"',
            # a read-only, noatime view of the writable layer for snapshot(): reading
            # through it does not touch the machine's access times
            'mkdir "$M/s"', 'mount --bind "$M/u" "$M/s"',
            'mount -o remount,bind,ro,noatime "$M/s"',
            'exec "$@"'])
        return [_UNSHARE, "--mount", "--propagation", "private", "--", "/bin/sh", "-c", script,
                "sh", self.mnt]


def _machine_mountpoint() -> Path:
    """An empty root-owned directory every path component of which the machine's owner
    uid can traverse (bwrap runs as that uid): /run/cycleqd-machine (or under /var/tmp).
    Mounts over it happen only in private mount namespaces."""
    for base in ("/run", "/var/tmp"):
        if os.path.isdir(base) and os.stat(base).st_mode & 0o001:
            d = Path(base) / "cycleqd-machine"
            try:
                d.mkdir(mode=0o755, exist_ok=True)
            except OSError:
                continue
            st = os.lstat(d)
            if st.st_uid == 0 and not os.path.islink(d) and not st.st_mode & 0o022:
                return d
    raise SandboxUnavailableError("no traversable directory for the OS machine's mount point "
                                  "(/run or /var/tmp)")


_UNSHARE = shutil.which("unshare") or "/usr/bin/unshare"
_NSENTER = shutil.which("nsenter") or "/usr/bin/nsenter"


class _Userns:
    """A user namespace owned by ``uid_base`` mapping ids 0..65535 inside onto
    ``uid_base..uid_base+65535`` (written by us, root, from outside), in which nobody can
    create a further user namespace (``user.max_user_namespaces = 0``, so no process in
    the machine can gain capabilities it was not given). A ``sleep`` holds it until the
    machine has joined; :meth:`fd` is passed to ``bwrap --userns``."""

    def __init__(self, host: "_Host", uid_base: int) -> None:
        b = uid_base
        self.proc = _launch([host.setpriv, f"--reuid={b}", f"--regid={b}", "--clear-groups",
                             "--pdeathsig", "KILL", "--", _UNSHARE, "--user", "--", "/bin/sh", "-c",
                             "echo up; exec sleep 2147483647"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd="/",
                            env={"PATH": _DEFAULT_PATH}, close_fds=True)
        self._fd: int | None = None
        try:
            with selectors.DefaultSelector() as sel:
                sel.register(self.proc.stdout, selectors.EVENT_READ)
                if not sel.select(timeout=20) or self.proc.stdout.readline() != b"up\n":
                    raise SandboxUnavailableError("cannot create a user namespace for the OS machine")
            for f in ("uid_map", "gid_map"):
                with open(f"/proc/{self.proc.pid}/{f}", "w") as fh:
                    fh.write(f"0 {b} {_MACHINE_IDS}\n")
            # user.max_user_namespaces is per user namespace; set from inside (as its root)
            r = subprocess.run([host.setpriv, f"--reuid={b}", f"--regid={b}", "--clear-groups",
                                "--", _NSENTER, f"--user=/proc/{self.proc.pid}/ns/user",
                                "--setuid", "0", "--setgid", "0", "--", "/bin/sh", "-c",
                                "echo 0 > /proc/sys/user/max_user_namespaces"],
                               capture_output=True, text=True, timeout=20, cwd="/",
                               env={"PATH": _DEFAULT_PATH})
            if r.returncode != 0:
                raise SandboxUnavailableError("cannot disable nested user namespaces in the OS "
                                              f"machine: {r.stderr.strip()[:200]}")
            self._fd = os.open(f"/proc/{self.proc.pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
        except BaseException:
            self.close()
            raise

    @property
    def fd(self) -> int:
        assert self._fd is not None
        return self._fd

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        try:
            self.proc.kill()
            self.proc.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            pass
        try:
            self.proc.stdout.close()
        except OSError:
            pass


_MACHINE_IDS = 65536


class _Sandbox:
    """One launched bwrap process tree and its cleanup."""

    def __init__(self, inner: Sequence[str], *, limits: SandboxLimits,
                 files: Mapping[str, bytes | str], workdir: str, env: Mapping[str, str] | None,
                 ro_binds: Sequence[tuple[str, str]], stdin: bool,
                 inherit_data: bytes | None = None,
                 machine: "_MachineSpec | None" = None) -> None:
        host = _host() if _HOST is None else _HOST
        if not workdir.startswith("/"):
            raise ValueError(f"workdir must be an absolute path, got {workdir!r}")
        _check_files(files)
        if machine is not None and not host.root:
            raise SandboxUnavailableError(
                "an OS machine (own root file system) needs root on the host")
        self.limits = limits
        self.machine = machine
        self.userns: _Userns | None = None
        # An OS machine runs in its own user namespace mapping 65536 ids onto the image's
        # shifted owners (shared by all machines: they never see each other's processes
        # or files, and each has its own per-namespace process count).
        self.uid = _alloc_uid() if host.root and machine is None else None
        self.cg = (_cgroup.create(f"cycleqd-sbx-{os.getpid()}-{self.uid or next(_uid_counter)}",
                                  memory_bytes=limits.memory_bytes,
                                  max_processes=limits.max_processes)
                   if host.root and host.cgroup_version else _cgroup.CgroupSet())
        fds: list[tuple[int, str]] = []
        other_fds: list[int] = []
        try:
            for path, data in files.items():
                fds.append((_memfd(data), path))
            if inherit_data is not None:
                # An fd the sandboxed command inherits (bwrap passes unknown fds through);
                # "{fd}" in its argv is replaced by the number.
                other_fds.append(_memfd(inherit_data))
                inner = [x.replace("{fd}", str(other_fds[-1])) for x in inner]
            full_env = _default_env(workdir)
            full_env.update(env or {})
            # bwrap's own options go through an fd (--args) so that the sandbox's
            # /proc/1/cmdline shows no host paths or plumbing.
            opts = _bwrap_args(limits, workdir=workdir, env=full_env, ro_binds=ro_binds,
                               file_fds=fds,
                               machine_root=None if machine is None else machine.mnt + "/m")
            nproc = limits.max_processes + 4
            if machine is not None or not host.root:
                # All OS machines (and, when not root, all sandboxes) share one host uid, so
                # RLIMIT_NPROC is set INSIDE the sandbox's own user namespace, where the
                # kernel (>= 5.14) counts it per namespace; set outside it would count every
                # process of that uid.
                inner = ["/usr/bin/prlimit", f"--nproc={nproc}", "--", *inner]
            if machine is not None:
                self.userns = _Userns(host, machine.uid_base)
                other_fds.append(os.dup(self.userns.fd))
                opts = ["--userns", str(other_fds[-1]), "--uid", "0", "--gid", "0", *opts]
            other_fds.append(_memfd(b"".join(o.encode() + b"\0" for o in opts)))
            bw = [host.bwrap, "--args", str(other_fds[-1]), "--", *inner]
            cpu = max(1, int(round(limits.cpu_seconds)))
            nofile = min(limits.max_open_files, _nofile_ceiling(host))
            pl = [host.prlimit, f"--cpu={cpu}:{cpu + 1}", f"--as={limits.memory_bytes}",
                  f"--fsize={limits.max_file_bytes}", f"--nofile={nofile}",
                  "--core=0"]
            if host.root and machine is None:
                pl.append(f"--nproc={nproc}")
            pl.append("--")
            if machine is not None:
                # host root: private mount namespace, tmpfs + overlay; then the machine's
                # owner uid, which owns the user namespace bwrap joins.
                pre = machine.mount_argv(limits)
                drop = [host.setpriv, f"--reuid={machine.uid_base}",
                        f"--regid={machine.uid_base}", "--clear-groups", "--"]
            else:
                pre = []
                drop = ([host.setpriv, f"--reuid={self.uid}", f"--regid={self.uid}",
                         "--clear-groups", "--"] if host.root else [])
            join = ("while [ \"$1\" != -- ]; do echo $$ > \"$1\" || exit 125; shift; done; "
                    "shift; exec \"$@\"")
            argv = ["/bin/sh", "-c", join, "sh", *self.cg.procs_files(), "--", *pre, *pl, *drop,
                    *bw]
            self.t0 = time.monotonic()
            self.proc = _launch(
                argv, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/",
                env={"PATH": _DEFAULT_PATH, "LANG": "C.UTF-8"},
                pass_fds=[fd for fd, _ in fds] + other_fds, start_new_session=True,
                close_fds=True)
        except BaseException:
            self.cg.remove()
            if self.userns is not None:
                self.userns.close()
            raise
        finally:
            for fd in [fd for fd, _ in fds] + other_fds:
                os.close(fd)
        self._closed = False
        _LIVE.add(self)

    def stop(self) -> None:
        """SIGKILL the sandbox's processes (no cleanup). The inside goes first: the PID
        namespace's init takes every process of the namespace with it, and bwrap (our
        child) reaps it, so that no zombie is left to the host's init; then bwrap."""
        if self.proc.poll() is None:
            for child in _children(self.proc.pid):
                try:
                    os.kill(child, signal.SIGKILL)
                except OSError:
                    pass
            try:
                self.proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                pass
        try:
            self.proc.kill()
        except OSError:
            pass

    def kill(self) -> None:
        """SIGKILL everything of this sandbox, wait for it, remove its cgroup. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.stop()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        self.cg.kill_all()
        if self.uid is not None:
            deadline = time.monotonic() + 5
            while True:
                pids = _pids_of_uid(self.uid)
                if not pids or time.monotonic() > deadline:
                    break
                for p in pids:
                    try:
                        os.kill(p, signal.SIGKILL)
                    except OSError:
                        pass
                time.sleep(0.01)
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if f is not None:
                try:
                    f.close()
                except OSError:
                    pass
        self.cg.remove()
        if self.userns is not None:
            self.userns.close()
        _LIVE.discard(self)


class _Launcher:
    """Starts every sandbox from ONE long-lived thread.

    ``bwrap --die-with-parent`` uses PR_SET_PDEATHSIG, which fires when the *thread* that
    forked bwrap exits, not the process: a sandbox started from a short-lived worker
    thread (a ThreadPoolExecutor's) would be killed when that thread ends. A daemon thread
    living as long as the interpreter keeps "the parent" alive exactly as long as the
    evaluator, so sandboxes still die with the evaluator and only with it.
    """

    def __init__(self) -> None:
        import queue

        self._q: "queue.Queue[tuple]" = queue.Queue()
        self._t = threading.Thread(target=self._loop, name="cycleqd-sandbox-launcher",
                                   daemon=True)
        self._t.start()

    def _loop(self) -> None:
        while True:
            argv, kw, box, done = self._q.get()
            try:
                box.append(subprocess.Popen(argv, **kw))
            except BaseException as e:  # noqa: BLE001 - handed back to the caller
                box.append(e)
            done.set()

    def popen(self, argv: list[str], **kw: object) -> subprocess.Popen:
        box: list = []
        done = threading.Event()
        self._q.put((argv, kw, box, done))
        done.wait()
        if isinstance(box[0], BaseException):
            raise box[0]
        return box[0]


_LAUNCHER: _Launcher | None = None
_LAUNCHER_LOCK = threading.Lock()


def _launch(argv: list[str], **kw: object) -> subprocess.Popen:
    global _LAUNCHER
    with _LAUNCHER_LOCK:
        if _LAUNCHER is None:
            _LAUNCHER = _Launcher()
    return _LAUNCHER.popen(argv, **kw)


@atexit.register
def _kill_live_sandboxes() -> None:
    for s in list(_LIVE):
        try:
            s.kill()
        except Exception:  # noqa: BLE001 - best effort at interpreter exit
            pass


# --------------------------------------------------------------------------- one shot


def run_sandboxed(argv: Sequence[str], *, stdin: bytes | str | None = None,
                  files: Mapping[str, bytes | str] | None = None,
                  limits: SandboxLimits = SandboxLimits(), workdir: str = "/root",
                  env: Mapping[str, str] | None = None,
                  ro_binds: Sequence[tuple[str, str]] = ()) -> SandboxResult:
    """Run one command in a fresh sandbox and return its result (never raises for
    anything the command does).

    Args:
        argv: the command, resolved inside the sandbox (e.g. ``["python3", "prog.py"]``;
            ``python3`` is the host's system ``/usr/bin/python3``).
        stdin: bytes or text fed to the command's stdin (None: /dev/null).
        files: sandbox path -> content, written before the command starts (e.g.
            ``{"/root/prog.py": code}``); parents are created.
        limits: see :class:`SandboxLimits`.
        workdir: the command's working directory inside.
        env: extra environment variables (the host's environment is never passed).
        ro_binds: extra (host path, sandbox path) pairs bound read-only.

    Raises:
        SandboxUnavailableError: bubblewrap is missing or unusable on this host.
        ValueError: a bad ``argv``/``files``/``workdir`` (before anything runs).
    """
    if isinstance(argv, (str, bytes)) or not argv or not all(isinstance(x, str) for x in argv):
        raise ValueError(f"argv must be a non-empty sequence of str, got {argv!r}")
    sb = _Sandbox(argv, limits=limits, files=files or {}, workdir=workdir, env=env,
                  ro_binds=ro_binds, stdin=stdin is not None)
    try:
        return _pump(sb, stdin)
    finally:
        sb.kill()


def _pump(sb: _Sandbox, stdin: bytes | str | None) -> SandboxResult:
    limits, p = sb.limits, sb.proc
    cap = limits.max_output_bytes
    sel = selectors.DefaultSelector()
    bufs = {"stdout": bytearray(), "stderr": bytearray()}
    sel.register(p.stdout, selectors.EVENT_READ, "stdout")
    sel.register(p.stderr, selectors.EVENT_READ, "stderr")
    pending = b""
    if stdin is not None:
        pending = stdin.encode() if isinstance(stdin, str) else bytes(stdin)
        os.set_blocking(p.stdin.fileno(), False)
        if pending:
            sel.register(p.stdin, selectors.EVENT_WRITE, "stdin")
        else:
            p.stdin.close()
    deadline = sb.t0 + limits.wall_seconds
    killed: str | None = None
    truncated = False
    next_cpu_check = 0.0

    def _kill(reason: str) -> None:
        nonlocal killed
        if killed is None:
            killed = reason
        sb.stop()
        sb.cg.kill_all(timeout=1.0)

    while sel.get_map():
        now = time.monotonic()
        if killed is None and now > deadline:
            _kill("wall_time")
        if killed is None and sb.cg.active and now >= next_cpu_check:
            next_cpu_check = now + 0.05
            used = sb.cg.cpu_seconds()
            if used is not None and used > limits.cpu_seconds:
                _kill("cpu_time")
        if killed is not None and now > deadline + 5:
            break  # pipes held open by something unkillable: give up reading
        for key, _ in sel.select(timeout=0.05):
            if key.data == "stdin":
                try:
                    n = os.write(p.stdin.fileno(), pending[:65536])
                    pending = pending[n:]
                except OSError:
                    pending = b""
                if not pending:
                    sel.unregister(p.stdin)
                    try:
                        p.stdin.close()
                    except OSError:
                        pass
                continue
            try:
                chunk = os.read(key.fd, 65536)
            except BlockingIOError:
                continue
            except OSError:
                chunk = b""
            if not chunk:
                sel.unregister(key.fileobj)
                continue
            buf = bufs[key.data]
            room = cap - len(buf)
            if len(chunk) > room:
                buf += chunk[:max(room, 0)]
                truncated = True
                _kill("output_limit")
            else:
                buf += chunk
    try:
        rc = p.wait(timeout=max(1.0, deadline + 5 - time.monotonic()))
    except subprocess.TimeoutExpired:
        _kill("wall_time")
        rc = p.wait()
    if killed is None and sb.cg.oom_killed():
        killed = "memory"
    if killed is None and sb.cg.active:
        used = sb.cg.cpu_seconds()
        if used is not None and used > limits.cpu_seconds:
            killed = "cpu_time"
    if killed is None and rc in (-signal.SIGXCPU, 128 + signal.SIGXCPU):
        killed = "cpu_time"  # RLIMIT_CPU fired before the cgroup accounting passed the limit
    return SandboxResult(
        returncode=rc, stdout=bufs["stdout"].decode("utf-8", "replace"),
        stderr=bufs["stderr"].decode("utf-8", "replace"), timed_out=killed == "wall_time",
        killed=killed, wall_s=time.monotonic() - sb.t0, truncated=truncated)


# --------------------------------------------------------------------------- sessions

_AGENT_SOURCE = (Path(__file__).with_name("_agent.py")).read_text()


class BwrapSession:
    """A persistent sandbox machine for one multi-turn episode (e.g. an OS task).

    Its file system (tmpfs root, /root, /tmp, ...), background processes and shell state
    (cwd, variables, functions, aliases) live from :meth:`start` to :meth:`close`;
    everything is killed at close. Commands run through a small supervisor inside the
    sandbox (the sandbox's ``/usr/bin/python3``, :mod:`._agent`); its replies are
    authenticated with a per-session key (HMAC-SHA256 over the reply, which carries the
    request id) so that commands -- which run as the same sandbox user -- cannot forge a
    result the host believes. A command that kills the supervisor or tampers with its
    channel ends the session (later calls return ``killed="sandbox_died"``).

    Use as a context manager::

        with BwrapSession(SandboxLimits(wall_seconds=10), workdir="/") as s:
            s.exec("cd /tmp && export X=1")
            s.exec("pwd; echo $X").stdout   # "/tmp\\n1\\n"

    Args:
        limits: see :class:`SandboxLimits`; ``wall_seconds`` is the default timeout of one
            :meth:`exec`, ``memory_bytes``/``max_processes`` hold for the whole machine.
        files: sandbox path -> content, written at start.
        workdir: the shell's starting directory.
        env: extra environment variables.
        ro_binds: extra (host path, sandbox path) pairs bound read-only.
        python: the interpreter inside the sandbox that runs the supervisor.
        rootfs: an OS machine image (:class:`cycleqd.sandbox.rootfs.RootFS` or its root
            directory): the machine's ``/`` is then that image under a private writable
            overlay (upper layer: a tmpfs of ``limits.tmpfs_bytes``), in its own user
            namespace with 65536 ids (so ``useradd``/``su``/``sudo``/``chown`` work) and
            Docker's default capabilities for its root; nothing of the host's file
            system is visible. Needs root on the host. None: the host's ``/usr`` and
            ``/etc`` read-only under a tmpfs root (the default).
        layers: with ``rootfs``, read-only layers put above the image, top first
            (e.g. a :meth:`snapshot` of another machine).

    Raises:
        SandboxUnavailableError: at :meth:`start`, when no sandbox can be made.
    """

    #: Source of the in-sandbox supervisor (a subclass may run another JSON-line server,
    #: e.g. the SQLite worker of :mod:`cycleqd.sandbox.sql`).
    _agent_source: str = _AGENT_SOURCE

    def __init__(self, limits: SandboxLimits = SandboxLimits(), *,
                 files: Mapping[str, bytes | str] | None = None, workdir: str = "/root",
                 env: Mapping[str, str] | None = None,
                 ro_binds: Sequence[tuple[str, str]] = (), python: str = "/usr/bin/python3",
                 rootfs: "object | str | os.PathLike | None" = None,
                 layers: Sequence[str | os.PathLike] = ()):
        if not workdir.startswith("/"):
            raise ValueError(f"workdir must be an absolute path, got {workdir!r}")
        self._machine: _MachineSpec | None = None
        if rootfs is not None:
            from .rootfs import ROOTFS_UID_BASE

            image = Path(getattr(rootfs, "path", rootfs))
            if not (image / "usr").is_dir():
                raise ValueError(f"rootfs {image} is not a root file system (no usr/)")
            mnt = _machine_mountpoint()
            self._machine = _MachineSpec(str(image), tuple(str(Path(x)) for x in layers),
                                         str(mnt), ROOTFS_UID_BASE)
            self._machine.lowerdir()  # validates the paths now
        elif layers:
            raise ValueError("layers need a rootfs")
        _check_files(files or {})
        self.limits = limits
        self.workdir = workdir
        self._files = dict(files or {})
        self._env = dict(env or {})
        self._ro_binds = list(ro_binds)
        self._python = python
        self._sb: _Sandbox | None = None
        self._dead: str | None = None
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._key = b""

    # -- lifecycle
    def start(self) -> "BwrapSession":
        if self._sb is not None:
            return self
        env = dict(self._env)
        env["__CQ_START_CWD"] = self.workdir
        boot = ("import os;f=os.fdopen({fd},'rb');s=f.read();f.close();"
                "exec(compile(s,'cycleqd-agent','exec'))")
        self._sb = _Sandbox([self._python, "-I", "-S", "-c", boot],
                            limits=self.limits, files=self._files, workdir=self.workdir,
                            env=env, ro_binds=self._ro_binds, stdin=True,
                            inherit_data=self._agent_source.encode(), machine=self._machine)
        self._key = secrets.token_bytes(32)
        try:
            self._sb.proc.stdin.write(self._key.hex().encode() + b"\n")
            self._sb.proc.stdin.flush()
        except OSError:
            pass  # reported by the ping below
        reply = self._request({"op": "ping"}, timeout=20.0)
        if reply is None or not reply.get("ok"):
            err = self._stderr_tail()
            self.close()
            raise SandboxUnavailableError(
                f"the sandbox supervisor did not start ({self._python} inside the sandbox): "
                f"{err or self._dead}")
        return self

    def __enter__(self) -> "BwrapSession":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Kill every process of the machine and free it. Idempotent."""
        if self._sb is not None:
            self._sb.kill()
        if self._dead is None:
            self._dead = "closed"

    @property
    def alive(self) -> bool:
        return self._sb is not None and self._dead is None

    @property
    def uid(self) -> int | None:
        """The host uid the sandbox runs as (root hosts only), for checks by tests."""
        return self._sb.uid if self._sb is not None else None

    def snapshot(self, dest: str | os.PathLike) -> Path:
        """Copy this OS machine's writable layer (everything changed since the image,
        deletions included) into the empty or missing host directory ``dest``; usable
        as a ``layers`` entry of another machine, which then starts as this one is now
        (files only: no processes). Take it while nothing untrusted has run yet: the
        copy is made by the host (``cp -a``; symlinks are copied, never followed)
        through a read-only ``noatime`` view, so it changes nothing in this machine,
        access times included.

        Raises:
            RuntimeError: not an OS machine, not started, or the copy failed.
        """
        if self._machine is None or self._sb is None or not self.alive:
            raise RuntimeError("snapshot() needs a started BwrapSession with a rootfs")
        src = f"/proc/{self._sb.proc.pid}/root{self._machine.mnt}/s"
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(["cp", "-a", "--no-target-directory", src, str(dest)],
                           capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"snapshot of the machine failed: {r.stderr.strip()[:300]}")
        return dest

    # -- commands
    def exec(self, cmd: str, *, timeout: float | None = None, merge_stderr: bool = False,
             persist: bool = True, stdin: str | None = None,
             max_output_bytes: int | None = None) -> SandboxResult:
        """Run a bash command; with ``persist`` (default) in the session's shell state
        (like typing it into an interactive shell), else in a fresh ``bash -c`` at ``/``
        with the initial environment (how AgentBench runs ``init``/``check`` scripts)."""
        if not isinstance(cmd, str):
            raise ValueError(f"cmd must be a str, got {type(cmd).__name__}")
        return self._exec({"shell": cmd, "persist": persist}, timeout, merge_stderr, stdin,
                          max_output_bytes)

    def run(self, argv: Sequence[str], *, timeout: float | None = None,
            merge_stderr: bool = False, stdin: str | None = None, cwd: str = "/",
            max_output_bytes: int | None = None) -> SandboxResult:
        """Run an argv (no shell, no persistent state) in the machine."""
        if isinstance(argv, (str, bytes)) or not argv:
            raise ValueError(f"argv must be a non-empty sequence of str, got {argv!r}")
        return self._exec({"argv": list(argv), "cwd": cwd}, timeout, merge_stderr, stdin,
                          max_output_bytes)

    def spawn(self, cmd: str) -> bool:
        """Start ``cmd`` detached in the background (stdio to /dev/null); it runs until
        it ends or the session closes. Returns False if the session is dead."""
        reply = self._request({"op": "spawn", "shell": cmd}, timeout=10.0)
        return bool(reply and reply.get("ok"))

    def put_file(self, path: str, data: str) -> bool:
        """Write a text file inside the machine (through the supervisor)."""
        r = self.run(["/bin/sh", "-c", 'mkdir -p "$(dirname "$1")" && cat > "$1"', "sh", path],
                     stdin=data)
        return r.ok

    # -- plumbing
    def _exec(self, body: dict, timeout: float | None, merge: bool, stdin: str | None,
              max_output: int | None) -> SandboxResult:
        t = float(timeout if timeout is not None else self.limits.wall_seconds)
        cap = int(max_output if max_output is not None else self.limits.max_output_bytes)
        req = {"op": "exec", "timeout": t, "max_output": cap, "merge_stderr": merge, **body}
        if stdin is not None:
            req["stdin"] = stdin
        t0 = time.monotonic()
        reply = self._request(req, timeout=t + 10.0, max_reply=8 * cap + (1 << 20))
        if reply is None or "rc" not in reply:
            return SandboxResult(returncode=None, stderr=f"sandbox session ended: {self._dead}",
                                 killed="sandbox_died", wall_s=time.monotonic() - t0)
        killed = reply.get("killed")
        if killed is None and self._sb is not None and self._sb.cg.oom_killed() \
                and reply.get("rc", 0) < 0:
            killed = "memory"
        return SandboxResult(returncode=reply["rc"], stdout=reply.get("stdout", ""),
                             stderr=reply.get("stderr", ""),
                             timed_out=bool(reply.get("timed_out")), killed=killed,
                             wall_s=float(reply.get("wall_s", time.monotonic() - t0)),
                             truncated=bool(reply.get("truncated")))

    def _request(self, req: dict, *, timeout: float, max_reply: int = 1 << 20) -> dict | None:
        with self._lock:
            if self._sb is None:
                raise RuntimeError("BwrapSession used before start()")
            if self._dead is not None:
                return None
            p = self._sb.proc
            req = dict(req, id=next(self._ids))
            try:
                p.stdin.write(json.dumps(req).encode() + b"\n")
                p.stdin.flush()
            except (OSError, ValueError):
                self._die("supervisor gone (write failed)")
                return None
            buf = bytearray()
            deadline = time.monotonic() + timeout
            fd = p.stdout.fileno()
            with selectors.DefaultSelector() as sel:
                sel.register(fd, selectors.EVENT_READ)
                while True:
                    nl = buf.find(b"\n")
                    if nl >= 0:
                        mac, _, body = bytes(buf[:nl]).partition(b" ")
                        good = hmac.new(self._key, body, hashlib.sha256).hexdigest().encode()
                        if not hmac.compare_digest(mac, good):
                            self._die("reply failed authentication (tampered channel)")
                            return None
                        try:
                            reply = json.loads(body)
                        except ValueError:
                            self._die("supervisor sent garbage")
                            return None
                        if reply.get("id") != req["id"]:
                            self._die("supervisor reply out of order")
                            return None
                        return reply
                    left = deadline - time.monotonic()
                    if left <= 0:
                        self._die("supervisor did not answer in time")
                        return None
                    if not sel.select(timeout=min(left, 0.5)):
                        continue
                    chunk = os.read(fd, 1 << 16)
                    if not chunk:
                        self._die("supervisor exited")
                        return None
                    buf += chunk
                    if len(buf) > max_reply:
                        self._die("supervisor reply too large")
                        return None

    def _die(self, reason: str) -> None:
        self._dead = reason
        if self._sb is not None:
            self._sb.kill()

    def _stderr_tail(self) -> str:
        if self._sb is None or self._sb.proc.stderr is None:
            return ""
        try:
            os.set_blocking(self._sb.proc.stderr.fileno(), False)
            return (self._sb.proc.stderr.read() or b"")[-2000:].decode("utf-8", "replace")
        except (OSError, ValueError, TypeError):
            return ""

"""The host side of the sandboxes: which tools and isolation features this host has
(probed once per process), the pool of throw-away host uids a sandbox runs as when the
evaluator is root, process-table scans by uid, and the one launcher thread every sandbox
is started from."""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass
from typing import Callable

from . import _cgroup
from .limits import SandboxResult, SandboxUnavailableError

#: PATH of the helpers the host launches, and the sandbox's default PATH.
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
UID_BASE = 1_500_000_000  # throw-away uids: UID_BASE + pid*256 + counter (mod 2**24)


@dataclass(frozen=True)
class Host:
    """Paths of the host tools a sandbox is launched with, whether the evaluator is root
    (each sandbox then runs as its own host uid) and the cgroup version (0: none)."""

    bwrap: str
    prlimit: str
    setpriv: str | None
    root: bool
    cgroup_version: int


_HOST: Host | None = None
_HOST_ERR: str | None = None
_HOST_LOCK = threading.Lock()


def probe(smoke: Callable[[], SandboxResult]) -> Host:
    """The host's tools and isolation features, probed once per process (thread-safe);
    the first call also runs ``smoke()`` (one sandboxed ``/bin/true``) to check that
    namespaces can be created here.

    Raises:
        SandboxUnavailableError: a tool is missing or the smoke test failed (every call
            raises the same error after that).
    """
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
                _HOST = Host(bwrap, prlimit, setpriv, root, cg)
                # Smoke test: can we actually create the namespaces here?
                try:
                    r = smoke()
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


def current() -> Host | None:
    """The probed host, or None before the first :func:`probe` has set it (it is set
    before the smoke test runs, so the smoke test's own sandbox finds it here)."""
    return _HOST


# --------------------------------------------------------------------------- uid pool

#: Counter behind :func:`alloc_uid` (also names cgroups of sandboxes without a uid).
uid_counter = itertools.count()


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


def alloc_uid() -> int:
    """A host uid no process uses now, from this process's block of 256.

    Raises:
        SandboxUnavailableError: all 256 are in use.
    """
    for _ in range(256):
        uid = UID_BASE + (((os.getpid() & 0xFFFF) << 8) | (next(uid_counter) & 0xFF))
        if not _uid_in_use(uid):
            return uid
    raise SandboxUnavailableError("no free sandbox uid")


def pids_of_uid(uid: int) -> list[int]:
    """Pids of the live (non-zombie) processes with ``uid`` as any of their uids."""
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


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (all its threads'), [] if it is gone."""
    out: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
    except (OSError, ValueError):
        pass
    return out


def nofile_ceiling(host: Host) -> int:
    """The highest RLIMIT_NOFILE we may set: our own hard limit (raising it needs
    CAP_SYS_RESOURCE, which a root in a container often lacks)."""
    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return hard if hard != resource.RLIM_INFINITY else 1 << 20


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


def launch(argv: list[str], **kw: object) -> subprocess.Popen:
    """``subprocess.Popen(argv, **kw)`` from the launcher thread (see :class:`_Launcher`)."""
    global _LAUNCHER
    with _LAUNCHER_LOCK:
        if _LAUNCHER is None:
            _LAUNCHER = _Launcher()
    return _LAUNCHER.popen(argv, **kw)

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

This module launches and kills sandboxes (:class:`Sandbox`) and runs one command in a
fresh one (:func:`run_sandboxed`, e.g. ``python3 program.py`` with a benchmark's tests);
:func:`sandbox_status` says what this host gives. Elsewhere: the limits and results
(:mod:`.limits`), host probing and the uid pool (:mod:`.host`), OS machines' roots
(:mod:`.machine`), the persistent machine of a multi-turn episode
(:class:`~.session.BwrapSession`).
"""

from __future__ import annotations

import atexit
import os
import selectors
import signal
import subprocess
import time
import weakref
from typing import Mapping, Sequence

from . import _cgroup
from .host import (DEFAULT_PATH, Host, alloc_uid, children, current, launch, nofile_ceiling,
                   pids_of_uid, probe, uid_counter)
from .limits import SandboxLimits, SandboxResult, SandboxStatus, SandboxUnavailableError
from .machine import MACHINE_CAPS, MachineSpec, Userns

__all__ = ["run_sandboxed", "sandbox_status"]

# Host directories bound read-only (or re-created as the same symlink) inside.
_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")
# Masked even though they are unreadable for the unprivileged sandbox uid anyway.
_SECRET_FILES = ("/etc/shadow", "/etc/shadow-", "/etc/gshadow", "/etc/gshadow-",
                 "/etc/sudoers", "/etc/mysql/debian.cnf", "/etc/machine-id")
_SECRET_DIRS = ("/etc/ssh", "/etc/ssl/private", "/etc/sudoers.d")
_WRITABLE_DIRS = ("/root", "/tmp", "/home", "/var", "/opt", "/srv", "/mnt", "/media",
                  "/run", "/run/shm")


def _host() -> Host:
    """The probed host (:func:`.host.probe`, smoke-tested with one ``/bin/true``)."""
    return probe(lambda: run_sandboxed(["/bin/true"], limits=SandboxLimits(wall_seconds=20)))


def sandbox_status() -> SandboxStatus:
    """Probe the host once: is bubblewrap usable, with which isolation features."""
    try:
        h = _host()
    except SandboxUnavailableError as e:
        return SandboxStatus(False, str(e))
    return SandboxStatus(True, "ok", h.bwrap, h.root,
                         _cgroup.probe()[1] if h.root else "not root: rlimits only")


# --------------------------------------------------------------------------- launching

_LIVE: "weakref.WeakSet[Sandbox]" = weakref.WeakSet()


def _memfd(data: bytes | str) -> int:
    fd = os.memfd_create("cycleqd", 0)
    os.write(fd, data.encode() if isinstance(data, str) else data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


#: Size of the small tmpfs mounts (/dev and the masks over secret directories), bytes.
_SMALL_TMPFS = 1 << 20
#: Device nodes bound into the sandbox's own (size-limited) /dev.
_DEVICES = ("null", "zero", "full", "random", "urandom", "tty")


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
        for c in MACHINE_CAPS:
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
    return {"PATH": DEFAULT_PATH, "HOME": "/root", "USER": "root", "LOGNAME": "root",
            "SHELL": "/bin/bash", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "TERM": "dumb",
            "HOSTNAME": "sandbox", "PWD": workdir}


def check_files(files: Mapping[str, bytes | str]) -> None:
    for path, data in files.items():
        if not isinstance(path, str) or not path.startswith("/") or ".." in path.split("/"):
            raise ValueError(f"files: sandbox path must be absolute without '..', got {path!r}")
        if not isinstance(data, (bytes, str)):
            raise ValueError(f"files[{path!r}] must be bytes or str, got {type(data).__name__}")


class Sandbox:
    """One launched bwrap process tree and its cleanup."""

    def __init__(self, inner: Sequence[str], *, limits: SandboxLimits,
                 files: Mapping[str, bytes | str], workdir: str, env: Mapping[str, str] | None,
                 ro_binds: Sequence[tuple[str, str]], stdin: bool,
                 inherit_data: bytes | None = None,
                 machine: "MachineSpec | None" = None) -> None:
        host = current() or _host()
        if not workdir.startswith("/"):
            raise ValueError(f"workdir must be an absolute path, got {workdir!r}")
        check_files(files)
        if machine is not None and not host.root:
            raise SandboxUnavailableError(
                "an OS machine (own root file system) needs root on the host")
        self.limits = limits
        self.machine = machine
        self.userns: Userns | None = None
        # An OS machine runs in its own user namespace mapping 65536 ids onto the image's
        # shifted owners (shared by all machines: they never see each other's processes
        # or files, and each has its own per-namespace process count).
        self.uid = alloc_uid() if host.root and machine is None else None
        self.cg = (_cgroup.create(f"cycleqd-sbx-{os.getpid()}-{self.uid or next(uid_counter)}",
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
                self.userns = Userns(host, machine.uid_base)
                other_fds.append(os.dup(self.userns.fd))
                opts = ["--userns", str(other_fds[-1]), "--uid", "0", "--gid", "0", *opts]
            other_fds.append(_memfd(b"".join(o.encode() + b"\0" for o in opts)))
            bw = [host.bwrap, "--args", str(other_fds[-1]), "--", *inner]
            cpu = max(1, int(round(limits.cpu_seconds)))
            nofile = min(limits.max_open_files, nofile_ceiling(host))
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
            self.proc = launch(
                argv, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/",
                env={"PATH": DEFAULT_PATH, "LANG": "C.UTF-8"},
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
            for child in children(self.proc.pid):
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
                pids = pids_of_uid(self.uid)
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
    sb = Sandbox(argv, limits=limits, files=files or {}, workdir=workdir, env=env,
                 ro_binds=ro_binds, stdin=stdin is not None)
    try:
        return _pump(sb, stdin)
    finally:
        sb.kill()


def _pump(sb: Sandbox, stdin: bytes | str | None) -> SandboxResult:
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

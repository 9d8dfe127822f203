"""A persistent sandbox machine for a multi-turn episode (:class:`BwrapSession`): the
sandbox of :mod:`.bwrap` running an in-sandbox supervisor (:mod:`._agent`) that executes
commands in a persistent shell and answers over an authenticated JSON-line channel."""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import os
import secrets
import selectors
import subprocess
import threading
import time
from pathlib import Path
from typing import Mapping, Sequence

from .bwrap import Sandbox, check_files
from .limits import ROOTFS_UID_BASE, SandboxLimits, SandboxResult, SandboxUnavailableError
from .machine import MachineSpec, machine_mountpoint

__all__ = ["BwrapSession"]

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
    #: e.g. the SQLite worker of :mod:`cycleqd.sandbox.sql.sqlite`).
    _agent_source: str = _AGENT_SOURCE

    def __init__(self, limits: SandboxLimits = SandboxLimits(), *,
                 files: Mapping[str, bytes | str] | None = None, workdir: str = "/root",
                 env: Mapping[str, str] | None = None,
                 ro_binds: Sequence[tuple[str, str]] = (), python: str = "/usr/bin/python3",
                 rootfs: "object | str | os.PathLike | None" = None,
                 layers: Sequence[str | os.PathLike] = ()):
        if not workdir.startswith("/"):
            raise ValueError(f"workdir must be an absolute path, got {workdir!r}")
        self._machine: MachineSpec | None = None
        if rootfs is not None:
            image = Path(getattr(rootfs, "path", rootfs))
            if not (image / "usr").is_dir():
                raise ValueError(f"rootfs {image} is not a root file system (no usr/)")
            mnt = machine_mountpoint()
            self._machine = MachineSpec(str(image), tuple(str(Path(x)) for x in layers),
                                        str(mnt), ROOTFS_UID_BASE)
            self._machine.lowerdir()  # validates the paths now
        elif layers:
            raise ValueError("layers need a rootfs")
        check_files(files or {})
        self.limits = limits
        self.workdir = workdir
        self._files = dict(files or {})
        self._env = dict(env or {})
        self._ro_binds = list(ro_binds)
        self._python = python
        self._sb: Sandbox | None = None
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
        self._sb = Sandbox([self._python, "-I", "-S", "-c", boot],
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

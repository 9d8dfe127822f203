"""An OS machine's root file system and user namespace (see :mod:`.rootfs` and
``BwrapSession(rootfs=...)``): the overlay mounted over the image in a private mount
namespace, the mount point, and the user namespace mapping 65536 ids."""

from __future__ import annotations

import os
import selectors
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .host import DEFAULT_PATH, Host, launch
from .limits import SandboxLimits, SandboxUnavailableError

#: Capabilities root keeps inside an OS machine (its own user namespace only): Docker's
#: default set, as in AgentBench's containers (no CAP_SYS_ADMIN: no mounts, so no tmpfs
#: without a size; no CAP_SYS_RESOURCE).
MACHINE_CAPS = ("CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_SETGID",
                "CAP_SETUID", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT",
                "CAP_KILL", "CAP_AUDIT_WRITE", "CAP_SETFCAP")


@dataclass(frozen=True)
class MachineSpec:
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


def machine_mountpoint() -> Path:
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


MACHINE_IDS = 65536  # ids mapped into an OS machine's user namespace
_UNSHARE = shutil.which("unshare") or "/usr/bin/unshare"
_NSENTER = shutil.which("nsenter") or "/usr/bin/nsenter"


class Userns:
    """A user namespace owned by ``uid_base`` mapping ids 0..65535 inside onto
    ``uid_base..uid_base+65535`` (written by us, root, from outside), in which nobody can
    create a further user namespace (``user.max_user_namespaces = 0``, so no process in
    the machine can gain capabilities it was not given). A ``sleep`` holds it until the
    machine has joined; :meth:`fd` is passed to ``bwrap --userns``."""

    def __init__(self, host: Host, uid_base: int) -> None:
        b = uid_base
        self.proc = launch([host.setpriv, f"--reuid={b}", f"--regid={b}", "--clear-groups",
                            "--pdeathsig", "KILL", "--", _UNSHARE, "--user", "--", "/bin/sh", "-c",
                            "echo up; exec sleep 2147483647"], stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd="/",
                           env={"PATH": DEFAULT_PATH}, close_fds=True)
        self._fd: int | None = None
        try:
            with selectors.DefaultSelector() as sel:
                sel.register(self.proc.stdout, selectors.EVENT_READ)
                if not sel.select(timeout=20) or self.proc.stdout.readline() != b"up\n":
                    raise SandboxUnavailableError("cannot create a user namespace for the OS machine")
            for f in ("uid_map", "gid_map"):
                with open(f"/proc/{self.proc.pid}/{f}", "w") as fh:
                    fh.write(f"0 {b} {MACHINE_IDS}\n")
            # user.max_user_namespaces is per user namespace; set from inside (as its root)
            r = subprocess.run([host.setpriv, f"--reuid={b}", f"--regid={b}", "--clear-groups",
                                "--", _NSENTER, f"--user=/proc/{self.proc.pid}/ns/user",
                                "--setuid", "0", "--setgid", "0", "--", "/bin/sh", "-c",
                                "echo 0 > /proc/sys/user/max_user_namespaces"],
                               capture_output=True, text=True, timeout=20, cwd="/",
                               env={"PATH": DEFAULT_PATH})
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

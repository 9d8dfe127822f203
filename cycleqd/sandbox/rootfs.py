"""The OS machine: a Debian root file system built once with ``mmdebstrap``, shared
read-only by every OS episode under a private writable overlay.

AgentBench OS-interaction tasks run in Ubuntu containers with a writable root
(THUDM/AgentBench ``src/server/tasks/os_interaction``: ``docker run`` of a stock image,
the task's scripts run as root). This module gives the OS skill the same kind of
machine without Docker:

* **Build** (:func:`build_rootfs`, once per content key): ``mmdebstrap --variant=minbase``
  of the host's own Debian suite from the host's own apt sources (the first file of
  ``/etc/apt/sources.list.d/*.sources`` or ``/etc/apt/sources.list``; no other host is
  contacted), plus :data:`ROOTFS_PACKAGES` (the tools the AgentBench tasks call). The
  tree is then *shifted*: every file's uid/gid is moved by :data:`ROOTFS_UID_BASE` (so
  that inside a user namespace mapping ``0..65535 -> base..base+65535`` every file has
  its real Debian owner, setuid bits included) and made read-only. Cached under
  ``<cache>/os-rootfs/<key>/`` where ``key`` hashes the suite, the sources, the package
  list, the mmdebstrap version and :data:`ROOTFS_VERSION`; a finished image has a
  ``manifest.json`` (written last, so a half-built image is never used).
* **Use** (:class:`cycleqd.sandbox.BwrapSession` with ``rootfs=``): per machine, in a
  private mount namespace of the host (nothing is mounted on the host itself), a
  size-limited tmpfs holds the overlay's upper layer, ``overlay(lower=image)`` becomes
  ``/``; a user namespace maps 65536 ids onto the image's owners; bubblewrap adds fresh
  ``/proc``, a small ``/dev`` and the PID/network/IPC/UTS namespaces. Every episode
  starts from the same pristine image; nothing of the host's file system is visible.

Requires: root on the host (to mount the overlay and write the id map), ``mmdebstrap``
(Debian package) and the package archive for the first build. :func:`rootfs_status`
says in one line why the machine is unavailable otherwise.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ROOTFS_PACKAGES", "ROOTFS_UID_BASE", "ROOTFS_VERSION", "RootFS", "RootfsUnavailableError",
           "build_rootfs", "default_rootfs", "rootfs_key", "rootfs_status"]

#: Bump when the build recipe changes (part of the image key).
ROOTFS_VERSION = "1"
#: Host uid/gid that is root inside an OS machine; the image's ids are shifted by it.
ROOTFS_UID_BASE = 1_400_000_000
ROOTFS_ID_COUNT = 65536
#: Debian packages added to ``minbase`` (which already has bash, coreutils, findutils,
#: grep, sed, gzip, tar, util-linux, login, passwd, perl-base, ...): the tools the
#: AgentBench OS tasks (training.json, dev.json, CycleQD's 110 search samples) call.
ROOTFS_PACKAGES = (
    "acl", "adduser", "attr", "bc", "bsdextrautils", "bzip2", "cron", "file", "gawk",
    "iproute2", "jq", "less", "lsof", "nano", "ncurses-bin", "net-tools", "passwd", "procps",
    "psmisc", "python3", "sudo", "time", "tree", "unzip", "vim-tiny", "xz-utils", "zip",
)


class RootfsUnavailableError(RuntimeError):
    """The OS machine's root file system cannot be built or used on this host."""


@dataclass(frozen=True)
class RootFS:
    """A built image: ``path`` is the root directory (shifted ids, read-only)."""

    path: Path
    key: str
    suite: str
    packages: tuple[str, ...]

    def __str__(self) -> str:
        return f"Debian {self.suite} image {self.key} at {self.path}"


def _sources_file() -> Path | None:
    d = Path("/etc/apt/sources.list.d")
    if d.is_dir():
        for p in sorted(d.glob("*.sources")):
            if p.read_text(errors="replace").strip():
                return p
    p = Path("/etc/apt/sources.list")
    if p.is_file() and p.read_text(errors="replace").strip():
        return p
    if d.is_dir():
        for p in sorted(d.glob("*.list")):
            if p.read_text(errors="replace").strip():
                return p
    return None


def _host_suite() -> str | None:
    try:
        text = Path("/etc/os-release").read_text()
    except OSError:
        return None
    m = re.search(r"^VERSION_CODENAME=\"?([a-z]+)\"?$", text, re.M)
    return m.group(1) if m else None


def _mmdebstrap_version(exe: str) -> str:
    try:
        return subprocess.run([exe, "--version"], capture_output=True, text=True,
                              timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


def rootfs_key(suite: str, sources: str, packages: tuple[str, ...], tool_version: str) -> str:
    """Content key of an image: sha256 over (recipe version, suite, apt sources text,
    sorted package list, mmdebstrap version), first 16 hex digits."""
    blob = json.dumps({"v": ROOTFS_VERSION, "suite": suite, "sources": sources,
                       "packages": sorted(packages), "tool": tool_version,
                       "uid_base": ROOTFS_UID_BASE}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _cache_root(cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("CYCLEQD_CACHE", "~/.cache/cycleqd")).expanduser()


def _plan(cache_dir, packages) -> tuple[str, Path, str, str]:
    """(key, image dir, suite, sources path) or raises RootfsUnavailableError."""
    if os.geteuid() != 0:
        raise RootfsUnavailableError(
            "the OS machine needs root on the host (to mount its overlay and map its users); "
            "run the evaluator as root")
    exe = shutil.which("mmdebstrap")
    src = _sources_file()
    suite = os.environ.get("CYCLEQD_ROOTFS_SUITE") or _host_suite()
    if src is None:
        raise RootfsUnavailableError("no apt sources on this host (/etc/apt/sources.list[.d])")
    if suite is None:
        raise RootfsUnavailableError("cannot tell the host's Debian suite (/etc/os-release "
                                     "VERSION_CODENAME); set CYCLEQD_ROOTFS_SUITE")
    tool = _mmdebstrap_version(exe) if exe else "missing"
    key = rootfs_key(suite, src.read_text(errors="replace"), tuple(packages), tool)
    return key, _cache_root(cache_dir) / "os-rootfs" / key, suite, str(src)


def _manifest(d: Path) -> dict | None:
    try:
        return json.loads((d / "manifest.json").read_text())
    except (OSError, ValueError):
        return None


_BUILD_LOCK = threading.Lock()


def build_rootfs(cache_dir: str | os.PathLike | None = None, *,
                 packages: tuple[str, ...] = ROOTFS_PACKAGES, log=print,
                 timeout_s: float = 1800.0) -> RootFS:
    """The OS machine's image, built on first use (minutes) and reused afterwards.

    Args:
        cache_dir: cache root (default ``$CYCLEQD_CACHE`` or ``~/.cache/cycleqd``).
        packages: Debian packages added to ``minbase``.
        log: one-line progress messages (None: quiet).
        timeout_s: limit of the ``mmdebstrap`` run, seconds.

    Returns:
        :class:`RootFS` (``path``: ``<cache>/os-rootfs/<key>/root``).

    Raises:
        RootfsUnavailableError: not root, no ``mmdebstrap``, no apt sources, or the build
            failed (the message names the cause and the log file).
    """
    key, d, suite, src = _plan(cache_dir, packages)
    m = _manifest(d)
    if m is not None:
        return RootFS(d / "root", key, suite, tuple(m.get("packages", packages)))
    exe = shutil.which("mmdebstrap")
    if exe is None:
        raise RootfsUnavailableError(
            "mmdebstrap is not installed: `apt-get install mmdebstrap` (the OS machine is "
            "built from the Debian archive once)")
    with _BUILD_LOCK:
        d.mkdir(parents=True, exist_ok=True)
        lockf = open(d / ".lock", "w")
        try:
            import fcntl

            fcntl.flock(lockf, fcntl.LOCK_EX)  # another process may be building it
            m = _manifest(d)
            if m is not None:
                return RootFS(d / "root", key, suite, tuple(m.get("packages", packages)))
            tmp = d / "root.partial"
            if tmp.exists():
                _rmtree(tmp)
            logf = d / "build.log"
            if log:
                log(f"building the OS machine (Debian {suite} + {len(packages)} packages) "
                    f"into {d} (once; a few minutes)")
            t0 = time.monotonic()
            cmd = [exe, "--variant=minbase", "--mode=root", "--format=directory",
                   "--include=" + ",".join(sorted(packages)),
                   "--dpkgopt=path-exclude=/usr/share/man/*",
                   "--dpkgopt=path-exclude=/usr/share/doc/*",
                   "--dpkgopt=path-include=/usr/share/doc/*/copyright",
                   "--dpkgopt=path-exclude=/usr/share/locale/*",
                   "--customize-hook=rm -rf \"$1\"/var/cache/apt/* \"$1\"/var/lib/apt/lists/*",
                   suite, str(tmp), src]
            with open(logf, "wb") as lf:
                try:
                    r = subprocess.run(cmd, stdout=lf, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, timeout=timeout_s)
                    rc = r.returncode
                except subprocess.TimeoutExpired:
                    rc = "timeout"
            if rc != 0:
                tail = logf.read_text(errors="replace").strip().splitlines()[-1:] or [""]
                raise RootfsUnavailableError(
                    f"mmdebstrap failed ({rc}): {tail[0][:300]} (full log: {logf})")
            _finish_image(tmp)
            if (d / "root").exists():
                _rmtree(d / "root")
            os.replace(tmp, d / "root")
            du = sum(f.stat(follow_symlinks=False).st_size for f in (d / "root").rglob("*"))
            man = {"key": key, "suite": suite, "sources": src, "packages": sorted(packages),
                   "tool": _mmdebstrap_version(exe), "built_s": round(time.monotonic() - t0, 1),
                   "bytes": du, "uid_base": ROOTFS_UID_BASE}
            (d / "manifest.json.tmp").write_text(json.dumps(man, indent=1))
            os.replace(d / "manifest.json.tmp", d / "manifest.json")
            if log:
                log(f"OS machine built in {man['built_s']} s ({du >> 20} MiB)")
            return RootFS(d / "root", key, suite, tuple(sorted(packages)))
        finally:
            lockf.close()


def _rmtree(p: Path) -> None:
    subprocess.run(["rm", "-rf", "--one-file-system", str(p)], check=False)


def _finish_image(root: Path) -> None:
    """Machine settings AgentBench's containers have, then shift every id by
    ROOTFS_UID_BASE (keeping setuid/setgid bits, which chown clears)."""
    (root / "etc" / "hostname").write_text("sandbox\n")
    (root / "etc" / "hosts").write_text("127.0.0.1\tlocalhost sandbox\n::1\tlocalhost\n")
    for p in (root / "etc" / "machine-id",):
        p.write_text("")
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        # each directory is shifted when visited as dirpath; symlinks to directories
        # are listed in dirnames but never visited
        links = [n for n in dirnames if os.path.islink(os.path.join(dirpath, n))]
        for name in filenames + links + ["."]:
            p = os.path.join(dirpath, name) if name != "." else dirpath
            st = os.lstat(p)
            if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
                if (st.st_dev, st.st_ino) in seen:
                    continue  # a hard link already shifted
                seen.add((st.st_dev, st.st_ino))
            if st.st_uid >= ROOTFS_ID_COUNT or st.st_gid >= ROOTFS_ID_COUNT:
                raise RootfsUnavailableError(f"image file {p} has an id outside 0..65535")
            os.lchown(p, st.st_uid + ROOTFS_UID_BASE, st.st_gid + ROOTFS_UID_BASE)
            if not os.path.islink(p) and st.st_mode & 0o6000:
                os.chmod(p, st.st_mode & 0o7777)


def default_rootfs(cache_dir=None, *, build: bool = True, log=print) -> RootFS:
    """The default image: built if missing and ``build``, else RootfsUnavailableError."""
    if not build:
        key, d, suite, _ = _plan(cache_dir, ROOTFS_PACKAGES)
        m = _manifest(d)
        if m is None:
            raise RootfsUnavailableError(f"the OS machine image {key} is not built yet "
                                         f"(run `python -m cycleqd.sandbox.rootfs`)")
        return RootFS(d / "root", key, suite, tuple(m.get("packages", ROOTFS_PACKAGES)))
    return build_rootfs(cache_dir, log=log)


def rootfs_status(cache_dir=None) -> tuple[bool, str]:
    """(usable now without building, one line saying why not / which image)."""
    try:
        r = default_rootfs(cache_dir, build=False)
    except RootfsUnavailableError as e:
        return False, str(e)
    return True, str(r)


if __name__ == "__main__":  # python -m cycleqd.sandbox.rootfs [CACHE_DIR]
    import sys

    try:
        print(build_rootfs(sys.argv[1] if len(sys.argv) > 1 else None))
    except RootfsUnavailableError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)

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
  ``manifest.json`` (written last, so a half-built image is never used) that also records
  ``dpkg``, a digest of the installed package versions (:func:`dpkg_digest`): the key
  pins the recipe, the digest pins what was actually installed (results cached against
  an image use both, ``RootFS.key`` and ``RootFS.content``).
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

from cycleqd import paths
from cycleqd.errors import CycleQDError
from cycleqd.sandbox.limits import ROOTFS_UID_BASE

__all__ = ["ROOTFS_PACKAGES", "ROOTFS_UID_BASE", "ROOTFS_VERSION", "RootFS", "RootfsUnavailableError",
           "build_rootfs", "default_rootfs", "dpkg_digest", "judge_guard_layer", "rootfs_key", "rootfs_status"]

#: Bump when the build recipe changes (part of the image key).
ROOTFS_VERSION = "1"
#: Host uid/gid that is root inside an OS machine; the image's ids are shifted by it.
ROOTFS_ID_COUNT = 65536
#: Debian packages added to ``minbase`` (which already has bash, coreutils, findutils,
#: grep, sed, gzip, tar, util-linux, login, passwd, perl-base, ...): the tools the
#: AgentBench OS tasks (training.json, dev.json, CycleQD's 110 search samples) call.
ROOTFS_PACKAGES = (
    "acl", "adduser", "attr", "bc", "bsdextrautils", "bzip2", "cron", "file", "gawk",
    "iproute2", "jq", "less", "lsof", "nano", "ncurses-bin", "net-tools", "passwd", "procps",
    "psmisc", "python3", "sudo", "time", "tree", "unzip", "vim-tiny", "xz-utils", "zip",
)


class RootfsUnavailableError(CycleQDError, RuntimeError):
    """The OS machine's root file system cannot be built or used on this host."""


@dataclass(frozen=True)
class RootFS:
    """A built image: ``path`` is the root directory (shifted ids, read-only)."""

    path: Path
    key: str
    suite: str
    packages: tuple[str, ...]
    #: digest of the installed packages (name, version, architecture) from the image's
    #: ``/var/lib/dpkg/status`` (:func:`dpkg_digest`): the recipe key alone does not pin
    #: versions, so a rebuild months later has the same ``key`` and newer packages.
    content: str = ""

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


def dpkg_digest(root: str | os.PathLike) -> str:
    """Content digest of an image's installed packages: sha256 (first 16 hex digits) over
    the sorted ``Package Version Architecture`` lines of the installed entries of
    ``<root>/var/lib/dpkg/status`` (dpkg's own database; read-only here).

    Raises:
        RootfsUnavailableError: the image has no readable dpkg status file.
    """
    try:
        text = (Path(root) / "var" / "lib" / "dpkg" / "status").read_text(errors="replace")
    except OSError as e:
        raise RootfsUnavailableError(f"image {root} has no dpkg status ({e})") from None
    rows = []
    for para in text.split("\n\n"):
        f = dict(m.groups() for m in re.finditer(r"^([A-Za-z-]+):[ \t]*(.*)$", para, re.M))
        if f.get("Package") and "installed" in f.get("Status", "").split()[-1:]:
            rows.append(f"{f['Package']} {f.get('Version', '')} {f.get('Architecture', '')}")
    return hashlib.sha256("\n".join(sorted(rows)).encode()).hexdigest()[:16]


def _loaded(d: Path, key: str, suite: str, m: dict, packages) -> "RootFS":
    """A finished image from its manifest; an image built before the content digest was
    recorded gets it computed from its dpkg status (once per load)."""
    content = m.get("dpkg") or dpkg_digest(d / "root")
    return RootFS(d / "root", key, suite, tuple(m.get("packages", packages)), content)


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
    return key, paths.cache_dir(cache_dir) / "os-rootfs" / key, suite, str(src)


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
        cache_dir: cache root (default :func:`cycleqd.paths.cache_dir`).
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
        return _loaded(d, key, suite, m, packages)
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
                return _loaded(d, key, suite, m, packages)
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
            content = dpkg_digest(tmp)
            _finish_image(tmp)
            if (d / "root").exists():
                _rmtree(d / "root")
            os.replace(tmp, d / "root")
            du = sum(f.stat(follow_symlinks=False).st_size for f in (d / "root").rglob("*"))
            man = {"key": key, "suite": suite, "sources": src, "packages": sorted(packages),
                   "tool": _mmdebstrap_version(exe), "built_s": round(time.monotonic() - t0, 1),
                   "bytes": du, "uid_base": ROOTFS_UID_BASE, "dpkg": content}
            (d / "manifest.json.tmp").write_text(json.dumps(man, indent=1))
            os.replace(d / "manifest.json.tmp", d / "manifest.json")
            if log:
                log(f"OS machine built in {man['built_s']} s ({du >> 20} MiB)")
            return RootFS(d / "root", key, suite, tuple(sorted(packages)), content)
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


#: System paths a judge machine takes from the untouched image (see
#: :func:`judge_guard_layer`): the interpreters, every tool and library, the dynamic
#: loader's configuration and Python's configuration. ``/usr/local`` is not among them
#: (tasks install their scripts there).
JUDGE_GUARDED = ("usr/bin", "usr/sbin", "usr/lib", "usr/lib32", "usr/lib64", "usr/libx32",
                 "usr/libexec", "usr/include", "bin", "sbin", "lib", "lib32", "lib64",
                 "libx32", "etc/ld.so.preload", "etc/ld.so.cache", "etc/ld.so.conf",
                 "etc/ld.so.conf.d", "etc/python3", "etc/python3.*", "etc/alternatives")
_GUARD_VERSION = "1"


def judge_guard_layer(rootfs: "RootFS") -> Path:
    """A read-only overlay layer that, put ABOVE a machine's own layers
    (``BwrapSession(rootfs=..., layers=[guard, snapshot])``), makes every path of
    :data:`JUDGE_GUARDED` exactly the untouched image's, whatever the layers below did
    to it: guarded directories are hard-linked copies of the image's, marked opaque
    (``trusted.overlay.opaque``: nothing from a lower layer shows through, files an agent
    added included), guarded symlinks and files are the image's, and a guarded path the
    image lacks (e.g. ``/etc/ld.so.preload``) is a whiteout (it does not exist in the
    machine). Everything else (``/root``, ``/etc/passwd``, ``/usr/local``, ``/tmp``, ...)
    is the lower layers'. Built once per image beside it (``<image dir>/guard-<v>``,
    renamed into place when complete; hard links, so a few MiB of directories).

    Raises:
        RootfsUnavailableError: the layer cannot be built (not root, no xattr support).
    """
    import glob

    img = Path(rootfs.path)
    dest = img.parent / f"guard-{_GUARD_VERSION}"  # renamed into place when complete
    if dest.is_dir():
        return dest
    with _BUILD_LOCK:
        if dest.is_dir():
            return dest
        tmp = img.parent / f"guard-{_GUARD_VERSION}.partial-{os.getpid()}"
        if tmp.exists():
            _rmtree(tmp)
        try:
            tmp.mkdir()
            st = os.lstat(img)
            os.chown(tmp, st.st_uid, st.st_gid)
            os.chmod(tmp, stat.S_IMODE(st.st_mode))
            paths: list[str] = []
            for g in JUDGE_GUARDED:
                hits = [os.path.relpath(h, img) for h in glob.glob(str(img / g))] if "*" in g else []
                paths += hits or ([g] if "*" not in g else [])
            for rel in sorted(set(paths)):
                parent = Path(rel).parent
                for i in range(1, len(parent.parts) + 1):  # parents: the image's owner/mode
                    sub = Path(*parent.parts[:i])
                    if not (tmp / sub).exists():
                        (tmp / sub).mkdir()
                        pst = os.lstat(img / sub)
                        os.chown(tmp / sub, pst.st_uid, pst.st_gid)
                        os.chmod(tmp / sub, stat.S_IMODE(pst.st_mode))
                src, dst = img / rel, tmp / rel
                if not os.path.lexists(src):
                    os.mknod(dst, stat.S_IFCHR | 0o000, os.makedev(0, 0))  # whiteout
                    continue
                r = subprocess.run(["cp", "-a", "--link", "--no-target-directory", str(src),
                                    str(dst)], capture_output=True, text=True)
                if r.returncode != 0:
                    raise RootfsUnavailableError(f"judge guard layer: cp {rel}: {r.stderr.strip()[:200]}")
                if src.is_dir() and not src.is_symlink():
                    os.setxattr(dst, "trusted.overlay.opaque", b"y", follow_symlinks=False)
            try:
                os.rename(tmp, dest)
            except OSError:
                if not dest.is_dir():  # another process finished it first: keep theirs
                    raise
                _rmtree(tmp)
        except OSError as e:
            _rmtree(tmp)
            raise RootfsUnavailableError(f"cannot build the judge guard layer at {dest}: {e}") from None
    return dest


def default_rootfs(cache_dir=None, *, build: bool = True, log=print) -> RootFS:
    """The default image: built if missing and ``build``, else RootfsUnavailableError."""
    if not build:
        key, d, suite, _ = _plan(cache_dir, ROOTFS_PACKAGES)
        m = _manifest(d)
        if m is None:
            raise RootfsUnavailableError(f"the OS machine image {key} is not built yet "
                                         f"(run `python -m cycleqd.sandbox.rootfs`)")
        return _loaded(d, key, suite, m, ROOTFS_PACKAGES)
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

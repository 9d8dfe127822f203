"""Crash-safe file and folder writes shared by the run directory, checkpoints and exports.

Every write here is write-to-temp, fsync, rename, fsync of the folder: after a crash (or a
power loss) a reader sees the old or the new file, never a mix. A full disk (``ENOSPC``,
``EDQUOT``) is raised as :class:`DiskFullError` naming the file, with the temp file removed,
so the command line can say which file could not be written and that nothing finished was
lost.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

_FULL = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(OSError):
    """The disk (or quota) filled up while writing ``path``. ``errno`` is ENOSPC/EDQUOT."""

    def __init__(self, path: Path | str, cause: BaseException | None = None):
        code = getattr(cause, "errno", None) if getattr(cause, "errno", None) in _FULL else errno.ENOSPC
        super().__init__(code, f"disk full while writing {path}", str(path))
        self.path = Path(path)


def is_disk_full(exc: BaseException) -> bool:
    """True for an OSError with ENOSPC/EDQUOT, or a library error that wraps one and only
    says so in its message (safetensors: ``I/O error: No space left on device (os error 28)``)."""
    if isinstance(exc, OSError) and exc.errno in _FULL:
        return True
    msg = str(exc)
    return "No space left on device" in msg or "Disk quota exceeded" in msg


@contextmanager
def disk_full_names(path: Path | str) -> Iterator[None]:
    """Re-raise a full-disk error inside the block as :class:`DiskFullError` naming ``path``."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as e:
        if is_disk_full(e):
            raise DiskFullError(path, e) from e
        raise


def fsync_path(path: Path | str) -> None:
    """fsync a file written (and closed) elsewhere, e.g. by safetensors, or a folder, so that
    renames and new names in it survive a power loss."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


fsync_dir = fsync_file = fsync_path   # the names the callers read best with


def sha256_file(path: Path | str, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                return h.hexdigest()
            h.update(b)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old or the new file, never a mix
    (temp file, fsync, rename, fsync of the folder).

    Raises:
        DiskFullError: the disk filled up (the temp file is removed, ``path`` is unchanged).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with disk_full_names(path):
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_write_bytes`)."""
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=False) + "\n")


@contextmanager
def atomic_file(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` for a library to write to (e.g. ``savefig``);
    when the block succeeds the file is fsynced and renamed onto ``path``, when it raises the
    temporary file is removed and ``path`` is left as it was. Full disk: :class:`DiskFullError`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")
    try:
        with disk_full_names(path):
            yield tmp
            fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (``/proc/self/status``,
    kernel 4.7+); elsewhere set and restored at once."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where
    the platform or the filesystem cannot."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    return fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0


@contextmanager
def atomic_directory(out_dir: Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``out_dir``; when the block succeeds it replaces
    ``out_dir``, when it raises the temporary folder is deleted and ``out_dir`` is left as it was.

    The folder and everything in it get the modes plain ``mkdir`` / ``open`` give (0777 /
    0666 less the umask, as after ``save_pretrained``), not ``mkdtemp``'s 0700 nor the 0600
    of libraries that write through a private temp file (safetensors). An old ``out_dir`` is swapped out only once
    the new one is complete -- in one atomic ``renameat2(RENAME_EXCHANGE)`` on Linux, else
    renamed aside, the new one renamed in (the old one is put back if that fails) -- and
    deleted last, so a crash at any moment leaves the old or the new folder at ``out_dir``
    (plus, at worst, a hidden ``.NAME.tmp-*`` / ``.NAME.old-*`` sibling to delete).
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    mask = _umask()
    try:
        yield tmp
        for root, dirs, files in os.walk(tmp):
            os.chmod(root, 0o777 & ~mask)
            for f in files:
                os.chmod(os.path.join(root, f), 0o666 & ~mask)
        fsync_dir(tmp)
        if not out_dir.exists():
            os.replace(tmp, out_dir)
        elif _exchange(tmp, out_dir):
            shutil.rmtree(tmp)            # now the old folder
        else:
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old)
            try:
                os.replace(tmp, out_dir)
            except BaseException:
                os.replace(old, out_dir)
                raise
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(out_dir.parent)


_MODEL_MARKERS = ("config.json", "cycleqd_export.json", "model.safetensors", "model.safetensors.index.json")


def check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse (FileExistsError, one line) an ``out_dir`` that is a file, a non-empty folder
    without ``overwrite``, or -- with it -- a non-empty folder that is not a model folder.
    Torch-free, so ``cycleqd export`` checks OUT before it loads anything."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} is a file, not a folder; choose another output folder")
    if not any(out_dir.iterdir()):
        return
    if not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty; choose another folder or "
                              "pass --overwrite to replace it")
    if not any((out_dir / m).exists() for m in _MODEL_MARKERS):
        raise FileExistsError(f"{out_dir} is not a model folder (no {', '.join(_MODEL_MARKERS[:2])} "
                              "or safetensors in it); --overwrite only replaces an earlier export")

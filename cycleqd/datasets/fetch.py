"""Find benchmark files in the data dir, and fetch missing ones from their public source
(or ``$CYCLEQD_DATA_MIRROR``) with a checksum check.

A download streams into a temporary file beside its destination (with a progress bar on
stderr), is converted where the catalogue says so, checked against the catalogue's SHA-256
and size, and only then renamed into place: a failed or corrupted download leaves nothing
behind. ``$CYCLEQD_DATA_MIRROR`` (like ``HF_ENDPOINT``) is a base URL serving the data-dir
layout; it replaces every public URL (tests point it at a server on 127.0.0.1).
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Iterable, Sequence

from tqdm import tqdm

from cycleqd.datasets.catalogue import CATALOGUE, DataFile, Dataset, file_entry
from cycleqd.errors import CycleQDError
from cycleqd.paths import data_dir

MIRROR_ENV = "CYCLEQD_DATA_MIRROR"
CHUNK = 1 << 16


class DataError(CycleQDError, RuntimeError):
    """Benchmark data cannot be found, fetched or trusted (one line naming the file)."""


class DataMissingError(DataError, FileNotFoundError):
    """Files of the data dir are missing; the message lists them all and the fetch command."""


class ChecksumError(DataError):
    """A download does not match the catalogue's SHA-256/size (nothing was kept)."""


def _datasets(names: Iterable[str]) -> list[Dataset]:
    out = []
    for n in names:
        if n not in CATALOGUE:
            raise DataError(f"unknown data set {n!r}; known: {', '.join(CATALOGUE)}")
        out.append(CATALOGUE[n])
    return out


def mirror() -> str | None:
    """``$CYCLEQD_DATA_MIRROR`` with a trailing ``/``, or ``None``."""
    m = os.environ.get(MIRROR_ENV, "").strip()
    return (m.rstrip("/") + "/") if m else None


def source_url(f: DataFile) -> str:
    """Where ``f`` is fetched from: the mirror's ``<rel>`` when set, else its public URL.

    Raises:
        DataError: a mirror-only file and no mirror set.
    """
    m = mirror()
    if m:
        return m + f.rel
    if f.url is None:
        raise DataError(f"{f.rel} has no public download ({f.mirror_only}); set {MIRROR_ENV} to a "
                        f"server holding the data-dir layout, or copy the file into {data_dir()}")
    return f.url


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def file_status(f: DataFile, root: Path | None = None) -> str:
    """``present`` (checksum matches), ``differs`` (another file is there), or ``missing``."""
    p = (root or data_dir()) / f.rel
    if not p.is_file():
        return "missing"
    return "present" if p.stat().st_size == f.size and sha256_of(p) == f.sha256 else "differs"


def missing_files(names: Iterable[str], root: Path | None = None) -> list[tuple[Dataset, DataFile]]:
    """The (data set, file) pairs of ``names`` with no file in the data dir."""
    root = root or data_dir()
    return [(d, f) for d in _datasets(names) for f in d.files if not (root / f.rel).is_file()]


def missing_message(missing: Sequence[tuple[Dataset, DataFile]], root: Path) -> str:
    """One line: every missing file and the command that fetches them."""
    names = list(dict.fromkeys(d.name for d, _ in missing))
    files = ", ".join(f"{f.rel} ({d.name})" for d, f in missing)
    return (f"benchmark data missing in {root}: {files}; fetch with `cycleqd data fetch "
            f"{' '.join(names)}`, or point CYCLEQD_DATA_DIR (--data-dir) at a folder that holds them")


def require(names: Iterable[str], root: Path | None = None) -> None:
    """Check that every file of ``names`` is in the data dir.

    Raises:
        DataMissingError: one message listing all missing files and the fetch command.
        DataError: an unknown name.
    """
    root = root or data_dir()
    missing = missing_files(names, root)
    if missing:
        raise DataMissingError(missing_message(missing, root))


def locate(rel: str, root: Path | None = None) -> Path:
    """The data-dir path of catalogue file ``rel``.

    Raises:
        DataMissingError: it is not there (the message names the fetch command).
    """
    root = root or data_dir()
    p = root / rel
    if p.is_file():
        return p
    d, f = file_entry(rel)
    raise DataMissingError(missing_message([(d, f)], root))


def _download(url: str, fh, *, desc: str, progress: bool, timeout_s: float) -> None:
    with urllib.request.urlopen(url, timeout=timeout_s) as r:  # noqa: S310 (catalogue or mirror URL)
        total = int(r.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=desc, file=sys.stderr,
                  disable=None if progress else True, leave=False) as bar:   # None: only on a terminal
            for block in iter(lambda: r.read(CHUNK), b""):
                fh.write(block)
                bar.update(len(block))


def fetch_file(f: DataFile, root: Path | None = None, *, progress: bool = True, timeout_s: float = 30.0,
               attempts: int = 2, log: Callable[[str], None] = print) -> Path:
    """Download one catalogue file into ``<root>/<rel>`` (atomically; see module doc).

    Args:
        f: the catalogue entry. root: data dir (default :func:`cycleqd.paths.data_dir`).
        progress: tqdm bar on stderr (when it is a terminal). timeout_s: per connection/read. attempts: tries on
            network errors (HTTP 4xx is not retried).
        log: gets one line saying what is fetched from where.
    Returns:
        The written path.
    Raises:
        ChecksumError: SHA-256 or size differ (message: file, expected, got, URL).
        DataError: mirror-only file without a mirror; a network error after ``attempts``;
            a download the conversion step rejects.
    """
    root = root or data_dir()
    dest = root / f.rel
    url = source_url(f)
    log(f"fetching {f.rel} from {url}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            for attempt in range(1, attempts + 1):
                try:
                    fh.seek(0)
                    fh.truncate()
                    _download(url, fh, desc=f.rel, progress=progress, timeout_s=timeout_s)
                    break
                except urllib.error.HTTPError as e:
                    if e.code < 500 or attempt == attempts:
                        raise DataError(f"{f.rel}: HTTP {e.code} from {url}") from e
                except OSError as e:  # URLError, timeouts, resets
                    if attempt == attempts:
                        raise DataError(f"{f.rel}: download from {url} failed: {e}") from e
        if f.convert is not None:
            try:
                tmp.write_bytes(f.convert(tmp.read_bytes()))
            except (ValueError, UnicodeDecodeError) as e:
                raise DataError(f"{f.rel}: the download from {url} is not in the expected format ({e})") from e
        size, digest = tmp.stat().st_size, sha256_of(tmp)
        if size != f.size or digest != f.sha256:
            raise ChecksumError(f"checksum mismatch for {f.rel} from {url}: expected sha256 {f.sha256} "
                                f"({f.size} bytes), got {digest} ({size} bytes); nothing kept")
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def fetch(names: Iterable[str], root: Path | None = None, *, progress: bool = True,
          log: Callable[[str], None] = print, **kw) -> list[Path]:
    """Fetch every missing file of the data sets ``names`` (files already there are kept).

    Returns:
        The paths written (empty when nothing was missing).
    Raises:
        DataError / ChecksumError: as :func:`fetch_file` (files fetched before stay);
            an unknown name before any download.
    """
    root = root or data_dir()
    missing = missing_files(names, root)
    if missing:
        log(f"benchmark data: {len(missing)} file(s) missing in {root}; fetching "
            f"{', '.join(dict.fromkeys(d.name for d, _ in missing))}")
    return [fetch_file(f, root, progress=progress, log=log, **kw) for _, f in missing]

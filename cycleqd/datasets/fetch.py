"""Find benchmark files in the data dir, and fetch missing ones from their public source
(or ``$CYCLEQD_DATA_MIRROR``) with a checksum check.

A download streams into a temporary file beside its destination (with a progress bar on
stderr), is converted where the catalogue says so, checked against the catalogue's SHA-256
and size, and only then renamed into place: a failed or corrupted download leaves nothing
behind. ``$CYCLEQD_DATA_MIRROR`` (like ``HF_ENDPOINT``) is a base URL serving the data-dir
layout; it replaces every public URL (tests point it at a server on 127.0.0.1).
A download stops as soon as it exceeds the stored size (``CONVERT_FACTOR`` times it for a
file with a ``convert`` step, whose upstream bytes differ); a hung mirror times out after
``$CYCLEQD_FETCH_TIMEOUT`` seconds (default 30) per connection/read and is retried once,
saying so. Written files get the mode the umask allows (0644 under the usual 022).
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
TIMEOUT_ENV = "CYCLEQD_FETCH_TIMEOUT"
DEFAULT_TIMEOUT_S = 30.0
CONVERT_FACTOR = 4   # a file with a convert step: the upstream may be this many times the stored size
CHUNK = 1 << 16


class DataError(CycleQDError, RuntimeError):
    """Benchmark data cannot be found, fetched or trusted (one line naming the file)."""


class DataMissingError(DataError, FileNotFoundError):
    """Files of the data dir are missing; the message lists them all and the fetch command."""


class ChecksumError(DataError):
    """A download does not match the catalogue's SHA-256/size (nothing was kept)."""


class _TooLarge(DataError):
    """The server sent more bytes than the catalogue allows (not retried)."""


def fetch_timeout() -> float:
    """Seconds per connection/read: ``$CYCLEQD_FETCH_TIMEOUT`` or 30.

    Raises:
        DataError: the variable is not a positive number.
    """
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        t = float(raw)
    except ValueError:
        t = -1.0
    if not t > 0:
        raise DataError(f"{TIMEOUT_ENV}={raw!r}: expected a positive number of seconds")
    return t


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


_VERDICTS: dict[str, tuple[int, int, bool]] = {}   # path -> (size, mtime_ns, matches the catalogue)
_WARNED: set[str] = set()


def _matches(p: Path, f: DataFile) -> bool:
    """``p`` holds the catalogue's bytes of ``f`` (the verdict cached by size and mtime)."""
    st = p.stat()
    key = str(p.resolve())
    hit = _VERDICTS.get(key)
    if hit is not None and hit[:2] == (st.st_size, st.st_mtime_ns):
        return hit[2]
    ok = st.st_size == f.size and sha256_of(p) == f.sha256
    _VERDICTS[key] = (st.st_size, st.st_mtime_ns, ok)
    return ok


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
    """The data-dir path of catalogue file ``rel``. A file that differs from the catalogue's
    checksum (edited locally) is used, with one warning line on stderr per path and process.

    Raises:
        DataMissingError: it is not there (the message names the fetch command).
    """
    root = root or data_dir()
    p = root / rel
    d, f = file_entry(rel)
    if p.is_file():
        if not _matches(p, f) and str(p) not in _WARNED:
            _WARNED.add(str(p))
            print(f"warning: {p} differs from the catalogue checksum (edited locally?); using it "
                  f"anyway; `cycleqd data fetch {d.name}` restores it", file=sys.stderr, flush=True)
        return p
    raise DataMissingError(missing_message([(d, f)], root))


def _download(url: str, fh, *, desc: str, progress: bool, timeout_s: float, limit: int) -> None:
    """Stream ``url`` into ``fh``; :class:`_TooLarge` as soon as more than ``limit`` bytes came."""
    with urllib.request.urlopen(url, timeout=timeout_s) as r:  # noqa: S310 (catalogue or mirror URL)
        total = int(r.headers.get("Content-Length") or 0) or None
        n = 0
        with tqdm(total=total, unit="B", unit_scale=True, desc=desc, file=sys.stderr,
                  disable=None if progress else True, leave=False) as bar:   # None: only on a terminal
            for block in iter(lambda: r.read(CHUNK), b""):
                n += len(block)
                if n > limit:
                    raise _TooLarge(f"{desc}: {url} sent more than {limit} bytes (the catalogue's limit "
                                    f"for this file); stopped, nothing kept")
                fh.write(block)
                bar.update(len(block))


def _umask() -> int:
    old = os.umask(0o022)
    os.umask(old)
    return old


def fetch_file(f: DataFile, root: Path | None = None, *, progress: bool = True, timeout_s: float | None = None,
               attempts: int = 2, log: Callable[[str], None] = print) -> Path:
    """Download one catalogue file into ``<root>/<rel>`` (atomically; see module doc).

    Args:
        f: the catalogue entry. root: data dir (default :func:`cycleqd.paths.data_dir`).
        progress: tqdm bar on stderr (when it is a terminal). timeout_s: per connection/read
            (default :func:`fetch_timeout`). attempts: tries on network errors (HTTP 4xx and an
            oversized download are not retried).
        log: gets one line saying what is fetched from where, and one per retry.
    Returns:
        The written path.
    Raises:
        ChecksumError: SHA-256 or size differ (message: file, expected, got, URL).
        DataError: mirror-only file without a mirror; a network error after ``attempts``;
            a download larger than the stored size (``CONVERT_FACTOR`` times it with a convert
            step); a download the conversion step rejects; a bad ``$CYCLEQD_FETCH_TIMEOUT``.
    """
    timeout_s = fetch_timeout() if timeout_s is None else timeout_s
    limit = f.size * (CONVERT_FACTOR if f.convert is not None else 1)
    root = root or data_dir()
    dest = root / f.rel
    url = source_url(f)
    log(f"fetching {f.rel} from {url}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        os.chmod(tmp, 0o666 & ~_umask())   # mkstemp makes 0600
        with os.fdopen(fd, "wb") as fh:
            for attempt in range(1, attempts + 1):
                try:
                    fh.seek(0)
                    fh.truncate()
                    _download(url, fh, desc=f.rel, progress=progress, timeout_s=timeout_s, limit=limit)
                    break
                except urllib.error.HTTPError as e:
                    if e.code < 500 or attempt == attempts:
                        raise DataError(f"{f.rel}: HTTP {e.code} from {url}") from e
                    why = f"HTTP {e.code}"
                except OSError as e:  # URLError, timeouts, resets
                    if attempt == attempts:
                        raise DataError(f"{f.rel}: download from {url} failed: {e}") from e
                    r = getattr(e, "reason", e)
                    why = (f"timeout ({timeout_s:g}s, {TIMEOUT_ENV})" if isinstance(r, TimeoutError)
                           else str(e))
                log(f"{f.rel}: retrying ({attempt + 1}/{attempts}) after {why}")
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
          log: Callable[[str], None] = print, refetch: bool = False, **kw) -> list[Path]:
    """Fetch every missing file of the data sets ``names``; with ``refetch`` (``cycleqd data
    fetch``) also every file whose checksum differs (saying so; the local file stays until the
    new one is verified). Other files are kept (a run or demo warns about a differing one when
    it reads it, see :func:`locate`).

    Returns:
        The paths written (empty when every file matched).
    Raises:
        DataError / ChecksumError: as :func:`fetch_file` (files fetched before stay);
            an unknown name before any download.
    """
    root = root or data_dir()
    todo = []
    for d, f in ((d, f) for d in _datasets(names) for f in d.files):
        st = file_status(f, root) if refetch else "present" if (root / f.rel).is_file() else "missing"
        if st == "differs":
            log(f"{root / f.rel} differs from the catalogue checksum; re-fetching it (the local file "
                f"is kept until the new one is verified)")
        if st != "present":
            todo.append((d, f))
    missing = [(d, f) for d, f in todo if not (root / f.rel).is_file()]
    if missing:
        log(f"benchmark data: {len(missing)} file(s) missing in {root}; fetching "
            f"{', '.join(dict.fromkeys(d.name for d, _ in missing))}")
    return [fetch_file(f, root, progress=progress, log=log, **kw) for _, f in todo]

"""The one rule for where cycleqd keeps things on disk.

* cache root: ``cfg.cache_dir`` (or an explicit ``--cache-dir``), else ``$CYCLEQD_CACHE``,
  else ``~/.cache/cycleqd``. Models, experts, sample outcomes, the OS image and downloads
  live under it.
* data root: an explicit ``--data-dir``/``data_dir``, else ``$CYCLEQD_DATA_DIR``, else
  ``<cache root>/data`` (where ``cycleqd data fetch`` puts the benchmark files; a checkout's
  test scripts point ``$CYCLEQD_DATA_DIR`` at this workplace's ``../shared/data``).

``~`` and ``$VARS`` are expanded in every form (a quoted ``CYCLEQD_CACHE='~/cq'`` means
``$HOME/cq`` everywhere). Nothing here creates folders or imports anything heavy.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

DEFAULT_CACHE = "~/.cache/cycleqd"


def _expand(p: str | os.PathLike) -> Path:
    return Path(os.path.expandvars(os.path.expanduser(os.fspath(p))))


def cache_dir(override: str | os.PathLike | Any | None = None) -> Path:
    """The cache root. ``override`` may be a path or a run config (its ``cache_dir`` is used
    when set); falls back to ``$CYCLEQD_CACHE``, then ``~/.cache/cycleqd``."""
    if override is not None and not isinstance(override, (str, os.PathLike)):
        override = getattr(override, "cache_dir", None)
    if override:
        return _expand(override)
    return _expand(os.environ.get("CYCLEQD_CACHE") or DEFAULT_CACHE)


def repo_root() -> Path:
    """The folder holding the ``cycleqd`` package (a checkout's root)."""
    return Path(__file__).resolve().parents[1]


def data_dir(override: str | os.PathLike | None = None) -> Path:
    """The benchmark data root: ``override``, else ``$CYCLEQD_DATA_DIR``, else
    ``<cache_dir()>/data``."""
    if override:
        return _expand(override)
    env = os.environ.get("CYCLEQD_DATA_DIR")
    return _expand(env) if env else cache_dir() / "data"

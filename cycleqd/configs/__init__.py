"""The example configs shipped inside the package (package data).

``configs/*.yaml`` at the top of the source tree and ``cycleqd/configs/*.yaml`` are the same
files (a test keeps them equal); only the latter is installed by ``pip install``, so a
non-editable install can still run ``cycleqd run tiny`` and ``cycleqd demo --toy``.

* :func:`names` -- the bundled config names (``tiny``, ``paper``, ``demo``, ``demo-toy``).
* :func:`path` -- a bundled config file by name, read through :mod:`importlib.resources`.
* :func:`resolve` -- what ``cycleqd run CONFIG`` accepts: an existing path, else a bundled name.
* :func:`write_examples` -- ``cycleqd init DIR``: editable copies of every bundled config.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from cycleqd.config import ConfigError

_SUFFIX = ".yaml"


def _root():
    return resources.files(__name__)


def names() -> list[str]:
    """The bundled config names, sorted (file names without ``.yaml``)."""
    return sorted(p.name[: -len(_SUFFIX)] for p in _root().iterdir()
                  if p.name.endswith(_SUFFIX) and p.is_file())


def path(name: str) -> Path:
    """The bundled config ``name`` (``tiny`` or ``tiny.yaml``) as a file path.

    Raises:
        ConfigError: no bundled config of that name (the message lists the names).
    """
    stem = name[: -len(_SUFFIX)] if name.endswith(_SUFFIX) else name
    if stem not in names():
        raise ConfigError(f"no bundled config named {name!r}; bundled: {', '.join(names())}")
    p = _root() / f"{stem}{_SUFFIX}"
    # installed packages (wheel, editable) are plain directories; a zipped install is not
    # supported by the rest of cycleqd either
    return Path(str(p))


def resolve(config: str | Path) -> Path:
    """A config argument: an existing file wins; otherwise a bundled name (``tiny``).

    Raises:
        ConfigError: neither an existing file nor a bundled name (one line, listing both).
    """
    p = Path(config).expanduser()
    if p.is_file():
        return p
    s = str(config)
    looks_like_name = "/" not in s and "\\" not in s
    if looks_like_name:
        stem = s[: -len(_SUFFIX)] if s.endswith(_SUFFIX) else s
        if stem in names():
            return path(stem)
    if p.is_dir():
        raise ConfigError(f"config {config} is a directory, not a YAML file (give the file in it, or a "
                          f"bundled config by name: {', '.join(names())})")
    raise ConfigError(f"config file not found: {config} (bundled configs, usable by name: "
                      f"{', '.join(names())}; `cycleqd init DIR` writes editable copies)")


def write_examples(directory: str | Path, *, overwrite: bool = False) -> list[Path]:
    """Copy every bundled config into ``directory`` (created if missing) for editing.

    Returns:
        The written files, sorted by name.
    Raises:
        FileExistsError: a file of that name exists and ``overwrite`` is false; checked for
            every file before anything is written, so nothing is half-done.
    """
    out = Path(directory).expanduser()
    targets = [(n, out / f"{n}{_SUFFIX}") for n in names()]
    clash = [str(t) for _, t in targets if t.exists()]
    if clash and not overwrite:
        raise FileExistsError(f"{', '.join(clash)} {'exists' if len(clash) == 1 else 'exist'}; pass --overwrite to replace")
    out.mkdir(parents=True, exist_ok=True)
    for n, t in targets:
        t.write_text(path(n).read_text())
    return [t for _, t in targets]

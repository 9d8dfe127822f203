"""One error family for everything a user can get wrong.

* :class:`CycleQDError`: the base. The ``cycleqd`` command line prints one as
  ``error: <message>`` (no traceback) and exits with status 2.
* :class:`MissingDependencyError`: an optional package is not installed; the message names
  the feature, the package and the install line (``pip install 'cycleqd[ray]'``). It is also
  an :class:`ImportError`, so ``except ImportError`` keeps working.

Subclasses elsewhere keep their older bases too (``ConfigError`` and ``RunDirError`` are
``ValueError`` as well), so existing ``except ValueError`` code is unchanged. Nothing here
imports anything.
"""

from __future__ import annotations

import importlib
from types import ModuleType

#: optional package (import name) -> (pip extra of cycleqd, the package on PyPI)
#: (pyproject.toml ``[project.optional-dependencies]``)
EXTRAS: dict[str, tuple[str, str]] = {
    "ray": ("ray", "ray[default]"),
    "vllm": ("vllm", "vllm"),
    "lm_eval": ("lmeval", "lm-eval"),
    "pymysql": ("mariadb", "pymysql"),
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
}


class CycleQDError(Exception):
    """Base of cycleqd's user-facing errors: the message says what is wrong, in one line
    where it can (a config error lists one problem per line)."""


class ConfigError(CycleQDError, ValueError):
    """A configuration is invalid; the message names each problem with its field path
    (``operators.mutation.rate: must be >= 0, got -0.1``). Raised by :mod:`cycleqd.registry`
    and :mod:`cycleqd.config` (which re-exports it)."""


class MissingDependencyError(CycleQDError, ImportError):
    """An optional dependency is missing. ``str(e)``: ``<what> needs <package>: pip install
    'cycleqd[<extra>]' (or pip install '<package>')``."""

    def __init__(self, module: str, what: str) -> None:
        extra, pkg = EXTRAS.get(module.split(".")[0], (None, module))
        hint = f"pip install 'cycleqd[{extra}]' (or pip install '{pkg}')" if extra else f"pip install '{pkg}'"
        super().__init__(f"{what} needs {pkg}: {hint}", name=module)


def require(module: str, what: str) -> ModuleType:
    """Import ``module`` (e.g. ``"ray"``, ``"vllm"``) or raise :class:`MissingDependencyError`
    naming ``what`` needs it (e.g. ``"the Ray executor"``).

    Raises:
        MissingDependencyError: ``module`` (or one of its own imports) is not installed.
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependencyError(module, what) from e

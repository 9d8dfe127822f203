"""Sandboxes for model-written code, shell and SQL (bubblewrap; SQLite/MariaDB backends).

Public API (stable; the coding, DB and OS skills use it):
:class:`SandboxLimits`, :class:`SandboxResult`, :func:`run_sandboxed`,
:class:`BwrapSession`, :func:`sandbox_status`, :class:`SandboxUnavailableError`.
"""

from .bwrap import run_sandboxed, sandbox_status
from .limits import SandboxLimits, SandboxResult, SandboxStatus, SandboxUnavailableError
from .session import BwrapSession

__all__ = ["BwrapSession", "SandboxLimits", "SandboxResult", "SandboxStatus",
           "SandboxUnavailableError", "run_sandboxed", "sandbox_status"]

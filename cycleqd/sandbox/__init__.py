"""Sandboxes for model-written code, shell and SQL (bubblewrap; SQLite/MariaDB backends).

Public API (stable; the coding, DB and OS skills use it):
:class:`SandboxLimits`, :class:`SandboxResult`, :func:`run_sandboxed`,
:class:`BwrapSession`, :func:`sandbox_status`, :class:`SandboxUnavailableError`.
"""

from .bwrap import (BwrapSession, SandboxLimits, SandboxResult, SandboxStatus,
                    SandboxUnavailableError, run_sandboxed, sandbox_status)

__all__ = ["BwrapSession", "SandboxLimits", "SandboxResult", "SandboxStatus",
           "SandboxUnavailableError", "run_sandboxed", "sandbox_status"]

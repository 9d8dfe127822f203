"""Import a heavy module on first attribute access.

``torch = lazy_import("torch")`` at the top of a module binds a stand-in; the real import
happens the first time an attribute is read (``torch.randn``), after which the stand-in holds
the module's namespace and lookups cost a plain attribute read. Unlike the standard library's
``importlib.util.LazyLoader``, nothing enters ``sys.modules`` before that first use, so
``import cycleqd.ops`` (and with it the operator registries, :mod:`cycleqd.registry`) leaves
torch unimported: ``cycleqd validate`` checks every operator without loading it.
"""

from __future__ import annotations

import importlib
import types
from typing import Any


class _LazyModule(types.ModuleType):
    """Stand-in for module ``name``; see the module docstring."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.__dict__["_lazy_target"] = name

    def __getattr__(self, attr: str) -> Any:   # only called for names not yet in __dict__
        if attr.startswith("__") and attr.endswith("__") and attr not in ("__version__", "__path__"):
            raise AttributeError(attr)
        module = importlib.import_module(self.__dict__["_lazy_target"])
        self.__dict__.update({k: v for k, v in vars(module).items() if k not in ("__name__",)})
        return getattr(module, attr)


def lazy_import(name: str) -> Any:
    """A stand-in for module ``name`` that imports it on first attribute access.

    Raises (at that first access): ImportError when the module is not installed.
    """
    return _LazyModule(name)

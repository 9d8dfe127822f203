"""cycleqd: CycleQD (Kuroki et al., ICLR 2025, arXiv 2410.14735) — quality-diversity
search over model weights that evolves multi-skill models from single-skill experts.

The Python API (see ``docs/python-api.md``); every name is imported on first use, so
``import cycleqd`` itself stays light (no torch)::

    import cycleqd
    cfg = cycleqd.load_config(cycleqd.configs.path("tiny"), {"qd.generations": 6})
    result = cycleqd.run_cycleqd(cycleqd.build_components(cfg), cfg, "runs/api")

Run: :func:`run_cycleqd`, :class:`CycleQDRun`, :class:`Components`, :class:`RunResult`,
:func:`build_components`, :class:`RunView` (read a run directory), :func:`weight_space`.
Errors: :class:`CycleQDError`, :class:`MissingDependencyError`. Config: :class:`RunConfig`, :func:`load_config`,
:func:`parse_config`, :class:`ConfigError`, :mod:`configs` (the bundled example configs).
Skills: ``SKILL_TYPES``, ``SKILLS`` (the skill registry: type -> evaluator), :class:`Skill`.
Operators: ``CROSSOVERS``, ``MUTATIONS``, ``AGGREGATIONS`` (registries: name -> factory),
:func:`register`, :func:`make_crossover`, :func:`make_mutation`. Every registry is a
:class:`cycleqd.registry.Registry` (``names()``, ``check()``, ``build()``, ``@register``).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: public name -> (module, attribute); resolved on first access by :func:`__getattr__`
_LAZY: dict[str, tuple[str, str]] = {
    # run
    "run_cycleqd": ("cycleqd.engine.loop", "run_cycleqd"),
    "CycleQDRun": ("cycleqd.engine.loop", "CycleQDRun"),
    "Components": ("cycleqd.engine.loop", "Components"),
    "RunResult": ("cycleqd.engine.loop", "RunResult"),
    "build_components": ("cycleqd.engine.build", "build_components"),
    "write_report": ("cycleqd.engine.report", "write_report"),
    "RunView": ("cycleqd.engine.runview", "RunView"),
    "weight_space": ("cycleqd.engine.runview", "weight_space"),
    # errors
    "CycleQDError": ("cycleqd.errors", "CycleQDError"),
    "MissingDependencyError": ("cycleqd.errors", "MissingDependencyError"),
    # config
    "RunConfig": ("cycleqd.config", "RunConfig"),
    "load_config": ("cycleqd.config", "load_config"),
    "parse_config": ("cycleqd.config", "parse_config"),
    "ConfigError": ("cycleqd.config", "ConfigError"),
    # skills
    "SKILL_TYPES": ("cycleqd.config", "SKILL_TYPES"),
    "SKILLS": ("cycleqd.registry", "SKILLS"),
    "Registry": ("cycleqd.registry", "Registry"),
    "Skill": ("cycleqd.skills.base", "Skill"),
    # operators
    "CROSSOVERS": ("cycleqd.registry", "CROSSOVERS"),
    "MUTATIONS": ("cycleqd.registry", "MUTATIONS"),
    "AGGREGATIONS": ("cycleqd.registry", "AGGREGATIONS"),
    "register": ("cycleqd.ops.base", "register"),
    "make_crossover": ("cycleqd.ops.crossover", "make_crossover"),
    "make_mutation": ("cycleqd.ops.mutation", "make_mutation"),
}

_SUBMODULES = ("configs", "tracking")

__all__ = sorted([*_LAZY, *_SUBMODULES, "__version__"])


def __getattr__(name: str) -> Any:
    """Import a public name on first access (PEP 562) and cache it in the module."""
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module 'cycleqd' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

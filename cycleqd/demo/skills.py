"""Stand-in skill factories for the demo, used only while a skill module does not yet
expose the factory that :data:`cycleqd.engine.build.SKILL_FACTORIES` names (the engine
calls ``factory(name=..., cache_dir=..., **params)``). Each builds the skill module's own
evaluator class with the same parameters; nothing here changes how a skill scores."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any


def make_mbpp_skill(name: str, cache_dir: Path | None = None, **params: Any):
    from cycleqd.skills.coding import CodingSkill
    return CodingSkill("mbpp", name=name, **params)


def make_dbbench_skill(name: str, cache_dir: Path | None = None, **params: Any):
    from cycleqd.skills.dbbench import DBBenchSkill
    return DBBenchSkill(name=name, **params)


def make_os_skill(name: str, cache_dir: Path | None = None, **params: Any):
    from cycleqd.skills.os_interaction import OSInteractionSkill
    return OSInteractionSkill(name=name, **params)


def ensure_factories(types=("mbpp", "dbbench", "os")) -> list[str]:
    """Point the engine's factory table at the stand-ins above for the skill types whose
    named factory does not exist. Returns the types patched."""
    from cycleqd.engine import build

    patched = []
    for t in types:
        spec = build.SKILL_FACTORIES.get(t)
        ok = False
        if spec:
            module, fn = spec.split(":")
            try:
                ok = hasattr(importlib.import_module(module), fn)
            except ImportError:
                ok = False
        if not ok:
            build.SKILL_FACTORIES[t] = f"{__name__}:make_{'mbpp' if t == 'mbpp' else t}_skill"
            patched.append(t)
    return patched

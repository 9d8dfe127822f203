"""Turn a validated :class:`RunConfig` into :class:`Components`.

Order matters for the user: everything cheap and checkable (data files, skill parameters,
operator names, model paths) is checked before any model is loaded.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Callable

from cycleqd import paths
from cycleqd.config import ConfigError, RunConfig, SkillConfig
from cycleqd.engine.loop import Components
from cycleqd.engine.runview import weight_space

def make_mbpp_skill(name: str, cache_dir: Path, **params: Any):
    from cycleqd.skills.coding.skill import CodingSkill

    return CodingSkill("mbpp", name=name, **params)


def make_humaneval_skill(name: str, cache_dir: Path, **params: Any):
    from cycleqd.skills.coding.skill import CodingSkill

    return CodingSkill("humaneval", name=name, **params)


def make_dbbench_skill(name: str, cache_dir: Path, **params: Any):
    from cycleqd.skills.agentbench.dbbench import DBBenchSkill

    return DBBenchSkill(name=name, **params)


def make_os_skill(name: str, cache_dir: Path, **params: Any):
    from cycleqd.skills.agentbench.os_interaction import OSInteractionSkill

    return OSInteractionSkill(name=name, **{"cache_dir": cache_dir, **params})  # OS image under the run's cache


def make_lmeval_skill(name: str, cache_dir: Path, **params: Any):
    from cycleqd.skills.lmeval import LMEvalSkill

    return LMEvalSkill(name=name, **params)


#: skill type -> "module:factory"; the factory takes (name, cache_dir, **params) and returns a
#: Skill. Per-sample outcomes are cached in ``cache_dir/sample_cache.sqlite`` unless the
#: params say ``cache: null``.
SKILL_FACTORIES: dict[str, str] = {
    "mbpp": f"{__name__}:make_mbpp_skill",
    "humaneval": f"{__name__}:make_humaneval_skill",
    "dbbench": f"{__name__}:make_dbbench_skill",
    "os": f"{__name__}:make_os_skill",
    "lmeval": f"{__name__}:make_lmeval_skill",
}


def _factory(spec: str) -> Callable[..., Any]:
    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


def build_llm_skill(sc: SkillConfig, cache_dir: Path) -> Any:
    """A real skill evaluator from its config entry. Raises ConfigError on bad params."""
    if sc.type not in SKILL_FACTORIES:
        raise ConfigError(f"skill {sc.name!r}: type {sc.type!r} cannot be built from a config here")
    params = dict(sc.params)
    params.setdefault("cache", cache_dir / "sample_cache.sqlite")
    try:
        return _factory(SKILL_FACTORIES[sc.type])(name=sc.name, cache_dir=cache_dir, **params)
    except (TypeError, ValueError, FileNotFoundError) as e:
        raise ConfigError(f"skills.{sc.name}: {e}") from None


def _check_model_sources(cfg: RunConfig) -> None:
    """Local-looking model paths must exist (hub ids are checked when loaded)."""
    sources = [("model.base", cfg.model.base)] + [(f"model.experts.{k}", v) for k, v in cfg.model.experts.items()]
    for field, src in sources:
        if src is None:
            continue
        looks_local = src.startswith(("/", ".", "~")) or src.endswith((".gguf", ".safetensors", ".bin", ".pt"))
        if looks_local and not Path(src).expanduser().exists():
            raise ConfigError(f"{field}: {src!r} does not exist")


def build_components(cfg: RunConfig, *, cache_dir: Path | None = None) -> Components:
    """Build skills, weight space and adapter for ``cfg`` (see module doc for the order)."""
    cache_dir = paths.cache_dir(cache_dir or cfg)
    cache_dir.mkdir(parents=True, exist_ok=True)
    _check_model_sources(cfg)
    synthetic = [s for s in cfg.skills if s.type == "synthetic"]
    if synthetic and len(synthetic) != len(cfg.skills):
        raise ConfigError("skills: synthetic skills cannot be mixed with model-evaluating skills")
    if any(s.type == "external" for s in cfg.skills):
        raise ConfigError("skills: type 'external' is only for programmatic runs (pass Components)")
    if synthetic and cfg.model.synthetic is None:
        raise ConfigError("skills: synthetic skills need model.synthetic (they score distance to its experts)")
    # 1. cheap checks and data loading: the skills
    skills = [] if synthetic else [build_llm_skill(s, cache_dir) for s in cfg.skills]
    # 2. models
    space, info = weight_space(cfg, cache_dir)
    # 3. adapter
    if synthetic:
        from cycleqd.skills.synthetic import SyntheticAdapter, SyntheticSkill

        full = [space.materialize(g) for g in space.expert_genomes()]
        skills = [SyntheticSkill(s.name, space.materialize(space.base_genome()), w, **s.params)
                  for s, w in zip(cfg.skills, full)]
        return Components(space, skills, SyntheticAdapter())
    from cycleqd.inference.adapter import LLMAdapter

    adapter = LLMAdapter.from_config(cfg.backend, info)
    return Components(space, skills, adapter, close=getattr(adapter, "close", None))

"""Turn a validated :class:`RunConfig` into :class:`Components`.

Order matters for the user: everything cheap and checkable (data files, skill parameters,
operator names, model paths) is checked before any model is loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from cycleqd import paths
from cycleqd.config import ConfigError, RunConfig, SkillConfig, check_config
from cycleqd.engine.final import needs_validation
from cycleqd.engine.loop import Components
from cycleqd.engine.runview import weight_space
from cycleqd.registry import SKILLS


def build_llm_skill(sc: SkillConfig, cache_dir: Path, *, field: str | None = None) -> Any:
    """A skill evaluator from its config entry, through :data:`cycleqd.registry.SKILLS`
    (``sc.type`` names the registered evaluator, ``sc.params`` its keyword arguments; the
    skill's name is ``sc.name``). Per-sample outcomes are cached in
    ``cache_dir/sample_cache.sqlite`` unless the params say ``cache: null``.

    Raises:
        ConfigError: unknown type, a parameter that does not fit (named, with a did-you-mean),
            missing data (``field``, default ``skills.<name>.params``, names where).
    """
    if sc.type in ("synthetic", "external"):
        raise ConfigError(f"skill {sc.name!r}: type {sc.type!r} cannot be built from a config here")
    params = dict(sc.params)
    params.setdefault("cache", cache_dir / "sample_cache.sqlite")
    field = field or f"skills.{sc.name}.params"
    try:
        return SKILLS.build(sc.type, params, field=field, name=sc.name, cache_dir=cache_dir)
    except FileNotFoundError as e:
        raise ConfigError(f"{field}: {e}") from None


def check_device(device: str) -> None:
    """``backend.device`` exists on this machine (the config schema checks only its form).

    Raises:
        ConfigError: ``cuda``/``cuda:N`` without CUDA or beyond ``torch.cuda.device_count()``,
            ``mps`` without MPS; one line, before any model loads.
    """
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"backend.device: {device} requested but torch has no CUDA "
                              "(torch.cuda.is_available() is False)")
        n = torch.cuda.device_count()
        if ":" in device and int(device.split(":")[1]) >= n:
            raise ConfigError(f"backend.device: {device} requested but torch sees {n} CUDA device(s) "
                              f"(cuda:0..cuda:{n - 1})")
    elif device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("backend.device: mps requested but torch has no MPS (torch.backends.mps.is_available() "
                          "is False)")


def build_components(cfg: RunConfig, *, cache_dir: Path | None = None) -> Components:
    """Build skills, weight space and adapter for ``cfg`` (see module doc for the order)."""
    cache_dir = paths.cache_dir(cache_dir or cfg)
    if any(s.type == "external" for s in cfg.skills):
        raise ConfigError("skills: type 'external' is only for programmatic runs (pass Components)")
    check_config(cfg)   # what `cycleqd validate` checks: model paths, skills' params, data, lm-eval tasks
    check_final(cfg)
    check_device(cfg.backend.device)
    cache_dir.mkdir(parents=True, exist_ok=True)
    synthetic = [s for s in cfg.skills if s.type == "synthetic"]
    # 1. cheap checks and data loading: the skills
    skills = [] if synthetic else [build_llm_skill(s, cache_dir, field=f"skills.{i}.params")
                                   for i, s in enumerate(cfg.skills)]
    # 2. models
    space, info = weight_space(cfg, cache_dir)
    # 3. adapter
    if synthetic:
        from cycleqd.skills.synthetic import SyntheticAdapter

        full = [space.materialize(g) for g in space.expert_genomes()]
        base_w = space.materialize(space.base_genome())
        def synth(split: str) -> list:
            return [SKILLS.build("synthetic", {**s.params, **({"split": split} if split != "search" else {})},
                                 field=f"skills.{i}.params", name=s.name, base=base_w, target=w)
                    for i, (s, w) in enumerate(zip(cfg.skills, full))]

        return Components(space, synth("search"), SyntheticAdapter(), validation=lambda: synth("validation"))
    from cycleqd.inference.adapter import LLMAdapter

    adapter = LLMAdapter.from_config(cfg.backend, info)
    return Components(space, skills, adapter, close=getattr(adapter, "close", None),
                       validation=validation_skills(cfg, cache_dir))


def _has_validation_split(s: Any) -> bool:
    """Whether skill config ``s`` can be built on a ``validation`` split: its evaluator takes
    ``split`` and accepts ``validation`` with these params (the official protocol -- MBPP+,
    ``protocol: official`` -- scores its fixed official set only, so it has none)."""
    if "split" not in SKILLS.entry(s.type).parameters():
        return False
    try:
        SKILLS.check(s.type, {**s.params, "split": "validation"})
    except ConfigError:
        return False
    return True


def check_final(cfg: RunConfig) -> None:
    """Refuse, before anything is loaded, a final strategy that chooses on validation when a
    skill's evaluator has no validation split. Raises ConfigError."""
    missing = [s.name for s in cfg.skills if s.type not in ("synthetic", "external")
               and not _has_validation_split(s)]
    if missing and needs_validation(cfg):
        raise ConfigError(f"final.strategy: chooses on the validation split, but skill(s) {missing} have none")


def validation_skills(cfg: RunConfig, cache_dir: Path):
    """``() -> skills`` building the config's skills on their ``validation`` split (for the
    final-model choice, :mod:`cycleqd.engine.final`), or None when a skill has no validation
    split (lm-eval tasks keep their own splits; the official protocol scores its official
    set only)."""
    if not all(_has_validation_split(s) for s in cfg.skills):
        return None
    return lambda: [build_llm_skill(s.model_copy(update={"params": {**s.params, "split": "validation"}}),
                                    cache_dir, field=f"skills.{i}.params") for i, s in enumerate(cfg.skills)]

"""A fast, deterministic synthetic skill for tests and the tiny example config.

Skill k scores a model by how close its task vector is to a target task vector
tau_k* = target_scale * tau_k (the k-th synthetic expert's task vector, scaled: the expert
has "learned" its skill only partly):  quality = exp(-||tau - tau_k*||^2 / ||tau_k*||^2).
With the default target_scale 1.25 the expert scores exp(-0.04) ~ 0.94, an unrelated
expert of equal norm ~ 0.19, the plain average of two orthogonal experts ~ 0.56 on each:
merging trades skills off the way real experts do, and SVD mutation along tau_k can
still improve quality. Per-sample outcomes are the per-tensor scores.

Splits: ``search`` scores against tau_k* itself (unchanged). ``validation`` and ``test``
stand for other samples of the same skill: their target is tau_k* plus a fixed seeded
perturbation of relative size ``split_noise`` per tensor (``torch.Generator`` seeded from
the skill name and split), different for each split, so a model can rank differently on
search, validation and test, as on real held-out data.
"""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING, Mapping

from cycleqd._lazy import lazy_import
from cycleqd.registry import SKILLS
from cycleqd.skills.base import SkillResult

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_import("torch")


SYNTHETIC_SPLITS = ("search", "validation", "test")


@SKILLS.register("synthetic", source="cycleqd: distance to a scaled synthetic expert (tests, tiny example)",
                 context=("name", "base", "target"))
class SyntheticSkill:
    """Args:
        name: skill name.
        base: theta_base, name -> tensor.
        target: full weights of the model that defines the skill (theta_base + tau_k*).
        temperature: scales the squared relative distance (higher = sharper skill).
        target_scale: tau_k* = target_scale * (target - base).
        split: ``search`` | ``validation`` | ``test`` (see the module docstring).
        split_noise: relative size of the validation/test targets' perturbation (>= 0).

    Raises:
        ValueError: zero task vector, unknown split, negative split_noise.

    ``evaluate(model)`` takes full weights (name -> tensor), as bound by
    :class:`SyntheticAdapter`.
    """

    def __init__(self, name: str, base: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor],
                 temperature: float = 1.0, target_scale: float = 1.25, split: str = "search",
                 split_noise: float = 0.1):
        if split not in SYNTHETIC_SPLITS:
            raise ValueError(f"synthetic skill {name!r}: split must be one of {SYNTHETIC_SPLITS}, got {split!r}")
        if split_noise < 0:
            raise ValueError(f"synthetic skill {name!r}: split_noise must be >= 0, got {split_noise}")
        self.name, self.temperature, self.split = name, float(temperature), split
        self.base = {k: v.float() for k, v in base.items()}
        self.target = {k: (target[k].float() - self.base[k]) * target_scale for k in self.base}
        if split != "search":
            g = torch.Generator().manual_seed(zlib.crc32(f"{name}/{split}".encode()))
            for k, t in self.target.items():
                noise = torch.randn(t.shape, generator=g)
                scale = split_noise * float(t.norm()) / max(float(noise.norm()), 1e-12)
                self.target[k] = t + noise * scale
        self.norm2 = float(sum(float((t * t).sum()) for t in self.target.values()))
        if self.norm2 == 0:
            raise ValueError(f"synthetic skill {name!r}: the target equals the base (zero task vector)")

    def evaluate(self, model: Mapping[str, torch.Tensor]) -> SkillResult:
        total, outcomes = 0.0, {}
        for k, b in self.base.items():
            d = model[k].float() - b - self.target[k]
            dist2 = float((d * d).sum())
            total += dist2
            tn = float((self.target[k] ** 2).sum())
            if tn > 0:
                outcomes[k] = float(torch.exp(torch.tensor(-self.temperature * dist2 / tn)))
        quality = float(torch.exp(torch.tensor(-self.temperature * total / self.norm2)))
        return SkillResult(min(1.0, max(0.0, quality)), outcomes)


class SyntheticAdapter:
    """Binds weights for synthetic skills: the skills read the weights directly."""

    def bind(self, weights: Mapping[str, torch.Tensor], fingerprint: str):
        return weights

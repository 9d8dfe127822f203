"""Vision skills: top-1 accuracy of an image classifier on one domain's split."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from cycleqd._checks import check_int
from cycleqd.skills.base import SkillResult
from cycleqd.vision.data import SPLITS, DomainSplit


class DomainAccuracySkill:
    """Accuracy on one (domain, split) set; implements :class:`cycleqd.skills.base.Skill`.

    Args:
        name: the skill's name (the archive's name), e.g. ``"rotated"``.
        data: the evaluation set (x float32 (N, 1, 8, 8), y int64 (N,)).
        batch_size: images per forward pass.
    ``evaluate(model)`` takes an ``nn.Module`` mapping (B, 1, 8, 8) float32 to (B, 10)
    logits (what :class:`~cycleqd.vision.adapter.ModuleAdapter` binds) and returns
    ``SkillResult(quality=accuracy, outcomes={"<domain>/<split>/<image index>": 0.0|1.0})``.
    Deterministic; non-finite logits count as wrong predictions, a forward pass that
    raises scores 0 on every sample (recorded in ``subscores["forward_failed"] = 1``).
    """

    def __init__(self, name: str, data: DomainSplit, *, batch_size: int = 2048):
        if len(data) == 0:
            raise ValueError(f"skill {name!r}: empty evaluation set {data.domain}/{data.split}")
        check_int("batch_size", batch_size)
        self.name, self.data, self.batch_size = name, data, batch_size
        self._ids = data.sample_ids()

    def correct(self, model: nn.Module) -> torch.Tensor:
        """Bool (N,): whether each image is classified correctly."""
        x, y = self.data.x, self.data.y
        out = []
        with torch.inference_mode():
            for i in range(0, len(y), self.batch_size):
                logits = model(x[i:i + self.batch_size])
                ok = torch.isfinite(logits).all(1)
                out.append((logits.argmax(1) == y[i:i + self.batch_size]) & ok)
        return torch.cat(out)

    def evaluate(self, model: nn.Module) -> SkillResult:
        try:
            correct = self.correct(model)
        except (RuntimeError, ValueError):
            return SkillResult(0.0, {i: 0.0 for i in self._ids}, {"forward_failed": 1.0})
        c = correct.tolist()
        return SkillResult(float(sum(c)) / len(c), {i: float(v) for i, v in zip(self._ids, c)})

    def __repr__(self) -> str:
        return f"DomainAccuracySkill({self.name!r}, {self.data.domain}/{self.data.split}, n={len(self.data)})"


def domain_skills(data: Mapping[str, Mapping[str, DomainSplit]], domains: Sequence[str],
                  split: str) -> list[DomainAccuracySkill]:
    """One :class:`DomainAccuracySkill` per domain (named after it, in ``domains`` order) on
    ``split`` of ``data`` (``{domain: {split: DomainSplit}}``, :func:`cycleqd.vision.data.build_domains`).

    Raises:
        ValueError: ``split`` not in :data:`cycleqd.vision.data.SPLITS`, or a domain/split
            missing from ``data``.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    missing = [d for d in domains if split not in data.get(d, {})]
    if missing:
        raise ValueError(f"no {split!r} split for domain(s) {missing}")
    return [DomainAccuracySkill(d, data[d][split]) for d in domains]

"""The skill seam: a skill scores a model in [0, 1] and reports per-sample outcomes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


class NonFiniteScore(ValueError):
    """A skill produced a NaN/inf score: the evaluation failed (the engine records the child
    as rejected and keeps it out of every archive)."""


@dataclass(frozen=True)
class SkillResult:
    """One skill's score of one model.

    Attributes:
        quality: the skill score in [0, 1] (e.g. pass@1, accuracy).
        outcomes: sample id -> that sample's score (0.0/1.0 for pass/fail).
        subscores: optional named extra scores (e.g. per-chunk pass rates), each in [0, 1].
    """

    quality: float
    outcomes: dict[str, float] = field(default_factory=dict)
    subscores: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if float(self.quality) != float(self.quality) or float(self.quality) in (float("inf"), float("-inf")):
            raise NonFiniteScore(f"SkillResult.quality must be a finite number in [0, 1], got {self.quality!r}")
        if not 0.0 <= float(self.quality) <= 1.0:
            raise ValueError(f"SkillResult.quality must be in [0, 1], got {self.quality!r}")

    def to_json(self) -> dict[str, Any]:
        return {"quality": float(self.quality), "outcomes": dict(self.outcomes),
                "subscores": dict(self.subscores)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "SkillResult":
        return cls(float(d["quality"]), dict(d.get("outcomes", {})), dict(d.get("subscores", {})))


@runtime_checkable
class Skill(Protocol):
    """A skill evaluator (paper §3: one per expert; quality of archive k = skill k's score).

    `evaluate(model)` receives what the run's ``ModelAdapter.bind`` returned: a
    :class:`cycleqd.inference.base.GenerationBackend` for LLM skills, an ``nn.Module`` for
    vision skills, the task vector for synthetic skills. It must be deterministic for
    the same weights and never raise on bad model output (bad output = failed sample).

    A skill that caches per-sample outcomes (:class:`cycleqd.skills.cache.SampleCache`)
    keys each one by what produced it: :func:`~cycleqd.skills.cache.model_key` of the
    model (weights fingerprint + backend), its own ``cache_key`` (every setting that can
    change an outcome: prompt, decoding, judge) and :func:`~cycleqd.skills.cache.item_key`
    of the item (its content, never its position in a file). See ``docs/cache.md``.
    """

    name: str

    def evaluate(self, model: Any) -> SkillResult: ...

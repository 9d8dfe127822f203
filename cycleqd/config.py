"""Run configuration: one YAML file, validated before any model loads.

Every section is a frozen pydantic model with ``extra="forbid"``, so an unknown key, a wrong
type or an impossible value (bin range min >= max, fewer than 2 skills, duplicate skill
names, an expert for a skill that does not exist, an unknown operator) is reported as a
:class:`ConfigError` that names the field path, e.g.::

    skills.1.bc_range: min (0.5) must be < max (0.2)

See ``configs/tiny.yaml`` (documented example) and ``configs/paper.yaml`` (the paper's setup).
"""

from __future__ import annotations

import hashlib
import inspect
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A configuration file is invalid; the message lists every problem with its field path."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


SKILL_TYPES = ("mbpp", "humaneval", "dbbench", "os", "lmeval", "synthetic", "external")


class SkillConfig(_Strict):
    """One skill: its evaluator and how its score is binned when it is a BC.

    Attributes:
        name: unique skill name (also the archive's name).
        type: evaluator: mbpp | humaneval | dbbench | os | lmeval | synthetic | external
            (external = provided programmatically through ``Components``).
        bc_range: [min, max] of the BC grid for this skill's score (official: MBPP 0–0.75,
            DB 0–0.45, OS 0–0.45); scores outside are clamped into the edge bins.
        bins: number of bins on that range (official 15).
        params: keyword arguments of the evaluator (split, limit, data path, ...).
    """

    name: str = Field(min_length=1)
    type: str
    bc_range: tuple[float, float] = (0.0, 1.0)
    bins: int = Field(15, ge=1, le=1000)
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("type")
    @classmethod
    def _known_type(cls, v: str) -> str:
        if v not in SKILL_TYPES:
            raise ValueError(f"unknown skill type {v!r}; choose one of {SKILL_TYPES}")
        return v

    @field_validator("bc_range")
    @classmethod
    def _range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not v[0] < v[1]:
            raise ValueError(f"min ({v[0]}) must be < max ({v[1]})")
        return v


class SyntheticModelConfig(_Strict):
    """Build a tiny random-init base and K synthetic experts (base + random low-rank task
    vectors) into the cache directory. For the shipped tiny example and tests only."""

    arch: Literal["llama", "qwen2"] = "llama"
    seed: int = 0
    hidden_size: int = Field(64, ge=8)
    num_layers: int = Field(2, ge=1)
    expert_rank: int = Field(4, ge=1)
    expert_scale: float = Field(0.05, gt=0)


class ModelConfig(_Strict):
    """Base model and one expert per skill.

    Attributes:
        base: HF folder, hub id, safetensors/.bin file or ``.gguf`` file (omit with ``synthetic``).
        experts: skill name -> expert source (same forms, or a peft LoRA adapter folder).
        synthetic: build a tiny base and experts instead (example/tests).
        seed_with_base: also seed the archives with the base model.
    """

    base: str | None = None
    experts: dict[str, str] = Field(default_factory=dict)
    synthetic: SyntheticModelConfig | None = None
    seed_with_base: bool = False

    @model_validator(mode="after")
    def _one_source(self) -> "ModelConfig":
        if self.synthetic is None and self.base is None:
            raise ValueError("give model.base (and model.experts) or model.synthetic")
        if self.synthetic is not None and (self.base is not None or self.experts):
            raise ValueError("model.synthetic builds its own base and experts: drop model.base/model.experts")
        return self


class OperatorConfig(_Strict):
    """A registered operator and its keyword arguments (``{name: linear, sigma: 0.01}``)."""

    model_config = ConfigDict(extra="allow", frozen=True)
    name: str

    def kwargs(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class OperatorsConfig(_Strict):
    """Weight operators (official: linear crossover sigma=0.01, SVD mutation rate 0.1).

    Attributes:
        genome: ``auto`` stores compact SVD genomes when the operators allow it
            (linear + svd_expert), else dense checkpoints; ``dense`` / ``svd`` force one.
    """

    crossover: OperatorConfig = OperatorConfig(name="linear", sigma=0.01)
    mutation: OperatorConfig = OperatorConfig(name="svd_expert", rate=0.1)
    aggregation: OperatorConfig = OperatorConfig(name="paper")
    genome: Literal["auto", "dense", "svd"] = "auto"


class QDConfig(_Strict):
    """The QD loop.

    Attributes:
        generations: number of children (paper: 1200).
        flip_interval: generations per quality skill (official 1).
        sampling: elite (paper normalisation [0.5, 0.8]) | elite_official ([0.5, 1.3],
            cell indices) | uniform (ablation).
        num_parents: parents per child (paper 2).
        mode: cyclic (CycleQD) | single (ablation: one archive, quality = mean of all
            skills, BCs = all skills).
        snapshot_every: keep a copy of the archives every N generations (the current ones
            are always written).
    """

    generations: int = Field(1200, ge=0)
    flip_interval: int = Field(1, ge=1)
    sampling: Literal["elite", "elite_official", "uniform"] = "elite"
    num_parents: int = Field(2, ge=1)
    mode: Literal["cyclic", "single"] = "cyclic"
    snapshot_every: int = Field(50, ge=1)


class BackendConfig(_Strict):
    """Generation backend for LLM skills: hf (transformers, CPU/GPU) or vllm (GPU)."""

    type: Literal["hf", "vllm"] = "hf"
    device: str = "cpu"
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "auto"
    batch_size: int = Field(32, ge=1)  # rows decoding together (continuous batching)
    gpu_memory_utilization: float = Field(0.8, gt=0, le=1)


class ExecutorConfig(_Strict):
    """Where "make child + evaluate" jobs run: in-process (local) or on Ray actors."""

    type: Literal["local", "ray"] = "local"
    workers: int = Field(2, ge=1)
    address: str | None = None
    synchronous: bool = False


class WandbConfig(_Strict):
    """Weights & Biases logging (``pip install cycleqd[wandb]``).

    Attributes:
        project: W&B project name.
        mode: ``online`` | ``offline`` (no network; ``wandb sync`` later) | ``disabled``;
            None: wandb's own default (``WANDB_MODE``, else online).
        entity: W&B entity (team/user); None: the logged-in default.
    """

    project: str = Field("cycleqd", min_length=1)
    mode: Literal["online", "offline", "disabled"] | None = None
    entity: str | None = None


class TrackingConfig(_Strict):
    """Experiment tracking (:mod:`cycleqd.tracking`): the figures of ``metrics.jsonl``
    (coverage, QD score, best quality per archive, child scores, timings) and the final
    elite maps, to TensorBoard event files (``RUN_DIR/tensorboard``; ``pip install
    cycleqd[tensorboard]``) and/or W&B. Not part of the run's fingerprint."""

    tensorboard: bool = False
    wandb: WandbConfig | None = None


class RunConfig(_Strict):
    """A whole CycleQD run (one YAML file)."""

    name: str = "cycleqd"
    seed: int = 0
    skills: list[SkillConfig]
    model: ModelConfig
    operators: OperatorsConfig = OperatorsConfig()
    qd: QDConfig = QDConfig()
    backend: BackendConfig = BackendConfig()
    executor: ExecutorConfig = ExecutorConfig()
    cache_dir: str | None = None
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _skills(self) -> "RunConfig":
        names = [s.name for s in self.skills]
        if len(names) < 2:
            raise ValueError(f"CycleQD needs at least 2 skills, got {len(names)}")
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate skill names: {dup}")
        if "mean" in names:
            raise ValueError("'mean' is reserved (quality of the single-archive ablation)")
        if self.model.synthetic is None:
            missing = [n for n in names if n not in self.model.experts]
            extra = [n for n in self.model.experts if n not in names]
            if missing:
                raise ValueError(f"model.experts: no expert for skill(s) {missing}")
            if extra:
                raise ValueError(f"model.experts: expert(s) for unknown skill(s) {extra}; skills are {names}")
        return self

    @property
    def skill_names(self) -> list[str]:
        return [s.name for s in self.skills]

    def fingerprint(self) -> str:
        """Short hash of the full config (identifies a run's setup)."""
        data = self.model_dump(mode="json", exclude={"tracking"})   # logging never changes results
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _format(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def check_operators(cfg: RunConfig) -> None:
    """Operator names exist in the registries and their keyword arguments fit the factory.

    Raises:
        ConfigError: naming ``operators.<kind>`` and the problem.
    """
    from cycleqd.ops import CROSSOVERS, MUTATIONS

    try:
        from cycleqd.ops.aggregation import AGGREGATIONS  # type: ignore[attr-defined]
    except ImportError:  # pragma: no cover - aggregation registry not built
        AGGREGATIONS = None
    problems = []
    for kind, registry in (("crossover", CROSSOVERS), ("mutation", MUTATIONS), ("aggregation", AGGREGATIONS)):
        op: OperatorConfig = getattr(cfg.operators, kind)
        if registry is None:
            continue
        if op.name not in registry:
            problems.append(f"  operators.{kind}.name: unknown {kind} {op.name!r}; "
                            f"registered: {sorted(registry)}")
            continue
        params = inspect.signature(registry[op.name]).parameters
        accepts_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
        for key in op.kwargs():
            if key not in params and not accepts_any:
                problems.append(f"  operators.{kind}.{key}: {op.name!r} takes no argument {key!r}; "
                                f"it takes {[p for p in params if p not in ('experts', 'bases')]}")
    if problems:
        raise ConfigError("invalid config:\n" + "\n".join(problems))


def parse_config(data: Any, *, source: str = "<config>") -> RunConfig:
    """Validate a config mapping. Raises ConfigError listing every problem."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping, got {type(data).__name__}")
    try:
        cfg = RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"invalid config {source}:\n{_format(e)}") from None
    check_operators(cfg)
    return cfg


def read_yaml(path: str | Path, what: str = "config") -> Any:
    """Parse a YAML file. Raises ConfigError naming ``what`` for a missing or unparsable file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} file not found: {path}")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read and validate a YAML config; ``overrides`` maps dotted keys to values
    (``{"qd.generations": 10}``). Raises ConfigError (also for a missing/unparsable file)."""
    data = read_yaml(path)
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return parse_config(data, source=str(path))

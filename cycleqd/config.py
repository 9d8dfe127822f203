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
import json
import math
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cycleqd.errors import ConfigError
from cycleqd.registry import AGGREGATIONS, CROSSOVERS, MUTATIONS, SKILLS, Registry, _did_you_mean

__all__ = ["ConfigError", "RunConfig", "load_config", "parse_config", "check_config", "check_operators",
           "check_skills", "check_model_sources", "SKILL_TYPES"]


class _Strict(BaseModel):
    # allow_inf_nan=False: a NaN/inf anywhere in a float field (bc_range, expert_scale, ...)
    # is a validation error naming the field, never a silent poison of the run
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# --- numbers: YAML 1.2 core schema -------------------------------------------------------

#: YAML 1.2 core-schema scalars (https://yaml.org/spec/1.2.2/#1032-tag-resolution). PyYAML
#: implements YAML 1.1, where ``1e-3`` (no dot) is a *string* and ``yes``/``on`` are booleans.
_Y12_NULL = re.compile(r"^(?:~|null|Null|NULL|)$")
_Y12_BOOL = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
_Y12_INT = re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$")
_Y12_FLOAT = re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
                        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$")


def _y12_int(value: str) -> int:
    if value.startswith("0o"):
        return int(value[2:], 8)
    if value.startswith("0x"):
        return int(value[2:], 16)
    return int(value, 10)


def _y12_float(value: str) -> float:
    v = value.lower()
    if v.endswith(".inf"):
        return -math.inf if v.startswith("-") else math.inf
    if v == ".nan":
        return math.nan
    return float(v)


class _Yaml12Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` with the YAML 1.2 core schema's null/bool/int/float rules."""


_Yaml12Loader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in rs if tag.rsplit(":", 1)[-1] not in ("null", "bool", "int", "float")]
    for ch, rs in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:null", _Y12_NULL, ["~", "n", "N", ""])
_Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:bool", _Y12_BOOL, list("tTfF"))
_Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:int", _Y12_INT, list("-+0123456789"))
_Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:float", _Y12_FLOAT, list("-+0123456789."))
_Yaml12Loader.add_constructor("tag:yaml.org,2002:int",
                              lambda loader, node: _y12_int(loader.construct_scalar(node)))
_Yaml12Loader.add_constructor("tag:yaml.org,2002:float",
                              lambda loader, node: _y12_float(loader.construct_scalar(node)))


def yaml12_load(text: str) -> Any:
    """Parse one YAML value with YAML 1.2 core-schema scalars (``1e-3`` is a float,
    ``yes`` a string, ``010`` the integer 10). Raises ``yaml.YAMLError``."""
    return yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 - SafeLoader subclass


def _numeric_strings(value: Any) -> Any:
    """Strings that are YAML 1.2 numbers become numbers (recursively in lists/dicts)."""
    if isinstance(value, str):
        if _Y12_INT.match(value):
            return _y12_int(value)
        if _Y12_FLOAT.match(value):
            return _y12_float(value)
        return value
    if isinstance(value, (list, tuple)):
        return type(value)(_numeric_strings(v) for v in value)
    if isinstance(value, dict):
        return {k: _numeric_strings(v) for k, v in value.items()}
    return value


def _first_non_finite(value: Any) -> Any:
    """The first NaN/inf number in ``value`` (nested lists/dicts), else None."""
    if isinstance(value, float) and not math.isfinite(value):
        return value
    if isinstance(value, str):  # "nan", "inf", "-Infinity": what float() would make of them
        try:
            return value if not math.isfinite(float(value)) else None
        except ValueError:
            return None
    if isinstance(value, (list, tuple)):
        value = list(value)
    elif isinstance(value, dict):
        value = list(value.values())
    else:
        return None
    for v in value:
        bad = _first_non_finite(v)
        if bad is not None:
            return bad
    return None


def _is_str_type(tp: Any) -> bool:
    """True when a value of annotation ``tp`` can only be a string (or None)."""
    origin = typing.get_origin(tp)
    if tp is str:
        return True
    if origin is Literal:
        return all(isinstance(a, str) for a in typing.get_args(tp))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return bool(args) and all(_is_str_type(a) for a in args)
    return False


def _accepts_str(tp: Any) -> bool:
    """True when annotation ``tp`` admits a string (``str``, ``str | None``,
    ``Sequence[str] | str``, a Literal of strings, ...)."""
    if _is_str_type(tp):
        return True
    if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return any(_accepts_str(a) for a in typing.get_args(tp))
    return False


def _registries() -> list[Registry]:
    return [CROSSOVERS, MUTATIONS, AGGREGATIONS]


def _string_params(op_name: str) -> set[str]:
    """Parameters that some registered operator called ``op_name`` annotates as ``str``."""
    out: set[str] = set()
    for reg in _registries():
        if op_name in reg:
            out |= {k for k, tp in reg.entry(op_name).hints().items() if _accepts_str(tp)}
    return out


#: skill ``type`` values: the registered skills (:data:`cycleqd.registry.SKILLS`) and
#: ``external`` (provided programmatically through ``Components``); a test keeps them equal
SKILL_TYPES = ("mbpp", "mbppplus", "humaneval", "dbbench", "os", "lmeval", "synthetic", "external")

#: ``backend.device``: cpu | cuda | cuda:N | mps (what ``torch.nn.Module.to`` accepts from the
#: HF backend; there is no "auto": the backend moves the model to exactly this device)
_DEVICE = re.compile(r"^(?:cpu|cuda(?::\d+)?|mps)$")

#: ``name``: the default run directory is ``runs/<name>-<time>``, so a plain file name
#: (no path separator, no leading dot: never ``..`` or a hidden folder; no control characters)
_NAME = re.compile(r"^[^/\\\x00-\x1f\x7f.][^/\\\x00-\x1f\x7f]{0,99}$")


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
    """A registered operator and its keyword arguments (``{name: linear, sigma: 0.01}``).

    Keyword arguments are untyped in the schema (each operator has its own); every number
    among them, nested lists included, must be finite (NaN/inf are refused here), and
    :func:`check_operators` checks them against the registered operator
    (:meth:`cycleqd.registry.Registry.check`: names, and its own range checks such as
    ``svd_expert.rate >= 0``, ``dare.density >= 1e-3``). A string that reads as a
    number under YAML 1.2 (``1e-3``, which YAML 1.1 leaves a string) is passed to the
    operator as that number unless the operator declares the parameter as a string
    (:meth:`kwargs`).
    """

    model_config = ConfigDict(extra="allow", frozen=True, allow_inf_nan=False)
    name: str

    @model_validator(mode="after")
    def _finite(self) -> "OperatorConfig":
        for key, value in (self.model_extra or {}).items():
            bad = _first_non_finite(_numeric_strings(value))
            if bad is not None:
                raise ValueError(f"{key}={bad!r}: must be a finite number")
        return self

    def kwargs(self) -> dict[str, Any]:
        """The operator's keyword arguments, with YAML-1.2 numeric strings as numbers
        (except for parameters the operator's factory annotates as ``str``)."""
        str_params = _string_params(self.name)
        return {k: (v if k in str_params else _numeric_strings(v)) for k, v in (self.model_extra or {}).items()}


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
        use_cma: per-child crossover mu/sigma and mutation rate from one CMA-ES per quality
            skill (official ``qd.use_cma``, default off; :mod:`cycleqd.qd.cma`); needs the
            ``linear`` crossover and an ``svd_expert``/``svd_self`` mutation.
        cma_popsize, cma_sigma0: its population size and initial step (official
            ``cma_es.popsize: 8``, ``cma_es.sigma: 0.01``).
    """

    generations: int = Field(1200, ge=0)
    flip_interval: int = Field(1, ge=1)
    sampling: Literal["elite", "elite_official", "uniform"] = "elite"
    num_parents: int = Field(2, ge=1)
    mode: Literal["cyclic", "single"] = "cyclic"
    snapshot_every: int = Field(50, ge=1)
    use_cma: bool = False
    cma_popsize: int = Field(8, ge=2)
    cma_sigma0: float = Field(0.01, gt=0)


class BackendConfig(_Strict):
    """Generation backend for LLM skills: hf (transformers, CPU/GPU) or vllm (GPU)."""

    type: Literal["hf", "vllm"] = "hf"
    device: str = "cpu"   # cpu | cuda | cuda:N | mps
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "auto"
    batch_size: int = Field(32, ge=1)  # rows decoding together (continuous batching)
    gpu_memory_utilization: float = Field(0.8, gt=0, le=1)
    # children of a compact SVD space evaluated without materialisation (low-rank deltas in
    # the forward pass; HF on CPU, fully factored spaces only): off = never (default: on CPU
    # the factored forward did not pay at the demo's sizes, docs/lowrank.md), on = whenever
    # exact, auto = when the last bind outweighed the last evaluation (a wall-clock rule: which
    # forward scores a child -- and so, on a greedy near-tie, its score -- can depend on load)
    lowrank: Literal["auto", "on", "off"] = "off"

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not _DEVICE.match(v):
            raise ValueError(f"unknown device {v!r}; expected cpu, cuda, cuda:N (N = 0, 1, ...) or mps")
        return v


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


#: the strategies ``final.strategy: auto`` tries, in this order (ties keep the earlier)
AUTO_STRATEGIES = ("mean", "quality_weighted", "task_arithmetic", "weight_search", "best_elite")


class FinalConfig(_Strict):
    """How the run's final model is chosen (:mod:`cycleqd.engine.final`).

    Attributes:
        strategy: a name in :data:`cycleqd.registry.AGGREGATIONS`, or ``auto`` (every one of
            :data:`AUTO_STRATEGIES` is built and scored on the validation split; the best
            validation mean wins, ties: the earlier in that order). None (the default): use
            ``operators.aggregation`` (name and parameters): one source of truth, so setting
            both ``final.strategy`` and a non-default ``operators.aggregation`` is an error.
        params: the strategy's parameters (``auto``: ``{strategy name: parameters}``).
    """

    strategy: str | None = None
    params: dict[str, Any] = {}

    @model_validator(mode="after")
    def _params_finite(self) -> "FinalConfig":
        bad = _first_non_finite(_numeric_strings(self.params))
        if bad is not None:
            raise ValueError(f"final.params: {bad!r} must be a finite number")
        return self


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
    final: FinalConfig = FinalConfig()

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(f"must be a plain file name (it names the run directory): no '/' or '\\', "
                             f"no control characters, not starting with '.', 1 to 100 characters; got {v!r}")
        return v

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
        # logging never changes results; an unset ``final`` keeps older runs' fingerprints
        skip = {"tracking"} | ({"final"} if self.final == FinalConfig() else set())
        data = self.model_dump(mode="json", exclude=skip)
        if self.backend.lowrank == "off":   # the default keeps older runs' fingerprints
            data["backend"].pop("lowrank")
        if not self.qd.use_cma:   # unused CMA settings: fingerprints stay what they were before them
            for k in ("use_cma", "cma_popsize", "cma_sigma0"):
                data["qd"].pop(k)
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _model_at(loc: tuple) -> Any:
    """The config model class holding the key at ``loc`` (a pydantic error location), or None."""
    model: Any = RunConfig
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if model is not None else None
        if field is None:
            return None
        tp = field.annotation
        while typing.get_origin(tp) is not None:
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            nested = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
            if nested:
                tp = nested[0]
                break
            if not args:
                break
            tp = args[-1]
        model = tp if isinstance(tp, type) and issubclass(tp, BaseModel) else None
    return model


def _format(err: ValidationError, overridden: typing.Iterable[str] = ()) -> str:
    """One ``  <field>: <message>`` line per problem; an unknown key gets a did-you-mean
    from the keys its section takes, a field set by ``--set`` says so."""
    lines = []
    overridden = list(overridden)
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden" and e["loc"]:
            model = _model_at(e["loc"])
            if model is not None:
                key = str(e["loc"][-1])
                msg = (f"unknown key{_did_you_mean(key, list(model.model_fields))}; "
                       f"{'.'.join(map(str, e['loc'][:-1])) or 'the top level'} takes {', '.join(model.model_fields)}")
        src = [k for k in overridden if loc == k or loc.startswith(k + ".") or k.startswith(loc + ".")]
        lines.append(f"  {loc}: {msg}" + (f" (from --set {src[0]})" if src else ""))
    return "\n".join(lines)


def check_operators(cfg: Any) -> None:
    """Operator names exist in the registries and their parameters fit (names, required
    ones, and each operator's own range checks such as ``svd_expert.rate >= 0`` or the DARE
    density floor), through :meth:`cycleqd.registry.Registry.check`: nothing heavy is built
    and torch is not imported, so ``cycleqd validate`` reports them in a second.

    Raises:
        ConfigError: every problem, each naming ``operators.<kind>[.<param>]``.

    ``cfg``: a :class:`RunConfig` or anything with its ``operators`` section (a demo config).
    """
    problems = []
    for kind, registry in (("crossover", CROSSOVERS), ("mutation", MUTATIONS), ("aggregation", AGGREGATIONS)):
        op: OperatorConfig = getattr(cfg.operators, kind)
        try:
            registry.check(op.name, op.kwargs(), field=f"operators.{kind}")
        except ConfigError as e:
            problems.append(f"  {e}")
    fin = getattr(cfg, "final", None)
    if fin is not None and fin.strategy is not None:
        if cfg.operators.aggregation != OperatorsConfig().aggregation:
            problems.append("  final.strategy: set either final.strategy or operators.aggregation, not both")
        auto = fin.strategy == "auto"
        unknown = sorted(set(fin.params) - set(AUTO_STRATEGIES)) if auto else []
        if unknown:
            problems.append(f"  final.params: {unknown} not among the auto strategies {list(AUTO_STRATEGIES)}")
        for name in (AUTO_STRATEGIES if auto else (fin.strategy,)):
            params = fin.params.get(name, {}) if auto else fin.params
            try:
                AGGREGATIONS.check(name, dict(params), field=f"final.params.{name}" if auto else "final")
            except ConfigError as e:
                problems.append(f"  {e}")
    _raise(problems)


def _raise(problems: list[str]) -> None:
    """One problem: one line; several: a header and one line each."""
    if len(problems) == 1:
        raise ConfigError(problems[0].strip())
    if problems:
        raise ConfigError("invalid config:\n" + "\n".join(problems))


def check_skills(skills: list[SkillConfig] | tuple[SkillConfig, ...]) -> None:
    """Each skill's parameters fit its registered evaluator (:data:`cycleqd.registry.SKILLS`):
    no unknown keyword (with a did-you-mean for a misspelt one), data paths that exist, and the
    evaluator's own checks that need no model or data (an lm-eval task name: this imports
    lm-eval and indexes its tasks, a few seconds, only when an ``lmeval`` skill is configured).

    Raises:
        ConfigError: every problem, each naming ``skills.<i>.params.<key>``.
    """
    problems = []
    for i, sc in enumerate(skills):
        if sc.type == "external":
            continue
        try:
            SKILLS.check(sc.type, sc.params, field=f"skills.{i}.params")
        except ConfigError as e:
            problems.append(f"  {e}")
    _raise(problems)


def check_model_sources(cfg: RunConfig) -> None:
    """Local-looking model paths exist (hub ids are checked when loaded); synthetic skills are
    not mixed with model-evaluating ones and come with ``model.synthetic``.

    Raises:
        ConfigError: naming the field.
    """
    sources = [("model.base", cfg.model.base)] + [(f"model.experts.{k}", v) for k, v in cfg.model.experts.items()]
    for field, src in sources:
        if src is None:
            continue
        looks_local = src.startswith(("/", ".", "~")) or src.endswith((".gguf", ".safetensors", ".bin", ".pt"))
        if looks_local and not Path(src).expanduser().exists():
            raise ConfigError(f"{field}: {src!r} does not exist")
    synthetic = [s for s in cfg.skills if s.type == "synthetic"]
    if synthetic and len(synthetic) != len(cfg.skills):
        raise ConfigError("skills: synthetic skills cannot be mixed with model-evaluating skills")
    if synthetic and cfg.model.synthetic is None:
        raise ConfigError("skills: synthetic skills need model.synthetic (they score distance to its experts)")


def check_config(cfg: RunConfig) -> None:
    """Everything that can be checked without loading weights, beyond the schema that
    :func:`parse_config` applies: the operators (:func:`check_operators`), local model paths
    (:func:`check_model_sources`) and the skills' parameters, data paths and lm-eval tasks
    (:func:`check_skills`). Run by ``cycleqd validate`` and by
    :func:`cycleqd.engine.build.build_components` (so by ``cycleqd run``) before any model loads.

    Raises:
        ConfigError: naming the field of each problem.
    """
    check_operators(cfg)
    check_model_sources(cfg)
    check_skills(cfg.skills)


def parse_config(data: Any, *, source: str = "<config>", overridden: typing.Iterable[str] = ()) -> RunConfig:
    """Validate a config mapping. Raises ConfigError listing every problem (a field whose
    dotted key is in ``overridden`` is marked as set by ``--set``)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping, got {type(data).__name__}")
    try:
        cfg = RunConfig.model_validate(data)
    except ValidationError as e:
        overridden = list(overridden)
        given = f" with --set {', '.join(overridden)}" if overridden else ""
        raise ConfigError(f"invalid config {source}{given}:\n{_format(e, overridden)}") from None
    check_operators(cfg)
    return cfg


def read_yaml(path: str | Path, what: str = "config") -> Any:
    """Parse a YAML file. Raises ConfigError naming ``what`` for a missing or unparsable file."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{what} {path} is a directory, not a YAML file")
    if not path.is_file():
        raise ConfigError(f"{what} file not found: {path}")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None


class OverrideText(str):
    """A ``--set KEY=VALUE`` value exactly as typed on the command line.

    :func:`load_config` parses it according to the type of the field it sets: a string field
    (``name``, ``model.base``, ``model.experts.<skill>``, an operator parameter annotated
    ``str``) keeps the text verbatim (``--set name=1e3`` is the name ``"1e3"``); every other
    field gets the text parsed as YAML with the YAML 1.2 core schema (``1e-3`` is a float,
    ``[0, 0.5]`` a list, ``null`` None, ``yes`` a string), and the config schema then
    validates it like a value from the file.
    """


def _field_annotation(data: dict, parts: list[str]) -> Any:
    """The annotation of the config field at ``parts`` (list positions already resolved to
    indices), or None when unknown (free-form ``params``, unknown keys)."""
    model: Any = RunConfig
    tp: Any = None
    i = 0
    node: Any = data
    while i < len(parts):
        key = parts[i]
        if model is None:
            return None
        if model is OperatorConfig:  # operator kwargs: the factory's annotation
            if key == "name":
                return str
            name = node.get("name") if isinstance(node, dict) else None
            for reg in _registries():
                if isinstance(name, str) and name in reg:
                    return reg.entry(name).hints().get(key)
            return None
        field = model.model_fields.get(key)
        if field is None:
            return None
        tp = field.annotation
        node = node.get(key) if isinstance(node, dict) else None
        i += 1
        # unwrap Optional / list[...] / dict[str, ...] down to the next model or leaf
        while True:
            origin = typing.get_origin(tp)
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and len(args) == 1 \
                    and i < len(parts):
                tp = args[0]
                continue
            if origin is list and i < len(parts):
                tp, i = args[0], i + 1
                node = node[int(parts[i - 1])] if isinstance(node, list) and parts[i - 1].isdigit() \
                    and int(parts[i - 1]) < len(node) else None
                continue
            if origin is dict and i < len(parts):
                tp, i = args[1] if len(args) == 2 else Any, i + 1
                node = node.get(parts[i - 1]) if isinstance(node, dict) else None
                continue
            break
        model = tp if isinstance(tp, type) and issubclass(tp, BaseModel) else None
    return tp


def _apply_override(data: dict, dotted: str, value: Any, source: str) -> None:
    """Set ``data[dotted]``; list items are addressed by index (``skills.0.bins``) or, for
    lists of named entries, by name (``skills.coding.bins``). Raises ConfigError."""
    parts = dotted.split(".")
    if not dotted or any(p == "" for p in parts):
        raise ConfigError(f"--set {dotted!r}: empty key (expected e.g. qd.generations)")
    node: Any = data
    resolved: list[str] = []
    for depth, p in enumerate(parts):
        last = depth == len(parts) - 1
        where = ".".join(resolved) or "<top level>"
        if isinstance(node, list):
            if p.lstrip("-").isdigit():
                idx = int(p)
                if not -len(node) <= idx < len(node):
                    raise ConfigError(f"--set {dotted}: {where} has {len(node)} entries, no index {idx}")
                idx %= len(node)
            else:
                names = [x.get("name") for x in node if isinstance(x, dict)]
                if p not in names:
                    raise ConfigError(f"--set {dotted}: {where} has no entry named {p!r} "
                                      f"(names: {', '.join(map(str, names)) or 'none'}; or use an index 0..{len(node) - 1})")
                idx = names.index(p)
            resolved.append(str(idx))
            if last:
                node[idx] = yaml12_load(str(value)) if isinstance(value, OverrideText) else value
            else:
                node = node[idx]
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {where} holds {node!r} ({type(node).__name__}), not a mapping")
        resolved.append(p)
        if last:
            if isinstance(value, OverrideText):
                value = _typed_override(data, resolved, value, dotted)
            node[p] = value
        else:
            if node.get(p) is None:
                node[p] = {}
            node = node[p]
    return None


def _typed_override(data: dict, parts: list[str], text: OverrideText, dotted: str) -> Any:
    tp = _field_annotation(data, parts)
    try:
        parsed = yaml12_load(str(text))
    except yaml.YAMLError as e:
        parsed_error = str(e).splitlines()[0]
        if tp is not None and _accepts_str(tp):
            return str(text)
        raise ConfigError(f"--set {dotted}={text}: not a valid YAML value ({parsed_error})") from None
    if tp is not None and _is_str_type(tp):
        optional = type(None) in typing.get_args(tp)
        return None if (optional and parsed is None) else str(text)
    if tp is not None and _accepts_str(tp) and isinstance(parsed, (int, float)) and not isinstance(parsed, bool):
        return str(text)  # e.g. a regex parameter typed ``Sequence[str] | str``: "1e3" is text
    return parsed


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read and validate a YAML config; ``overrides`` maps dotted keys to values
    (``{"qd.generations": 10}``, ``{"skills.coding.bins": 10}``, ``{"skills.0.bins": 10}``);
    an :class:`OverrideText` value is parsed by the type of the field it sets.
    Raises ConfigError (also for a missing/unparsable file or a key path that does not fit)."""
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    for dotted, value in (overrides or {}).items():
        _apply_override(data, dotted, value, str(path))
    return parse_config(data, source=str(path), overridden=_resolved_keys(data, overrides or {}))


def _resolved_keys(data: dict, overrides: dict[str, Any]) -> list[str]:
    """The ``--set`` keys with list entries named by index (``skills.coding.bins`` ->
    ``skills.0.bins``), as pydantic error locations spell them."""
    out = []
    for dotted in overrides:
        parts, node, resolved = dotted.split("."), data, []
        for p in parts:
            if isinstance(node, list):
                names = [x.get("name") if isinstance(x, dict) else None for x in node]
                idx = names.index(p) if p in names else (int(p) % len(node) if p.lstrip("-").isdigit() and node else p)
                resolved.append(str(idx))
                node = node[idx] if isinstance(idx, int) else None
            else:
                resolved.append(p)
                node = node.get(p) if isinstance(node, dict) else None
        out.append(".".join(resolved))
    return out

"""Build the run's WeightSpace from model specs and operator configs.

Order (cheap and checkable first, heavy last): operator names and the genome choice are
validated, every model spec is resolved (paths exist, kinds recognised), the base is opened
(lazily; a GGUF is converted once into the cache), each expert is opened and validated
against the base (config, tensor names and shapes), and only then are tensors read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import torch

from cycleqd.models.lazy import resident
from cycleqd.models.loading import Expert, LoadedModel, load_expert, load_model, needs_untie
from cycleqd.models.sources import ModelLoadError, resolve_source, tokenizer_files
from cycleqd.models.validate import check_finite, check_float
from cycleqd.ops.crossover import make_crossover
from cycleqd.ops.genome import SVDGenomeWeightSpace
from cycleqd.ops.mutation import make_mutation
from cycleqd.ops.space import DenseWeightSpace
from cycleqd.registry import CROSSOVERS, MUTATIONS, svd_genome_compatible


@dataclass
class ModelInfo:
    """What the rest of the system needs to know about the models.

    Attributes:
        model_dir: HF folder with the base's ``config.json`` and tokenizer (what the LLM
            adapter / generation backend loads); ``None`` for a bare checkpoint file.
        has_tokenizer: tokenizer files present in ``model_dir``.
        config: the base's config as a dict (``{}`` if none).
        base_spec, expert_specs, expert_kinds: the sources as given / classified.
        fingerprints: base fingerprint + one per expert (cache keys).
        dtype: the base's dominant stored dtype.
        n_params: parameters in the checkpoint (tied weights once).
        checkpoint_bytes: bytes of one checkpoint in the stored dtypes.
        genome: ``"svd"`` or ``"dense"`` (what the space stores).
        resident: base and task vectors held in RAM (else read lazily per tensor).
        extra: ``untied``: tied names (``lm_head.weight``) the space holds as tensors of
            their own because an expert trains one side of a tied pair (exports of such
            models are untied, see :func:`cycleqd.engine.export.write_hf_folder`).
    """

    model_dir: Path | None
    has_tokenizer: bool
    config: dict
    base_spec: str
    expert_specs: list[str]
    expert_kinds: list[str]
    fingerprints: list[str]
    dtype: torch.dtype
    n_params: int
    checkpoint_bytes: int
    genome: str
    resident: bool
    extra: dict = field(default_factory=dict)


def _mem_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def _spec(op: Mapping[str, Any] | str, field: str, registry) -> dict:
    """``{"name": ..., **params}`` after ``registry.check`` (name and parameters, nothing
    built). Raises ConfigError naming ``field``."""
    d = {"name": op} if isinstance(op, str) else dict(op)
    params = {k: v for k, v in d.items() if k != "name"}
    registry.check(d.get("name"), params, field=field)
    return d


def choose_genome(genome: str, crossover: str, mutation: str) -> str:
    """``auto`` -> ``svd`` when (crossover, mutation) keep children in the compact family
    (declared at registration, :func:`cycleqd.registry.svd_genome_compatible`).

    Raises:
        ValueError: ``genome="svd"`` with operators that do not allow it, or a bad value.
    """
    ok = svd_genome_compatible(crossover, mutation)
    if genome == "auto":
        return "svd" if ok else "dense"
    if genome == "svd" and not ok:
        xs = [n for n in CROSSOVERS.names() if CROSSOVERS.declares_svd_genome(n)]
        ms = [n for n in MUTATIONS.names() if MUTATIONS.declares_svd_genome(n)]
        raise ValueError(f"genome='svd' needs crossover in {xs} and mutation in "
                         f"{ms}; got {crossover!r} + {mutation!r} (use 'dense' or 'auto')")
    if genome not in ("svd", "dense"):
        raise ValueError(f"genome={genome!r}: expected 'auto', 'dense' or 'svd'")
    return genome


def build_weight_space(base: str, experts: Sequence[str], crossover: Mapping[str, Any] | str,
                       mutation: Mapping[str, Any] | str,
                       genome: Literal["auto", "dense", "svd"] = "auto",
                       cache_dir: Path | str | None = None, *,
                       resident_models: bool | Literal["auto"] = "auto",
                       gguf_dtype: torch.dtype = torch.float32) -> tuple[Any, ModelInfo]:
    """Load base + experts, validate them, and build the WeightSpace.

    Args:
        base: base model spec (HF folder / hub id / .safetensors / .bin / .gguf).
        experts: one spec per skill, in skill order (also LoRA adapter folders).
        crossover, mutation: ``{"name": ..., **params}`` for the registries.
        genome: ``auto`` (compact SVD genomes when the operators allow it), ``dense``, ``svd``.
        cache_dir: GGUF conversions (``gguf/``) and expert SVDs (``svd/``); default
            ``$CYCLEQD_CACHE`` or ``~/.cache/cycleqd``.
        resident_models: keep base and task vectors in RAM (fast; needs ~4 bytes/param per
            expert + the base) or read them per tensor from the memory-mapped files. ``auto``:
            resident when that takes < 40 % of the available RAM. A dense genome space always
            holds its task vectors in RAM.
    Returns:
        ``(space, info)``.
    Raises:
        ValueError: bad operator names/parameters/genome choice, no experts.
        FileNotFoundError / ModelLoadError: a source is missing, corrupt, does not match
            the base (the first mismatching tensor is named), or holds a weight that is NaN,
            inf or beyond the float16 range (model and tensor named; checked before any
            task vector, SVD or merge is computed).
    """
    if not experts:
        raise ValueError("model.experts: at least one expert is needed")
    cache_dir = Path(cache_dir) if cache_dir is not None else Path(
        os.environ.get("CYCLEQD_CACHE", "~/.cache/cycleqd")).expanduser()
    xo = _spec(crossover, "operators.crossover", CROSSOVERS)
    mu = _spec(mutation, "operators.mutation", MUTATIONS)
    kind = choose_genome(genome, xo["name"], mu["name"])
    # resolve every source before reading any tensor
    base_src = resolve_source(base)
    for e in experts:
        resolve_source(e)
    if base_src.kind == "lora":
        raise ModelLoadError(f"model.base {base!r} is a LoRA adapter; the base must be a full model")
    base_m: LoadedModel = load_model(base_src, cache_dir=cache_dir, gguf_dtype=gguf_dtype)
    if needs_untie(base_m, experts):  # a LoRA expert trains lm_head or embed_tokens alone
        base_m = load_model(base_src, cache_dir=cache_dir, gguf_dtype=gguf_dtype, untie=True)
    check_float(base_m.state, f"base {base}")
    check_finite(base_m.state, f"base {base}")  # NaN/inf/|w| > 65504: refuse before any compute
    loaded: list[Expert] = [load_expert(e, base_m, cache_dir=cache_dir, label=f"expert {i} ({e})",
                                        gguf_dtype=gguf_dtype) for i, e in enumerate(experts)]

    n_params = sum(_numel(base_m.state, k) for k in base_m.state)
    ck_bytes = base_m.state.nbytes() if hasattr(base_m.state, "nbytes") else sum(
        t.numel() * t.element_size() for t in base_m.state.values())
    need = ck_bytes + 4 * n_params * len(loaded)
    res = (need < 0.4 * _mem_available()) if resident_models == "auto" else bool(resident_models)
    if kind == "dense":
        res = True
    base_state = resident(base_m.state) if res else base_m.state
    taus = [resident(e.task_vector) if res else e.task_vector for e in loaded]

    xop = make_crossover(xo, base=base_state, field="operators.crossover")
    mop = make_mutation(mu, experts=taus, cache_dir=cache_dir / "svd",
                        fingerprints=[e.fingerprint for e in loaded], field="operators.mutation")
    space = (SVDGenomeWeightSpace(base_state, taus, xop, mop) if kind == "svd"
             else DenseWeightSpace(base_state, taus, xop, mop))

    dtypes: dict[torch.dtype, int] = {}
    for k in base_m.state:
        dt = base_m.state.dtype(k) if hasattr(base_m.state, "dtype") else base_m.state[k].dtype
        dtypes[dt] = dtypes.get(dt, 0) + _numel(base_m.state, k)
    folder = base_m.folder
    info = ModelInfo(
        model_dir=folder, has_tokenizer=bool(folder and tokenizer_files(folder)),
        config=base_m.config.to_dict() if base_m.config is not None else {},
        base_spec=str(base), expert_specs=[str(e) for e in experts],
        expert_kinds=[e.kind for e in loaded],
        fingerprints=[base_m.fingerprint] + [e.fingerprint for e in loaded],
        dtype=max(dtypes, key=dtypes.get), n_params=n_params, checkpoint_bytes=ck_bytes,
        genome=kind, resident=res, extra={"untied": list(base_m.extra.get("untied", []))})
    return space, info


def _numel(state: Mapping[str, torch.Tensor], k: str) -> int:
    shape = state.shape(k) if hasattr(state, "shape") else tuple(state[k].shape)
    n = 1
    for d in shape:
        n *= d
    return n

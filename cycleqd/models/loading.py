"""Loading the base model and the experts, in every common form.

Accepted sources: see :mod:`cycleqd.models.sources` (resolved by
:func:`~cycleqd.models.sources.resolve_source`).

Tensor names are the *checkpoint* names (what ``save_pretrained`` writes and what vLLM's
``load_weights`` takes); a tied ``lm_head.weight`` is dropped when the config ties it to
the input embeddings, so each weight appears once.

Memory behaviour (honest): safetensors files are memory-mapped and read one tensor at a
time (``safe_open``); ``.bin`` files are ``torch.load(mmap=True)`` -- zip-format files are
mapped lazily, legacy (pre-1.6) pickles are read whole. Task vectors of experts are
computed per tensor in fp32 (:mod:`cycleqd.models.lazy`), so a
streaming merge (:func:`cycleqd.engine.export.stream_merge`) holds only a few tensors'
worth of fp32 at once plus the OS page cache. GGUF conversion materialises the whole
dequantised model once. :func:`cycleqd.models.build.build_weight_space` decides whether to
keep base and task vectors resident in RAM (fast, small models) or lazy (8B models).

Validation before any arithmetic is :mod:`cycleqd.models.validate`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from .lazy import DiffTaskVector, LazyStateDict, LoraTaskVector
from .sources import ModelLoadError, ResolvedSource, folder_weights, resolve_source
from .validate import check_config, check_finite, check_float, check_tensors, tied_weight_names


@dataclass
class LoadedModel:
    """A model's weights (lazy) plus what is needed to validate and export it.

    Attributes:
        source: the resolved source.
        state: name -> tensor (stored dtype; lazy), tied duplicates hidden.
        config: the ``transformers`` config (``None`` for a bare checkpoint).
        folder: an HF folder with config/tokenizer (for export and the LLM adapter), if any.
        fingerprint: cache key for SVDs etc.
    """

    source: ResolvedSource
    state: Mapping[str, torch.Tensor]
    config: Any
    folder: Path | None
    fingerprint: str
    extra: dict = field(default_factory=dict)


def _load_config(folder: Path | None):
    if folder is None or not (folder / "config.json").is_file():
        return None
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(folder))
    except Exception as e:
        raise ModelLoadError(f"{folder}/config.json cannot be read by transformers: {e}") from e


def gguf_cache_folder(gguf: Path, cache_dir: Path, dtype: torch.dtype) -> Path:
    st = gguf.stat()
    key = hashlib.blake2b(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}|{dtype}".encode(),
                          digest_size=8).hexdigest()
    return Path(cache_dir) / "gguf" / f"{gguf.stem}-{key}"


def load_model(spec: str | os.PathLike | ResolvedSource, *, cache_dir: Path | str,
               gguf_dtype: torch.dtype = torch.float32, untie: bool = False) -> LoadedModel:
    """Open a full model (not a LoRA adapter) lazily.

    GGUF files are converted once into ``cache_dir/gguf/<name>-<hash>/`` (an HF folder),
    then opened like any folder.

    Tied weights (``lm_head.weight`` of a ``tie_word_embeddings`` model) appear once, under
    the source name, unless ``untie=True``: then the tied name is a tensor of its own (read
    from the source when the checkpoint does not store it) and ``extra["untied"]`` lists
    the tied names -- needed when an expert trains one side only (see :func:`needs_untie`).

    Raises:
        ModelLoadError / FileNotFoundError: see :func:`resolve_source`; a LoRA adapter
            given where a full model is needed.
    """
    src = spec if isinstance(spec, ResolvedSource) else resolve_source(spec)
    if src.kind == "lora":
        raise ModelLoadError(f"{src.spec} is a LoRA adapter; it can only be an expert (a full "
                             "model is needed here)")
    if src.kind == "gguf":
        from cycleqd.models.gguf import convert_gguf

        out = gguf_cache_folder(src.files[0], Path(cache_dir), gguf_dtype)
        if not ((out / "config.json").is_file() and folder_weights(out)):
            convert_gguf(src.files[0], out, dtype=gguf_dtype)
        fp = src.fingerprint()
        conv = resolve_source(out)
        conv.spec = src.spec
        src = conv
    else:
        fp = src.fingerprint()
    config = _load_config(src.config_dir)
    state = LazyStateDict(src.files)
    tied = tied_weight_names(config)
    extra: dict = {}
    if untie and tied:
        state = LazyStateDict(src.files, aliases=tied)
        extra["untied"] = sorted(t for t in tied if t in state)
    else:
        drop = [t for t, s in tied.items() if t in state and s in state]
        if drop:
            state = LazyStateDict(src.files, drop=drop)
    return LoadedModel(source=src, state=state, config=config, folder=src.config_dir, fingerprint=fp,
                       extra=extra)


def needs_untie(base: LoadedModel, experts: Sequence[str | os.PathLike]) -> bool:
    """True when ``base`` ties its output layer to the input embeddings and a LoRA expert
    trains one side of the pair on its own (``modules_to_save`` of ``lm_head`` or
    ``embed_tokens``, or a LoRA on either). peft keeps the two apart in such an adapter
    (the wrapped copy is trained, the other side keeps the base weight), so merging it into
    a tied model would lose one side: the weight space must then hold both tensors and the
    export untie them (``tie_word_embeddings=False``)."""
    tied = tied_weight_names(base.config)
    if not tied:
        return False
    modules = {n.rsplit(".", 1)[0] for pair in tied.items() for n in pair}
    for spec in experts:
        try:
            src = resolve_source(spec)
        except (FileNotFoundError, ModelLoadError):
            continue
        if src.kind != "lora":
            continue
        for k in LazyStateDict(src.files):
            name = k[len("base_model.model."):] if k.startswith("base_model.model.") else k
            if any(name == m or name.startswith(m + ".") for m in modules):
                return True
    return False


def lora_task_vector_via_peft(adapter_dir: Path, base: LoadedModel) -> dict[str, torch.Tensor]:
    """Fallback: merge the adapter with peft's ``merge_and_unload`` in fp32 and subtract
    the base. Needs the whole base model in RAM (fp32) once; returns a dense fp32 task
    vector over the base's checkpoint names."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if base.folder is None:
        raise ModelLoadError("merging this LoRA adapter needs peft and a base HF folder with config")
    with torch.random.fork_rng(devices=[]):
        model = AutoModelForCausalLM.from_pretrained(str(base.folder), dtype=torch.float32)
        merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    sd = merged.state_dict()
    out = {}
    for k in base.state:
        if k not in sd:
            raise ModelLoadError(f"peft merge of {adapter_dir}: merged model lacks {k!r}")
        out[k] = sd[k].float() - base.state[k].float()
    return out


# --- experts -------------------------------------------------------------------------

@dataclass
class Expert:
    """One expert as a task vector over the base.

    Attributes:
        spec: the user's string.
        kind: source kind (``lora`` or a full-model kind).
        task_vector: name -> fp32 tensor (lazy for full models and most LoRA adapters).
        fingerprint: cache key (source files + base fingerprint).
    """

    spec: str
    kind: str
    task_vector: Mapping[str, torch.Tensor]
    fingerprint: str


def load_expert(spec: str | os.PathLike, base: LoadedModel, *, cache_dir: Path | str,
                label: str | None = None, gguf_dtype: torch.dtype = torch.float32) -> Expert:
    """Open an expert and validate it against ``base`` before any tensor arithmetic.

    Raises:
        ModelLoadError: mismatching architecture / tensor names / shapes (first mismatching
            tensor named; tied embeddings and resized vocabularies explained), corrupt files,
            a weight (or LoRA factor) that is NaN, inf or beyond :data:`MAX_ABS_WEIGHT`
            (:func:`check_finite`).
        FileNotFoundError: missing path.
    """
    label = label or f"expert {spec}"
    src = resolve_source(spec)
    if src.kind == "lora":
        declared = json.loads((src.config_dir / "adapter_config.json").read_text()).get(
            "base_model_name_or_path")
        tv = LoraTaskVector(src.config_dir, base.state)
        check_finite(tv.raw, label)
        fp = hashlib.blake2b(f"{src.fingerprint()}|{base.fingerprint}".encode(), digest_size=12).hexdigest()
        if tv.needs_peft:
            tv = lora_task_vector_via_peft(src.config_dir, base)
            check_finite(tv, label)
        e = Expert(spec=str(spec), kind="lora", task_vector=tv, fingerprint=fp)
        e.declared_base = declared  # type: ignore[attr-defined]
        return e
    m = load_model(src, cache_dir=cache_dir, gguf_dtype=gguf_dtype, untie=bool(base.extra.get("untied")))
    check_config(base.config, m.config, label)
    check_tensors(base.state, m.state, label, base_cfg=base.config)
    check_float(m.state, label)
    check_finite(m.state, label)
    fp = hashlib.blake2b(f"{m.fingerprint}|{base.fingerprint}".encode(), digest_size=12).hexdigest()
    return Expert(spec=str(spec), kind=m.source.kind, task_vector=DiffTaskVector(m.state, base.state),
                  fingerprint=fp)

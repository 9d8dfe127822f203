"""Loading the base model and the experts, in every common form, and validating them.

Accepted sources (``spec`` strings, resolved by :func:`resolve_source`):

========================  ==================================================================
``/path/to/hf_folder``    ``config.json`` + ``model.safetensors`` / sharded
                          ``model.safetensors.index.json`` / ``pytorch_model.bin`` (+ index)
``/path/model.safetensors``  a bare safetensors checkpoint (config taken from its folder if any)
``/path/model.bin|.pt``   a PyTorch state-dict checkpoint (``torch.load(weights_only=True, mmap=True)``)
``/path/model.gguf``      a GGUF file, dequantised once through ``transformers`` into a plain HF
                          folder under ``cache_dir/gguf/`` (see :mod:`cycleqd.models.gguf`)
``/path/lora_adapter``    a peft LoRA adapter folder (``adapter_config.json``); experts only:
                          turned into a dense task vector ``scaling * B @ A`` per target
``org/name[@revision]``   a Hugging Face hub id (``huggingface_hub.snapshot_download``, then
                          one of the above; needs network -- not exercised by the tests)
========================  ==================================================================

Tensor names are the *checkpoint* names (what ``save_pretrained`` writes and what vLLM's
``load_weights`` takes); a tied ``lm_head.weight`` is dropped when the config ties it to
the input embeddings, so each weight appears once.

Memory behaviour (honest): safetensors files are memory-mapped and read one tensor at a
time (``safe_open``); ``.bin`` files are ``torch.load(mmap=True)`` -- zip-format files are
mapped lazily, legacy (pre-1.6) pickles are read whole. Task vectors of experts are
computed per tensor in fp32 (:class:`DiffTaskVector`, :class:`LoraTaskVector`), so a
streaming merge (:func:`cycleqd.engine.export.stream_merge`) holds only a few tensors'
worth of fp32 at once plus the OS page cache. GGUF conversion materialises the whole
dequantised model once. :func:`cycleqd.models.build.build_weight_space` decides whether to
keep base and task vectors resident in RAM (fast, small models) or lazy (8B models).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping, Sequence

import torch

from cycleqd.errors import CycleQDError

SourceKind = Literal["hf_dir", "safetensors", "bin", "gguf", "lora"]

_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja",
                    "chat_template.json", "added_tokens.json")


class ModelLoadError(CycleQDError, ValueError):
    """A model source cannot be read or does not match the base (message says why)."""


@dataclass
class ResolvedSource:
    """Where a model's weights and config live.

    Attributes:
        spec: the user's string.
        kind: ``hf_dir`` | ``safetensors`` | ``bin`` | ``gguf`` | ``lora``.
        files: weight files (safetensors/bin shards; the gguf file; the adapter file).
        config_dir: folder holding ``config.json`` (``None`` for a bare checkpoint file).
        hub_id: the hub repo id if it came from the hub.
    """

    spec: str
    kind: SourceKind
    files: list[Path]
    config_dir: Path | None
    hub_id: str | None = None

    def fingerprint(self) -> str:
        """Cheap identity of the weight files (no read of their content): resolved path,
        size, mtime, device, inode and ctime of each. Every way of putting other bytes at
        the same path changes the inode (``cp -p``, ``rsync -a``, ``tar x`` write a new
        file) or the ctime (an in-place write; users cannot set ctime, unlike the mtime
        that those tools restore), so a retrained expert never reuses the old one's SVD
        basis or conversion. A metadata-only change (chmod) changes it too: a recompute,
        never a stale reuse."""
        h = hashlib.blake2b(digest_size=12)
        h.update(self.kind.encode())
        for f in self.files:
            st = f.stat()
            h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_dev}|{st.st_ino}|"
                     f"{st.st_ctime_ns}".encode())
        return h.hexdigest()


def _looks_like_hub_id(spec: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+(@[\w.\-/]+)?", spec)) and not spec.startswith(".")


def _folder_weights(folder: Path) -> tuple[SourceKind, list[Path]] | None:
    for idx in _WEIGHT_INDEXES:
        p = folder / idx
        if p.is_file():
            try:
                wm = json.loads(p.read_text())["weight_map"]
            except Exception as e:
                raise ModelLoadError(f"{p}: not a valid weight index ({e})") from e
            files = [folder / f for f in dict.fromkeys(wm.values())]
            missing = [f for f in files if not f.is_file()]
            if missing:
                raise ModelLoadError(f"{p} lists shard {missing[0].name} which is missing")
            return ("safetensors" if idx.startswith("model.safetensors") else "bin"), files
    for name in _WEIGHT_FILES:
        if (folder / name).is_file():
            return ("safetensors" if name.endswith(".safetensors") else "bin"), [folder / name]
    st = sorted(folder.glob("*.safetensors"))
    if st:
        return "safetensors", st
    return None


def resolve_source(spec: str | os.PathLike, *, revision: str | None = None) -> ResolvedSource:
    """Classify a model spec (see the module table). Cheap: reads no tensors.

    Raises:
        FileNotFoundError: a local path that does not exist (and is not a hub id).
        ModelLoadError: a folder without recognisable weights, an ambiguous folder, a
            non-LoRA peft adapter.
    """
    s = str(spec)
    p = Path(s).expanduser()
    if p.exists():
        if p.is_file():
            suf = p.suffix.lower()
            cfg = p.parent if (p.parent / "config.json").is_file() else None
            if suf == ".safetensors":
                return ResolvedSource(s, "safetensors", [p], cfg)
            if suf in (".bin", ".pt", ".pth"):
                return ResolvedSource(s, "bin", [p], cfg)
            if suf == ".gguf":
                return ResolvedSource(s, "gguf", [p], None)
            if p.name == "adapter_config.json":
                return resolve_source(p.parent)
            raise ModelLoadError(f"{p}: unknown checkpoint type {suf!r} (expected .safetensors, "
                                 ".bin/.pt/.pth, .gguf, or an HF / peft folder)")
        if (p / "adapter_config.json").is_file():
            cfg = json.loads((p / "adapter_config.json").read_text())
            if cfg.get("peft_type", "LORA") != "LORA":
                raise ModelLoadError(f"{p}: peft adapter type {cfg.get('peft_type')!r} is not "
                                     "supported (only LoRA adapters)")
            files = [f for f in (p / "adapter_model.safetensors", p / "adapter_model.bin") if f.is_file()]
            if not files:
                raise ModelLoadError(f"{p}: adapter_config.json but no adapter_model.safetensors/.bin")
            return ResolvedSource(s, "lora", files[:1], p)
        found = _folder_weights(p)
        if found is not None:
            if not (p / "config.json").is_file():
                raise ModelLoadError(f"{p}: weights but no config.json")
            return ResolvedSource(s, "hf_dir", found[1], p)
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return ResolvedSource(s, "gguf", ggufs, None)
        if len(ggufs) > 1:
            raise ModelLoadError(f"{p}: several .gguf files ({[g.name for g in ggufs]}); name one")
        raise ModelLoadError(f"{p}: no model weights found (expected model.safetensors, "
                             "pytorch_model.bin, an index, a .gguf or adapter_config.json)")
    if _looks_like_hub_id(s) and not s.startswith(("/", "~")):
        return _resolve_hub(s, revision)
    raise FileNotFoundError(f"model source {s!r} does not exist (not a local path, not a hub id)")


def _resolve_hub(spec: str, revision: str | None) -> ResolvedSource:
    """Download (or reuse the HF cache of) a hub repo's weights, config and tokenizer."""
    from huggingface_hub import snapshot_download

    repo, _, rev = spec.partition("@")
    try:
        folder = snapshot_download(repo, revision=rev or revision, allow_patterns=[
            "*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"])
    except Exception as e:
        raise ModelLoadError(f"cannot download {spec!r} from the Hugging Face hub: {e}") from e
    r = resolve_source(folder)
    r.spec, r.hub_id = spec, repo
    return r


# --- lazy state dicts ----------------------------------------------------------------

class LazyStateDict(Mapping[str, torch.Tensor]):
    """Read-only name -> tensor mapping over checkpoint files; tensors are read on access,
    in their stored dtype (safetensors: memory-mapped; ``.bin``: ``torch.load(mmap=True)``).

    Args:
        files: safetensors or bin files (shards of one checkpoint).
        drop: names to hide (tied weights).
        aliases: ``{name: source}``: expose ``name`` (absent from the files) reading
            ``source`` -- a tied ``lm_head.weight`` shown as its own tensor (untied view).
    Raises:
        ModelLoadError: a corrupt or unreadable file (names the file).
    """

    def __init__(self, files: Sequence[Path], *, drop: Sequence[str] = (),
                 aliases: Mapping[str, str] | None = None):
        from safetensors import safe_open

        self.files = [Path(f) for f in files]
        self._alias: dict[str, str] = {}
        self._where: dict[str, Any] = {}
        self._bins: list[dict] = []
        for f in self.files:
            if f.suffix == ".safetensors":
                try:
                    h = safe_open(str(f), framework="pt")
                    keys = list(h.keys())
                except Exception as e:
                    raise ModelLoadError(f"corrupt or unreadable safetensors file {f}: {e}") from e
                for k in keys:
                    self._where[k] = h
            else:
                try:
                    sd = torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)
                except Exception:
                    try:  # legacy (non-zip) pickles cannot be mmapped
                        sd = torch.load(str(f), map_location="cpu", weights_only=True)
                    except Exception as e:
                        raise ModelLoadError(f"corrupt or unreadable PyTorch checkpoint {f}: {e}") from e
                if not isinstance(sd, Mapping):
                    raise ModelLoadError(f"{f}: expected a state dict, got {type(sd).__name__}")
                if "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
                    sd = sd["state_dict"]
                self._bins.append(sd)
                for k, v in sd.items():
                    if isinstance(v, torch.Tensor):
                        self._where[k] = sd
        for d in drop:
            self._where.pop(d, None)
        for name, source in (aliases or {}).items():
            if name not in self._where and source in self._where:
                self._where[name] = self._where[source]
                self._alias[name] = source

    def __getitem__(self, k: str) -> torch.Tensor:
        src = self._where[k]
        k = self._alias.get(k, k)
        if isinstance(src, dict):
            return src[k]
        try:
            return src.get_tensor(k)
        except Exception as e:
            raise ModelLoadError(f"cannot read tensor {k!r} from {self.files}: {e}") from e

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def shape(self, k: str) -> tuple[int, ...]:
        """Shape without reading the data (safetensors header / mmapped tensor)."""
        src, k = self._where[k], self._alias.get(k, k)
        if isinstance(src, dict):
            return tuple(src[k].shape)
        return tuple(src.get_slice(k).get_shape())

    def dtype(self, k: str) -> torch.dtype:
        src, k = self._where[k], self._alias.get(k, k)
        if isinstance(src, dict):
            return src[k].dtype
        return _ST_DTYPES[src.get_slice(k).get_dtype()]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: self.shape(k) for k in self}

    def nbytes(self) -> int:
        total = 0
        for k in self:
            n = 1
            for d in self.shape(k):
                n *= d
            total += n * torch.empty((), dtype=self.dtype(k)).element_size()
        return total


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
              "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
              "F8_E5M2": torch.float8_e5m2}


class DiffTaskVector(Mapping[str, torch.Tensor]):
    """Lazy task vector ``tau[k] = expert[k] - base[k]`` computed in fp32 on access.

    Non-float tensors (integer buffers) give zeros. Keys: the base's.
    """

    def __init__(self, expert: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor]):
        self.expert, self.base = expert, base

    def __getitem__(self, k):
        b = self.base[k]
        if not b.is_floating_point():
            return torch.zeros(b.shape, dtype=torch.float32)
        return self.expert[k].float() - b.float()

    def __iter__(self):
        return iter(self.base)

    def __len__(self):
        return len(self.base)


def tied_weight_names(config: Any) -> dict[str, str]:
    """Tied checkpoint names ``{tied_name: source_name}`` for a config (``{}`` if untied).

    Uses the model class' ``_tied_weights_keys`` (transformers 5) and falls back to
    ``lm_head.weight -> model.embed_tokens.weight``.
    """
    if config is None or not getattr(config, "tie_word_embeddings", False):
        return {}
    try:
        from transformers import AutoModelForCausalLM

        cls = AutoModelForCausalLM._model_mapping[type(config)]
        keys = getattr(cls, "_tied_weights_keys", None)
        if isinstance(keys, dict) and keys:
            return dict(keys)
    except Exception:
        pass
    return {"lm_head.weight": "model.embed_tokens.weight"}


# --- loaded models -------------------------------------------------------------------

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
        if not ((out / "config.json").is_file() and _folder_weights(out)):
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


# --- validation ----------------------------------------------------------------------

_ARCH_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "intermediate_size", "head_dim", "vocab_size",
                "tie_word_embeddings")


def _shape_of(state: Mapping[str, torch.Tensor], k: str) -> tuple[int, ...]:
    return state.shape(k) if hasattr(state, "shape") else tuple(state[k].shape)


def _embedding_like(name: str) -> bool:
    return any(s in name for s in ("embed_tokens", "lm_head", "wte", "word_embeddings", "embed_in",
                                   "embed_out", "output.weight", "tok_embeddings"))


def check_config(base_cfg: Any, exp_cfg: Any, label: str) -> None:
    """Compare architecture fields; raises :class:`ModelLoadError` naming the first difference."""
    if base_cfg is None or exp_cfg is None:
        return
    for f in _ARCH_FIELDS:
        a, b = getattr(base_cfg, f, None), getattr(exp_cfg, f, None)
        if f == "tie_word_embeddings":
            a, b = bool(a), bool(b)
        if a is None or b is None or a == b:
            continue
        if f == "vocab_size":
            raise ModelLoadError(
                f"{label}: vocabulary size {b} differs from the base's {a} -- the expert's "
                "embeddings were resized (tokens added with resize_token_embeddings?). Task "
                "vectors need identical shapes: merge experts that share the base's tokenizer, "
                "or resize the base the same way first.")
        if f == "tie_word_embeddings":
            raise ModelLoadError(
                f"{label}: tie_word_embeddings={b} but the base has {a}. One of them has a "
                "separate lm_head.weight while the other shares the input embedding matrix, so "
                "their tensors do not correspond; re-save the expert with the base's tying.")
        raise ModelLoadError(f"{label}: architecture differs from the base: {f} = {b!r} "
                             f"(base: {a!r})")


def check_tensors(base: Mapping[str, torch.Tensor], expert: Mapping[str, torch.Tensor], label: str,
                  *, base_cfg: Any = None) -> None:
    """Same tensor names and shapes; raises :class:`ModelLoadError` naming the first
    mismatching tensor (base order), with an explanation for tied / resized embeddings."""
    ek = set(expert)
    for k in base:
        if k not in ek:
            raise ModelLoadError(f"{label}: tensor {k!r} of the base is missing from the expert "
                                 f"({len([x for x in base if x not in ek])} missing in all)")
        bs, es = _shape_of(base, k), _shape_of(expert, k)
        if bs != es:
            if _embedding_like(k) and len(bs) == 2 and len(es) == 2 and bs[1] == es[1]:
                raise ModelLoadError(
                    f"{label}: tensor {k!r} has shape {es}, the base {bs}: the vocabulary was "
                    f"resized from {bs[0]} to {es[0]} rows (added tokens / "
                    "resize_token_embeddings / padding to a multiple). Task vectors need identical "
                    "shapes: use experts fine-tuned from this exact base and tokenizer.")
            raise ModelLoadError(f"{label}: tensor {k!r} has shape {es}, the base has {bs}")
    extra = [k for k in expert if k not in set(base)]
    if extra:
        k = extra[0]
        if base_cfg is not None and k in tied_weight_names(base_cfg):
            raise ModelLoadError(
                f"{label}: has its own {k!r} but the base ties it to the input embeddings "
                "(tie_word_embeddings=True); the expert's untied output layer would be lost. "
                "Re-save the expert with tied embeddings, or untie the base first.")
        if "lm_head" in k:
            raise ModelLoadError(
                f"{label}: has tensor {k!r} which the base lacks -- the base's checkpoint ties "
                "lm_head to embed_tokens while the expert unties it (tie_word_embeddings differs).")
        raise ModelLoadError(f"{label}: has tensor {k!r} which the base lacks "
                             f"({len(extra)} extra in all)")


def check_float(base: Mapping[str, torch.Tensor], label: str = "base") -> None:
    """Reject quantised checkpoints (int/fp8 weights) with a clear message."""
    for k in base:
        dt = base.dtype(k) if hasattr(base, "dtype") else base[k].dtype
        if dt in (torch.int8, torch.uint8, torch.float8_e4m3fn, torch.float8_e5m2) and k.endswith("weight"):
            raise ModelLoadError(f"{label}: tensor {k!r} is stored as {dt} (a quantised "
                                 "checkpoint); task-vector arithmetic needs float weights")


#: Largest |weight| a model may hold: the float16 maximum (65504). A weight above it becomes
#: inf when the model is served in float16 (``backend.dtype: float16``); sums of such weights
#: in crossovers and their squares in the SVD overflow fp32 long before 3e38 does; and no
#: trained LLM weight comes near it (healthy weights are O(1), outliers O(10^2)). So a value
#: like 3e38, finite in fp32 and bf16, is treated as corruption just like NaN and inf.
MAX_ABS_WEIGHT = float(torch.finfo(torch.float16).max)

def non_finite_description(t: torch.Tensor, max_abs: float = MAX_ABS_WEIGHT) -> str | None:
    """None when every entry of a float tensor is finite with ``|w| <= max_abs``; else a
    short description ("2 NaN, 1 inf, max |w| 3e+38 at index 17"). Non-float tensors: None.
    One ``torch.aminmax`` pass without a copy (a bad tensor is then examined in fp32 to
    describe it)."""
    if not t.is_floating_point() or t.numel() == 0:
        return None
    flat = t.detach().reshape(-1)
    lo, hi = torch.aminmax(flat)  # one pass, no copy; NaN propagates into both
    if bool(hi <= max_abs) and bool(lo >= -max_abs):
        return None
    x = flat.float()
    n_nan = int(torch.isnan(x).sum())
    n_inf = int(torch.isinf(x).sum())
    big = torch.isfinite(x) & (x.abs() > max_abs)
    parts = []
    if n_nan:
        parts.append(f"{n_nan} NaN")
    if n_inf:
        parts.append(f"{n_inf} inf")
    if bool(big.any()):
        parts.append(f"{int(big.sum())} beyond +-{max_abs:g} (max |w| {float(x[big].abs().max()):.3g})")
    first = int(torch.nonzero(~(x.abs() <= max_abs))[0, 0])
    return ", ".join(parts) + f"; first at flat index {first}"


def check_finite(state: Mapping[str, torch.Tensor], label: str, *, max_abs: float = MAX_ABS_WEIGHT) -> None:
    """Every float weight of ``state`` is finite with ``|w| <= max_abs`` (default
    :data:`MAX_ABS_WEIGHT`, the float16 maximum). Reads every tensor once.

    Raises:
        ModelLoadError: one line naming the model (``label``), the tensor and what is wrong,
            e.g. ``expert 1 (/m/coding): tensor 'model.layers.0.mlp.up_proj.weight' is not
            finite: 1 NaN; first at flat index 5``.
    """
    for k in state:
        desc = non_finite_description(state[k], max_abs)
        if desc is not None:
            raise ModelLoadError(f"{label}: tensor {k!r} is not finite: {desc} (weights must be finite "
                                 f"with |w| <= {max_abs:g}, the float16 range); the checkpoint is "
                                 "corrupt or diverged -- re-export or retrain it")


# --- LoRA adapters -------------------------------------------------------------------

class LoraTaskVector(Mapping[str, torch.Tensor]):
    """Dense task vector of a peft LoRA adapter over ``base``: fp32, computed per tensor.

    For a LoRA'd linear layer ``tau[W] = scaling * B @ A`` (``B`` (out, r), ``A`` (r, in);
    transposed when ``fan_in_fan_out``), ``scaling = alpha / r`` (``alpha / sqrt(r)`` with
    rsLoRA; ``alpha_pattern`` honoured, ``r`` read from the tensors); for an embedding
    ``tau = scaling * (B @ A).T``; ``lora_B.bias`` (``lora_bias``) adds to the bias;
    ``modules_to_save`` and saved ``base_layer`` weights contribute ``saved - base``; all
    other tensors are 0. This equals ``merge_and_unload()`` minus the base (tested) without
    ever materialising the merged model.

    Adapters this path does not cover (DoRA, ``trainable_token_indices``, unknown key
    layouts) are merged with peft's own ``merge_and_unload`` in fp32 instead
    (:func:`lora_task_vector_via_peft`, whole model in RAM).

    Raises:
        ModelLoadError: adapter tensors that do not fit the base (names the tensor).
    """

    def __init__(self, adapter_dir: Path, base: Mapping[str, torch.Tensor]):
        from peft.utils.other import get_pattern_key

        self.adapter_dir = Path(adapter_dir)
        self.base = base
        self.cfg = json.loads((self.adapter_dir / "adapter_config.json").read_text())
        st = self.adapter_dir / "adapter_model.safetensors"
        files = [st] if st.is_file() else [self.adapter_dir / "adapter_model.bin"]
        self.raw = LazyStateDict(files)
        self._get_pattern_key = get_pattern_key
        self.modules: dict[str, dict[str, str]] = {}   # base tensor name -> role -> adapter key
        self.full: dict[str, str] = {}                 # base tensor name -> adapter key (full weight)
        unknown = []
        base_keys = set(base)
        for k in self.raw:
            name = k[len("base_model.model."):] if k.startswith("base_model.model.") else k
            m = re.fullmatch(r"(.+)\.(lora_A|lora_B)(?:\.[^.]+)?\.(weight|bias)", name)
            e = re.fullmatch(r"(.+)\.(lora_embedding_A|lora_embedding_B)(?:\.[^.]+)?", name)
            if m:
                mod, role, kind = m.groups()
                if kind == "bias":
                    self.modules.setdefault(f"{mod}.bias", {})["bias_B"] = k
                else:
                    self.modules.setdefault(f"{mod}.weight", {})[role] = k
                continue
            if e:
                mod, role = e.groups()
                self.modules.setdefault(f"{mod}.weight", {})[role] = k
                continue
            name = re.sub(r"\.base_layer\.", ".", name)
            name = re.sub(r"\.modules_to_save\.[^.]+\.", ".", name)
            name = re.sub(r"\.original_module\.", ".", name)
            if name in base_keys:
                self.full[name] = k
            else:
                unknown.append(k)
        self.unknown = unknown
        for target, roles in self.modules.items():
            if target not in base_keys and target.endswith(".bias"):
                raise ModelLoadError(f"LoRA adapter {self.adapter_dir}: trains a bias (lora_bias) "
                                     f"for {target[:-5]!r}, which has no bias in the base model; "
                                     "that cannot be expressed as a task vector over the base")
            if target not in base_keys:
                raise ModelLoadError(f"LoRA adapter {self.adapter_dir}: targets {target!r}, which "
                                     "the base model does not have (adapter for a different model?)")
        self.needs_peft = bool(unknown) or bool(self.cfg.get("use_dora")) or bool(
            self.cfg.get("trainable_token_indices"))
        self.check_shapes()

    def scaling(self, target: str, r: int) -> float:
        mod = target.rsplit(".", 1)[0]
        alpha = self.cfg.get("lora_alpha", 8)
        pat = self.cfg.get("alpha_pattern") or {}
        if pat:
            key = self._get_pattern_key(list(pat.keys()), mod)
            alpha = pat.get(key, alpha)
        return alpha / (r ** 0.5) if self.cfg.get("use_rslora") else alpha / r

    def check_shapes(self) -> None:
        fan = bool(self.cfg.get("fan_in_fan_out"))
        for target, roles in self.modules.items():
            bshape = _shape_of(self.base, target)
            if "lora_A" in roles and "lora_B" in roles:
                a, b = self.raw.shape(roles["lora_A"]), self.raw.shape(roles["lora_B"])
                out = (b[0], a[1]) if not fan else (a[1], b[0])
                if out != bshape:
                    raise ModelLoadError(f"LoRA adapter {self.adapter_dir}: delta for {target!r} "
                                         f"has shape {out}, the base tensor {bshape}")
            elif "lora_embedding_A" in roles and "lora_embedding_B" in roles:
                a, b = self.raw.shape(roles["lora_embedding_A"]), self.raw.shape(roles["lora_embedding_B"])
                out = (a[1], b[0])
                if out != bshape:
                    raise ModelLoadError(
                        f"LoRA adapter {self.adapter_dir}: embedding delta for {target!r} has "
                        f"shape {out}, the base {bshape}"
                        + (" (vocabulary resized)" if out[1] == bshape[1] else ""))
            elif "bias_B" not in roles:
                raise ModelLoadError(f"LoRA adapter {self.adapter_dir}: {target!r} has "
                                     f"{sorted(roles)} but not both A and B")
        for target, k in self.full.items():
            s, bs = self.raw.shape(k), _shape_of(self.base, target)
            if s != bs:
                extra = (f" -- the vocabulary was resized from {bs[0]} to {s[0]} rows"
                         if _embedding_like(target) and len(s) == 2 and s[1] == bs[1] else "")
                raise ModelLoadError(f"LoRA adapter {self.adapter_dir}: saved {target!r} has shape "
                                     f"{s}, the base {bs}{extra}")

    def __getitem__(self, k: str) -> torch.Tensor:
        b = self.base[k]
        tau = None
        if k in self.full:
            tau = self.raw[self.full[k]].float() - b.float()
        roles = self.modules.get(k)
        if roles:
            delta = None
            if "lora_A" in roles:
                A, B = self.raw[roles["lora_A"]].float(), self.raw[roles["lora_B"]].float()
                delta = (B @ A) * self.scaling(k, A.shape[0])
                if self.cfg.get("fan_in_fan_out"):
                    delta = delta.T
            elif "lora_embedding_A" in roles:
                A, B = self.raw[roles["lora_embedding_A"]].float(), self.raw[roles["lora_embedding_B"]].float()
                delta = (B @ A).T * self.scaling(k, A.shape[0])
            elif "bias_B" in roles:
                w_roles = self.modules.get(k[: -len("bias")] + "weight", {})
                r = self.raw.shape(w_roles["lora_A"])[0] if "lora_A" in w_roles else 1
                delta = self.raw[roles["bias_B"]].float() * self.scaling(k, r)
            tau = delta if tau is None else tau + delta
        if tau is None:
            tau = torch.zeros(b.shape, dtype=torch.float32)
        return tau.contiguous()

    def __iter__(self):
        return iter(self.base)

    def __len__(self):
        return len(self.base)


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


def resident(mapping: Mapping[str, torch.Tensor], *, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Read a lazy mapping fully into RAM (optionally casting), preserving key order."""
    return {k: (mapping[k].to(dtype) if dtype is not None else mapping[k].clone()) for k in mapping}


def tokenizer_files(folder: Path) -> list[Path]:
    """Tokenizer files present in an HF folder."""
    return [folder / f for f in _TOKENIZER_FILES if (folder / f).is_file()]

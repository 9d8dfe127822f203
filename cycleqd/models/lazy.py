"""Lazy views of weights: checkpoint files as a name -> tensor mapping read one tensor at
a time (:class:`LazyStateDict`), and an expert's task vector over the base computed per
tensor in fp32 (:class:`DiffTaskVector` for full models, :class:`LoraTaskVector` for peft
LoRA adapters)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch

from .sources import ModelLoadError
from .validate import embedding_like, shape_of


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
    (:func:`cycleqd.models.loading.lora_task_vector_via_peft`, whole model in RAM).

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
            bshape = shape_of(self.base, target)
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
            s, bs = self.raw.shape(k), shape_of(self.base, target)
            if s != bs:
                extra = (f" -- the vocabulary was resized from {bs[0]} to {s[0]} rows"
                         if embedding_like(target) and len(s) == 2 and s[1] == bs[1] else "")
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


def resident(mapping: Mapping[str, torch.Tensor], *, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Read a lazy mapping fully into RAM (optionally casting), preserving key order."""
    return {k: (mapping[k].to(dtype) if dtype is not None else mapping[k].clone()) for k in mapping}

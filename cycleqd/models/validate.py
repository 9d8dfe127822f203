"""Validating models before any tensor arithmetic: an expert's architecture, tensor
names and shapes against the base's (with explanations for tied and resized embeddings),
float-only weights, and finite weights within the float16 range."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from .sources import ModelLoadError

_ARCH_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "intermediate_size", "head_dim", "vocab_size",
                "tie_word_embeddings")


def shape_of(state: Mapping[str, torch.Tensor], k: str) -> tuple[int, ...]:
    """Shape of ``state[k]``, from the header when ``state`` is lazy (no tensor read)."""
    return state.shape(k) if hasattr(state, "shape") else tuple(state[k].shape)


def embedding_like(name: str) -> bool:
    """Whether a tensor name is an input or output embedding (for resize explanations)."""
    return any(s in name for s in ("embed_tokens", "lm_head", "wte", "word_embeddings", "embed_in",
                                   "embed_out", "output.weight", "tok_embeddings"))


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
        bs, es = shape_of(base, k), shape_of(expert, k)
        if bs != es:
            if embedding_like(k) and len(bs) == 2 and len(es) == 2 and bs[1] == es[1]:
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

"""LoRA supervised fine-tuning of a causal LM on chat conversations (loss on assistant tokens).

This is how the demo's experts are made (the paper's experts are full fine-tunes of
Llama-3-8B-Instruct; on a 2-core CPU a LoRA of SmolLM2-135M is what fits). One training
example is a conversation -- ``[{"role": "system"|"user"|"assistant", "content": str}, ...]``
-- rendered with the model's own chat template exactly as the evaluators render prompts
(:class:`cycleqd.inference.hf.HFBackend` uses ``apply_chat_template``), so the expert learns
the very token sequence it will see at evaluation time. Only the tokens of assistant turns
(their content and the end-of-turn token that follows, so the model learns to stop) carry
a loss; system, user and tool-observation turns are context.

The loop is a plain torch loop (AdamW, linear warm-up then linear decay) rather than the
``transformers`` Trainer: on 2 CPU cores the Trainer's per-step overhead (accelerate,
logging callbacks, dataloader workers) is measurable against 5-10 s steps, and the plain
loop makes every random draw come from one explicit seeded generator. A tqdm bar shows the
running loss and the ETA.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from cycleqd._io import atomic_directory

Message = Mapping[str, str]
Conversation = Sequence[Message]

#: Linear layers of Llama-family decoders (SmolLM2, Llama-3, Qwen2): "all linear" LoRA.
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
IGNORE = -100


@dataclass(frozen=True)
class LoraRecipe:
    """Hyper-parameters of one LoRA SFT run (part of the expert cache key).

    Attributes:
        rank: LoRA rank r.
        alpha: LoRA alpha (scaling = alpha / r).
        dropout: LoRA dropout on the adapter input.
        target_modules: module names that get adapters (default: all linear layers).
        steps: optimiser steps.
        batch_size: conversations per step.
        lr: peak learning rate (AdamW).
        warmup_steps: linear warm-up steps, then linear decay to 10 % of ``lr``.
        weight_decay: AdamW weight decay.
        max_length: tokens per conversation; longer ones are cut at the right (their
            assistant tokens past the cut get no loss; a conversation left with none is dropped).
        seed: seeds the LoRA init and the batch order (explicit generators).
        autocast: ``"none"`` (fp32 throughout), ``"bfloat16"`` (forward and backward
            under ``torch.autocast("cpu", bfloat16)``; LoRA weights, gradients and AdamW
            state stay fp32) or ``"auto"`` (``bfloat16`` where the CPU computes bf16
            natively -- oneDNN's AVX512-BF16/AMX check -- else ``none``; resolved when
            the recipe is made, so the cache key names what actually ran). Measured on a
            2-core AVX512-BF16 EPYC, OS trajectories (4 x ~470 tokens): 7.8 s -> 5.5 s per step.
    """

    rank: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ALL_LINEAR
    steps: int = 24
    batch_size: int = 4
    lr: float = 5e-4
    warmup_steps: int = 2
    weight_decay: float = 0.0
    max_length: int = 384
    seed: int = 0
    autocast: str = "none"

    def __post_init__(self) -> None:
        if self.autocast not in ("none", "bfloat16", "auto"):
            raise ValueError(f"LoraRecipe.autocast must be 'none', 'bfloat16' or 'auto', got {self.autocast!r}")
        if self.autocast == "auto":
            object.__setattr__(self, "autocast", "bfloat16" if cpu_bf16_native() else "none")
        for name in ("rank", "alpha", "steps", "batch_size", "max_length"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"LoraRecipe.{name} must be a positive int, got {v!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"LoraRecipe.lr must be > 0, got {self.lr!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraRecipe.dropout must be in [0, 1), got {self.dropout!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"LoraRecipe.warmup_steps must be >= 0, got {self.warmup_steps!r}")
        if not self.target_modules:
            raise ValueError("LoraRecipe.target_modules must name at least one module")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["target_modules"] = list(self.target_modules)
        if d["autocast"] == "none":  # the fp32 recipe keeps the cache key it had before the field
            del d["autocast"]
        return d

    def replace(self, **kw: Any) -> "LoraRecipe":
        d = asdict(self)
        d.update(kw)
        d["target_modules"] = tuple(d["target_modules"])
        return LoraRecipe(**d)


def cpu_bf16_native() -> bool:
    """True when oneDNN reports native bf16 compute on this CPU (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


# ------------------------------------------------------------------------- tokenisation
def _render(tokenizer: Any, messages: Sequence[Message], *, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template([dict(m) for m in messages], tokenize=False,
                                         add_generation_prompt=generation_prompt)


def assistant_spans(tokenizer: Any, messages: Conversation) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans that carry a loss.

    Each assistant turn's span runs from the first character of its content to the end of
    the end-of-turn token that closes it (``<|im_end|>`` for ChatML), found by rendering the
    conversation's prefixes with the same chat template.

    Returns:
        ``(text, [(start, end), ...])`` with character offsets into ``text``.
    Raises:
        ValueError: a conversation with no assistant turn, a bad role, or a chat template
            that does not render prefixes as prefixes of the whole.
    """
    roles = [m.get("role") for m in messages]
    if "assistant" not in roles:
        raise ValueError("training conversation has no assistant turn")
    bad = [r for r in roles if r not in ("system", "user", "assistant")]
    if bad:
        raise ValueError(f"training conversation has unknown role(s) {bad}")
    text = _render(tokenizer, messages, generation_prompt=False)
    eos = tokenizer.eos_token or ""
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = _render(tokenizer, messages[:i], generation_prompt=True)
        if not text.startswith(prefix):
            raise ValueError("the chat template does not render a conversation's prefix as a prefix "
                             "of the whole conversation; cannot locate assistant turns")
        start = len(prefix)
        content = m["content"]
        if text[start:start + len(content)] != content:
            raise ValueError(f"assistant turn {i} is not rendered verbatim by the chat template")
        end = start + len(content)
        if eos and text.startswith(eos, end):
            end += len(eos)
        spans.append((start, end))
    return text, spans


def encode_conversation(tokenizer: Any, messages: Conversation, max_length: int
                        ) -> tuple[list[int], list[int]] | None:
    """Token ids and labels of one conversation.

    Returns:
        ``(input_ids, labels)``, both ``len <= max_length``; ``labels[t] = input_ids[t]`` on
        assistant tokens (see :func:`assistant_spans`), :data:`IGNORE` elsewhere. ``None`` if
        no assistant token survives the cut at ``max_length``.
    """
    text, spans = assistant_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [IGNORE] * len(ids)
    for t, (a, b) in enumerate(enc["offset_mapping"]):
        if b <= a:
            continue
        if any(s <= a and b <= e for s, e in spans):
            labels[t] = ids[t]
    ids, labels = ids[:max_length], labels[:max_length]
    if all(x == IGNORE for x in labels):
        return None
    return ids, labels


def conversations_digest(conversations: Sequence[Conversation]) -> str:
    """Content hash of a training set (part of the expert cache key)."""
    h = hashlib.sha256()
    for c in conversations:
        h.update(json.dumps([[m["role"], m["content"]] for m in c], ensure_ascii=False).encode())
        h.update(b"\x00")
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- training
@dataclass
class TrainReport:
    """What a training run did: per-step losses (mean token cross-entropy, nats), tokens
    seen, wall seconds, examples used / dropped (too long)."""

    losses: list[float] = field(default_factory=list)
    tokens: int = 0
    loss_tokens: int = 0
    wall_s: float = 0.0
    examples: int = 0
    dropped: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _batches(n: int, batch_size: int, steps: int, rng: np.random.Generator) -> list[list[int]]:
    """``steps`` batches of indices: seeded epoch-wise permutations, each batch sorted by index."""
    order: list[int] = []
    while len(order) < steps * batch_size:
        order.extend(rng.permutation(n).tolist())
    return [order[s * batch_size:(s + 1) * batch_size] for s in range(steps)]


def _collate(items: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(i) for i, _ in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    lab = torch.full((len(items), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for r, (i, l) in enumerate(items):  # right padding (training: no generation)
        ids[r, :len(i)] = torch.tensor(i)
        lab[r, :len(l)] = torch.tensor(l)
        mask[r, :len(i)] = 1
    return {"input_ids": ids, "labels": lab, "attention_mask": mask}


def causal_lm_loss(model: Any, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over the tokens whose label is not ``IGNORE``.

    Same value as ``model(**batch).loss`` (the ``transformers`` causal-LM loss: labels
    shifted left by one, mean over kept tokens), but the output projection runs only at the
    kept positions: with loss on assistant tokens only (~12 % of an agent trajectory) that
    skips most of the ``[B, T, vocab]`` logits (49k-word vocabulary: 470 MB fp32 for
    4 x 600 tokens) and their backward -- measured 11.8 s -> 7.8 s per step, same loss.
    Models whose head does more than a linear map (logit soft-capping) take the plain path.

    Args:
        model: a causal LM (optionally peft-wrapped) with ``get_decoder`` and
            ``get_output_embeddings``.
        batch: ``input_ids`` / ``attention_mask`` / ``labels``, int64 ``[B, T]``.
    Returns:
        A scalar fp32 tensor.
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = inner.get_output_embeddings()
    cfg = inner.config
    if head is None or getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
        return model(**batch).loss
    hidden = inner.get_decoder()(input_ids=batch["input_ids"],
                                 attention_mask=batch["attention_mask"]).last_hidden_state
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE
    logits = head(hidden[:, :-1][keep])
    return torch.nn.functional.cross_entropy(logits.float(), labels[keep])


def train_lora(base_dir: str | Path, conversations: Sequence[Conversation], recipe: LoraRecipe,
               out_dir: str | Path, *, progress: bool = True, desc: str = "LoRA SFT",
               metadata: Mapping[str, Any] | None = None) -> TrainReport:
    """Fine-tune a LoRA adapter on ``conversations`` and save it as a peft adapter folder.

    Args:
        base_dir: HF folder of the base model (config, weights, tokenizer with a chat template).
        conversations: training conversations (see module doc); loss on assistant turns only.
        recipe: hyper-parameters.
        out_dir: adapter folder to write (``adapter_config.json``, ``adapter_model.safetensors``,
            ``train_report.json``). Written to a temporary sibling and renamed, so a killed run
            never leaves a half-written adapter that looks finished.
        progress: show a tqdm bar (loss, ETA).
        metadata: extra JSON stored in ``train_report.json``.
    Returns:
        The :class:`TrainReport`.
    Raises:
        ValueError: no usable conversation (empty, or all cut away by ``max_length``).
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir, out_dir = Path(base_dir), Path(out_dir)
    tok = AutoTokenizer.from_pretrained(str(base_dir))
    encoded = []
    for c in conversations:
        e = encode_conversation(tok, c, recipe.max_length)
        if e is not None:
            encoded.append(e)
    report = TrainReport(examples=len(encoded), dropped=len(conversations) - len(encoded))
    if not encoded:
        raise ValueError(f"no usable training conversation ({len(conversations)} given, all empty "
                         f"or cut away by max_length={recipe.max_length})")
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    with torch.random.fork_rng(devices=[]):  # peft's LoRA init uses the global RNG: isolate it
        torch.manual_seed(recipe.seed)
        model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
        model.config.use_cache = False
        lcfg = LoraConfig(r=recipe.rank, lora_alpha=recipe.alpha, lora_dropout=recipe.dropout,
                          target_modules=list(recipe.target_modules), bias="none",
                          task_type="CAUSAL_LM")
        model = get_peft_model(model, lcfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)

    def lr_at(step: int) -> float:  # step: 0-based
        if step < recipe.warmup_steps:
            return recipe.lr * (step + 1) / (recipe.warmup_steps + 1)
        frac = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
        return recipe.lr * (1.0 - 0.9 * frac)

    rng = np.random.default_rng(recipe.seed)
    batches = _batches(len(encoded), recipe.batch_size, recipe.steps, rng)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=recipe.steps, desc=desc, unit="step", dynamic_ncols=True, disable=None)  # no \r lines in log files
    t0 = time.perf_counter()
    ema = None
    try:
        for step, idx in enumerate(batches):
            batch = _collate([encoded[i] for i in idx], pad_id)
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=recipe.autocast == "bfloat16"):
                loss = causal_lm_loss(model, batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{desc}: loss is {loss.item()} at step {step}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            lv = float(loss.detach())
            report.losses.append(round(lv, 5))
            report.tokens += int(batch["attention_mask"].sum())
            report.loss_tokens += int((batch["labels"] != IGNORE).sum())
            ema = lv if ema is None else 0.8 * ema + 0.2 * lv
            if bar is not None:
                bar.set_postfix(loss=f"{lv:.3f}", avg=f"{ema:.3f}", refresh=False)
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    report.wall_s = round(time.perf_counter() - t0, 2)

    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(str(tmp))
        cfg_path = tmp / "adapter_config.json"
        acfg = json.loads(cfg_path.read_text())
        acfg["base_model_name_or_path"] = str(base_dir)
        cfg_path.write_text(json.dumps(acfg, indent=2))
        (tmp / "train_report.json").write_text(json.dumps(
            {"recipe": recipe.to_json(), "report": report.to_json(), **dict(metadata or {})}, indent=1))
    return report


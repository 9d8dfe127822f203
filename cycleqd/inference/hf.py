"""Hugging Face ``transformers`` generation backend: batched, left-padded, KV-cached greedy.

How a call to :meth:`HFBackend.generate` runs:

1. every conversation is rendered with the tokenizer's chat template
   (``add_generation_prompt=True``) and tokenised without extra special tokens; a raw prompt
   string is tokenised as is, with the tokenizer's default special tokens (as vLLM does); a
   ``response_prefix`` is appended to the prompt text before tokenising;
2. prompts are sorted by token length (longest first) and queued;
3. continuous batching (``engine="evict"``): up to ``batch_size`` rows decode together, greedily,
   one token per step, with a KV cache that appends in place
   (:class:`~cycleqd.inference._kvcache.GrowingLayer`; ``DynamicCache``'s per-token ``torch.cat``
   was half of a decode step). A row that ends (EOS, ``max_new_tokens``, or a stop string in its
   text) is evicted from the batch and the cache at once; when a quarter of the slots are free,
   the next queued prompts are prefilled (left-padded, attention mask zero on the padding,
   position ids counted from each row's first real token, logits for the last position only;
   in groups of at most ``prefill_tokens`` padded tokens) and joined to the running batch, so
   the batch stays full and one long reply does not keep the others waiting
   (``model.generate`` keeps finished rows until the longest reply of its batch ends; coding
   replies range from 20 to max_new_tokens tokens). When all prompts of the call share a
   token prefix of at least ``min_shared_prefix`` tokens (a skill's system prompt and
   instructions: 328 of ~400 tokens for OS, 332 for DB), its KV cache is computed once and each row
   is laid out ``[shared prefix][padding][own suffix]`` -- measured on 20 search items per
   skill: OS 40.3 s -> 23.4 s, DB 35.3 s -> 22.6 s, same scores. That was the whole rule of
   ``prefix_cache="call"``; the default ``"prompts"`` plans every admission per prompt
   (:meth:`HFBackend._plan_prefill`): prompts are clustered by shared token prefix (each
   skill over its own system prompt, even when several skills' prompts are admitted
   together), and the KV of every prefilled prompt is memoised (LRU, ``prompt_memo_bytes``)
   so a prompt that starts with an earlier one (an agent's next turn) is prefilled only past
   it. ``engine="generate"`` runs ``model.generate`` on fixed batches instead (same replies);
4. replies are decoded up to their first EOS, cut before the first stop string and returned
   in the input order.

Steps 3-4 are one loop, :meth:`HFBackend._decode_loop`, fed by a ``poll`` callback:
``generate`` feeds all its prompts at once, :meth:`HFBackend.generate_stream` lets callers
submit :class:`~cycleqd.inference.base.Request` s while the batch runs (each with its own
budget, stop strings and ``on_done``). For Llama-family models the decode steps run on the
lean decoder of :mod:`cycleqd.inference.fastllama` (``fast=True``, default: preallocated KV
slots, fused and packed GEMMs, shared-prefix cascade attention, unpadded prefill; same replies); other models, and models whose modules are wrapped (e.g.
:class:`~cycleqd.inference.lowrank.LowRankChildren`), use the ``transformers`` forward.
``docs/inference.md`` describes both and the measurements.

Greedy decoding is deterministic for fixed weights, batch size and device, but a padded batch
reduces in a different order than a single prompt, so a reply can in rare cases differ from
one decoded alone (a near tie between two tokens); ``benchmarks/eval_bench.py`` measures it.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from cycleqd._checks import check_choice, check_int
from cycleqd.inference._checks import check_generate_args, check_state_dict, cut_at_stop
from cycleqd.inference._kvcache import growing_cache, join, joinable, trim
from cycleqd.inference.base import Conversation, Message, Request
from cycleqd.inference.fingerprint import fingerprint_state_dict


class HFBackend:
    """A :class:`~cycleqd.inference.base.GenerationBackend` on a ``transformers`` causal LM.

    Args:
        model: a loaded ``PreTrainedModel`` (``AutoModelForCausalLM``) or a path / hub id,
            loaded with :meth:`from_pretrained` defaults.
        tokenizer: its tokenizer (default: loaded from ``model``'s path). Must have a chat
            template (or pass ``chat_template``).
        fingerprint: identity of the loaded weights (default: a content hash of the state dict,
            :func:`~cycleqd.inference.fingerprint.fingerprint_state_dict`).
        batch_size: most rows decoding together (>= 1). On 2 CPU cores 32 for a 135M model
            (``benchmarks/eval_bench.py``: 4.5x one-prompt-at-a-time; 16 gave 3.8x); on a GPU,
            as large as memory allows.
        device: where to run (``"cpu"``, ``"cuda"``, ``"cuda:1"``; default: the model's device).
        chat_template: Jinja template overriding the tokenizer's.
        sort_by_length: batch prompts of similar length together (default True).
        engine: ``"evict"`` (own greedy loop with continuous batching: finished rows leave,
            queued prompts join; default) or ``"generate"`` (``model.generate`` per batch).
        prefill_tokens: most padded tokens per prefill forward (default 2048); the prompts
            admitted at once are prefilled in length-sorted groups of this size and joined.
        min_shared_prefix: when all prompts of a ``generate`` call share a token prefix at
            least this long (a skill's system prompt and instructions), its KV cache is
            computed once and reused by every row (0 disables; default 32).
        fast: decode Llama-family models with the lean decoder of
            :mod:`cycleqd.inference.fastllama` (preallocated KV cache, one fused QKV and
            gate/up GEMM per layer; same greedy replies); other architectures, or a model whose
            modules were wrapped (:class:`~cycleqd.inference.lowrank.LowRankChildren`) or
            hooked, use the ``transformers`` forward (see :attr:`fast_fallback`). Default True.
        prefix_cache: how prefill reuses KV already computed (``engine="evict"``):

            * ``"prompts"`` (default): automatic prefix caching at prompt granularity (as
              vLLM's APC, with whole prompts instead of 16-token blocks). The KV of every
              prefilled prompt is memoised (key: weight fingerprint + the prompt's token ids;
              LRU bounded by ``prompt_memo_bytes``), and each admission of queued prompts is
              planned by :meth:`_plan_prefill`: a prompt that starts with a memoised prompt
              (an agent episode's next turn starts with its previous turn's prompt) is
              prefilled from where the memo ends; prompts sharing a token prefix of at least
              ``min_shared_prefix`` tokens (a skill's system prompt) are prefilled together
              over its KV, computed once or sliced from any memoised prompt that starts with
              it, even when several skills' prompts are queued together;
            * ``"call"``: the previous rule: one shared prefix per ``generate`` call (all its
              prompts must share it), per prefill group in :meth:`generate_stream`, with the
              shared prefixes memoised (``prefix_memo_size``); no prompt memo.
        prompt_memo_bytes: most bytes of prompt KV the ``"prompts"`` memo keeps (default
            512 MiB, lowered from 1.5 GiB after a full demo was killed for memory at 24 GB
            peak RSS on a 24 GiB machine; SmolLM2-135M in fp32 holds 45 KiB per token (30 layers x 2 x 3 KV heads
            x 64 dims x 4 bytes), so ~35k prompt tokens: a demo child's 40 agent episodes
            (~450-token prompts, each turn replacing its previous one) and 20 coding prompts
            take ~1.1 GiB; Llama-3-8B in bf16, 128 KiB per token: ~12k tokens); 0 disables the
            memo; ``min_shared_prefix=0`` disables every prefix reuse.

    Raises:
        ValueError: bad ``batch_size``, ``engine``, ``prefix_cache`` or
            ``prompt_memo_bytes``, or no chat template available.
    """

    def __init__(self, model: Any, tokenizer: Any = None, *, fingerprint: str | None = None,
                 batch_size: int = 32, device: str | torch.device | None = None,
                 chat_template: str | None = None, sort_by_length: bool = True,
                 engine: str = "evict", prefill_tokens: int = 2048,
                 min_shared_prefix: int = 32, fast: bool = True, prefix_cache: str = "prompts",
                 prompt_memo_bytes: int = 1 << 29) -> None:
        check_int("batch_size", batch_size)
        check_choice("engine", engine, ("evict", "generate"))
        check_choice("prefix_cache", prefix_cache, ("prompts", "call"))
        check_int("prefill_tokens", prefill_tokens)
        if isinstance(prompt_memo_bytes, bool) or not isinstance(prompt_memo_bytes, int) \
                or prompt_memo_bytes < 0:
            raise ValueError(f"prompt_memo_bytes must be an int >= 0, got {prompt_memo_bytes!r}")
        self.prefix_cache = prefix_cache
        self.engine = engine
        self.fast = bool(fast)
        #: why the last decode loop ran on the ``transformers`` forward although ``fast`` is
        #: set (None: it ran on the lean decoder, or ``fast`` is off)
        self.fast_fallback: str | None = None
        self._fast_decoder = None
        self.reset_stats()
        self.prefill_tokens = prefill_tokens
        self.min_shared_prefix = int(min_shared_prefix)
        self._joinable = True
        # (fingerprint, prefix tokens) -> prefix KV: an agent skill's turns all start with the
        # same system prompt, so later turns of the same model reuse the first turn's prefix
        self._prefix_memo: OrderedDict[tuple, list] = OrderedDict()
        # (fingerprint, prompt tokens) -> the prompt's KV (automatic prefix caching, see
        # _plan_prefill); both memos are dropped when the weights change (load_weights, or any
        # in-place change of a parameter: _check_memo_weights)
        self._prompt_memo = _PromptMemo(prompt_memo_bytes)
        self._memo_sig: tuple | None = None
        if isinstance(model, (str, Path)):
            model, tok = self._load(model, device=device)
            tokenizer = tokenizer if tokenizer is not None else tok
        if tokenizer is None:
            from transformers import AutoTokenizer
            name = getattr(model.config, "_name_or_path", None)
            if not name:
                raise ValueError("tokenizer is required when the model was not loaded from a path")
            tokenizer = AutoTokenizer.from_pretrained(name)
        if chat_template is not None:
            tokenizer.chat_template = chat_template
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat template; pass chat_template=...")
        if device is not None:
            model = model.to(device)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.sort_by_length = sort_by_length
        self.device = next(model.parameters()).device
        self._eos_ids = self._eos_token_ids()
        self._pad_id = (tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                        else self._eos_ids[0])
        sd = model.state_dict()
        self._shapes = {k: tuple(v.shape) for k, v in sd.items()}
        self._tied = self._tied_aliases(sd)
        self.fingerprint = fingerprint if fingerprint is not None else fingerprint_state_dict(sd)

    #: shared-prefix KV caches kept for reuse by later calls with the same weights (each
    #: ~15 MB for a 330-token prefix of SmolLM2-135M in fp32)
    prefix_memo_size: int = 4
    #: a prompt leaves its cluster's prefill group (``prefix_cache="prompts"``) for a group
    #: over its own memo entry when that saves it at least this many tokens of prefill: a
    #: separate forward costs a few ms of dispatch and a copy of the prefix KV, a token of
    #: SmolLM2-135M ~0.27 GFLOP (~3-5 ms on one CPU core)
    memo_split_tokens: int = 8
    #: ``prefix_cache="prompts"``: a row joins a prefill group only when its left padding is
    #: at most this fraction of the group's width (None: only ``prefill_tokens`` bounds a
    #: group). On CPU padding costs as much as real tokens and a row of ~50+ tokens is
    #: already an efficient GEMM (a demo child's replayed admissions: 7711 -> 5788 padded
    #: tokens, docs/child_eval.md); on a GPU larger batches may be worth some padding.
    prefill_pad_frac: float | None = 0.1

    # ------------------------------------------------------------------ construction
    @staticmethod
    def _load(path: str | Path, *, device=None, dtype: torch.dtype | None = torch.float32):
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
        tok = AutoTokenizer.from_pretrained(str(path))
        if device is not None:
            model = model.to(device)
        return model, tok

    @classmethod
    def from_pretrained(cls, path: str | Path, *, device: str | None = None,
                        dtype: torch.dtype = torch.float32, **kwargs: Any) -> HFBackend:
        """Load an HF folder (or hub id) with its tokenizer.

        Args:
            path: folder with ``config.json``, weights and tokenizer files (or a hub id).
            device: ``"cpu"`` (default when None), ``"cuda"``...
            dtype: parameter dtype (fp32 default: CPU kernels are fastest and exact in fp32).
            **kwargs: passed to :class:`HFBackend` (batch_size, fingerprint...).
        """
        model, tok = cls._load(path, device=device, dtype=dtype)
        return cls(model, tok, **kwargs)

    def _eos_token_ids(self) -> list[int]:
        ids: list[int] = []
        gc = getattr(self.model, "generation_config", None)
        for src in (getattr(gc, "eos_token_id", None), self.tokenizer.eos_token_id):
            if src is None:
                continue
            for i in (src if isinstance(src, (list, tuple)) else [src]):
                if int(i) not in ids:
                    ids.append(int(i))
        if not ids:
            raise ValueError("neither the tokenizer nor the generation config defines an EOS token")
        return ids

    def _untie(self, name: str) -> None:
        """Give the tied alias ``name`` (e.g. ``lm_head.weight``) its own parameter, a copy
        of the tensor it shared. The model config is left as loaded: nothing on the
        generation path re-ties weights, and the config is part of the sample cache's
        backend key (:func:`cycleqd.skills.cache.backend_key`), which must not change with
        the weights loaded (the weights have their own fingerprint)."""
        mod_name, _, attr = name.rpartition(".")
        mod = self.model.get_submodule(mod_name) if mod_name else self.model
        old = getattr(mod, attr)
        setattr(mod, attr, torch.nn.Parameter(old.detach().clone(), requires_grad=False))
        del self._tied[name]

    @staticmethod
    def _tied_aliases(sd: Mapping[str, torch.Tensor]) -> dict[str, str]:
        """name -> canonical name, for state-dict entries sharing storage (tied weights)."""
        first: dict[tuple[int, tuple, str], str] = {}
        alias: dict[str, str] = {}
        for k, v in sd.items():
            key = (v.untyped_storage().data_ptr(), tuple(v.shape), str(v.dtype))
            if key in first:
                alias[k] = first[key]
            else:
                first[key] = k
        return alias

    # ------------------------------------------------------------------ protocol
    def render(self, conversation: Sequence[Message]) -> str:
        """The prompt string of one conversation (chat template + generation prompt)."""
        return self.tokenizer.apply_chat_template(list(conversation), tokenize=False,
                                                  add_generation_prompt=True)

    def prompt_ids(self, conversation: Conversation, response_prefix: str = "") -> list[int]:
        """Token ids of one prompt as :meth:`generate` feeds it to the model: a chat
        conversation rendered (:meth:`render`) + ``response_prefix``, tokenised without added
        special tokens; a raw prompt string + ``response_prefix``, tokenised with the
        tokenizer's default special tokens (vLLM's rule for a text prompt)."""
        if isinstance(conversation, str):
            return self.tokenizer(conversation + response_prefix)["input_ids"]
        return self.tokenizer(self.render(conversation) + response_prefix,
                              add_special_tokens=False)["input_ids"]

    @torch.inference_mode()
    def generate(self, conversations: Sequence[Conversation], *, max_new_tokens: int,
                 stop: Sequence[str] = (), response_prefix: str = "") -> list[str]:
        """Greedy replies, one per conversation, in input order.

        Args:
            conversations: N conversations, each a list of ``{"role", "content"}`` messages
                or a raw prompt string (no chat template; see :meth:`prompt_ids`).
            max_new_tokens: generation budget per reply (tokens, >= 1).
            stop: strings that end a reply; the reply is cut before the first one.
            response_prefix: text the reply is continued from (appended to every prompt);
                not part of the returned reply.
        Returns:
            N strings (special tokens removed).
        Raises:
            ValueError: malformed conversations / arguments (before any model work).
        """
        convs, stop = check_generate_args(conversations, max_new_tokens, stop, response_prefix)
        if not convs:
            return []
        prompts = [self.prompt_ids(c, response_prefix) for c in convs]
        order = list(range(len(prompts)))
        if self.sort_by_length:
            order.sort(key=lambda i: -len(prompts[i]))
        out: list[str] = [""] * len(prompts)
        if self.engine == "evict":
            # "prompts": every admission is planned by _plan_prefill (shared and memoised
            # prefixes found per prompt); "call": one shared prefix for the whole call
            texts = self._greedy([prompts[i] for i in order], max_new_tokens, stop)
            for i, text in zip(order, texts):
                out[i] = cut_at_stop(text, stop)
            return out
        for s in range(0, len(order), self.batch_size):
            idx = order[s:s + self.batch_size]
            batch = [prompts[i] for i in idx]
            texts = self._generate_batch(batch, self._generation_config(max_new_tokens, stop))
            for i, text in zip(idx, texts):
                out[i] = cut_at_stop(text, stop)
        return out

    def _left_pad(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) token ids and attention mask, prompts right-aligned (left padding)."""
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for r, p in enumerate(prompts):
            if p:
                ids[r, width - len(p):] = torch.tensor(p, dtype=torch.long)
                mask[r, width - len(p):] = 1
        return ids, mask

    def _forward_kwargs(self) -> tuple[str, dict]:
        """(name of the KV-cache argument, extra prefill kwargs) for this model's forward:
        transformers >= 5.x calls the cache ``cache`` (``past_key_values`` before)."""
        if not hasattr(self, "_fwd"):
            import inspect
            params = inspect.signature(self.model.forward).parameters
            ckw = "cache" if "cache" in params else "past_key_values"
            extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
            self._fwd = (ckw, extra)
        return self._fwd

    def _prefill(self, prompts: list[list[int]], prefix: tuple[int, list] | None = None):
        """Prefill one left-padded batch: (cache, mask (B, T), first tokens (B,), next positions (B,)).

        With ``prefix = (P, [(keys, values) per layer, each (1, kv_heads, P, head_dim)])`` --
        the KV cache of the first P tokens that all ``prompts`` share -- only the suffixes are
        computed: each row is laid out ``[prefix][padding][suffix]`` (mask 0 on the padding,
        positions P, P+1, ... on the suffix), so the shared tokens are computed once per call.
        """
        P = prefix[0] if prefix else 0
        ids, mask = self._left_pad([p[P:] for p in prompts])
        ids, mask = ids.to(self.device), mask.to(self.device)
        self.stats["prefill_tokens"] += int(mask.sum())
        self.stats["prefill_padded"] += int(mask.numel())
        pos = P + (mask.cumsum(-1) - 1).clamp(min=0)
        cache = growing_cache()
        if prefix:
            b = len(prompts)
            for i, (k, v) in enumerate(prefix[1]):
                cache.update(k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1), i)
            mask = torch.cat([mask.new_ones((b, P)), mask], dim=1)
        ckw, extra = self._forward_kwargs()
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                            **extra, **{ckw: cache}).logits[:, -1]
        if self._memo_on() and self._prompt_memo.max_bytes and joinable(cache):
            self._memoise_prompts(prompts, cache, mask)
        return cache, mask, logits.argmax(-1), pos[:, -1] + 1

    def _memo_on(self) -> bool:
        """True when prefill plans and memoises per prompt (``prefix_cache="prompts"``, prefix
        reuse enabled by ``min_shared_prefix``, a cache that can be joined)."""
        return self.prefix_cache == "prompts" and self.min_shared_prefix > 0 and self._joinable

    def _memoise(self, prompts: list[list[int]], kv_of: Callable[[int], tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Store each prefilled prompt's KV in the prompt memo: ``kv_of(r)`` gives prompt r's
        (keys, values), each (layers, kv_heads, len(prompts[r]), head_dim). Prompts shorter
        than ``min_shared_prefix`` (too short to be reused) and prompts the memo already
        covers (a memoised prompt starts with them) are skipped, before ``kv_of`` copies."""
        memo, fp = self._prompt_memo, self.fingerprint
        for r, toks in enumerate(prompts):
            if len(toks) < self.min_shared_prefix:
                continue
            arr = np.asarray(toks, dtype=np.int64)
            if not memo.covers(fp, arr):
                memo.put(fp, arr, *kv_of(r))

    def _memoise_prompts(self, prompts: list[list[int]], cache, mask: torch.Tensor) -> None:
        """:meth:`_memoise` after a ``transformers`` prefill: row r's real positions of
        ``cache`` (mask 1: the prefix, then its own tokens, left padding dropped)."""
        real = mask.bool()
        width = real.shape[1]

        def kv_of(r: int) -> tuple[torch.Tensor, torch.Tensor]:
            if len(prompts[r]) == width:          # no padding in this row (dense)
                return (torch.stack([la.keys[r] for la in cache.layers]),
                        torch.stack([la.values[r] for la in cache.layers]))
            idx = real[r].nonzero().squeeze(1)
            return (torch.stack([la.keys[r].index_select(1, idx) for la in cache.layers]),
                    torch.stack([la.values[r].index_select(1, idx) for la in cache.layers]))

        self._memoise(prompts, kv_of)

    def _memoise_slots(self, prompts: list[list[int]], prefix: tuple[int, list] | None,
                       keys: list[torch.Tensor], values: list[torch.Tensor], slots: list[int]) -> None:
        """:meth:`_memoise` after the lean decoder's prefill
        (:meth:`FastLlamaBatch.admit <cycleqd.inference.fastllama.FastLlamaBatch.admit>`),
        which writes each prompt's own positions straight into its slot: prompt r's KV is the
        ``prefix`` KV (P positions, each layer (1, kv_heads, P, head_dim)) followed by slot
        ``slots[r]``'s first ``len(prompts[r]) - P`` positions of ``keys``/``values`` (per layer
        (batch_size, kv_heads, capacity, head_dim))."""
        if not (self._memo_on() and self._prompt_memo.max_bytes):
            return
        P = prefix[0] if prefix else 0
        layers = prefix[1] if P else [(None, None)] * len(keys)

        def part(pre: torch.Tensor | None, buf: torch.Tensor, s_: int, c: int) -> torch.Tensor:
            own = buf[s_, :, :c]
            return own if pre is None else torch.cat([pre[0, :, :P], own], dim=1)

        def kv_of(r: int) -> tuple[torch.Tensor, torch.Tensor]:
            s_, c = slots[r], len(prompts[r]) - P
            return (torch.stack([part(pk, K, s_, c) for (pk, _), K in zip(layers, keys)]),
                    torch.stack([part(pv, V, s_, c) for (_, pv), V in zip(layers, values)]))

        self._memoise(prompts, kv_of)

    def _shared_prefix(self, prompts: list[list[int]]) -> tuple[int, list] | None:
        """KV cache of the longest token prefix shared by all ``prompts`` (system prompt,
        instructions...), if there are >= 2 prompts, it is >= ``min_shared_prefix`` tokens
        and the cache can be joined; else None. At least one token of each prompt is left to
        the per-row prefill."""
        if len(prompts) < 2 or not self.min_shared_prefix or not self._joinable:
            return None
        n = min(len(p) for p in prompts) - 1
        first = prompts[0]
        for p in prompts[1:]:
            k = 0
            while k < n and p[k] == first[k]:
                k += 1
            n = k
        if n < self.min_shared_prefix:
            return None
        return self._compute_prefix(first[:n])

    def _compute_prefix(self, toks: list[int]) -> tuple[int, list] | None:
        """``(len(toks), KV)`` of the token prefix ``toks`` from ``_prefix_memo`` (same
        fingerprint) or computed by one forward and memoised there (the ``prefix_memo_size``
        most recent); None if the model's cache cannot be joined."""
        n = len(toks)
        key = (self.fingerprint, tuple(toks))
        if key in self._prefix_memo:
            self._prefix_memo.move_to_end(key)
            return n, self._prefix_memo[key]
        cache = growing_cache()
        ckw, extra = self._forward_kwargs()
        ids = torch.tensor([list(toks)], dtype=torch.long, device=self.device)
        self.model(input_ids=ids, use_cache=True, **extra, **{ckw: cache})
        self.stats["prefill_tokens"] += n
        if not joinable(cache):
            return None
        kv = [(la.keys.clone(), la.values.clone()) for la in cache.layers]
        self._prefix_memo[key] = kv
        while len(self._prefix_memo) > self.prefix_memo_size:
            self._prefix_memo.popitem(last=False)
        return n, kv

    def _prefill_groups(self, take: list[int], prompts: Sequence[Sequence[int]] | None = None, *,
                        lengths: Sequence[int] | None = None,
                        pad_frac: float | None = None) -> list[list[int]]:
        """Cut the prompts to admit (``take``: indices, longest first) into prefill batches of
        at most ``prefill_tokens`` padded tokens (>= 1 prompt each): one prefill of many
        prompts of different lengths would spend most of its work on padding and quadratic
        attention. Lengths are ``len(prompts[i])``, or ``lengths[i]`` (the tokens each row
        prefills itself, past a shared prefix) when given. With ``pad_frac``, a row also
        joins the current group only if its left padding is at most that fraction of the
        group's width (padding is computed like real tokens)."""
        lens = lengths if lengths is not None else [len(p) for p in prompts]
        groups: list[list[int]] = []
        width = 0                                  # longest prompt of the last group
        for i in take:
            w = max(width, lens[i])
            if groups and w * (len(groups[-1]) + 1) <= self.prefill_tokens and (
                    pad_frac is None or w - lens[i] <= pad_frac * w):
                groups[-1].append(i)
                width = w
            else:
                groups.append([i])
                width = lens[i]
        return groups

    def _check_memo_weights(self) -> None:
        """Drop both prefix memos if any parameter changed since they were filled: a
        different tensor (untied, replaced) or one modified in place (its version counter;
        ``load_weights`` also clears them). The memos are keyed by the fingerprint too, so
        a caller that changes the weights and the fingerprint never reads stale KV; this
        also covers an in-place change under the same fingerprint."""
        sig = tuple((p.data_ptr(), p._version) for p in self.model.parameters())
        if sig != self._memo_sig:
            self._prefix_memo.clear()
            self._prompt_memo.clear()
            self._memo_sig = sig

    def _memo_match(self, arr: np.ndarray) -> tuple[tuple, int] | None:
        """The memoised KV that covers the longest token prefix of one prompt (``arr``,
        int64 (n,)), with at least one token of the prompt left over: ``(source, L)``
        (``source`` = ``("sys", key)`` for ``_prefix_memo``, ``("prompt", key)`` for the
        prompt memo; ``L`` >= ``min_shared_prefix``), or None. Entries of other fingerprints
        are ignored."""
        best, limit, fp = None, len(arr) - 1, self.fingerprint
        for key in self._prefix_memo:
            if key[0] == fp:
                n = _lcp(arr, np.asarray(key[1], dtype=np.int64), limit)
                if n >= self.min_shared_prefix and (best is None or n > best[1]):
                    best = (("sys", key), n)
        got = self._prompt_memo.match(fp, arr, limit)
        if got is not None and got[1] >= self.min_shared_prefix and (best is None or got[1] > best[1]):
            best = (("prompt", got[0]), got[1])
        return best

    def _memo_kv(self, source: tuple, n: int) -> tuple[int, list]:
        """``(n, [(keys, values) per layer, each (1, kv_heads, n, head_dim)])``: the first
        ``n`` positions of a memo entry (views; marks the entry most recently used)."""
        kind, key = source
        if kind == "sys":
            self._prefix_memo.move_to_end(key)
            return n, [(k[:, :, :n], v[:, :, :n]) for k, v in self._prefix_memo[key]]
        return n, self._prompt_memo.kv(key, n)

    def _plan_prefill(self, prompts: list[list[int]]) -> list[tuple[list[int], tuple[int, list] | None]]:
        """Plan the prefill of the prompts admitted at once (``prefix_cache="prompts"``):
        ``[(row indices into prompts, prefix or None)]``, a prefix being ``(P, [(keys,
        values) per layer, each (1, kv_heads, P, head_dim)])`` as :meth:`_prefill` takes it;
        rows of a group longest first, each group at most ``prefill_tokens`` padded tokens of
        its own (past the prefix); the groups cover every row once. May run one forward per
        cluster whose prefix is not memoised.

        1. Clusters: the prompts sorted by their token ids; neighbours sharing at least
           ``min_shared_prefix`` tokens are one cluster (a skill's prompts: its system
           prompt), prefilled over the cluster's common prefix -- so two skills' prompts
           queued together are prefilled each over its own system prompt's KV.
        2. Memo: each prompt's longest memoised prefix (:meth:`_memo_match`: a shared
           prefix, or a whole earlier prompt, e.g. an agent's previous turn). A prompt whose
           memoised prefix is at least ``memo_split_tokens`` longer than its cluster's common
           prefix (or that has no cluster) leaves the cluster: it is prefilled over
           its memo entry, with the other prompts that picked the same entry (at their
           shortest match), e.g. a group of one.
        3. The cluster's common prefix KV is sliced from a memo entry that covers it, else
           computed once (:meth:`_shared_prefix`, memoised in ``_prefix_memo``).

        Every prompt keeps at least one token for its own prefill. Each prefilled prompt's KV
        is then memoised (:meth:`_memoise_prompts`). Stats: ``prefill_reused`` counts the admitted rows' prompt tokens served by a prefix
        KV, ``prefill_memo`` those of them served from KV memoised before this admission.
        """
        thr = self.min_shared_prefix
        n = len(prompts)
        arrs = [np.asarray(p, dtype=np.int64) for p in prompts]
        self._check_memo_weights()
        best = [self._memo_match(a) for a in arrs]
        order = sorted(range(n), key=lambda i: prompts[i])
        clusters: list[list[int]] = [[order[0]]]
        for a, b in zip(order, order[1:]):
            if _lcp(arrs[a], arrs[b], min(len(arrs[a]), len(arrs[b])) - 1) >= thr:
                clusters[-1].append(b)
            else:
                clusters.append([b])

        def common(members: list[int]) -> int:   # members in token order: first vs last
            lo = min(len(arrs[i]) for i in members) - 1
            return _lcp(arrs[members[0]], arrs[members[-1]], lo)

        plan: list[tuple[list[int], tuple[int, list] | None, bool]] = []
        alone: list[int] = []                     # rows prefilled without a prefix
        by_source: dict[tuple, list[int]] = {}
        for members in clusters:
            shared: list[int] = []
            if len(members) >= 2:
                L = common(members)
                shared = [i for i in members
                          if best[i] is None or best[i][1] < L + self.memo_split_tokens]
                if len(shared) >= 2 and common(shared) >= thr:
                    L = common(shared)
                else:
                    shared = []
            for i in members:
                if i in shared:
                    continue
                if best[i] is not None:
                    by_source.setdefault(best[i][0], []).append(i)
                else:
                    alone.append(i)
            if shared:
                src = next((best[i][0] for i in shared if best[i] is not None and best[i][1] >= L), None)
                if src is None:
                    before = self.stats["prefill_tokens"]     # grows when it is computed
                    pre = self._shared_prefix([prompts[i] for i in shared])
                    hit = pre is not None and self.stats["prefill_tokens"] == before
                else:
                    hit = True
                    pre = self._memo_kv(src, L)
                    if src[0] == "prompt":   # keep the shared prefix past the prompt's eviction
                        key = (self.fingerprint, tuple(prompts[shared[0]][:L]))
                        if key not in self._prefix_memo:
                            self._prefix_memo[key] = [(k.clone(), v.clone()) for k, v in pre[1]]
                            while len(self._prefix_memo) > self.prefix_memo_size:
                                self._prefix_memo.popitem(last=False)
                if pre is None:
                    alone += shared
                else:
                    plan.append((shared, pre, hit))
        for src, members in by_source.items():
            plan.append((members, self._memo_kv(src, min(best[i][1] for i in members)), True))
        if alone:
            plan.append((alone, None, False))
        out = []
        for members, pre, hit in plan:
            P = pre[0] if pre is not None else 0
            self.stats["prefill_reused"] += P * len(members)
            self.stats["prefill_memo"] += P * len(members) if hit else 0
            lens = {i: len(prompts[i]) - P for i in members}
            members = sorted(members, key=lambda i: -lens[i])
            out += [(g, pre) for g in self._prefill_groups(members, lengths=lens,
                                                           pad_frac=self.prefill_pad_frac)]
        return out

    def _greedy(self, prompts: list[list[int]], max_new_tokens: int,
                stop: list[str]) -> list[str]:
        """Greedy decoding of all ``prompts`` (queued in this order) with continuous batching
        (``engine="evict"``): :meth:`_decode_loop` fed once with one :class:`Request` per
        prompt; replies (cut at the first stop string) in the order of ``prompts``."""
        out: list[str] = [""] * len(prompts)

        def done(i: int):
            def set_(text: str) -> None:
                out[i] = text
            return set_

        reqs = [Request(p, max_new_tokens, stop, done(i)) for i, p in enumerate(prompts)]
        fed = [False]

        def poll(block: bool) -> list[Request] | None:
            if fed[0]:
                return None
            fed[0] = True
            return reqs

        self._check_memo_weights()
        self._decode_loop(poll, prefix=(self._shared_prefix(prompts)
                                        if self.prefix_cache == "call" else None))
        return out

    @torch.inference_mode()
    def generate_stream(self, poll: Callable[[bool], list[Request] | None]) -> None:
        """Greedy decoding of requests that arrive while others decode (continuous batching
        across callers, e.g. several skills' evaluations of one child).

        Between two decode steps the loop calls ``poll(block)``; it returns the newly arrived
        :class:`~cycleqd.inference.base.Request` s (``[]`` if none), or None once closed (the
        active rows are then finished and the call returns). ``block`` is True when no row is
        active and none is queued: ``poll`` may then wait for a request. New requests are
        prefilled and join the running batch at the next step (when at least a quarter of
        ``batch_size`` slots are free or all queued ones fit, as in :meth:`generate`); each
        row ends at EOS, its own ``max_new_tokens`` or its own stop strings, and its
        ``on_done`` is called with its reply as soon as it ends. The prompts admitted at once
        are prefilled per :meth:`_plan_prefill` (``prefix_cache="prompts"``: each over its
        longest shared or memoised prefix, skills' system prompts and agents' previous turns
        included) or, with ``prefix_cache="call"``, per prefill group over the group's
        memoised or shared prefix (:meth:`_group_prefix`). Runs on the calling thread;
        the weights must not be changed (``load_weights``) while it runs.

        Raises:
            TypeError: ``poll`` returned something other than a list of Requests or None.
            Exceptions raised by ``poll`` or ``on_done`` propagate (the loop stops).
        """
        self._decode_loop(poll, prefix=None)

    def _group_prefix(self, prompts: list[list[int]]) -> tuple[int, list] | None:
        """The shared-prefix KV for one prefill group of :meth:`generate_stream`: the longest
        memoised prefix (same weights) that starts every prompt with a token left over, else
        the group's own shared prefix (:meth:`_shared_prefix`, >= 2 prompts)."""
        best = None
        for (fp, toks), kv in self._prefix_memo.items():
            n = len(toks)
            if fp == self.fingerprint and (best is None or n > best[0]) and all(
                    len(p) > n and tuple(p[:n]) == toks for p in prompts):
                best = (n, kv)
        return best if best is not None else self._shared_prefix(prompts)

    def _new_batch(self):
        """The decode state of one :meth:`_decode_loop` run: the lean Llama decoder
        (:mod:`cycleqd.inference.fastllama`) when ``fast`` allows it for this model, else
        the ``transformers`` forward with a growing KV cache (:class:`_HFBatch`)."""
        self.fast_fallback = None
        if self.fast:
            from cycleqd.inference.fastllama import FastLlamaBatch, fast_unsupported
            why = fast_unsupported(self.model)
            if why is None:
                if self._fast_decoder is None or not self._fast_decoder.current():
                    if self._fast_decoder is not None:
                        # the weights changed, possibly through ``.data`` (no version counter
                        # moves, so _check_memo_weights cannot see it; current() compares
                        # contents): no memoised KV of the old weights may be reused
                        self._prefix_memo.clear()
                        self._prompt_memo.clear()
                    self._fast_decoder = None      # free the stale copies before building
                    self._fast_decoder = FastLlamaBatch.decoder(self.model)
                return FastLlamaBatch(self, self._fast_decoder)
            self.fast_fallback = why
        return _HFBatch(self)

    def _decode_loop(self, poll: Callable[[bool], list[Request] | None],
                     prefix: tuple[int, list] | None) -> None:
        """The continuous-batching greedy loop behind :meth:`generate` and
        :meth:`generate_stream`.

        At most ``batch_size`` rows decode together. A row that ends (EOS, its
        ``max_new_tokens``, one of its stop strings) is evicted from the batch and the KV
        cache at once and its ``on_done`` called; when at least ``max(1, batch_size // 4)``
        slots are free (or all queued requests fit), the next queued prompts are prefilled
        (left-padded, in groups of at most ``prefill_tokens`` padded tokens; over the shared
        ``prefix`` KV when given, else per :meth:`_plan_prefill` with
        ``prefix_cache="prompts"`` -- each group over its rows' shared or memoised prefix --
        or :meth:`_group_prefix` with ``"call"``) and joined to the running batch.
        Shapes: active rows A <= batch_size feed (A, 1) tokens; the KV cache holds
        (A, kv_heads, T, head_dim) per layer. If a prefilled HF cache is not
        :func:`~cycleqd.inference._kvcache.joinable` (a layer holding no KV of its own, e.g.
        one sharing another layer's), rows are admitted only into an empty batch.
        """
        eos = set(self._eos_ids)
        refill = max(1, self.batch_size // 4)
        pending: deque[Request] = deque()
        rows: list[_Row] = []
        batch = self._new_batch()
        stats = self.stats
        closed = False
        while True:
            if not closed:
                t0 = time.perf_counter()
                new = poll(not rows and not pending)
                stats["poll_s"] += time.perf_counter() - t0
                if new is None:
                    closed = True
                elif isinstance(new, list) and all(isinstance(r, Request) for r in new):
                    pending.extend(new)
                else:
                    raise TypeError("generate_stream: poll must return a list of Requests or None")
            if not rows and not pending:
                if closed:
                    release = getattr(batch, "release", None)
                    if release is not None:    # the lean decoder's KV buffers, for the next loop
                        release()
                    return
                continue
            free = self.batch_size - len(rows)
            if pending and (not rows or (free >= min(refill, len(pending)) and batch.joinable)):
                t0 = time.perf_counter()
                take = [pending.popleft() for _ in range(min(free, len(pending)))]
                prompts = [r.prompt_ids for r in take]
                planned = prefix is None and batch.joinable and self._memo_on()
                if planned:      # per prompt: shared and memoised prefixes (_plan_prefill)
                    plan = self._plan_prefill(prompts)
                else:
                    self._check_memo_weights()
                    plan = [(g, None) for g in (self._prefill_groups(list(range(len(take))), prompts)
                                                if batch.joinable else [list(range(len(take)))])]
                groups = [g for g, _ in plan]
                for k, (group, pre) in enumerate(plan):
                    gp = [prompts[i] for i in group]
                    if not planned:      # prefix_cache="call" (or no prefix reuse at all)
                        pre = prefix if prefix is not None else (
                            self._group_prefix(gp) if self.prefix_cache == "call"
                            or self.min_shared_prefix else None)
                    if pre is not None and any(len(p) <= pre[0] for p in gp):
                        pre = None
                    batch.admit(gp, pre, max(take[i].max_new_tokens for i in group))
                    rows += [_Row(take[i], self._stop_window(take[i].stop)) for i in group]
                    if not batch.joinable:   # e.g. a layer without KV of its own: no joining
                        pending.extendleft(take[i] for g in groups[k + 1:][::-1] for i in g[::-1])
                        break
                stats["prefill_s"] += time.perf_counter() - t0
                stats["prefill_rows"] += len(take)
            t0 = time.perf_counter()
            keep = []
            for j, (row, tok) in enumerate(zip(rows, batch.tokens())):
                if tok not in eos:
                    row.gen.append(tok)
                    if len(row.gen) < row.req.max_new_tokens and not (row.req.stop and any(
                            s_ in self.tokenizer.decode(row.gen[-row.window:], skip_special_tokens=True)
                            for s_ in row.req.stop)):
                        keep.append(j)
                        continue
                stats["tokens"] += len(row.gen)
                row.req.on_done(cut_at_stop(self.tokenizer.decode(row.gen, skip_special_tokens=True),
                                            row.req.stop))
            if len(keep) < len(rows):
                rows = [rows[j] for j in keep]
                if rows:
                    batch.select(keep)
                else:
                    batch.clear()
            stats["host_s"] += time.perf_counter() - t0
            if not rows:
                continue
            t0 = time.perf_counter()
            batch.step()
            stats["decode_s"] += time.perf_counter() - t0
            stats["steps"] += 1
            stats["row_steps"] += len(rows)

    @staticmethod
    def _stop_window(stop: list[str]) -> int:
        """Tokens decoded at the end of a reply to look for stop strings (a token is >= 1
        character, so twice the longest stop string plus slack covers a stop split across
        tokens)."""
        return 2 * max((len(s_) for s_ in stop), default=0) + 8

    def reset_stats(self) -> None:
        """Zero :attr:`stats`: seconds spent polling (``poll_s``), prefilling admitted prompts
        (``prefill_s``), in decode forwards (``decode_s``; including the greedy argmax and
        its copy to the host) and in the host loop (``host_s``: token bookkeeping, stop
        checks, detokenisation, ``on_done``), and counts of decode ``steps``, ``row_steps``
        (rows x steps), ``prefill_rows``, ``prefill_tokens`` (prompt tokens run through the
        model: each row's own part, plus a shared prefix when it is computed),
        ``prefill_padded`` (the rows' own parts with their left padding: what the prefill
        forwards computed, shared prefixes excluded),
        ``prefill_reused`` (prompt tokens of admitted rows taken from a shared or memoised
        prefix's KV instead, ``prefix_cache="prompts"``), ``prefill_memo`` (of those, the
        tokens whose KV was memoised before their admission), ``attended``
        (key positions attended, summed over decode row-steps), ``kv_read`` (key positions
        the lean decoder's attention calls read: a chunk of rows reads each of its rows up to
        the chunk's longest, a shared prefix once per group and step -- the memory traffic
        ``benchmarks/eval_bench.py`` puts against the bandwidth) and generated ``tokens``."""
        self.stats = dict.fromkeys(("poll_s", "prefill_s", "decode_s", "host_s"), 0.0)
        self.stats.update(dict.fromkeys(("steps", "row_steps", "prefill_rows", "prefill_tokens",
                                         "prefill_padded", "prefill_reused", "prefill_memo",
                                         "attended", "kv_read", "tokens"), 0))

    def _generation_config(self, max_new_tokens: int, stop: list[str]):
        from transformers import GenerationConfig
        return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                temperature=None, top_p=None, top_k=None, use_cache=True,
                                eos_token_id=self._eos_ids, pad_token_id=self._pad_id,
                                stop_strings=stop or None)

    def _generate_batch(self, prompts: list[list[int]], gen_cfg) -> list[str]:
        """One left-padded batch through ``model.generate`` (``engine="generate"``)."""
        ids, mask = self._left_pad(prompts)
        width = ids.shape[1]
        kwargs = {"tokenizer": self.tokenizer} if gen_cfg.stop_strings else {}
        seqs = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                   generation_config=gen_cfg, **kwargs)
        texts = []
        eos = set(self._eos_ids)
        for row in seqs[:, width:].tolist():
            end = next((k for k, t in enumerate(row) if t in eos), len(row))
            texts.append(self.tokenizer.decode(row[:end], skip_special_tokens=True))
        return texts

    @torch.no_grad()
    def load_weights(self, state_dict: Mapping[str, torch.Tensor], fingerprint: str) -> None:
        """Copy new weights into the loaded model in place (no reload, no reallocation).

        Args:
            state_dict: name -> tensor with the model's names and shapes (any float dtype or
                device; cast on copy). A tied alias (``lm_head.weight`` of a model with tied
                embeddings) may be omitted. If given and equal to its canonical tensor, the
                two stay tied; if given and *different* (a weight space untied by an expert
                that trained ``lm_head`` or ``embed_tokens`` alone, see
                :func:`cycleqd.models.loading.load_model`), the model is untied in place:
                the alias gets its own parameter and keeps it for later loads (so the run
                evaluates exactly the weights its export writes).
            fingerprint: identity of the new weights (cache key).
        Raises:
            ValueError: unknown/missing names or shape mismatches, checked before any copy,
                so a rejected call leaves the old weights and fingerprint in place.
        """
        if not isinstance(fingerprint, str) or not fingerprint:
            raise ValueError("load_weights: fingerprint must be a non-empty string")
        check_state_dict(state_dict, self._shapes, optional=set(self._tied))
        for name, src in list(self._tied.items()):
            if name in state_dict and src in state_dict and not torch.equal(
                    state_dict[name].to(state_dict[src].dtype), state_dict[src]):
                self._untie(name)
        targets = self.model.state_dict()
        for name, t in state_dict.items():
            if name in self._tied and self._tied[name] in state_dict:
                continue  # tied alias: the canonical entry is copied
            targets[name].copy_(t)
        self.fingerprint = fingerprint
        self._prefix_memo.clear()
        self._prompt_memo.clear()


def _lcp(a: np.ndarray, b: np.ndarray, limit: int) -> int:
    """Length of the common prefix of two int64 token arrays, at most ``limit`` (>= 0)."""
    n = max(0, min(limit, len(a), len(b)))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if diff.size else n


class _PromptMemo:
    """The prompt KV memo of :class:`HFBackend` (``prefix_cache="prompts"``): automatic
    prefix caching at prompt granularity.

    Entries: ``(fingerprint, prompt token ids) -> (keys, values)``, each a tensor
    (layers, kv_heads, len, head_dim) in the model's dtype and device: the prompt's KV
    cache as prefilled. The KV of a causal LM's first ``n`` positions depends only on its
    first ``n`` tokens, so an entry serves any prompt sharing ``n`` tokens with it
    (:meth:`match`, :meth:`kv` slices). Bounded by ``max_bytes`` (least recently used entries
    dropped first; an entry larger than the bound is not kept); storing a prompt drops the
    entries it extends (an agent's previous turn: the new entry covers it) and entries of
    other fingerprints (a new child's weights). Not thread-safe: used by the decode loop's
    thread only.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self.entries: OrderedDict[tuple, tuple[np.ndarray, torch.Tensor, torch.Tensor, int]] = OrderedDict()
        self.bytes = 0

    def clear(self) -> None:
        self.entries.clear()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self.entries)

    def match(self, fp: str, arr: np.ndarray, limit: int) -> tuple[tuple, int] | None:
        """``(key, n)``: the entry of fingerprint ``fp`` sharing the longest token prefix
        with ``arr`` (n tokens, at most ``limit``), or None (no entry shares a token)."""
        best = None
        for key, (toks, *_rest) in self.entries.items():
            if key[0] == fp:
                n = _lcp(arr, toks, limit)
                if n and (best is None or n > best[1]):
                    best = (key, n)
        return best

    def covers(self, fp: str, arr: np.ndarray) -> bool:
        """True when an entry of ``fp`` starts with all of ``arr`` (marks it recently used)."""
        for key, (toks, *_rest) in self.entries.items():
            if key[0] == fp and len(toks) >= len(arr) and _lcp(arr, toks, len(arr)) == len(arr):
                self.entries.move_to_end(key)
                return True
        return False

    def kv(self, key: tuple, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The first ``n`` positions of entry ``key``: per layer (keys, values), each a
        (1, kv_heads, n, head_dim) view; marks the entry most recently used."""
        self.entries.move_to_end(key)
        _, keys, values, _ = self.entries[key]
        return [(keys[i, :, :n][None], values[i, :, :n][None]) for i in range(keys.shape[0])]

    def put(self, fp: str, arr: np.ndarray, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store a prompt's KV (``keys``/``values`` (layers, kv_heads, len(arr), head_dim));
        drops the entries it extends and other fingerprints' entries, then the least
        recently used ones until the total is within ``max_bytes``."""
        nbytes = keys.numel() * keys.element_size() + values.numel() * values.element_size()
        if nbytes > self.max_bytes:
            return
        for key, (toks, _k, _v, nb) in list(self.entries.items()):
            if key[0] != fp or (len(toks) <= len(arr) and _lcp(arr, toks, len(toks)) == len(toks)):
                del self.entries[key]
                self.bytes -= nb
        self.entries[(fp, arr.tobytes())] = (arr, keys, values, nbytes)
        self.bytes += nbytes
        while self.bytes > self.max_bytes:
            _, (_t, _k, _v, nb) = self.entries.popitem(last=False)
            self.bytes -= nb


@dataclass
class _Row:
    """One active row of :meth:`HFBackend._decode_loop`: its request, generated ids and stop
    window (tokens)."""

    req: Request
    window: int
    gen: list[int] = field(default_factory=list)


class _HFBatch:
    """Decode state on the ``transformers`` forward: a growing KV cache
    (:func:`~cycleqd.inference._kvcache.growing_cache`), the (A, T) attention mask, the next
    token (A,) and next position (A,) of each active row."""

    def __init__(self, be: HFBackend) -> None:
        self.be = be
        self.cache = self.mask = self.nxt = self.pos = None
        self.joinable = be._joinable

    def admit(self, prompts: list[list[int]], prefix: tuple[int, list] | None,
              max_new_tokens: int = 1) -> None:
        """Prefill ``prompts`` (over ``prefix``) and append them as the last rows (the cache
        grows as needed: ``max_new_tokens`` is unused)."""
        c2, m2, n2, p2 = self.be._prefill(prompts, prefix)
        if self.cache is not None:
            self.mask = join(self.cache, self.mask, c2, m2)
            self.nxt, self.pos = torch.cat([self.nxt, n2]), torch.cat([self.pos, p2])
        else:
            self.cache, self.mask, self.nxt, self.pos = c2, m2, n2, p2
        if not joinable(self.cache):
            self.be._joinable = self.joinable = False

    def tokens(self) -> list[int]:
        """The next token of each active row (the greedy choice of the last forward)."""
        return self.nxt.tolist()

    def select(self, keep: list[int]) -> None:
        """Keep only rows ``keep`` (increasing indices), dropping unused leading positions."""
        sel = torch.tensor(keep, device=self.be.device)
        self.cache.batch_select_indices(sel)
        self.mask, self.nxt, self.pos = self.mask[sel], self.nxt[sel], self.pos[sel]
        if joinable(self.cache):
            self.mask = trim(self.cache, self.mask)

    def clear(self) -> None:
        self.cache = self.mask = self.nxt = self.pos = None

    def step(self) -> None:
        """One decode forward of all active rows: append their tokens, greedy next tokens."""
        ckw, _ = self.be._forward_kwargs()
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.nxt), 1))], dim=1)
        self.be.stats["attended"] += int(self.mask.sum())
        logits = self.be.model(input_ids=self.nxt[:, None], attention_mask=self.mask,
                               position_ids=self.pos[:, None], use_cache=True,
                               **{ckw: self.cache}).logits[:, -1]
        self.nxt = logits.argmax(-1)
        self.pos = self.pos + 1

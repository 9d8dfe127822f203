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
   skill: OS 40.3 s -> 23.4 s, DB 35.3 s -> 22.6 s, same scores. ``engine="generate"`` runs
   ``model.generate`` on fixed batches instead (same replies);
4. replies are decoded up to their first EOS, cut before the first stop string and returned
   in the input order.

Greedy decoding is deterministic for fixed weights, batch size and device, but a padded batch
reduces in a different order than a single prompt, so a reply can in rare cases differ from
one decoded alone (a near tie between two tokens); ``benchmarks/eval_bench.py`` measures it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from cycleqd.inference._checks import check_generate_args, check_state_dict, cut_at_stop
from cycleqd.inference._kvcache import growing_cache, join, joinable, trim
from cycleqd.inference.base import Conversation, Message
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

    Raises:
        ValueError: bad ``batch_size`` or ``engine``, or no chat template available.
    """

    def __init__(self, model: Any, tokenizer: Any = None, *, fingerprint: str | None = None,
                 batch_size: int = 32, device: str | torch.device | None = None,
                 chat_template: str | None = None, sort_by_length: bool = True,
                 engine: str = "evict", prefill_tokens: int = 2048,
                 min_shared_prefix: int = 32) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if engine not in ("evict", "generate"):
            raise ValueError(f"engine must be 'evict' or 'generate', got {engine!r}")
        if isinstance(prefill_tokens, bool) or not isinstance(prefill_tokens, int) or prefill_tokens < 1:
            raise ValueError(f"prefill_tokens must be a positive int, got {prefill_tokens!r}")
        self.engine = engine
        self.prefill_tokens = prefill_tokens
        self.min_shared_prefix = int(min_shared_prefix)
        self._joinable = True
        # (fingerprint, prefix tokens) -> prefix KV: an agent skill's turns all start with the
        # same system prompt, so later turns of the same model reuse the first turn's prefix
        self._prefix_memo: OrderedDict[tuple, list] = OrderedDict()
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
        return cache, mask, logits.argmax(-1), pos[:, -1] + 1

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
        key = (self.fingerprint, tuple(first[:n]))
        if key in self._prefix_memo:
            self._prefix_memo.move_to_end(key)
            return n, self._prefix_memo[key]
        cache = growing_cache()
        ckw, extra = self._forward_kwargs()
        ids = torch.tensor([first[:n]], dtype=torch.long, device=self.device)
        self.model(input_ids=ids, use_cache=True, **extra, **{ckw: cache})
        if not joinable(cache):
            return None
        kv = [(la.keys.clone(), la.values.clone()) for la in cache.layers]
        self._prefix_memo[key] = kv
        while len(self._prefix_memo) > self.prefix_memo_size:
            self._prefix_memo.popitem(last=False)
        return n, kv

    def _prefill_groups(self, take: list[int], prompts: list[list[int]]) -> list[list[int]]:
        """Cut the prompts to admit (longest first) into prefill batches of at most
        ``prefill_tokens`` padded tokens (>= 1 prompt each): one prefill of many prompts of
        different lengths would spend most of its work on padding and quadratic attention."""
        groups: list[list[int]] = []
        width = 0                                  # longest prompt of the last group
        for i in take:
            w = max(width, len(prompts[i]))
            if groups and w * (len(groups[-1]) + 1) <= self.prefill_tokens:
                groups[-1].append(i)
                width = w
            else:
                groups.append([i])
                width = len(prompts[i])
        return groups

    def _greedy(self, prompts: list[list[int]], max_new_tokens: int,
                stop: list[str]) -> list[str]:
        """Greedy decoding of all ``prompts`` with continuous batching (``engine="evict"``).

        At most ``batch_size`` rows decode together. A row that ends (EOS, ``max_new_tokens``,
        stop string) is evicted from the batch and the KV cache at once
        (``DynamicCache.batch_select_indices``); when at least ``max(1, batch_size // 4)`` slots
        are free (or the rest of the queue fits), the next prompts of the queue are prefilled as
        one left-padded batch and joined to the running one, so the batch stays full until the
        queue is empty and a long reply no longer keeps the others waiting. Shapes: active rows
        A <= batch_size feed (A, 1) tokens with (A, T) masks; the KV cache holds
        (A, kv_heads, T, head_dim) per layer, T trimmed to the longest active row. If a prefilled
        cache is not :func:`~cycleqd.inference._kvcache.joinable` (a layer holding no KV of its
        own, e.g. one sharing another layer's), rows are admitted only into an empty batch.
        """
        ckw, _ = self._forward_kwargs()
        queue = list(range(len(prompts)))[::-1]            # pop() takes the next prompt
        gen: list[list[int]] = [[] for _ in prompts]
        eos = set(self._eos_ids)
        window = 2 * max((len(s_) for s_ in stop), default=0) + 8  # tokens decoded for stops
        refill = max(1, self.batch_size // 4)
        prefix = self._shared_prefix(prompts)
        cache = mask = nxt = next_pos = None
        active: list[int] = []
        while queue or active:
            free = self.batch_size - len(active)
            if queue and (not active or (free >= min(refill, len(queue)) and self._joinable)):
                take = [queue.pop() for _ in range(min(free, len(queue)))]
                groups = self._prefill_groups(take, prompts) if self._joinable else [take]
                for k, group in enumerate(groups):
                    c2, m2, n2, p2 = self._prefill([prompts[i] for i in group], prefix)
                    if active:
                        mask = join(cache, mask, c2, m2)
                        nxt, next_pos = torch.cat([nxt, n2]), torch.cat([next_pos, p2])
                    else:
                        cache, mask, nxt, next_pos = c2, m2, n2, p2
                    active += group
                    if not joinable(cache):  # e.g. a layer without KV of its own: no joining
                        self._joinable = False
                        queue += [i for g in groups[k + 1:] for i in g][::-1]
                        break
            keep = []
            for j, (row, tok) in enumerate(zip(active, nxt.tolist())):
                if tok in eos:
                    continue
                gen[row].append(tok)
                if len(gen[row]) >= max_new_tokens:
                    continue
                if stop:
                    tail = self.tokenizer.decode(gen[row][-window:], skip_special_tokens=True)
                    if any(s_ in tail for s_ in stop):
                        continue
                keep.append(j)
            if len(keep) < len(active):
                active = [active[j] for j in keep]
                if not active:
                    cache = None
                    continue
                sel = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(sel)
                mask, nxt, next_pos = mask[sel], nxt[sel], next_pos[sel]
                if joinable(cache):
                    mask = trim(cache, mask)
            mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=1)
            logits = self.model(input_ids=nxt[:, None], attention_mask=mask,
                                position_ids=next_pos[:, None], use_cache=True,
                                **{ckw: cache}).logits[:, -1]
            nxt = logits.argmax(-1)
            next_pos = next_pos + 1
        return [self.tokenizer.decode(g, skip_special_tokens=True) for g in gen]

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

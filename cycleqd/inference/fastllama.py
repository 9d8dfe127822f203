"""A lean greedy decode step for Llama-family models, behind :class:`~cycleqd.inference.hf.HFBackend`.

Why: at 32 rows on 2 CPU cores a ``transformers`` decode step of SmolLM2-135M spends most of
its time outside the GEMMs (mask building, per-module dispatch, the KV cache's row joins and
trims; ``benchmarks/eval_bench.py --profile`` prints the split). This module runs the same
arithmetic with fewer, larger operations:

- a preallocated KV cache per layer, (rows, kv_heads, capacity, head_dim): each row keeps
  its slot, a new position is written in place at that row's own length, an evicted row is
  replaced by moving the last row into its slot (no per-step concatenation, no join padding:
  each row starts at position 0 of its slot and the step attends to ``max(length)``
  positions with a (rows, 1, 1, T) boolean mask);
- one GEMM for q/k/v and one for gate/up per layer (fused copies of the weights, rebuilt when
  any parameter of the model changes: :meth:`LlamaDecoder.current`);
- attention through ``scaled_dot_product_attention`` on the packed GQA layout
  (rows, kv_heads, groups, head_dim), as ``transformers``' SDPA path decodes one query;
  RMSNorm, RoPE (the model's own rotary module) and SiLU written exactly as in
  ``transformers``' ``modeling_llama``; the greedy argmax on the logits of the step.

Prefill stays on the ``transformers`` forward (:meth:`HFBackend._prefill
<cycleqd.inference.hf.HFBackend._prefill>`, shared prefix included); its KV is copied into the
slots. Replies equal the ``transformers`` path's up to float rounding (fp32: the benchmark
compares them token for token); models it does not cover run on the ``transformers``
forward (:func:`fast_unsupported`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: ``config.model_type`` values whose decoder layers are Llama's (pre-norm RMSNorm, RoPE,
#: GQA attention without bias, SiLU-gated MLP)
LLAMA_TYPES = ("llama",)


def fast_unsupported(model: torch.nn.Module) -> str | None:
    """Why ``model`` cannot run on :class:`FastLlamaBatch` (None when it can).

    It can when it is a ``LlamaForCausalLM``-shaped model (``config.model_type`` in
    :data:`LLAMA_TYPES`, SiLU MLP, no attention/MLP bias, SDPA attention), and none of its
    modules has an instance-level ``forward`` (e.g. installed by
    :class:`~cycleqd.inference.lowrank.LowRankChildren`) or forward hooks: the lean step reads
    the weights directly and would silently skip such wrappers.
    """
    cfg = getattr(model, "config", None)
    mtype = getattr(cfg, "model_type", None)
    if mtype not in LLAMA_TYPES:
        return f"model_type {mtype!r} is not one of {LLAMA_TYPES}"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"hidden_act {cfg.hidden_act!r} is not silu"
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        return "attention or MLP bias"
    if getattr(cfg, "_attn_implementation", "sdpa") != "sdpa":
        return f"attention implementation {cfg._attn_implementation!r} is not sdpa"
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(model, "lm_head"):
        return "no model.layers / lm_head"
    from torch.nn.modules import module as _m
    if _m._global_forward_hooks or _m._global_forward_pre_hooks:
        return "global forward hooks are installed"
    for name, mod in model.named_modules():
        if "forward" in vars(mod):
            return f"module {name or '<root>'} has a wrapped forward (e.g. LowRankChildren)"
        if mod._forward_hooks or mod._forward_pre_hooks:
            return f"module {name or '<root>'} has forward hooks"
    return None


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """``LlamaRMSNorm.forward`` (same operations, same rounding)."""
    dt = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(dt)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``apply_rotary_pos_emb`` for one tensor: x (A, heads, d), cos/sin (A, 1, d)."""
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rot * sin


class LlamaDecoder:
    """The weights of a Llama-family model laid out for :class:`FastLlamaBatch`.

    Per layer: the input/post-attention norm weights, a fused (q + 2 kv, hidden) q/k/v weight,
    the o-projection, a fused (2 intermediate, hidden) gate/up weight, the down projection
    (the fused ones are copies; the others alias the model's parameters). Built from the
    model's current parameters; :meth:`current` tells whether they still are.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        cfg = model.config
        inner = model.model
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.scale = self.head_dim ** -0.5
        self.embed = inner.embed_tokens.weight
        self.rotary = inner.rotary_emb
        self.norm = (inner.norm.weight, inner.norm.variance_epsilon)
        self.lm_head = model.lm_head.weight
        self.layers = []
        with torch.no_grad():
            for la in inner.layers:
                at, ml = la.self_attn, la.mlp
                self.layers.append((
                    la.input_layernorm.weight, la.input_layernorm.variance_epsilon,
                    torch.cat([at.q_proj.weight, at.k_proj.weight, at.v_proj.weight]).contiguous(),
                    at.o_proj.weight,
                    la.post_attention_layernorm.weight, la.post_attention_layernorm.variance_epsilon,
                    torch.cat([ml.gate_proj.weight, ml.up_proj.weight]).contiguous(),
                    ml.down_proj.weight, ml.gate_proj.weight.shape[0]))
        self.model = model
        self._sig = self._signature()

    def _signature(self) -> list[tuple]:
        return [(n, p, p._version, p.data_ptr())
                for n, p in self.model.named_parameters(remove_duplicate=False)]

    def current(self) -> bool:
        """True while the model's parameters are the same tensors, unmodified in place, as
        when this decoder was built (``HFBackend.load_weights`` copies in place, which bumps
        the tensors' version counters; untying replaces a parameter)."""
        sig = self._signature()
        return len(sig) == len(self._sig) and all(
            a[0] == b[0] and a[1] is b[1] and a[2:] == b[2:] for a, b in zip(sig, self._sig))

    @property
    def kv_dim(self) -> int:
        return self.n_kv * self.head_dim

    def step(self, tokens: torch.Tensor, pos: torch.Tensor, keys: list[torch.Tensor],
             values: list[torch.Tensor], mask: torch.Tensor, write: torch.Tensor,
             chunks: list[tuple[int, int, int]]) -> torch.Tensor:
        """One greedy decode step of A rows.

        Args:
            tokens: (A,) int64 token of each row at position ``pos``.
            pos: (A,) int64 position ids.
            keys, values: per layer (>= A, kv_heads, capacity, head_dim) slot buffers;
                position ``write[r]`` of row r is written by this step.
            mask: (>= A, capacity) bool, True where a row attends (including ``write``).
            write: (A,) int64 slot index written by each row.
            chunks: (first row, end row, T) row ranges covering 0..A-1 whose attention reads
                only the first T positions (T > every ``write`` of the range): attention is
                memory-bound on the KV cache, so rows much shorter than the longest do not
                read the longest row's length.
        Returns:
            (A,) int64 greedy next tokens.
        """
        A = tokens.shape[0]
        H, KV, d = self.n_heads, self.n_kv, self.head_dim
        x = F.embedding(tokens, self.embed)                           # (A, D)
        cos, sin = self.rotary(x[:, None], pos[:, None])              # (A, 1, d)
        rows = torch.arange(A, device=tokens.device)
        amask = mask[:, None, None, :]
        qd, kd = H * d, KV * d
        for (w1, e1, wqkv, wo, w2, e2, wgu, wd, inter), K, V in zip(self.layers, keys, values):
            h = _rms(x, w1, e1)
            qkv = F.linear(h, wqkv)
            q = _rope(qkv[:, :qd].view(A, H, d), cos, sin)
            k = _rope(qkv[:, qd:qd + kd].view(A, KV, d), cos, sin)
            K[rows, :, write] = k
            V[rows, :, write] = qkv[:, qd + kd:].view(A, KV, d)
            q = q.view(A, KV, H // KV, d)
            if len(chunks) == 1:
                o = F.scaled_dot_product_attention(q, K[:A, :, :chunks[0][2]], V[:A, :, :chunks[0][2]],
                                                   attn_mask=amask[:A, :, :, :chunks[0][2]],
                                                   scale=self.scale)
            else:
                o = torch.cat([F.scaled_dot_product_attention(
                    q[r0:r1], K[r0:r1, :, :t], V[r0:r1, :, :t], attn_mask=amask[r0:r1, :, :, :t],
                    scale=self.scale) for r0, r1, t in chunks])
            x = x + F.linear(o.reshape(A, qd), wo)
            h = _rms(x, w2, e2)
            gu = F.linear(h, wgu)
            x = x + F.linear(F.silu(gu[:, :inter]) * gu[:, inter:], wd)
        x = _rms(x, *self.norm)
        return F.linear(x, self.lm_head).argmax(-1)


class FastLlamaBatch:
    """Decode state of :meth:`HFBackend._decode_loop <cycleqd.inference.hf.HFBackend._decode_loop>`
    on a :class:`LlamaDecoder`: per layer keys/values (batch_size, kv_heads, capacity, head_dim)
    allocated once per loop (grown by copying when a row outgrows the capacity), the (batch_size,
    capacity) attention mask, and per row its filled length, next position and next token.
    Active rows occupy slots 0..A-1; a row's slot holds its real positions only (prefill
    padding dropped), so its mask is True exactly on 0..length-1.

    Invariant: every position of a slot at or past its row's length holds zeros. Attention
    reads a chunk of rows up to the chunk's longest row and masks the rest, but a masked
    position is still multiplied by its zero weight inside SDPA, so a NaN/inf left there by
    the slot's previous occupant (a child whose activations overflowed) would make a healthy
    row's output NaN. ``dirty`` (per slot, the end of what was ever written there) bounds
    what :meth:`admit` and :meth:`select` clear.

    Args:
        backend: the :class:`~cycleqd.inference.hf.HFBackend` (its ``_prefill``,
            ``batch_size``, ``device`` and ``stats`` are used).
        decoder: a :class:`LlamaDecoder` of the backend's model, current.
    """

    joinable = True
    GROW = 256  # positions added when a row outgrows the capacity
    #: rows per attention call (each call reads the KV of its rows up to their longest length)
    attn_rows = 8

    def __init__(self, backend, decoder: LlamaDecoder) -> None:
        self.be, self.dec = backend, decoder
        self.B = backend.batch_size
        self.A = 0
        self.cap = 0
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        dev = backend.device
        self.mask = torch.zeros((self.B, 0), dtype=torch.bool, device=dev)
        self.length = torch.zeros(self.B, dtype=torch.long, device=dev)
        self.pos = torch.zeros(self.B, dtype=torch.long, device=dev)
        self.nxt = torch.zeros(self.B, dtype=torch.long, device=dev)
        self.dirty = [0] * self.B   # per slot: positions >= dirty[s] are zero in every layer

    @staticmethod
    def decoder(model: torch.nn.Module) -> LlamaDecoder:
        """A :class:`LlamaDecoder` of ``model``'s current weights."""
        return LlamaDecoder(model)

    def _reserve(self, need: int) -> None:
        """Make the capacity at least ``need`` positions (copying the filled part)."""
        if need <= self.cap:
            return
        cap = need if not self.cap else max(need + self.GROW, self.cap + self.cap // 4)
        d, kv = self.dec.head_dim, self.dec.n_kv
        like = self.dec.embed
        used = int(self.length[:self.A].max()) if self.A else 0
        for lst in (self.keys, self.values):
            for i in range(len(self.dec.layers)):
                # zeros, not empty: masked positions are still multiplied by their (zero)
                # weights inside SDPA, and 0 * NaN from uninitialised memory is NaN
                buf = like.new_zeros((self.B, kv, cap, d))
                if lst and used:
                    buf[:self.A, :, :used] = lst[i][:self.A, :, :used]
                if len(lst) > i:
                    lst[i] = buf
                else:
                    lst.append(buf)
        self.dirty = [min(d_, used) if s_ < self.A else 0 for s_, d_ in enumerate(self.dirty)]
        mask = torch.zeros((self.B, cap), dtype=torch.bool, device=self.mask.device)
        mask[:, :self.cap] = self.mask
        self.mask, self.cap = mask, cap

    def admit(self, prompts: list[list[int]], prefix, max_new_tokens: int = 1) -> None:
        """Prefill ``prompts`` with the ``transformers`` forward (over ``prefix``) and copy
        their KV (without the left padding) into slots A..A+N-1; the capacity is made room for
        ``max_new_tokens`` more positions of the longest (so that it rarely grows by copying)."""
        cache, m2, n2, p2 = self.be._prefill(prompts, prefix)
        n, w = m2.shape
        a = self.A
        if a + n > self.B:
            raise RuntimeError(f"FastLlamaBatch: {a + n} rows exceed batch_size {self.B}")
        real = m2.bool()
        counts = real.sum(1).tolist()
        self._reserve(max(counts) + max_new_tokens)
        dense = all(c == w for c in counts)
        self._clear_tails([(a + r, c) for r, c in enumerate(counts)])
        for la, K, V in zip(cache.layers, self.keys, self.values):
            if dense:
                K[a:a + n, :, :w] = la.keys
                V[a:a + n, :, :w] = la.values
            else:    # drop the left padding: the slot holds the row's real positions only
                for r, c in enumerate(counts):
                    K[a + r, :, :c] = la.keys[r][:, real[r]]
                    V[a + r, :, :c] = la.values[r][:, real[r]]
        self.mask[a:a + n] = False
        for r, c in enumerate(counts):
            self.mask[a + r, :c] = True
        self.length[a:a + n] = torch.tensor(counts, device=self.length.device)
        self.pos[a:a + n] = p2
        self.nxt[a:a + n] = n2
        self.A = a + n

    def tokens(self) -> list[int]:
        """The next token of each active row."""
        return self.nxt[:self.A].tolist()

    def select(self, keep: list[int]) -> None:
        """Keep rows ``keep`` (increasing): each kept row moves down to slot j (its KV up to
        its own length is copied)."""
        for j, src in enumerate(keep):
            if src != j:
                t = int(self.length[src])
                for K, V in zip(self.keys, self.values):
                    K[j, :, :t] = K[src, :, :t]
                    V[j, :, :t] = V[src, :, :t]
                for buf in (self.mask, self.length, self.pos, self.nxt):
                    buf[j] = buf[src]
                self._clear_tails([(j, t)])
        self.A = len(keep)

    def _clear_tails(self, rows: list[tuple[int, int]]) -> None:
        """Zero slot ``s``'s positions ``t..dirty[s]`` in every layer for each ``(s, t)``
        (the previous occupant's leftovers past the new row's length) and set ``dirty[s] = t``
        (the caller writes the row's ``t`` positions)."""
        for s_, t in rows:
            end = self.dirty[s_]
            if end > t:
                for K, V in zip(self.keys, self.values):
                    K[s_, :, t:end] = 0
                    V[s_, :, t:end] = 0
            self.dirty[s_] = t

    def clear(self) -> None:
        self.A = 0

    def step(self) -> None:
        """One decode step of the active rows: write their tokens' KV at their lengths, greedy
        next tokens, lengths and positions + 1."""
        a = self.A
        length = self.length[:a]
        lens = length.tolist()
        self._reserve(max(lens) + 1)
        self.mask[torch.arange(a, device=self.mask.device), length] = True
        c = self.attn_rows
        chunks = [(r, min(r + c, a), max(lens[r:r + c]) + 1) for r in range(0, a, c)]
        self.be.stats["attended"] += sum(lens) + a
        self.nxt[:a] = self.dec.step(self.nxt[:a], self.pos[:a], self.keys, self.values,
                                     self.mask, length, chunks)
        for r, n in enumerate(lens):
            self.dirty[r] = max(self.dirty[r], n + 1)
        self.length[:a] += 1
        self.pos[:a] += 1

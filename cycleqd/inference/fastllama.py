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
- one GEMM for q/k/v and one for gate/up per layer (the decoder's own copies of the GEMM
  weights, checked against the model's parameters at each decode loop and rebuilt when they
  differ: :meth:`LlamaDecoder.current`); on CPU in fp32 the GEMMs run on MKL's packed
  weights, the rows padded up to a bucket (:class:`LlamaDecoder`);
- attention through ``scaled_dot_product_attention`` on the packed GQA layout
  (rows, kv_heads, groups, head_dim), as ``transformers``' SDPA path decodes one query;
  rows admitted over a shared prefix attend to it in one call per prefix group (cascade
  attention, :meth:`LlamaDecoder.step`), the prefix KV being kept once, not in every slot;
- RMSNorm, RoPE (the model's own rotary module) and SiLU written exactly as in
  ``transformers``' ``modeling_llama``; the greedy argmax on the logits of the step.

Prefill of admitted prompts runs through the same layers (:meth:`LlamaDecoder.prefill`: all
prompts' tokens as one unpadded matrix, causal attention per prompt, KV written into the
slots) when the CPU flash kernel is there, else on the ``transformers`` forward
(:meth:`HFBackend._prefill <cycleqd.inference.hf.HFBackend._prefill>`) with its KV copied
into the slots. Replies equal the ``transformers`` path's up to float rounding (fp32: the
benchmark compares them token for token); models it does not cover run on the
``transformers`` forward (:func:`fast_unsupported`).
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


def mkl_packed_available() -> bool:
    """True when this torch has the MKL packed-weight GEMM (``torch.ops.mkl._mkl_linear`` and
    ``_mkl_reorder_linear_weight``, what inductor's weight freezing uses on CPU)."""
    try:
        return bool(torch._C.has_mkl) and hasattr(torch.ops.mkl, "_mkl_linear") and hasattr(
            torch.ops.mkl, "_mkl_reorder_linear_weight")
    except (AttributeError, RuntimeError):
        return False


def cascade_available(device: torch.device) -> bool:
    """True when shared-prefix (cascade) attention can run on ``device``: it needs the CPU
    flash-attention kernel that returns the log-sum-exp of each query
    (``torch.ops.aten._scaled_dot_product_flash_attention_for_cpu``, what
    ``F.scaled_dot_product_attention`` dispatches to on CPU)."""
    return torch.device(device).type == "cpu" and hasattr(
        torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")


def _merge(o: torch.Tensor, lse: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor) -> torch.Tensor:
    """Attention over the union of two disjoint key sets from each set's normalised output
    o, o2 (..., d) and log-sum-exp lse, lse2 (...): the softmax-weighted mean of o and o2 with
    weights exp(lse) and exp(lse2) (max-shifted), as in FlashInfer's cascade attention."""
    mx = torch.maximum(lse, lse2)
    w, w2 = (lse - mx).exp_()[..., None], (lse2 - mx).exp_()[..., None]
    return (o * w + o2 * w2) / (w + w2)


class LlamaDecoder:
    """The weights of a Llama-family model laid out for :class:`FastLlamaBatch`.

    Per layer: the input/post-attention norm weights (aliases of the model's parameters), a
    fused (q + 2 kv, hidden) q/k/v weight, the (hidden, q) o-projection, a fused
    (2 intermediate, hidden) gate/up weight and the (hidden, intermediate) down projection;
    plus the (vocab, hidden) lm_head. The GEMM weights are the decoder's own copies (the
    embedding and norm weights are read from the model at each step).

    Packed GEMMs (``pack``; default: when :func:`mkl_packed_available` and the model is fp32
    on CPU): MKL's packed-weight GEMM is 1.2-2.2x ``F.linear`` on these shapes at 8-64 rows,
    1 thread, but only for the row count it was packed for. A step of A rows therefore runs
    its GEMMs at the bucket ``bucket(A)`` (smallest of :attr:`buckets` >= A), the extra rows
    being padding that never reaches the KV slots, attention or the returned tokens. The
    packed copies of all GEMM weights for one bucket (~ the model's size: 0.54 GB for
    SmolLM2-135M fp32) are built on the first step that uses the bucket; at most
    :attr:`max_packed` buckets are kept (least recently used dropped).

    Weight tracking (:meth:`current`): the copies are of the model's parameters when this
    decoder was built; a parameter replaced, modified in place (version counter) or edited
    through ``.data`` (no version bump) makes :meth:`current` False.
    """

    #: row buckets of the packed GEMMs (a step pads its rows up to the smallest bucket >= A;
    #: beyond the last, up to a multiple of 16)
    buckets: tuple[int, ...] = (8, 16, 32, 48, 64)
    #: packed buckets kept at once (each ~ one copy of the GEMM weights)
    max_packed: int = 2

    def __init__(self, model: torch.nn.Module, pack: bool | None = None) -> None:
        cfg = model.config
        inner = model.model
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.scale = self.head_dim ** -0.5
        self.embed = inner.embed_tokens.weight
        self.rotary = inner.rotary_emb
        self.norm = (inner.norm.weight, inner.norm.variance_epsilon)
        self.layers = []
        # (source parameters, copy, row offset) of every GEMM weight copy: what current() compares
        self._sources: list[tuple[torch.Tensor, torch.Tensor, int]] = []
        with torch.no_grad():
            self.lm_head = self._copy([model.lm_head.weight])
            for la in inner.layers:
                at, ml = la.self_attn, la.mlp
                self.layers.append((
                    la.input_layernorm.weight, la.input_layernorm.variance_epsilon,
                    self._copy([at.q_proj.weight, at.k_proj.weight, at.v_proj.weight]),
                    self._copy([at.o_proj.weight]),
                    la.post_attention_layernorm.weight, la.post_attention_layernorm.variance_epsilon,
                    self._copy([ml.gate_proj.weight, ml.up_proj.weight]),
                    self._copy([ml.down_proj.weight]), ml.gate_proj.weight.shape[0]))
        self.model = model
        self._sig = self._signature()
        if pack is None:
            pack = (mkl_packed_available() and self.lm_head.device.type == "cpu"
                    and self.lm_head.dtype == torch.float32)
        self.pack = bool(pack)
        #: bucket -> (per layer (qkv, o, gate/up, down) packed weights, packed lm_head)
        self._packed: dict[int, tuple[list[tuple], object]] = {}

    def _copy(self, params: list[torch.Tensor]) -> torch.Tensor:
        """A contiguous copy of ``params`` stacked along dim 0, recorded for :meth:`current`."""
        w = torch.cat([p.detach() for p in params]).contiguous()
        off = 0
        for p in params:
            self._sources.append((p, w, off))
            off += p.shape[0]
        return w

    def _signature(self) -> list[tuple]:
        return [(n, p, p._version, p.data_ptr())
                for n, p in self.model.named_parameters(remove_duplicate=False)]

    def current(self) -> bool:
        """True while the model's parameters are the same tensors, with the same contents, as
        when this decoder was built.

        ``HFBackend.load_weights`` copies in place, which bumps the tensors' version counters,
        and untying replaces a parameter: both are seen from the parameters' identity,
        ``data_ptr`` and version counters. An edit through ``p.data`` bumps no counter, so
        each GEMM weight copy is also compared exactly (``torch.equal``) with its source
        parameters -- one read of the model's GEMM weights and of the copies (0.29 s for
        SmolLM2-135M fp32 on one core at load ~2), once per decode loop. The embedding and norm weights
        are read from the model at each step and need no check.
        """
        sig = self._signature()
        if len(sig) != len(self._sig) or not all(
                a[0] == b[0] and a[1] is b[1] and a[2:] == b[2:] for a, b in zip(sig, self._sig)):
            return False
        with torch.no_grad():
            return all(torch.equal(w[off:off + p.shape[0]], p.detach())
                       for p, w, off in self._sources)

    @property
    def kv_dim(self) -> int:
        return self.n_kv * self.head_dim

    def bucket(self, rows: int) -> int:
        """Rows the GEMMs of a ``rows``-row step run at (``rows`` itself when not packing)."""
        if not self.pack:
            return rows
        for b in self.buckets:
            if b >= rows:
                return b
        return -(-rows // 16) * 16

    def _packs(self, m: int):
        """The packed GEMM weights for ``m`` rows (built on first use; LRU of ``max_packed``)."""
        got = self._packed.pop(m, None)
        while self._packed and len(self._packed) >= self.max_packed:
            self._packed.pop(next(iter(self._packed)))    # least recently used first
        if got is None:
            rw = torch.ops.mkl._mkl_reorder_linear_weight
            got = ([(rw(l[2], m), rw(l[3], m), rw(l[6], m), rw(l[7], m)) for l in self.layers],
                   rw(self.lm_head, m))
        self._packed[m] = got          # most recently used last
        return got

    def step(self, tokens: torch.Tensor, pos: torch.Tensor, keys: list[torch.Tensor],
             values: list[torch.Tensor], mask: torch.Tensor, write: torch.Tensor,
             chunks: list[tuple[int, int, int]],
             groups: list[tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]] = ()
             ) -> torch.Tensor:
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
            groups: shared-prefix groups (cascade attention; needs :func:`cascade_available`):
                (row indices (n,) int64, per layer the prefix's (keys, values), each
                (1, kv_heads, P, head_dim)). A row of a group attends to the group's P prefix
                positions followed by its own slot positions (which then hold only what
                follows the prefix). The prefix part is one flash-attention call for all
                rows of the group (queries of all its rows x the prefix keys, read once),
                merged with each row's slot attention by log-sum-exp (:func:`_merge`):
                equal to attention over the concatenation up to fp32 rounding.
        Returns:
            (A,) int64 greedy next tokens.

        With packed GEMMs the hidden states have M = :meth:`bucket` (A) >= A rows: rows A..M-1
        (token 0 at position 0) go through the GEMMs, norms and RoPE only; their KV is not
        written, they do not attend and their tokens are dropped (every operation but
        attention is row-wise, so they cannot change rows 0..A-1).
        """
        A = tokens.shape[0]
        M = self.bucket(A)
        H, KV, d = self.n_heads, self.n_kv, self.head_dim
        if M > A:
            tokens = torch.cat([tokens, tokens.new_zeros(M - A)])
            pos = torch.cat([pos, pos.new_zeros(M - A)])
        if self.pack:
            packs, plm = self._packs(M)
            mkl = torch.ops.mkl._mkl_linear

            def lin(x, w, pw):
                return mkl(x, pw, w, None, M)
        else:
            packs, plm = [(None,) * 4] * len(self.layers), None

            def lin(x, w, pw):
                return F.linear(x, w)
        x = F.embedding(tokens, self.embed)                           # (M, D)
        cos, sin = self.rotary(x[:, None], pos[:, None])              # (M, 1, d)
        rows = torch.arange(A, device=tokens.device)
        amask = mask[:, None, None, :]
        if groups:     # the flash kernel takes an additive float mask (what SDPA builds from bool)
            tmax = max(t for _, _, t in chunks)
            amask = x.new_zeros((A, tmax)).masked_fill_(~mask[:A, :tmax], float("-inf"))
            amask = amask[:, None, None, :]
            flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        G = H // KV
        qd, kd = H * d, KV * d
        o_buf = x.new_zeros((M, qd)) if M > A else None
        for li, ((w1, e1, wqkv, wo, w2, e2, wgu, wd, inter), (pqkv, po, pgu, pd), K, V) in enumerate(
                zip(self.layers, packs, keys, values)):
            h = _rms(x, w1, e1)
            qkv = lin(h, wqkv, pqkv)[:A]
            q = _rope(qkv[:, :qd].view(A, H, d), cos[:A], sin[:A])
            k = _rope(qkv[:, qd:qd + kd].view(A, KV, d), cos[:A], sin[:A])
            K[rows, :, write] = k
            V[rows, :, write] = qkv[:, qd + kd:].view(A, KV, d)
            q = q.view(A, KV, G, d)
            if groups:
                parts = [flash(q[r0:r1], K[r0:r1, :, :t], V[r0:r1, :, :t],
                               attn_mask=amask[r0:r1, :, :, :t], scale=self.scale)
                         for r0, r1, t in chunks]
                o = parts[0][0] if len(parts) == 1 else torch.cat([p_[0] for p_ in parts])
                lse = parts[0][1] if len(parts) == 1 else torch.cat([p_[1] for p_ in parts])
                for idx, kv in groups:
                    n = idx.shape[0]
                    kp, vp = kv[li]
                    qg = q[idx].transpose(0, 1).reshape(1, KV, n * G, d)
                    op, lp = flash(qg, kp, vp, scale=self.scale)
                    op = op.reshape(KV, n, G, d).transpose(0, 1)
                    lp = lp.reshape(KV, n, G).transpose(0, 1)
                    o[idx] = _merge(o[idx], lse[idx], op, lp)
            elif len(chunks) == 1:
                o = F.scaled_dot_product_attention(q, K[:A, :, :chunks[0][2]], V[:A, :, :chunks[0][2]],
                                                   attn_mask=amask[:A, :, :, :chunks[0][2]],
                                                   scale=self.scale)
            else:
                o = torch.cat([F.scaled_dot_product_attention(
                    q[r0:r1], K[r0:r1, :, :t], V[r0:r1, :, :t], attn_mask=amask[r0:r1, :, :, :t],
                    scale=self.scale) for r0, r1, t in chunks])
            if o_buf is None:
                o = o.reshape(A, qd)
            else:
                o_buf[:A] = o.reshape(A, qd)
                o = o_buf
            x = x + lin(o, wo, po)
            h = _rms(x, w2, e2)
            gu = lin(h, wgu, pgu)
            x = x + lin(F.silu(gu[:, :inter]) * gu[:, inter:], wd, pd)
        x = _rms(x, *self.norm)
        return lin(x, self.lm_head, plm)[:A].argmax(-1)


    def prefill(self, prompts: list[list[int]], prefix: tuple[int, list] | None,
                keys: list[torch.Tensor], values: list[torch.Tensor],
                slots: list[int]) -> torch.Tensor:
        """Prefill ``prompts`` through the lean layers, writing their KV into ``slots``.

        The N = sum of suffix lengths tokens of all prompts run as one (N, hidden) matrix
        (no padding) through each layer's GEMMs; attention is per prompt, causal over its own
        suffix (flash kernel, K/V repeated to the query heads as ``transformers``' SDPA path
        does), merged by log-sum-exp (:func:`_merge`) with attention over the shared prefix
        (one call for the queries of all prompts x the prefix keys). Needs
        :func:`cascade_available`.

        Args:
            prompts: N prompts (token ids); each longer than the prefix.
            prefix: (P, per layer (keys, values) each (1, kv_heads, P, head_dim)): the KV of
                the P tokens every prompt starts with (its positions are 0..P-1), or None.
            keys, values: per layer (slots, kv_heads, capacity, head_dim) buffers; prompt r's
                positions P.. are written at 0..len-P-1 of slot ``slots[r]``.
            slots: slot of each prompt.
        Returns:
            (N,) int64 greedy first token of each prompt.
        """
        P, kv = prefix if prefix else (0, None)
        suf = [p[P:] for p in prompts]
        lens = [len(t) for t in suf]
        dev = keys[0].device
        H, KV, d = self.n_heads, self.n_kv, self.head_dim
        G, qd, kd = H // KV, H * d, KV * d
        flat = torch.tensor([t for p in suf for t in p], dtype=torch.long, device=dev)
        pos = torch.cat([torch.arange(P, P + n, device=dev) for n in lens])
        N = flat.shape[0]
        offs = [0]
        for n in lens:
            offs.append(offs[-1] + n)
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        x = F.embedding(flat, self.embed)                              # (N, D)
        cos, sin = self.rotary(x[:, None], pos[:, None])               # (N, 1, d)
        for li, ((w1, e1, wqkv, wo, w2, e2, wgu, wd, inter), K, V) in enumerate(
                zip(self.layers, keys, values)):
            h = _rms(x, w1, e1)
            qkv = F.linear(h, wqkv)
            q = _rope(qkv[:, :qd].view(N, H, d), cos, sin)               # (N, H, d)
            k = _rope(qkv[:, qd:qd + kd].view(N, KV, d), cos, sin)       # (N, KV, d)
            v = qkv[:, qd + kd:].view(N, KV, d)
            o = torch.empty_like(q)
            lse = q.new_empty((N, H))
            for r, s_ in enumerate(slots):
                a, b = offs[r], offs[r + 1]
                kr, vr = k[a:b].transpose(0, 1), v[a:b].transpose(0, 1)  # (KV, n, d)
                K[s_, :, :b - a] = kr
                V[s_, :, :b - a] = vr
                orr, lr = flash(q[a:b].transpose(0, 1)[None],
                                kr.repeat_interleave(G, 0)[None], vr.repeat_interleave(G, 0)[None],
                                is_causal=True, scale=self.scale)
                o[a:b] = orr[0].transpose(0, 1)
                lse[a:b] = lr[0].transpose(0, 1)
            if kv is not None:
                kp, vp = kv[li]
                qg = q.view(N, KV, G, d).transpose(0, 1).reshape(1, KV, N * G, d)
                op, lp = flash(qg, kp, vp, scale=self.scale)
                op = op.reshape(KV, N, G, d).transpose(0, 1).reshape(N, H, d)
                lp = lp.reshape(KV, N, G).transpose(0, 1).reshape(N, H)
                o = _merge(o, lse, op, lp)
            x = x + F.linear(o.reshape(N, qd), wo)
            h = _rms(x, w2, e2)
            gu = F.linear(h, wgu)
            x = x + F.linear(F.silu(gu[:, :inter]) * gu[:, inter:], wd)
        last = torch.tensor([b - 1 for b in offs[1:]], device=dev)
        x = _rms(x[last], *self.norm)
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

    Shared prefixes (:attr:`cascade`, on CPU): rows admitted over a shared prefix (``admit``'s
    ``prefix``, from :meth:`HFBackend._shared_prefix
    <cycleqd.inference.hf.HFBackend._shared_prefix>` / ``_group_prefix``) keep only what
    follows the prefix in their slots; the prefix KV is kept once per prefix (the memoised
    tensors themselves, not copied) and attended by all rows of its group in one call
    (:meth:`LlamaDecoder.step`'s ``groups``). Rows admitted over the same prefix object in
    different admits share one group.

    Args:
        backend: the :class:`~cycleqd.inference.hf.HFBackend` (its ``_prefill``,
            ``batch_size``, ``device`` and ``stats`` are used).
        decoder: a :class:`LlamaDecoder` of the backend's model, current.
    """

    joinable = True
    GROW = 256  # positions added when a row outgrows the capacity
    #: rows per attention call (each call reads the KV of its rows up to their longest length)
    attn_rows = 8
    #: keep a shared prefix's KV once per group (cascade attention) instead of in every slot
    cascade = True
    #: prefill admitted prompts through the lean layers (:meth:`LlamaDecoder.prefill`;
    #: needs :attr:`cascade`) instead of the ``transformers`` forward
    lean_prefill = True

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
        self.cascade = self.cascade and cascade_available(dev)
        #: per slot: key of its row's prefix group in :attr:`prefixes` (None: no prefix)
        self.group: list[int | None] = [None] * self.B
        #: group key -> (P, per layer (keys, values) each (1, kv_heads, P, head_dim))
        self.prefixes: dict[int, tuple[int, list]] = {}
        self._adopt(getattr(backend, "_fast_kv", None))
        backend._fast_kv = None

    def _adopt(self, spare) -> None:
        """Take over the KV buffers a previous batch of the same backend handed back
        (:meth:`release`) when their shapes, dtype and device fit: allocating and zeroing them
        afresh costs ~1.5 GB of zero-filling per decode loop at 32 rows x 1000 positions for
        SmolLM2-135M (measured: 5.2 s of a 27.5 s child evaluation). Their ``dirty`` extents
        come with them, so the zero-past-length invariant holds exactly as for a slot reused
        within one batch."""
        if not spare:
            return
        keys, values, mask, cap, dirty = spare
        d, kv = self.dec.head_dim, self.dec.n_kv
        want = (self.B, kv, cap, d)
        if (len(keys) == len(self.dec.layers) and all(
                t.shape == want and t.dtype == self.dec.embed.dtype and t.device == self.dec.embed.device
                for t in keys + values) and mask.shape == (self.B, cap) and len(dirty) == self.B):
            self.keys, self.values, self.mask, self.cap, self.dirty = keys, values, mask, cap, list(dirty)

    def release(self) -> None:
        """Hand the KV buffers back to the backend for its next decode loop (called by
        :meth:`HFBackend._decode_loop <cycleqd.inference.hf.HFBackend._decode_loop>` on a
        normal end only: after an exception inside a step ``dirty`` could understate what was
        written). This batch must not be used afterwards."""
        if self.cap:
            self.be._fast_kv = (self.keys, self.values, self.mask, self.cap, self.dirty)
        self.keys, self.values, self.cap, self.A = [], [], 0, 0

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
        ``max_new_tokens`` more positions of the longest (so that it rarely grows by copying).
        With :attr:`cascade` and a ``prefix`` (P, per-layer KV), the slots receive only the
        positions after the P prefix positions and the rows join the prefix's group."""
        if self.lean_prefill and self.cascade:
            self._admit_lean(prompts, prefix, max_new_tokens)
            return
        cache, m2, n2, p2 = self.be._prefill(prompts, prefix)
        a = self.A
        if a + m2.shape[0] > self.B:
            raise RuntimeError(f"FastLlamaBatch: {a + m2.shape[0]} rows exceed batch_size {self.B}")
        P = prefix[0] if prefix and self.cascade else 0
        key = None
        if P:
            key = id(prefix[1])
            self.prefixes[key] = prefix           # holds the tensors, so the id stays unique
            m2 = m2[:, P:]
        n, w = m2.shape
        real = m2.bool()
        counts = real.sum(1).tolist()
        self._reserve(max(counts) + max_new_tokens)
        dense = all(c == w for c in counts)
        self._clear_tails([(a + r, c) for r, c in enumerate(counts)])
        for la, K, V in zip(cache.layers, self.keys, self.values):
            lk, lv = la.keys[:, :, P:], la.values[:, :, P:]
            if dense:
                K[a:a + n, :, :w] = lk
                V[a:a + n, :, :w] = lv
            else:    # drop the left padding: the slot holds the row's real positions only
                for r, c in enumerate(counts):
                    K[a + r, :, :c] = lk[r][:, real[r]]
                    V[a + r, :, :c] = lv[r][:, real[r]]
        self.group[a:a + n] = [key] * n
        self.mask[a:a + n] = False
        for r, c in enumerate(counts):
            self.mask[a + r, :c] = True
        self.length[a:a + n] = torch.tensor(counts, device=self.length.device)
        self.pos[a:a + n] = p2
        self.nxt[a:a + n] = n2
        self.A = a + n

    def _admit_lean(self, prompts: list[list[int]], prefix, max_new_tokens: int) -> None:
        """:meth:`admit` through :meth:`LlamaDecoder.prefill` (no padding, KV written into
        the slots directly)."""
        a, n = self.A, len(prompts)
        if a + n > self.B:
            raise RuntimeError(f"FastLlamaBatch: {a + n} rows exceed batch_size {self.B}")
        P = prefix[0] if prefix else 0
        counts = [len(p) - P for p in prompts]
        if min(counts) < 1:
            raise ValueError("FastLlamaBatch.admit: a prompt is not longer than its prefix")
        self._reserve(max(counts) + max_new_tokens)
        self._clear_tails([(a + r, c) for r, c in enumerate(counts)])
        first = self.dec.prefill(prompts, prefix, self.keys, self.values, list(range(a, a + n)))
        self.be.stats["prefill_tokens"] += sum(counts)
        memoise = getattr(self.be, "_memoise_slots", None)
        if memoise is not None:     # the backend's prompt memo (agent turn N+1 reuses turn N)
            memoise(prompts, prefix, self.keys, self.values, list(range(a, a + n)))
        key = None
        if P:
            key = id(prefix[1])
            self.prefixes[key] = prefix
        self.group[a:a + n] = [key] * n
        dev = self.length.device
        self.mask[a:a + n] = False
        for r, c in enumerate(counts):
            self.mask[a + r, :c] = True
        self.length[a:a + n] = torch.tensor(counts, device=dev)
        self.pos[a:a + n] = torch.tensor([len(p) for p in prompts], device=dev)
        self.nxt[a:a + n] = first
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
                self.group[j] = self.group[src]
                self._clear_tails([(j, t)])
        self.A = len(keep)
        live = set(self.group[:self.A])
        self.prefixes = {k: v for k, v in self.prefixes.items() if k in live}

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
        self.prefixes = {}

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
        self.be.stats["kv_read"] += sum((r1 - r0) * t for r0, r1, t in chunks)
        groups = []
        if self.prefixes:
            rows: dict[int, list[int]] = {}
            for r, g in enumerate(self.group[:a]):
                if g is not None:
                    rows.setdefault(g, []).append(r)
            for g, idx in rows.items():
                P, kv = self.prefixes[g]
                groups.append((torch.tensor(idx, device=self.mask.device), kv))
                self.be.stats["attended"] += P * len(idx)
                self.be.stats["kv_read"] += P
        self.nxt[:a] = self.dec.step(self.nxt[:a], self.pos[:a], self.keys, self.values,
                                     self.mask, length, chunks, groups)
        for r, n in enumerate(lens):
            self.dirty[r] = max(self.dirty[r], n + 1)
        self.length[:a] += 1
        self.pos[:a] += 1

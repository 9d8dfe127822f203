"""The lean Llama decoder (``cycleqd.inference.fastllama``): packed GEMMs, weight tracking."""

from __future__ import annotations

import pytest
import torch

from cycleqd.inference import HFBackend
from cycleqd.inference import fastllama


def _pair(d, **kw):
    fast = HFBackend.from_pretrained(d, batch_size=4, min_shared_prefix=0, **kw)
    slow = HFBackend(fast.model, fast.tokenizer, batch_size=4, min_shared_prefix=0, fast=False,
                     fingerprint="x")
    return fast, slow


@pytest.mark.parametrize("target", ["model.layers.0.self_attn.q_proj.weight",
                                    "model.layers.1.self_attn.o_proj.weight",
                                    "model.layers.0.mlp.down_proj.weight",
                                    "lm_head.weight"])
def test_in_place_edit_through_data_is_decoded(tiny_llama_dirs, convs, target):
    """Attack (F2): ``p.data.copy_(...)`` does not bump ``p``'s version counter, so a decoder
    that tracked weights by identity/data_ptr/version kept decoding the previous weights.
    After such an edit the lean path must give the transformers path's replies on the edited
    model (and they must differ from the unedited replies, or the test proves nothing)."""
    fast, slow = _pair(tiny_llama_dirs[0])
    before = fast.generate(convs, max_new_tokens=12)
    dec = fast._fast_decoder
    p = fast.model.get_parameter(target)
    g = torch.Generator().manual_seed(3)
    p.data.copy_(torch.randn(p.shape, generator=g) * p.detach().std() * 3)
    assert not dec.current()
    ref = slow.generate(convs, max_new_tokens=12)
    assert ref != before
    assert fast.generate(convs, max_new_tokens=12) == ref
    assert fast.fast_fallback is None


def test_single_element_data_edit_is_decoded(tiny_llama_dirs, convs):
    """Attack (F2): one element changed through ``.data`` (no version bump, same storage):
    the content probe is exact, so the decoder is rebuilt."""
    fast, slow = _pair(tiny_llama_dirs[0])
    fast.generate(convs, max_new_tokens=4)
    dec = fast._fast_decoder
    w = fast.model.model.layers[1].mlp.down_proj.weight
    w.data[3, 5] += 1e-6                    # tiny: only an exact comparison sees it
    assert not dec.current()
    fast.generate(convs, max_new_tokens=4)
    assert fast._fast_decoder is not dec and fast._fast_decoder.current()


def _steps(be, prompts, dec, n=8):
    from cycleqd.inference.fastllama import FastLlamaBatch
    b = FastLlamaBatch(be, dec)
    out = []
    with torch.inference_mode():
        b.admit(prompts[:3], None, n + 2)
        b.admit(prompts[3:], None, n + 2)
        for k in range(n):
            out.append(b.tokens())
            b.step()
            if k == 3:
                b.select([0, 2, 3, 4])
        out.append(b.tokens())
    return out, b


@pytest.mark.skipif(not fastllama.mkl_packed_available(), reason="no MKL packed GEMM in this torch")
def test_packed_gemms_pad_rows_without_touching_real_rows(tiny_llama_dirs):
    """Rows padded up to a bucket: the greedy tokens equal the unpacked step's and the
    transformers forward's, no slot past the active rows receives KV, and the packed copies
    are built only for the buckets used (at most ``max_packed`` kept)."""
    be = HFBackend.from_pretrained(tiny_llama_dirs[1], batch_size=8)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17], [3, 4, 5], [30, 31, 32, 33, 34]]
    plain = fastllama.LlamaDecoder(be.model, pack=False)
    packed = fastllama.LlamaDecoder(be.model, pack=True)
    packed.buckets = (2, 4, 8)      # 5 rows -> bucket 8 (3 padding rows), 4 rows -> bucket 4
    a, _ = _steps(be, prompts, plain)
    b, batch = _steps(be, prompts, packed)
    assert a == b
    assert sorted(packed._packed) == [4, 8]
    # slots 5..7 were never occupied (5 rows at most): the padding rows wrote nothing there
    assert all(not bool(k[5:].any()) for k in batch.keys + batch.values)
    from cycleqd.inference.hf import _HFBatch
    hb = _HFBatch(be)
    with torch.inference_mode():
        hb.admit(prompts[:3], None)
        hb.admit(prompts[3:], None)
        for k in range(8):
            assert hb.tokens() == a[k]
            hb.step()
            if k == 3:
                hb.select([0, 2, 3, 4])
    packed.max_packed = 1
    _steps(be, prompts, packed)
    assert len(packed._packed) == 1


def test_without_mkl_ops_falls_back_to_linear(tiny_llama_dirs, convs, monkeypatch):
    """No MKL packed GEMM (another build, another device): the step runs on F.linear, same replies."""
    fast, slow = _pair(tiny_llama_dirs[0])
    monkeypatch.setattr(fastllama, "mkl_packed_available", lambda: False)
    fast._fast_decoder = None
    assert fast.generate(convs, max_new_tokens=10) == slow.generate(convs, max_new_tokens=10)
    assert not fast._fast_decoder.pack and not fast._fast_decoder._packed


def _cascade_run(be, cascade, n=10):
    """Tokens of a FastLlamaBatch fed two prefix groups and one row without prefix."""
    from cycleqd.inference.fastllama import FastLlamaBatch
    p1, p2 = list(range(40, 80)), list(range(120, 150))
    g1 = [p1 + [5, 6, 7], p1 + [8], p1 + [9, 10, 11, 12, 13]]
    g2 = [p2 + [14, 15], p2 + [16, 17, 18, 19]]
    b = FastLlamaBatch(be, be._fast_decoder or FastLlamaBatch.decoder(be.model))
    b.cascade = cascade
    out = []
    with torch.inference_mode():
        b.admit(g1, be._shared_prefix(g1), n + 2)
        b.admit([[3, 4, 5, 6]], None, n + 2)
        b.admit(g2, be._shared_prefix(g2), n + 2)
        lengths = b.length[:b.A].tolist()
        for k in range(n):
            out.append(b.tokens())
            b.step()
            if k == 4:
                b.select([1, 3, 4])          # drops rows of both groups; moves the rest down
        out.append(b.tokens())
    return out, lengths, b


def test_cascade_attention_equals_prefix_copied_into_slots(tiny_llama_dirs):
    """Rows admitted over a shared prefix: with cascade attention (prefix KV kept once per
    group, merged by log-sum-exp) the greedy tokens equal those of the prefix copied into
    every slot, the slots hold only the suffixes, and a group left without rows is dropped."""
    be = HFBackend.from_pretrained(tiny_llama_dirs[1], batch_size=8, min_shared_prefix=8)
    if not fastllama.cascade_available(be.device):
        pytest.skip("no CPU flash-attention kernel with log-sum-exp")
    a, la, ba = _cascade_run(be, cascade=False)
    b, lb, bb = _cascade_run(be, cascade=True)
    assert a == b and len(set(map(tuple, a))) > 1
    assert la == [43, 41, 45, 4, 32, 34] and lb == [3, 1, 5, 4, 2, 4]
    assert not ba.prefixes and len(bb.prefixes) == 2 and bb.group[:3] == [bb.group[0], None, bb.group[2]]
    with torch.inference_mode():
        bb.select([1])
    assert not bb.prefixes


def test_cascade_reused_slot_never_leaks_nonfinite_kv(tmp_path):
    """Attack (as test_reused_slot_never_leaks_a_previous_rows_nonfinite_kv, over a shared
    prefix): A's suffix holds an inf-embedding token, so A's slot KV turns NaN; A ends, C
    moves into A's slot, and B (same prefix, longer suffix) shares C's attention chunk. With
    the prefix attended separately, C's zeroed slot tail must still keep C's reply equal to
    its reply alone and to the transformers path."""
    from cycleqd.models.tiny import make_tiny_llama
    from tests.inference._poison import poisoned_stream

    d = make_tiny_llama(tmp_path / "m", seed=0, hidden_size=64, num_layers=2)
    bad = 7
    pre = list(range(300, 340))
    A = pre + list(range(20, 40)) + [bad] + list(range(60, 80))
    # B's suffix (30) is longer than C's, and short enough not to grow the capacity (a growth
    # copies only the rows' filled parts, which would clean the slot by accident)
    C, B = pre + list(range(100, 104)), pre + list(range(200, 230))

    def run(fast):
        return poisoned_stream(d, A, B, C, bad, fast=fast, min_shared_prefix=8)

    fast_stream, fast_alone, fast_b = run(True)
    slow_stream, _, slow_b = run(False)
    assert fast_stream == fast_alone == slow_stream and fast_b == slow_b


@pytest.mark.parametrize("shared", [False, True])
def test_lean_prefill_matches_transformers_prefill(tiny_llama_dirs, shared):
    """Prompts of different lengths prefilled through the lean layers (flat, unpadded,
    causal per prompt, prefix merged by log-sum-exp) give the transformers prefill's first
    tokens, slot KV (fp32 rounding) and lengths/positions, then the same decode."""
    be = HFBackend.from_pretrained(tiny_llama_dirs[0], batch_size=6, min_shared_prefix=8)
    if not fastllama.cascade_available(be.device):
        pytest.skip("no CPU flash-attention kernel with log-sum-exp")
    pre = list(range(50, 90)) if shared else []
    prompts = [pre + list(range(5, 5 + n)) for n in (9, 2, 17, 1, 6)]
    from cycleqd.inference.fastllama import FastLlamaBatch
    got = []
    for lean in (False, True):
        b = FastLlamaBatch(be, FastLlamaBatch.decoder(be.model))
        b.lean_prefill = lean
        with torch.inference_mode():
            b.admit(prompts[:1], None, 8)             # a row already decoding
            b.step()
            b.admit(prompts[1:], be._shared_prefix(prompts[1:]) if shared else None, 8)
            toks = [b.tokens()]
            for _ in range(6):
                b.step()
                toks.append(b.tokens())
        got.append((toks, b.length[:b.A].tolist(), b.pos[:b.A].tolist(), b))
    (ta, la, pa, ba), (tb, lb, pb, bb) = got
    assert ta == tb and la == lb and pa == pb
    for x, y in zip(ba.keys + ba.values, bb.keys + bb.values):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)
    assert bool((pa[1] == len(prompts[1]) + 6))


def test_kv_buffers_reused_across_decode_loops_and_poison_cleared(tiny_llama_dirs):
    """A decode loop hands its KV buffers to the next (no re-allocation and zero-filling per
    loop); a previous occupant's leftovers -- here NaN written over everything a slot ever
    held -- never reach a later loop's rows: replies equal a fresh backend's."""
    from cycleqd.inference import HFBackend
    d = tiny_llama_dirs[0]
    conv = [[{"role": "user", "content": "Say something about lists, at length. " * k}] for k in (1, 3, 2, 4)]
    be = HFBackend.from_pretrained(d, batch_size=4, min_shared_prefix=0)
    first = be.generate(conv, max_new_tokens=8)
    spare = be._fast_kv
    assert spare is not None and spare[3] > 0                    # handed back at the loop's end
    keys, values, _mask, cap, dirty = spare
    with torch.inference_mode():                                 # poison what was ever written
        for K, V in zip(keys, values):
            for s_, n in enumerate(dirty):
                K[s_, :, :n] = float("nan")
                V[s_, :, :n] = float("nan")
    short = [[{"role": "user", "content": "Hi."}]] * 2 + conv[:2]
    got = be.generate(short, max_new_tokens=8)
    assert be._fast_kv[0][0] is keys[0]                          # the same buffers, reused
    fresh = HFBackend.from_pretrained(d, batch_size=4, min_shared_prefix=0)
    assert got == fresh.generate(short, max_new_tokens=8)
    assert first == fresh.generate(conv, max_new_tokens=8)

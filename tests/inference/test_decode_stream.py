"""HFBackend.generate_stream (cross-caller continuous batching) and the lean Llama decoder."""

from __future__ import annotations

import pytest
import torch

from cycleqd.inference import HFBackend
from cycleqd.inference.base import Request


@pytest.fixture(scope="module")
def pair(tiny_llama_dirs):
    a = tiny_llama_dirs[0]
    return (HFBackend.from_pretrained(a, batch_size=3, fast=False),
            HFBackend.from_pretrained(a, batch_size=3, fast=True))


@pytest.mark.parametrize("fast", [False, True])
def test_stream_rows_join_mid_run_with_own_budgets_and_stops(pair, convs, fast):
    """Requests arrive between decode steps, each with its own budget and stop strings; every
    reply equals ``generate`` of that prompt alone with the same arguments."""
    be = pair[fast]
    ids = [be.prompt_ids(c) for c in convs]
    full = be.generate(convs, max_new_tokens=20)
    budgets = [20, 5, 12, 20, 3, 16, 9]
    stops = [[t[6:9]] if len(t) > 9 else [] for t in full]
    assert sum(bool(s) for s in stops) >= 3
    got: dict[int, str] = {}
    arrivals = {0: [0, 1], 2: [2], 3: [3, 4, 5], 9: [6]}     # poll call -> request indices
    calls = {"n": 0, "blocked": 0}

    def done(i):
        return lambda text: got.__setitem__(i, text)

    def poll(block: bool):
        k = calls["n"]
        calls["n"] += 1
        calls["blocked"] += block
        if k > max(arrivals):
            return None
        return [Request(ids[i], budgets[i], stops[i], done(i)) for i in arrivals.get(k, [])]

    be.reset_stats()
    be.generate_stream(poll)
    assert be.stats["prefill_rows"] == len(convs) and be.stats["steps"] > 0
    assert sorted(got) == list(range(len(convs)))
    for i, c in enumerate(convs):
        assert got[i] == be.generate([c], max_new_tokens=budgets[i], stop=stops[i])[0], i
    assert be.fast_fallback is None


def test_stream_block_waits_and_none_finishes_active_rows(pair, convs):
    be = pair[1]
    ids = be.prompt_ids(convs[1])
    seen, out = [], []
    script = iter([[], [Request(ids, 6, on_done=out.append)], None])

    def poll(block):
        seen.append(block)
        return next(script)

    be.generate_stream(poll)
    assert seen[:2] == [True, True]          # nothing active: poll may wait
    assert seen[2] is False                  # a row is decoding
    assert out == [be.generate([convs[1]], max_new_tokens=6)[0]]
    with pytest.raises(TypeError, match="poll"):
        be.generate_stream(lambda block: ["not a request"])


@pytest.mark.parametrize("kwargs, field", [
    (dict(prompt_ids=[], max_new_tokens=3), "prompt_ids"),
    (dict(prompt_ids=[1, -2], max_new_tokens=3), "prompt_ids"),
    (dict(prompt_ids=[1], max_new_tokens=0), "max_new_tokens"),
    (dict(prompt_ids=[1], max_new_tokens=2, stop="x"), "stop"),
    (dict(prompt_ids=[1], max_new_tokens=2, on_done=3), "on_done"),
])
def test_bad_request_rejected_on_construction(kwargs, field):
    with pytest.raises(ValueError, match=field):
        Request(**kwargs)


def test_fast_equals_transformers_path_and_generate(tiny_llama_dirs, convs):
    a = tiny_llama_dirs[0]
    slow = HFBackend.from_pretrained(a, batch_size=3, fast=False)
    fast = HFBackend.from_pretrained(a, batch_size=3)
    gen = HFBackend.from_pretrained(a, batch_size=3, engine="generate")
    ref = gen.generate(convs, max_new_tokens=24)
    assert fast.generate(convs, max_new_tokens=24) == slow.generate(convs, max_new_tokens=24) == ref
    assert fast.fast_fallback is None and fast._fast_decoder is not None
    assert len(set(ref)) > 1


def test_fast_step_logits_path_matches_hf_forward(tiny_llama_dirs):
    """The lean step's greedy tokens over several steps equal the transformers forward's for
    rows of different lengths (padding, slots filled at different lengths)."""
    be = HFBackend.from_pretrained(tiny_llama_dirs[1], batch_size=4)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]
    from cycleqd.inference.fastllama import FastLlamaBatch
    from cycleqd.inference.hf import _HFBatch
    with torch.inference_mode():
        fb, hb = FastLlamaBatch(be, FastLlamaBatch.decoder(be.model)), _HFBatch(be)
        for b in (fb, hb):
            b.admit(prompts[:2], None)
            b.admit(prompts[2:], None)
        # unused slot positions are read (with zero weight) by attention: they must be finite
        # (0 * NaN from uninitialised memory is NaN; this broke replies depending on the heap)
        assert all(bool(torch.isfinite(t).all()) for t in fb.keys + fb.values)
        for _ in range(10):
            assert fb.tokens() == hb.tokens()
            fb.step()
            hb.step()
        fb.select([0, 2])
        hb.select([0, 2])
        for _ in range(5):
            fb.step()
            hb.step()
            assert fb.tokens() == hb.tokens()


def test_fast_decoder_rebuilt_after_load_weights(tiny_llama_dirs, convs):
    """Fused weight copies must follow load_weights: a second child gives its own replies."""
    a, b = tiny_llama_dirs
    be = HFBackend.from_pretrained(a, batch_size=3)
    other = HFBackend.from_pretrained(b, batch_size=3, fast=False)
    first = be.generate(convs, max_new_tokens=12)
    dec = be._fast_decoder
    be.load_weights(other.model.state_dict(), "b")
    assert not dec.current()
    assert be.generate(convs, max_new_tokens=12) == other.generate(convs, max_new_tokens=12) != first
    assert be._fast_decoder is not dec


def test_wrapped_forward_falls_back_to_transformers(tiny_llama_dirs, convs):
    be = HFBackend.from_pretrained(tiny_llama_dirs[0], batch_size=3)
    ref = be.generate(convs[:3], max_new_tokens=8)
    lin = be.model.model.layers[0].mlp.down_proj
    calls = []
    orig = lin.forward

    def wrapped(x):
        calls.append(x.shape)
        return orig(x)

    lin.forward = wrapped                          # what LowRankChildren does
    try:
        assert be.generate(convs[:3], max_new_tokens=8) == ref
        assert "wrapped forward" in be.fast_fallback and calls
    finally:
        del lin.forward
    be.generate(convs[:3], max_new_tokens=8)
    assert be.fast_fallback is None


def test_stream_groups_reuse_a_shared_prefix(tiny_llama_dirs, convs):
    """Requests sharing a long system prompt, arriving in two waves: the first wave's group
    computes the prefix KV once, the second reuses it from the memo; replies equal generate()."""
    be = HFBackend.from_pretrained(tiny_llama_dirs[0], batch_size=4)
    system = {"role": "system", "content": "You are a careful assistant. " * 12}
    shared = [[system, *(m for m in c if m["role"] != "system")] for c in convs]
    ids = [be.prompt_ids(c) for c in shared]
    got: dict[int, str] = {}
    waves = iter([[0, 1, 2], [], [3, 4, 5, 6]])

    def poll(block):
        idx = next(waves, None)
        return None if idx is None else [
            Request(ids[i], 10, on_done=lambda t, i=i: got.__setitem__(i, t)) for i in idx]

    be.generate_stream(poll)
    assert len(be._prefix_memo) == 1
    (_, toks), = be._prefix_memo.keys()
    assert len(toks) >= 32 and all(tuple(p[:len(toks)]) == toks for p in ids)
    ref = HFBackend.from_pretrained(tiny_llama_dirs[0], batch_size=4, min_shared_prefix=0,
                                    fast=False).generate(shared, max_new_tokens=10)
    assert [got[i] for i in range(len(shared))] == ref


def test_reused_slot_never_leaks_a_previous_rows_nonfinite_kv(tmp_path):
    """Attack (red team): row A's prompt holds a token whose embedding is inf, so A's KV turns
    NaN; A ends, short row C moves into A's old slot, and a longer row B then shares C's
    attention chunk, so C's masked tail (A's leftovers) is read. SDPA multiplies masked
    positions by 0 and 0 * NaN = NaN: C must still get the reply it gets alone and on the
    transformers path (every slot position past a row's length is zeroed)."""
    from cycleqd.models.tiny import make_tiny_llama
    from tests.inference._poison import poisoned_stream

    d = make_tiny_llama(tmp_path / "m", seed=0, hidden_size=64, num_layers=2)
    bad = 7
    A = list(range(20, 60)) + [bad] + list(range(60, 80))
    C, B = list(range(100, 110)), list(range(200, 250))

    def run(fast):
        return poisoned_stream(d, A, B, C, bad, fast=fast, min_shared_prefix=0)[:2]

    fast_stream, fast_alone = run(True)
    slow_stream, _ = run(False)
    assert fast_stream == fast_alone == slow_stream

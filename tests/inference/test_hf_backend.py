"""HFBackend: batched == sequential greedy, stop strings, budgets, in-place weight swaps."""

from __future__ import annotations

import pytest
import torch

from cycleqd.inference import GenerationBackend, HFBackend, fingerprint_state_dict


@pytest.fixture(scope="module")
def backends(tiny_llama_dirs):
    a, b = tiny_llama_dirs
    return HFBackend.from_pretrained(a, batch_size=4), HFBackend.from_pretrained(b, batch_size=4)


def test_protocol_and_order(backends, convs):
    be, _ = backends
    assert isinstance(be, GenerationBackend)
    out = be.generate(convs, max_new_tokens=12)
    assert len(out) == len(convs) and all(isinstance(x, str) for x in out)
    # each reply is the reply of its own conversation: reversing the input reverses the output
    assert be.generate(convs[::-1], max_new_tokens=12) == out[::-1]
    assert be.generate([], max_new_tokens=4) == []


def test_batched_equals_one_by_one(backends, convs):
    be, _ = backends
    batched = be.generate(convs, max_new_tokens=16)
    be.batch_size = 1
    try:
        single = [be.generate([c], max_new_tokens=16)[0] for c in convs]
    finally:
        be.batch_size = 4
    assert batched == single
    assert len(set(batched)) > 1  # the prompts really lead to different replies


def test_eviction_loop_equals_hf_generate(tiny_llama_dirs, convs):
    a = tiny_llama_dirs[0]
    ev = HFBackend.from_pretrained(a, batch_size=3)
    hf = HFBackend.from_pretrained(a, batch_size=3, engine="generate")
    assert ev.generate(convs, max_new_tokens=20) == hf.generate(convs, max_new_tokens=20)
    full = ev.generate(convs, max_new_tokens=20)
    stops = [t[4:6] for t in full if len(t) >= 6][:2]
    assert stops
    assert ev.generate(convs, max_new_tokens=20, stop=stops) == \
        hf.generate(convs, max_new_tokens=20, stop=stops)
    with pytest.raises(ValueError, match="engine"):
        HFBackend.from_pretrained(a, engine="beam")


def test_continuous_batching_joins_rows_mid_run(tiny_llama_dirs, convs, monkeypatch):
    """Rows end at different steps (stop strings), freed slots are refilled from the queue by
    joining a new prefilled batch to the running one; replies equal one-by-one decoding and
    ``model.generate``."""
    a = tiny_llama_dirs[0]
    ev = HFBackend.from_pretrained(a, batch_size=3, fast=False)  # joins HF caches
    full = ev.generate(convs, max_new_tokens=24)
    stops = [t[k:k + 3] for t, k in zip(full, (2, 9, 5, 14)) if len(t) > k + 3]
    assert len(stops) >= 3
    joins = []
    import cycleqd.inference.hf as hf_module
    orig = hf_module.join

    def spy(cache, mask, new_cache, new_mask):
        joins.append((mask.shape, new_mask.shape))
        return orig(cache, mask, new_cache, new_mask)

    monkeypatch.setattr(hf_module, "join", spy)
    continuous = ev.generate(convs, max_new_tokens=24, stop=stops)
    assert joins, "no prompt was admitted into a running batch"
    assert any(m[1] != n[1] for m, n in joins)  # joined batches of different widths (padding)
    ev.batch_size = 1
    single = [ev.generate([c], max_new_tokens=24, stop=stops)[0] for c in convs]
    hf = HFBackend.from_pretrained(a, batch_size=3, engine="generate")
    assert continuous == single == hf.generate(convs, max_new_tokens=24, stop=stops)
    assert len({len(t) for t in continuous}) > 2  # the rows really ended at different steps


def test_shared_prefix_computed_once_same_replies(tiny_llama_dirs, convs, monkeypatch):
    """Prompts sharing a long system prompt: its KV cache is computed once per call and the
    replies equal those without sharing, one-by-one decoding and ``model.generate``."""
    a = tiny_llama_dirs[0]
    system = {"role": "system", "content": "You are a careful assistant. " * 12}
    shared = [[system, *(m for m in c if m["role"] != "system")] for c in convs]
    ev = HFBackend.from_pretrained(a, batch_size=3)
    prefixes = []
    orig = HFBackend._shared_prefix

    def spy(self, prompts):
        out = orig(self, prompts)
        prefixes.append(None if out is None else out[0])
        return out

    monkeypatch.setattr(HFBackend, "_shared_prefix", spy)
    with_prefix = ev.generate(shared, max_new_tokens=16)
    assert prefixes and prefixes[-1] is not None and prefixes[-1] >= 32
    prefixes.clear()
    ev.min_shared_prefix = 0            # no prefix reuse of any kind (memos included)
    ev.reset_stats()
    assert ev.generate(shared, max_new_tokens=16) == with_prefix
    assert all(p is None for p in prefixes) and ev.stats["prefill_reused"] == 0
    assert ev.stats["prefill_tokens"] == sum(len(ev.prompt_ids(c)) for c in shared)
    ev.batch_size = 1
    assert [ev.generate([c], max_new_tokens=16)[0] for c in shared] == with_prefix
    hf = HFBackend.from_pretrained(a, batch_size=3, engine="generate")
    assert hf.generate(shared, max_new_tokens=16) == with_prefix
    with pytest.raises(ValueError, match="prefill_tokens"):
        HFBackend.from_pretrained(a, prefill_tokens=0)


def test_unsorted_batches_same_replies(backends, convs):
    be, _ = backends
    be.sort_by_length = False
    try:
        unsorted = be.generate(convs, max_new_tokens=10)
    finally:
        be.sort_by_length = True
    assert unsorted == be.generate(convs, max_new_tokens=10)


def test_max_new_tokens_bounds_reply(backends, convs, monkeypatch):
    """n new tokens need 1 prefill + at most n - 1 decode forwards per batch (the n-th
    token comes from the last forward); batches = ceil(7 / 4) = 2."""
    be, _ = backends
    calls = []
    real = be.model.forward

    def spy(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(be.model, "forward", spy)
    for n in (1, 5):
        calls.clear()
        # a cold prompt memo (memoised prompts are prefilled in groups per memo entry) and
        # no padding bound on the prefill groups (prefill_pad_frac splits them further)
        be._prompt_memo.clear()
        monkeypatch.setattr(be, "prefill_pad_frac", None)
        short = be.generate(convs, max_new_tokens=n)
        assert len(calls) <= 2 * n
        assert sum(1 for shape in calls if shape[1] > 1) == 2  # two prefills
    longer = be.generate(convs, max_new_tokens=20)
    assert sum(map(len, longer)) > sum(map(len, short))


def test_max_new_tokens_bounds_reply_generate_engine(tiny_llama_dirs, convs, monkeypatch):
    be = HFBackend.from_pretrained(tiny_llama_dirs[0], batch_size=4, engine="generate")
    seen = []
    real = be.model.generate

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.append(out.shape[1] - kwargs["input_ids"].shape[1])
        return out

    monkeypatch.setattr(be.model, "generate", spy)
    for n in (1, 5):
        seen.clear()
        be.generate(convs, max_new_tokens=n)
        assert seen and max(seen) <= n


def test_stop_string_cuts_reply(backends, convs):
    be, _ = backends
    full = be.generate(convs, max_new_tokens=24)
    k, text = max(enumerate(full), key=lambda kv: len(kv[1]))
    assert len(text) >= 6, "random tiny model produced too little text to test stop strings"
    stop = text[3:6]
    cut = be.generate([convs[k]], max_new_tokens=24, stop=[stop])[0]
    assert cut == text[:text.find(stop)]
    assert stop not in cut


def test_weight_swap_in_place(backends, convs):
    a, b = backends
    ref_a = a.generate(convs, max_new_tokens=12)
    ref_b = b.generate(convs, max_new_tokens=12)
    assert ref_a != ref_b
    ptrs = {k: v.data_ptr() for k, v in a.model.state_dict().items()}
    fp_a = a.fingerprint
    sd_a = {k: v.clone() for k, v in a.model.state_dict().items()}
    sd_b = b.model.state_dict()
    a.load_weights(sd_b, fingerprint="child-1")
    try:
        assert a.fingerprint == "child-1"
        assert a.generate(convs, max_new_tokens=12) == ref_b
        assert {k: v.data_ptr() for k, v in a.model.state_dict().items()} == ptrs  # no realloc
    finally:
        a.load_weights(sd_a, fingerprint=fp_a)
    assert a.generate(convs, max_new_tokens=12) == ref_a


def test_bad_weights_rejected_before_any_copy(backends):
    a, _ = backends
    before = {k: v.clone() for k, v in a.model.state_dict().items()}
    fp = a.fingerprint
    good = {k: v.clone() + 1.0 for k, v in before.items()}
    bad_shape = dict(good)
    name = "model.layers.1.mlp.down_proj.weight"
    bad_shape[name] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="down_proj.*shape"):
        a.load_weights(bad_shape, fingerprint="x")
    with pytest.raises(ValueError, match="unknown"):
        a.load_weights({**good, "model.extra.weight": torch.zeros(2)}, fingerprint="x")
    missing = dict(good)
    del missing["model.norm.weight"]
    with pytest.raises(ValueError, match="missing"):
        a.load_weights(missing, fingerprint="x")
    with pytest.raises(ValueError, match="fingerprint"):
        a.load_weights(good, fingerprint="")
    after = a.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert a.fingerprint == fp


def test_tied_embeddings_alias_optional(tiny_tied_dir, convs):
    be = HFBackend.from_pretrained(tiny_tied_dir)
    sd = {k: v.clone() for k, v in be.model.state_dict().items()}
    ref = be.generate(convs[:3], max_new_tokens=8)
    sd.pop("lm_head.weight", None)
    new = {k: v * 1.5 for k, v in sd.items()}
    be.load_weights(new, fingerprint="scaled")
    emb = be.model.get_input_embeddings().weight
    assert torch.equal(emb, new["model.embed_tokens.weight"])
    assert torch.equal(be.model.get_output_embeddings().weight, emb)  # still tied
    be.load_weights(sd, fingerprint="orig")
    assert be.generate(convs[:3], max_new_tokens=8) == ref


def test_untied_weights_untie_a_tied_model(tiny_tied_dir, convs):
    """A weight space untied by an expert that trained ``lm_head`` alone (issue 18.9) is
    evaluated as untied: the logits are those of a model holding both tensors, not of one
    whose output layer silently stayed equal to the embeddings."""
    be = HFBackend.from_pretrained(tiny_tied_dir)
    sd = {k: v.clone() for k, v in be.model.state_dict().items()}
    emb = sd["model.embed_tokens.weight"]
    head = emb + 0.5 * torch.randn(emb.shape, generator=torch.Generator().manual_seed(0))
    new = dict(sd, **{"lm_head.weight": head})
    be.load_weights(new, fingerprint="untied")
    assert torch.equal(be.model.get_output_embeddings().weight, head)
    assert torch.equal(be.model.get_input_embeddings().weight, emb)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        hidden = be.model.model(input_ids=ids).last_hidden_state
        assert torch.allclose(be.model(input_ids=ids).logits, hidden @ head.T, atol=1e-5)
    # later loads keep the two apart; loading tied weights again gives the original model
    be.load_weights(sd, fingerprint="orig")
    assert torch.equal(be.model.get_output_embeddings().weight, emb)
    ref = HFBackend.from_pretrained(tiny_tied_dir).generate(convs[:3], max_new_tokens=8)
    assert be.generate(convs[:3], max_new_tokens=8) == ref


def test_default_fingerprint_is_content_hash(tiny_llama_dirs):
    a, b = tiny_llama_dirs
    a1, a2, b1 = (HFBackend.from_pretrained(p) for p in (a, a, b))
    assert a1.fingerprint == a2.fingerprint != b1.fingerprint
    assert a1.fingerprint == fingerprint_state_dict(a1.model.state_dict())
    sd = {k: v.clone() for k, v in a1.model.state_dict().items()}
    sd["model.norm.weight"][0] += 1e-3
    assert fingerprint_state_dict(sd) != a1.fingerprint
    with pytest.raises(ValueError, match="empty"):
        fingerprint_state_dict({})


@pytest.mark.parametrize("kwargs, field", [
    ({"conversations": [[{"role": "robot", "content": "x"}]], "max_new_tokens": 4}, "role"),
    ({"conversations": [[]], "max_new_tokens": 4}, "conversations\\[0\\]"),
    ({"conversations": [[{"role": "user", "content": 3}]], "max_new_tokens": 4}, "content"),
    ({"conversations": [[{"role": "user", "content": "x"}]], "max_new_tokens": 0}, "max_new_tokens"),
    ({"conversations": [[{"role": "user", "content": "x"}]], "max_new_tokens": 4, "stop": "ab"}, "stop"),
    ({"conversations": [[{"role": "user", "content": "x"}]], "max_new_tokens": 4, "stop": [""]}, "stop"),
    ({"conversations": "hello", "max_new_tokens": 4}, "conversations"),
])
def test_bad_generate_args(backends, kwargs, field):
    be, _ = backends
    with pytest.raises(ValueError, match=field):
        be.generate(**kwargs)


def test_bad_constructor_args(tiny_llama_dirs):
    with pytest.raises(ValueError, match="batch_size"):
        HFBackend.from_pretrained(tiny_llama_dirs[0], batch_size=0)


@pytest.mark.integration
def test_smollm2_batched_equals_sequential_and_swap():
    """Real SmolLM2-135M-Instruct: batched greedy == one-by-one greedy on MBPP-style prompts,
    and an in-place swap to perturbed weights changes replies, swapping back restores them."""
    from cycleqd.models.smollm2 import ensure_smollm2

    be = HFBackend.from_pretrained(ensure_smollm2(), batch_size=4)
    convs = [[{"role": "user", "content": q}] for q in (
        "Write a python function to reverse a string.",
        "Write a function to find the maximum of three numbers. Your code should pass: "
        "assert max_of_three(1, 5, 3) == 5",
        "What is 7 * 6?", "Name a prime number larger than 10.")]
    batched = be.generate(convs, max_new_tokens=48)
    be.batch_size = 1
    assert [be.generate([c], max_new_tokens=48)[0] for c in convs] == batched
    be.batch_size = 4
    base = {k: v.clone() for k, v in be.model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    child = {k: v + 0.05 * v.std() * torch.randn(v.shape, generator=g) if v.ndim == 2 else v
             for k, v in base.items()}
    be.load_weights(child, fingerprint="child")
    assert be.generate(convs, max_new_tokens=48) != batched
    be.load_weights(base, fingerprint="base")
    assert be.generate(convs, max_new_tokens=48) == batched


def test_shared_prefix_reused_across_calls_until_the_weights_change(tiny_llama_dirs, convs):
    """A later call with the same weights reuses the prefix KV (no forward over the prefix);
    new weights drop it, and the replies are those of a fresh backend holding those weights."""
    from safetensors.torch import load_file

    a, b = tiny_llama_dirs[0], tiny_llama_dirs[1]
    system = {"role": "system", "content": "You are a careful assistant. " * 12}
    shared = [[system, *(m for m in c if m["role"] != "system")] for c in convs]
    ev = HFBackend.from_pretrained(a, batch_size=3)
    first = ev.generate(shared, max_new_tokens=12)
    assert len(ev._prefix_memo) == 1
    lengths = []
    hook = ev.model.register_forward_pre_hook(lambda m, args, kw: lengths.append(kw["input_ids"].shape),
                                              with_kwargs=True)
    assert ev.generate(shared[::-1], max_new_tokens=12) == first[::-1]
    assert lengths and not [s for s in lengths if s[0] == 1 and s[1] >= 32], lengths  # no prefix forward
    hook.remove()
    sd = {k: v for f in sorted(b.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    ev.load_weights(sd, "other-weights")
    assert not ev._prefix_memo
    assert ev.generate(shared, max_new_tokens=12) == HFBackend.from_pretrained(b, batch_size=3).generate(
        shared, max_new_tokens=12)

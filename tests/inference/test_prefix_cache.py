"""HFBackend prefix reuse (``prefix_cache="prompts"``): prefix-aware admission of mixed
skills' prompts and the prompt KV memo (automatic prefix caching at prompt granularity).

Every reply is compared with a cold backend (fresh, ``min_shared_prefix=0``: no prefix
reuse of any kind) decoding the prompt alone; token counts come from ``stats``.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from cycleqd.inference import HFBackend
from cycleqd.inference.base import Request

SYS_A = {"role": "system", "content": "You are a careful Python programmer. Write one function. " * 6}
SYS_B = {"role": "system", "content": "You operate a MySQL database; answer with one SQL query. " * 6}
USERS = ["Find the max of a list.", "Reverse a string please, and explain each step of it.",
         "Count the vowels.", "How many users are older than 30 in the table users?",
         "List every table.", "def add(a, b):"]


def _cold(d, prompt_ids: list[int], n: int) -> str:
    """Reference: a fresh backend, no prefix reuse, the prompt decoded alone."""
    be = HFBackend.from_pretrained(d, batch_size=1, min_shared_prefix=0)
    out = []
    be.generate_stream(_script([[Request(list(prompt_ids), n, on_done=out.append)]]))
    return out[0]


def _script(waves):
    it = iter(waves)
    return lambda block: next(it, None)


def _stream(be: HFBackend, waves: list[list[list[int]]], n: int) -> list[str]:
    """Run ``waves`` of prompt ids through generate_stream (one wave per poll); replies in
    submission order."""
    got: dict[int, str] = {}
    reqs, k = [], 0
    for wave in waves:
        reqs.append([Request(p, n, on_done=lambda t, i=k + j: got.__setitem__(i, t))
                     for j, p in enumerate(wave)])
        k += len(wave)
    be.generate_stream(_script(reqs))
    return [got[i] for i in range(k)]


@pytest.fixture(scope="module")
def mixed(tiny_llama_dirs):
    """Two skills' conversations, interleaved in the queue (A, B, A, B, ...)."""
    return [[SYS_A if i % 2 == 0 else SYS_B, {"role": "user", "content": u}]
            for i, u in enumerate(USERS)]


@pytest.mark.parametrize("fast", [False, True])
def test_mixed_skills_prefilled_over_their_own_system_prompt(tiny_llama_dirs, mixed, fast, monkeypatch):
    """Two skills' prompts queued together: "prompts" prefills each skill's rows over its own
    system-prompt KV (one forward per system prompt), "call" finds no prefix shared by the
    mixed group; fewer prefill tokens, replies equal to each prompt decoded alone."""
    d = tiny_llama_dirs[0]
    new = HFBackend.from_pretrained(d, batch_size=8, fast=fast)
    old = HFBackend.from_pretrained(d, batch_size=8, fast=fast, prefix_cache="call")
    ids = [new.prompt_ids(c) for c in mixed]
    seen = []
    # every admission (prompts, prefix length): the lean decoder prefills through its own
    # layers (FastLlamaBatch._admit_lean), the transformers path through HFBackend._prefill
    from cycleqd.inference.fastllama import FastLlamaBatch
    real, real_lean = HFBackend._prefill, FastLlamaBatch._admit_lean

    def spy(self, prompts, prefix=None):
        seen.append(([list(p) for p in prompts], prefix[0] if prefix else 0))
        return real(self, prompts, prefix)

    def spy_lean(self, prompts, prefix, max_new_tokens):
        seen.append(([list(p) for p in prompts], prefix[0] if prefix else 0))
        return real_lean(self, prompts, prefix, max_new_tokens)

    monkeypatch.setattr(HFBackend, "_prefill", spy)
    monkeypatch.setattr(FastLlamaBatch, "_admit_lean", spy_lean)
    got = _stream(new, [ids], 10)
    groups_new = list(seen)
    seen.clear()
    ref_old = _stream(old, [ids], 10)
    monkeypatch.undo()
    assert seen == [(ids, 0)]               # "call": the mixed group shares no prefix
    # "prompts": each group holds one skill's rows (split further only to bound padding),
    # over the prefix all that skill's prompts share (>= its system prompt), computed once
    prefix_of = {}
    for rows, P in groups_new:
        skill = {ids.index(r) % 2 for r in rows}
        assert len(skill) == 1
        prefix_of.setdefault(skill.pop(), set()).add(P)
    assert sorted(len(rows) for rows, _ in groups_new) != [6] and sum(len(r) for r, _ in groups_new) == 6
    for k in (0, 1):
        mine = ids[k::2]
        lcp = min(next((j for j, (x, y) in enumerate(zip(mine[0], r)) if x != y), len(r))
                  for r in mine[1:])
        assert prefix_of[k] == {lcp} and lcp >= 40
    computed = sum(P for (P,) in prefix_of.values())
    reused = sum(P * len(rows) for rows, P in groups_new)
    assert new.stats["prefill_reused"] == reused
    assert new.stats["prefill_tokens"] == sum(map(len, ids)) - reused + computed
    assert old.stats["prefill_tokens"] == sum(map(len, ids)) > new.stats["prefill_tokens"]
    assert got == ref_old == [_cold(d, p, 10) for p in ids]


def _episode_turns(be: HFBackend, n_eps: int = 3, n: int = 12):
    """Turn-1 conversations of ``n_eps`` agent episodes (shared system prompt), their turn-1
    replies on ``be`` and the turn-2 conversations (reply + an observation)."""
    t1 = [[SYS_B, {"role": "user", "content": f"{u} The table is users(id, name, age); "
                                                  f"one query per turn, then wait for its result."}]
          for u in USERS[:n_eps]]
    r1 = be.generate(t1, max_new_tokens=n)
    t2 = [c + [{"role": "assistant", "content": r},
               {"role": "user", "content": f"Observation: [(4,)] rows={i}. Continue."}]
          for i, (c, r) in enumerate(zip(t1, r1))]
    return t1, r1, t2


@pytest.mark.parametrize("fast", [False, True])
def test_agent_turn_two_reuses_turn_one_kv(tiny_llama_dirs, fast):
    """An episode's next turn starts with its previous turn's prompt: it is prefilled only
    past the memoised turn-1 KV (a group per episode), the turn-1 entries are superseded, and
    replies equal a cold backend's."""
    d = tiny_llama_dirs[0]
    be = HFBackend.from_pretrained(d, batch_size=8, fast=fast)
    t1, r1, t2 = _episode_turns(be)
    ids1 = [be.prompt_ids(c) for c in t1]
    ids2 = [be.prompt_ids(c) for c in t2]
    assert all(b[:len(a)] == a for a, b in zip(ids1, ids2))      # the template keeps the prefix
    assert len(be._prompt_memo) == 3
    be.reset_stats()
    got = be.generate(t2, max_new_tokens=12)
    own = sum(len(b) - len(a) for a, b in zip(ids1, ids2))
    assert be.stats["prefill_tokens"] == own                      # nothing before turn 2's tokens
    assert be.stats["prefill_reused"] == sum(map(len, ids1))
    assert len(be._prompt_memo) == 3                               # turn 2 replaced turn 1
    assert got == [_cold(d, p, 12) for p in ids2]
    assert r1 == [_cold(d, p, 12) for p in ids1]
    # the same prompt again: all but its last token from the memo
    be.reset_stats()
    assert be.generate(t2, max_new_tokens=12) == got and be.stats["prefill_tokens"] == 3


def test_stream_turn_two_joins_running_batch_over_its_memo(tiny_llama_dirs):
    """Turn 2 of one episode arrives while other rows decode (the pool's case): it is
    prefilled over its turn-1 KV, next to a fresh prompt of another skill."""
    d = tiny_llama_dirs[0]
    be = HFBackend.from_pretrained(d, batch_size=4)
    t1, _, t2 = _episode_turns(be, n_eps=1)
    other = [SYS_A, {"role": "user", "content": USERS[0]}]
    ids = [be.prompt_ids(t2[0]), be.prompt_ids(other)]
    be.reset_stats()
    got = _stream(be, [[ids[1]], [], [ids[0]]], 10)
    assert be.stats["prefill_tokens"] == len(ids[1]) + len(ids[0]) - len(be.prompt_ids(t1[0]))
    assert got == [_cold(d, ids[1], 10), _cold(d, ids[0], 10)]


def _weights(d):
    return {k: v for f in sorted(d.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


@pytest.mark.parametrize("how", ["new_fingerprint", "same_fingerprint_in_place", "load_weights",
                                 "same_fingerprint_through_data"])
def test_weight_change_never_reuses_stale_kv(tiny_llama_dirs, how, monkeypatch):
    """Attack: the memo holds turn-1 KV of weights A; the same token ids are then decoded
    with weights B -- copied in place under a NEW fingerprint (the memo's key alone must
    protect: the parameter-version guard is disabled), copied in place under the SAME
    fingerprint (the version guard must protect), or via load_weights. Replies equal a cold
    backend holding B, and differ from what the stale KV gives (so the attack bites)."""
    a, b = tiny_llama_dirs
    be = HFBackend.from_pretrained(a, batch_size=4)
    t1, _, t2 = _episode_turns(be, n_eps=2)
    ids2 = [be.prompt_ids(c) for c in t2]
    ref_b = [_cold(b, p, 12) for p in ids2]
    sd_b = _weights(b)
    if how == "load_weights":
        be.load_weights(sd_b, "weights-b")
        assert not be._prompt_memo and not be._prefix_memo
    else:
        if how == "new_fingerprint":
            monkeypatch.setattr(HFBackend, "_check_memo_weights", lambda self: None)
        with torch.no_grad():
            for k, v in be.model.state_dict().items():
                # through .data no version counter moves: the lean decoder's content check
                # (LlamaDecoder.current) must catch it and drop the memos with its copies
                (v.data if how == "same_fingerprint_through_data" else v).copy_(sd_b[k])
        if how == "new_fingerprint":
            be.fingerprint = "weights-b"
    be.reset_stats()
    got = be.generate(t2, max_new_tokens=12)
    assert be.stats["prefill_memo"] == 0 and got == ref_b
    # the attack bites: KV of weights A under B's replies would differ
    stale = HFBackend.from_pretrained(a, batch_size=4)
    _episode_turns(stale, n_eps=2)
    with torch.no_grad():
        for k, v in stale.model.state_dict().items():
            v.copy_(sd_b[k])
    monkeypatch.setattr(HFBackend, "_check_memo_weights", lambda self: None)
    stale.fast = False        # nor the lean decoder's content check (which also drops the memos)
    stale.reset_stats()
    assert stale.generate(t2, max_new_tokens=12) != ref_b
    assert stale.stats["prefill_memo"] > 0


def test_memo_bytes_bound_lru_and_disable(tiny_llama_dirs, mixed):
    """The memo never holds more than prompt_memo_bytes (least recently used dropped
    first; an entry above the bound is not kept); 0 disables it with the same replies."""
    d = tiny_llama_dirs[0]
    probe = HFBackend.from_pretrained(d, batch_size=4)
    ids = [probe.prompt_ids(c) for c in mixed]
    probe.generate([mixed[0]], max_new_tokens=2)
    (_, k0, v0, nb0), = probe._prompt_memo.entries.values()
    per_token = nb0 // len(ids[0])
    assert nb0 == (k0.numel() + v0.numel()) * k0.element_size() and k0.shape[2] == len(ids[0])
    bound = per_token * (max(map(len, ids)) * 2 + 1)         # room for two prompts, not three
    be = HFBackend.from_pretrained(d, batch_size=2, prompt_memo_bytes=bound)
    ref = be.generate(mixed, max_new_tokens=8)
    memo = be._prompt_memo
    assert 1 <= len(memo) < len(mixed) and memo.bytes <= bound
    assert memo.bytes == sum(e[3] for e in memo.entries.values())
    small = HFBackend.from_pretrained(d, batch_size=2, prompt_memo_bytes=per_token * 10)
    assert small.generate(mixed, max_new_tokens=8) == ref and len(small._prompt_memo) == 0
    off = HFBackend.from_pretrained(d, batch_size=2, prompt_memo_bytes=0)
    assert off.generate(mixed, max_new_tokens=8) == ref and len(off._prompt_memo) == 0
    big = HFBackend.from_pretrained(d, batch_size=2)
    assert big.generate(mixed, max_new_tokens=8) == ref
    for x in (off, be, big):       # the same prompts again: the memo serves what it kept
        x.reset_stats()
        assert x.generate(mixed, max_new_tokens=8) == ref
    assert big.stats["prefill_tokens"] < be.stats["prefill_tokens"] <= off.stats["prefill_tokens"]
    assert big.stats["prefill_tokens"] == len(mixed)               # one token per prompt
    # entries of another fingerprint are dropped when a new prompt is stored
    be.fingerprint = "other"
    be.generate([mixed[1]], max_new_tokens=2)
    assert {k[0] for k in memo.entries} == {"other"} and len(memo) == 1


@pytest.mark.parametrize("kwargs, field", [({"prompt_memo_bytes": -1}, "prompt_memo_bytes"),
                                           ({"prompt_memo_bytes": 1.5}, "prompt_memo_bytes"),
                                           ({"prefix_cache": "blocks"}, "prefix_cache")])
def test_bad_prefix_cache_args(tiny_llama_dirs, kwargs, field):
    with pytest.raises(ValueError, match=field):
        HFBackend.from_pretrained(tiny_llama_dirs[0], **kwargs)


def test_prefill_groups_bounded_by_padding(tiny_llama_dirs):
    """prefill_pad_frac: a row joins a group only if its padding is <= that fraction of the
    group's width; prefill_tokens still bounds every group."""
    be = HFBackend.from_pretrained(tiny_llama_dirs[0], prefill_tokens=400)
    lens = [100, 95, 91, 50, 48, 10]
    take = list(range(len(lens)))
    assert be._prefill_groups(take, lengths=lens, pad_frac=0.1) == [[0, 1, 2], [3, 4], [5]]
    assert be._prefill_groups(take, lengths=lens) == [[0, 1, 2, 3], [4, 5]]
    assert be._prefill_groups(take, lengths=lens, pad_frac=0.0) == [[0], [1], [2], [3], [4], [5]]

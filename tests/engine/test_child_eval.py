"""One batch per child, children without materialisation: the engine's scores and replies
are the sequential, materialised path's (tiny random Llama, real MBPP and DB-Bench skills)."""

from __future__ import annotations

import threading

import pytest
import torch
from safetensors.torch import load_file

from cycleqd.engine.step import Job, WorkerContext, evaluate_skills, score_child
from cycleqd.inference.adapter import LLMAdapter
from cycleqd.inference.hf import HFBackend
from cycleqd.inference.pool import GenerationPool
from cycleqd.models.tiny import make_tiny_llama
from cycleqd.ops import SVDGenomeWeightSpace, make_crossover, make_mutation
from cycleqd.skills.agentbench.episode import Episode, run_lockstep
from cycleqd.skills.base import NonFiniteScore, SkillResult


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama base and two LoRA-like experts (rank 3 on every Linear, nothing else)."""
    root = tmp_path_factory.mktemp("child-eval")
    base_dir = make_tiny_llama(root / "base", seed=0, hidden_size=32, num_layers=2)
    base = load_file(str(base_dir / "model.safetensors"))
    g = torch.Generator().manual_seed(5)
    taus = []
    for _ in range(2):
        tau = {}
        for k, v in base.items():
            if v.ndim == 2 and "embed" not in k:
                tau[k] = (torch.randn(v.shape[0], 3, generator=g) @ torch.randn(3, v.shape[1], generator=g)) * 0.05
            else:
                tau[k] = torch.zeros(v.shape)
        taus.append(tau)
    return base_dir, base, taus, root


class _Store:
    def __init__(self, genomes):
        self.genomes = genomes

    def get(self, k):
        return self.genomes[k]


def _skills():
    from cycleqd.skills.agentbench.dbbench import DBBenchSkill
    from cycleqd.skills.coding.skill import CodingSkill

    return [CodingSkill("mbpp", split="search", limit=4, max_new_tokens=20, stop=["\n```\n"]),
            DBBenchSkill(split="search", limit=4, max_new_tokens=20, max_rounds=2, episode_batch=3)]


def _details(skills):
    return [dict(s.last_details) for s in skills]


def test_pooled_and_factored_scores_and_replies_equal_sequential_materialised(tiny):
    base_dir, base, taus, root = tiny
    mu = make_mutation({"name": "svd_expert", "rate": 0.5}, experts=taus, cache_dir=root / "svd")
    space = SVDGenomeWeightSpace(base, taus, make_crossover({"name": "linear", "sigma": 0.05}), mu)
    e = space.expert_genomes()
    store = _Store({"a": e[0], "b": e[1]})
    job = Job(1, 0, ("a", "b"), "child", 0)
    g = torch.Generator().manual_seed(1)
    child = space.mutate(space.crossover([e[0], e[1]], g), 0, g)
    # the default lean decoder (fastllama): the three paths batch rows differently, so this
    # also checks that its slot KV cache gives each row the same reply whatever the batch
    backend = HFBackend.from_pretrained(base_dir, batch_size=4, fast=True)
    out = {}
    for name, pooled, lowrank in (("sequential", False, "off"), ("pooled", True, "off"),
                                  ("pooled+factored", True, "on")):
        skills = _skills()
        adapter = LLMAdapter(backend, lowrank=lowrank)
        ctx = WorkerContext(space, store, adapter, skills, "fp", pooled=pooled)
        timings: dict[str, float] = {}
        res = score_child(ctx, job, child, timings)
        assert res.rejected is None
        assert ("bind_factored_s" in timings) == (lowrank == "on"), timings
        out[name] = ({k: (r.quality, r.outcomes, r.subscores) for k, r in res.results.items()},
                     _details(skills), res.fingerprint)
        adapter.bind(dict(base), "base")   # leave the backend as found (removes the factors)
    seq = out["sequential"]
    assert list(seq[0]) == ["mbpp", "dbbench"] and all(seq[1]), "both skills generated"
    replies = [d["reply"] for d in seq[1][0].values()]
    assert len(set(replies)) > 1, "replies differ between prompts: the comparison can tell them apart"
    for name in ("pooled", "pooled+factored"):
        assert out[name][0] == seq[0], name
        assert out[name][1] == seq[1], name
    assert out["pooled"][2] == seq[2] and out["pooled+factored"][2].startswith("lr-")
    # the factored child really is the child (not the base): the base's replies differ
    skills = _skills()
    evaluate_skills(skills, LLMAdapter(backend).bind(dict(base), "base-again"), {}, pooled=False)
    assert _details(skills) != seq[1]


def test_seed_jobs_and_non_svd_genomes_are_materialised(tiny):
    base_dir, base, taus, root = tiny
    space = SVDGenomeWeightSpace(base, taus, make_crossover({"name": "linear"}), make_mutation("none"))
    backend = HFBackend.from_pretrained(base_dir, batch_size=4)
    adapter = LLMAdapter(backend, lowrank="on")
    e = space.expert_genomes()
    ctx = WorkerContext(space, _Store({"a": e[0]}), adapter, [], "fp")
    t: dict[str, float] = {}
    score_child(ctx, Job(0, 0, (), "a", 0), e[0], t)          # a seed: weights' fingerprint
    assert "materialize_s" in t and "bind_factored_s" not in t
    t = {}
    score_child(ctx, Job(1, 0, ("a",), "c", 0), e[0], t)      # a child: factored
    assert "bind_factored_s" in t
    huge = type(e[0])(c=torch.tensor([1e9, 0.0], dtype=torch.float64))
    assert adapter.bind_genome(space, huge) is None            # beyond fp16 range: the exact check decides
    res = score_child(ctx, Job(1, 0, ("a",), "h", 0), huge, {})
    assert res.rejected and "not finite" in res.rejected
    assert adapter.bind_genome(space, {k: torch.zeros(v.shape) for k, v in base.items()}) is None
    with pytest.raises(ValueError, match="lowrank must be"):
        LLMAdapter(backend, lowrank="yes")
    adapter.bind(dict(base), "base")


def test_auto_factors_only_when_the_bind_outweighs_the_evaluation(tiny):
    base_dir, base, taus, root = tiny
    space = SVDGenomeWeightSpace(base, taus, make_crossover({"name": "linear"}), make_mutation("none"))
    adapter = LLMAdapter(HFBackend.from_pretrained(base_dir, batch_size=4), lowrank="auto")
    g = space.expert_genomes()[1]
    assert adapter.bind_genome(space, g) is None               # nothing measured yet
    adapter.record({"materialize_s": 3.0, "finite_check_s": 0.5, "fingerprint_s": 0.5, "bind_s": 0.5,
                    "eval_s": 100.0}, factored=False)
    assert adapter.bind_genome(space, g) is None               # 4.5 s bind << 30 s overhead
    adapter.record({"eval_s": 5.0}, factored=False)
    assert adapter.bind_genome(space, g) is not None           # short evaluations: factored


# --------------------------------------------------------------------------- the pool
class _Echo:
    """A backend whose reply names its prompt and settings; counts calls and batch sizes."""

    fingerprint = "echo"

    def __init__(self, fail_on: str | None = None):
        self.calls: list[int] = []
        self.fail_on = fail_on
        self.lock = threading.Lock()

    def generate(self, conversations, *, max_new_tokens, stop=(), response_prefix=""):
        with self.lock:
            self.calls.append(len(conversations))
        out = []
        for c in conversations:
            text = c if isinstance(c, str) else c[-1]["content"]
            if self.fail_on and self.fail_on in text:
                raise RuntimeError("backend broke")
            out.append(f"{text}|{max_new_tokens}|{','.join(stop)}|{response_prefix}")
        return out


def test_pool_answers_every_thread_with_its_own_reply_and_merges_batches():
    be = _Echo()
    got: dict[int, list[str]] = {}
    with GenerationPool(be).attached() as pool:
        assert not pool.streaming

        def ask(i):
            got[i] = be.generate([f"p{i}-{j}" for j in range(3)], max_new_tokens=i % 2 + 1, stop=["x"])

        ts = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        with pytest.raises(ValueError):                 # bad input: named in the caller
            be.generate(["a"], max_new_tokens=0)
    assert got == {i: [f"p{i}-{j}|{i % 2 + 1}|x|" for j in range(3)] for i in range(8)}
    assert sum(be.calls) == 24 and "generate" not in vars(be)   # detached afterwards
    with pytest.raises(RuntimeError, match="after close"):
        pool.submit("late", max_new_tokens=1)


def test_pool_backend_error_fails_only_its_requests():
    be = _Echo(fail_on="bad")
    with GenerationPool(be).attached():
        with pytest.raises(RuntimeError, match="backend broke"):
            be.generate(["bad"], max_new_tokens=1)
        assert be.generate(["good"], max_new_tokens=1) == ["good|1||"]


def test_cancelled_request_does_not_kill_the_decode_thread():
    """Attack (red team): a caller cancels its future before the reply; answering it must not
    raise inside the pool's decode thread (every later request would then wait forever)."""
    gate = threading.Event()

    class _Slow(_Echo):
        def generate(self, convs, **kw):
            gate.wait(5)
            return super().generate(convs, **kw)

    be = _Slow()
    with GenerationPool(be, stream=False).attached() as pool:
        fut = pool.submit("first", max_new_tokens=1)
        assert fut.cancel()
        gate.set()
        assert pool.submit("second", max_new_tokens=1).result(timeout=10) == "second|1||"


def test_llama3_official_rendering_keeps_submit():
    """``chat_format: llama3-official`` wraps ``generate``; the wrapper keeps ``submit`` (with
    the same rendering), so pooled official DB/OS episodes still stream."""
    from cycleqd.skills.agentbench import official

    seen = []

    class _Gen:
        def __call__(self, convs):
            seen.extend(convs)
            return ["r"] * len(convs)

        def submit(self, conv):
            seen.append(conv)
            return "fut"

    conv = [{"role": "user", "content": "hi"}]
    g = official.render_for("llama3-official", _Gen())
    assert g([conv]) == ["r"] and g.submit(conv) == "fut"
    assert seen == [official.llama3_prompt(conv)] * 2
    assert not hasattr(official.render_for("llama3-official", lambda c: c), "submit")


class _Counting(Episode):
    """Ends after the reply says 'stop' or after its turns; score = number of turns."""

    def step(self, reply):
        self.messages.append({"role": "user", "content": f"obs after {reply}"})
        if reply.startswith("obs after obs"):
            self.done = True

    def finish(self):
        self.score = len(self.messages) - self.n_prompt


def test_streaming_episodes_match_lockstep():
    def episodes():
        return [_Counting(f"e{i}", [{"role": "user", "content": "x" * i}]) for i in range(5)]

    be = _Echo()
    lock = episodes()
    run_lockstep(lock, lambda convs: be.generate(convs, max_new_tokens=3), max_turns=3)
    stream = episodes()
    with GenerationPool(be).attached():
        from cycleqd.skills.agentbench.episode import _Generate
        gen = _Generate(be, 3, ())
        assert callable(getattr(gen, "submit", None))
        run_lockstep(stream, gen, max_turns=3)
    assert [(e.messages, e.score, e.done) for e in stream] == [(e.messages, e.score, e.done) for e in lock]


class _Skill:
    def __init__(self, name, value, log):
        self.name, self.value, self.log = name, value, log

    def evaluate(self, model):
        self.log.append(self.name)
        if isinstance(self.value, Exception):
            raise self.value
        return SkillResult(self.value, {})


@pytest.mark.parametrize("pooled", [False, True])
def test_rejection_and_errors_follow_skill_order(pooled):
    be = _Echo()
    log: list[str] = []
    skills = [_Skill("a", 0.5, log), _Skill("b", NonFiniteScore("nan"), log), _Skill("c", 0.7, log)]
    t: dict[str, float] = {}
    res, rej = evaluate_skills(skills, be, t, pooled=pooled)
    assert res == {"a": SkillResult(0.5, {})} and rej == "skill 'b' failed: nan"
    assert log[:2] == ["a", "b"] if not pooled else sorted(log) == ["a", "b", "c"]
    skills = [_Skill("a", 0.5, log), _Skill("b", KeyError("boom"), log)]
    with pytest.raises(KeyError, match="boom"):
        evaluate_skills(skills, be, {}, pooled=pooled)

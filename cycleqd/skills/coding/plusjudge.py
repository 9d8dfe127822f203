"""The official MBPP+ judge (EvalPlus ``base`` inputs): outputs compared with the ground truth.

Source followed: EvalPlus 0.3.1 (``evalplus/evaluate.py`` ``get_groundtruth`` and
``check_correctness``; ``evalplus/eval/__init__.py`` ``untrusted_check``/``unsafe_execute``,
``is_floats``; ``evalplus/eval/_special_oracle.py``; ``evalplus/config.py``), which the
official CycleQD code scores as ``_base_pass@1``. Differences in *where* things run, not in
the rule:

1. **Ground truth**: the canonical solution runs on the base inputs in a sandbox (the
   candidate harness of :func:`.judge.run_candidate`, trusted input), which reports each
   output as plain data (:mod:`.wire`) and each call's wall time. Recorded once per problem
   content in this process. For ``check_str``-like tasks (``MBPP_OUTPUT_NOT_NONE_TASKS``)
   the expected value is ``output is not None``, as ``trusted_exec(output_not_none=True)``.
2. **Candidate**: a fresh sandbox per sample runs the candidate on the same inputs (no
   expected value is there). Its sandbox CPU limit is ``min(limits.timeout_s,
   sum(time_limits) + 1)`` (EvalPlus: ``min(60, sum(time_limits)) + 1``), with
   ``time_limits[i] = max(DEFAULT_MIN_TIME_LIMIT, DEFAULT_GT_TIME_LIMIT_FACTOR * gt_time[i])``
   = ``max(1 s, 4 x the canonical's time)``; a call whose reported time exceeds its limit
   fails. The reported time comes from inside the candidate's process, so a candidate can
   forge it -- that only lets a slow program run to the sandbox's own absolute caps, which
   always hold; it never makes a wrong output pass.
3. **Verdict** (:func:`outputs_match`, this process): EvalPlus's rule over the *decoded
   plain data* (fresh builtin objects; nothing the candidate defined): ``out == exp``, the
   MBPP special oracles, else with ``atol`` (``1e-6`` once a float expected value is seen
   while ``atol == 0``, carried over to later inputs as EvalPlus's loop does) ``type(out) ==
   type(exp)``, equal lengths and ``numpy.allclose(out, exp, rtol=1e-7, atol=atol)``. A
   sample passes iff every base input passes (EvalPlus ``base`` status ``pass``).
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from cycleqd.skills.coding import wire
from cycleqd.skills.coding.data import CodeProblem, evalplus_functions
from cycleqd.skills.coding.judge import (JUDGE_SOURCE_HASH, CodeProgram, ExecLimits, Verdict,
                                         run_candidate)

#: evalplus/config.py (0.3.1)
DEFAULT_GT_TIME_LIMIT_FACTOR = 4.0
DEFAULT_MIN_TIME_LIMIT = 1.0
#: part of the coding skill's cache key for MBPP+
PLUS_JUDGE_HASH = hashlib.sha256("\0".join([
    JUDGE_SOURCE_HASH, Path(__file__).read_text(encoding="utf-8")]).encode()).hexdigest()[:16]

_ORACLE_NAMES = ("MBPP_OUTPUT_NOT_NONE_TASKS", "MBPP_OUTPUT_SET_EQ_TASKS", "_surface_Area",
                 "_digit_distance_nums")
_ORACLES: dict[str, Any] = {}


def _oracles() -> dict[str, Any]:
    if not _ORACLES:
        _ORACLES.update(evalplus_functions("eval/_special_oracle.py", _ORACLE_NAMES))
    return _ORACLES


@dataclass(frozen=True)
class GroundTruth:
    """The canonical solution's outputs on one problem's base inputs.

    Attributes:
        outputs: per call (in ``problem.calls`` order), the output as wire text.
        times: per call, wall seconds of the canonical solution.
        detail: why it could not be computed ('' if fine; then ``outputs`` is empty).
    """

    outputs: tuple[str, ...]
    times: tuple[float, ...]
    detail: str = ""

    def time_limits(self) -> list[float]:
        """EvalPlus's per-input limits: ``max(1 s, 4 x the canonical's time)``."""
        return [max(DEFAULT_MIN_TIME_LIMIT, DEFAULT_GT_TIME_LIMIT_FACTOR * t) for t in self.times]


_GT: dict[str, GroundTruth] = {}
_GT_LOCK = threading.Lock()


def _gt_key(p: CodeProblem) -> str:
    return hashlib.sha256(json.dumps([PLUS_JUDGE_HASH, p.id, p.reference, list(p.calls),
                                      p.entry_point]).encode()).hexdigest()


def _one_truth(p: CodeProblem, limits: ExecLimits) -> GroundTruth:
    if not p.calls:
        return GroundTruth((), (), f"{p.id} has no base inputs")
    run = run_candidate(CodeProgram(p, p.reference), p.calls,
                        replace(limits, timeout_s=3 * float(limits.timeout_s)))
    if run.failure is not None:
        return GroundTruth((), (), f"canonical solution: {run.failure.status} {run.failure.detail}")
    outs = []
    for key in p.calls:
        status, payload = run.results[key]
        if status != "ok":
            return GroundTruth((), (), f"canonical solution: {status} {payload[:200]}")
        outs.append(payload)
    return GroundTruth(tuple(outs), tuple(float(run.times.get(k, 0.0)) for k in p.calls))


def ground_truth(problems: Sequence[CodeProblem], limits: ExecLimits = ExecLimits(), *,
                 workers: int = 2) -> dict[str, GroundTruth]:
    """Problem id -> :class:`GroundTruth`, computed in sandboxes once per problem content in
    this process (a failed computation is not kept). Raises ``SandboxUnavailableError``
    only if no sandbox can be made."""
    keys = {p.id: _gt_key(p) for p in problems}
    with _GT_LOCK:
        todo = [p for p in problems if keys[p.id] not in _GT]
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(todo) or 1))) as pool:
        fresh = dict(zip([p.id for p in todo], pool.map(lambda p: _one_truth(p, limits), todo)))
    with _GT_LOCK:
        for pid, gt in fresh.items():
            if not gt.detail:
                _GT[keys[pid]] = gt
        return {p.id: fresh.get(p.id) or _GT[keys[p.id]] for p in problems}


def _is_floats(x: object) -> bool:
    """EvalPlus ``is_floats`` over plain data (no ndarray can arrive here)."""
    if isinstance(x, float):
        return True
    if isinstance(x, (list, tuple)) and x:
        return all(isinstance(i, float) for i in x)
    return False


def outputs_match(entry_point: str, args: list, out: object, exp: object, atol: float) -> tuple[bool, float]:
    """EvalPlus's comparison of one MBPP+ output (``unsafe_execute``, dataset ``mbpp``).

    Args:
        entry_point: the tested function's name (selects the special oracles).
        args: the call's arguments (trusted benchmark input; for the special oracles).
        out: the candidate's output, decoded plain data. exp: the expected output.
        atol: the tolerance in force (EvalPlus mutates it across a problem's inputs).
    Returns:
        (passed, the tolerance in force for the next input). Never raises.
    """
    o = _oracles()
    try:
        exact = out == exp
        if entry_point == "are_equivalent":  # Mbpp/164
            exact = True
        elif entry_point == "sum_div":  # Mbpp/295
            exact = exact or out == 0
        elif entry_point == "surface_Area":  # Mbpp/581
            exact = exact or abs(out - o["_surface_Area"](*args)) <= atol
        elif entry_point == "digit_distance_nums":  # Mbpp/558
            exact = exact or out == o["_digit_distance_nums"](*args)
        elif entry_point in o["MBPP_OUTPUT_SET_EQ_TASKS"]:
            exact = set(out) == set(exp)
        elif entry_point in o["MBPP_OUTPUT_NOT_NONE_TASKS"]:
            exact = out == exp if isinstance(out, bool) else exp == (out is not None)
    except Exception:  # noqa: BLE001 - EvalPlus: an exception fails the input
        exact = False
    if atol == 0 and _is_floats(exp):
        atol = 1e-6  # "enforce atol for float comparison"
    try:
        if exact or atol == 0:
            return bool(exact), atol
    except Exception:  # noqa: BLE001
        return False, atol
    try:
        if type(out) is not type(exp):
            return False, atol
        if isinstance(exp, (list, tuple)) and len(out) != len(exp):
            return False, atol
        return bool(np.allclose(out, exp, rtol=1e-07, atol=atol)), atol
    except Exception:  # noqa: BLE001
        return False, atol


def judge_plus(samples: Mapping[str, tuple[CodeProblem, CodeProgram]],
               limits: ExecLimits = ExecLimits(), *, workers: int = 2) -> dict[str, Verdict]:
    """Judge MBPP+ candidates on the base inputs (sample id -> (problem, program) to sample
    id -> :class:`Verdict`; see the module docstring). ``status``: ``pass`` | ``fail`` (an
    output differs; the detail names the input's index, never the expected value) |
    ``error`` (a call raised) | ``timeout`` (a call over its EvalPlus time limit, or the
    sandbox's) | the candidate-run statuses of :class:`Verdict` | ``judge_error`` (no
    ground truth). Raises ``SandboxUnavailableError`` only if no sandbox can be made."""
    if not samples:
        return {}
    problems = {p.id: p for p, _ in samples.values()}
    truth = ground_truth(list(problems.values()), limits, workers=workers)
    verdicts: dict[str, Verdict] = {}
    asks = []
    for sid, (p, prog) in samples.items():
        gt = truth[p.id]
        if gt.detail:
            verdicts[sid] = Verdict(False, "judge_error", f"no ground truth: {gt.detail}"[:300])
            continue
        cap = min(float(limits.timeout_s), sum(gt.time_limits()) + 1.0)
        asks.append((sid, p, prog, gt, replace(limits, timeout_s=cap)))
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(asks) or 1))) as pool:
        runs = list(pool.map(lambda a: run_candidate(a[2], a[1].calls, a[4]), asks))
    for (sid, p, _, gt, _), run in zip(asks, runs):
        verdicts[sid] = _decide(p, gt, run)
    return {sid: verdicts[sid] for sid in samples}


def _decide(p: CodeProblem, gt: GroundTruth, run) -> Verdict:
    if run.failure is not None:
        f = run.failure
        return Verdict(False, f.status, f.detail, run.wall_s)
    atol = float(p.atol)
    not_none = p.entry_point in _oracles()["MBPP_OUTPUT_NOT_NONE_TASKS"]
    for i, (key, exp_text, limit) in enumerate(zip(p.calls, gt.outputs, gt.time_limits())):
        status, payload = run.results[key]
        if status != "ok":
            why = "raised" if status == "err" else "gave no plain-data output"
            return Verdict(False, "error" if status == "err" else "bad_output",
                           f"input {i} {why}: {payload[:200]}", run.wall_s)
        if run.times.get(key, float("inf")) > limit:
            return Verdict(False, "timeout", f"input {i} ran over its {limit:.2f} s limit",
                           run.wall_s)
        try:
            out, exp = wire.loads(payload), wire.loads(exp_text)
            name, args, _ = wire.decode_call(key)
        except (wire.WireError, ValueError) as e:
            return Verdict(False, "bad_output", f"input {i}: {e}"[:200], run.wall_s)
        if not_none:
            exp = exp is not None
        ok, atol = outputs_match(p.entry_point, args, out, exp, atol)
        if not ok:
            return Verdict(False, "fail", f"input {i} of {len(p.calls)}: wrong output", run.wall_s)
    return Verdict(True, "pass", "", run.wall_s)

"""The coding judge: candidates compute outputs in their sandbox, a separate process decides.

Design (issue 12; see docs/graders.md, "Coding"):

1. **Inputs** (:func:`plan_calls`, trusted, cached per problem in this process): the
   benchmark's test code runs once with the *reference* solution, in its own sandbox, with
   the tested function wrapped by a recorder; the recorded top-level calls (function name +
   arguments as plain data, :mod:`.wire`) are the inputs the tests need.
2. **Candidate** (:func:`run_candidate`): a fresh sandbox per sample holds only the setup
   code, the candidate's code, the harness and the list of inputs -- no test code, no
   expected values. The harness calls the function on fresh copies of each input and
   prints each return value as plain-data JSON (or the exception it raised).
3. **Verdict** (:func:`judge_batches`): a third sandbox, which never holds candidate code,
   runs the benchmark's own test code with the tested function replaced by a *replay* of
   the candidate's plain-data results: ``assert f(x) == y``, ``math.isclose``,
   ``set(f(x)) == set(y)``, ``abs(f(x) - y) < 1e-6``, HumanEval's ``check(candidate)``
   loops all apply unchanged, over builtin values rebuilt by the judge. A call the tests
   make that the candidate was not asked (tests whose later inputs depend on earlier
   outputs) sends the sample back for another candidate run with the new inputs (at most
   :data:`MAX_ROUNDS` rounds).

A sample passes only if the candidate answered every call it was asked (no output for a
call = fail: early ``os._exit``/``sys.exit``), its sandbox was not killed, and the test
code completed in the judge. Each sample's failure carries its reason in its
:class:`Verdict`; nothing a sample does raises out of here (only an unusable sandbox does).
"""

from __future__ import annotations

import hashlib
import json
import marshal
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from cycleqd.skills.coding import wire
from cycleqd.skills.coding.data import CodeProblem

#: Bump whenever the judge's semantics change (part of CodingSkill.cache_key).
JUDGE_VERSION = "3-plaindata-replay"
#: Candidate runs per sample at most (first run + rounds for inputs found later).
MAX_ROUNDS = 3

_HERE = Path(__file__).resolve().parent
_WIRE_SRC = (_HERE / "wire.py").read_text(encoding="utf-8")
_HARNESS_SRC = (_HERE / "_harness.py").read_text(encoding="utf-8")
_DRIVER_SRC = (_HERE / "_driver.py").read_text(encoding="utf-8")
#: Hash of the judge's code, host side and sandbox side (also part of the cache key).
JUDGE_SOURCE_HASH = hashlib.sha256("\0".join([
    JUDGE_VERSION, Path(__file__).read_text(encoding="utf-8"), _WIRE_SRC, _HARNESS_SRC,
    _DRIVER_SRC]).encode()).hexdigest()[:16]
_ENV = {"PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"}
_PY = ["python3", "-s", "-B"]


# ------------------------------------------------------------------------------ types
@dataclass(frozen=True)
class Verdict:
    """Outcome of one sample.

    Attributes:
        passed: the benchmark's tests passed on the candidate's outputs.
        status: ``pass`` | ``fail`` (a test assertion or comparison failed) | ``error`` (the
            program did not load, or a call raised) | ``no_result`` (a call produced no
            output: early exit, crash) | ``bad_output`` (a result that is not plain data,
            too large, or reported twice) | ``timeout`` | ``memory`` | ``output_limit`` |
            ``extract_error`` (the reply could not be turned into a program) |
            ``judge_error`` (the judge could not decide; never a pass) | ``sandbox_error``.
        detail: short reason (exception, test line, kill reason); never the expected values.
        wall_s: wall-clock seconds of the candidate's sandbox runs.
    """

    passed: bool
    status: str
    detail: str = ""
    wall_s: float = 0.0


@dataclass(frozen=True)
class ExecLimits:
    """Per-sample sandbox limits of the coding skill.

    Attributes:
        timeout_s: CPU seconds of one candidate run (its wall clock may take twice that
            plus 1 s, so a loaded machine does not turn slow-but-correct programs into
            timeouts), and the wall-clock time of the judge's test code per sample.
        memory_mb: memory per candidate run, MiB (total and per-process address space).
        max_processes: processes + threads alive at once in a candidate run.
        max_output_bytes: bytes of the candidate's own prints kept (more kills the run).
        max_result_bytes: bytes of one call's result as plain-data JSON, and of all results
            of one run together (more: ``bad_output``/``output_limit``).
    """

    timeout_s: float = 10.0
    memory_mb: int = 1024
    max_processes: int = 32
    max_output_bytes: int = 64 * 1024
    max_result_bytes: int = 1 << 20

    def __post_init__(self) -> None:
        if isinstance(self.timeout_s, bool) or not (
                isinstance(self.timeout_s, (int, float)) and self.timeout_s > 0):
            raise ValueError(f"ExecLimits.timeout_s must be > 0, got {self.timeout_s!r}")
        if not (isinstance(self.memory_mb, int) and self.memory_mb >= 32):
            raise ValueError(f"ExecLimits.memory_mb must be an int >= 32, got {self.memory_mb!r}")
        if not (isinstance(self.max_processes, int) and self.max_processes >= 4):
            raise ValueError(f"ExecLimits.max_processes must be an int >= 4, got {self.max_processes!r}")
        if not (isinstance(self.max_output_bytes, int) and self.max_output_bytes >= 1024):
            raise ValueError("ExecLimits.max_output_bytes must be an int >= 1024, got "
                             f"{self.max_output_bytes!r}")
        if not (isinstance(self.max_result_bytes, int) and self.max_result_bytes >= 1024):
            raise ValueError("ExecLimits.max_result_bytes must be an int >= 1024, got "
                             f"{self.max_result_bytes!r}")

    def sandbox_limits(self):
        """:class:`~cycleqd.sandbox.SandboxLimits` of one candidate run."""
        from cycleqd.sandbox import SandboxLimits
        return SandboxLimits(cpu_seconds=float(self.timeout_s),
                             wall_seconds=2.0 * float(self.timeout_s) + 1.0,
                             memory_bytes=self.memory_mb << 20, max_processes=self.max_processes,
                             max_output_bytes=self.max_output_bytes + self.max_result_bytes,
                             max_file_bytes=16 << 20, tmpfs_bytes=64 << 20)


@dataclass(frozen=True)
class CodeProgram:
    """What runs in a candidate's sandbox: ``solution`` = setup + the candidate's code (no
    tests). ``str(program)`` is that source. Made by ``coding.build_program``."""

    problem: CodeProblem
    solution: str

    def __str__(self) -> str:
        return self.solution


@dataclass(frozen=True)
class CallPlan:
    """The inputs the tests of one problem give the tested function(s).

    Attributes:
        calls: call keys (:func:`.wire.call_key`), in first-use order, unique.
        reference_passed: the reference solution passed the tests while being recorded.
        detail: why recording failed or the reference did not pass ('' if fine).
    """

    calls: tuple[str, ...]
    reference_passed: bool
    detail: str = ""


@dataclass
class CandidateRun:
    """One candidate sandbox run: ``results`` call key -> (ok|err|bad, payload); ``times``
    call key -> the call's wall seconds as the harness reported them."""

    results: dict[str, tuple[str, str]] = field(default_factory=dict)
    times: dict[str, float] = field(default_factory=dict)
    failure: Verdict | None = None
    wall_s: float = 0.0


# ------------------------------------------------------------------------ programs
def entries(problem: CodeProblem) -> tuple[str, ...]:
    """Names of the functions the tests call (MBPP and HumanEval: the entry point)."""
    return (problem.entry_point,)


def judge_program(problem: CodeProblem) -> str:
    """Trusted code run before the tests in the judge: setup (MBPP imports) and, for
    HumanEval, the prompt (its imports and helpers such as ``poly``/``encode_cyclic``;
    the entry point's stub is replaced by the replay)."""
    parts = [problem.setup_code] if problem.setup_code else []
    if problem.dataset == "humaneval":
        parts.append(problem.instruction + "    pass\n")
    return "\n\n".join(p.rstrip("\n") for p in parts) + "\n"


def reference_program(problem: CodeProblem) -> str:
    """Setup + the benchmark's reference solution (recording only)."""
    parts = [problem.setup_code] if problem.setup_code else []
    parts.append(problem.reference)
    return "\n\n".join(p.rstrip("\n") for p in parts) + "\n"


# ------------------------------------------------------------------------ sandboxes
def _driver_limits(n_jobs: int, limits: ExecLimits):
    from cycleqd.sandbox import SandboxLimits
    t = float(n_jobs) * float(limits.timeout_s) + 20.0
    return SandboxLimits(cpu_seconds=t, wall_seconds=t,
                         memory_bytes=(2 * limits.memory_mb + 256) << 20, max_processes=16,
                         max_output_bytes=64 << 20, max_file_bytes=1 << 20,
                         tmpfs_bytes=16 << 20)


def _run_driver(mode: str, jobs: list[dict], limits: ExecLimits) -> dict[str, dict]:
    """Run trusted ``jobs`` in one driver sandbox; id -> result (ids without a line are
    absent: the caller decides). Recording (the reference, trusted and cached) gets three
    times the per-sample time."""
    from cycleqd.sandbox import run_sandboxed

    if mode == "record":
        limits = ExecLimits(timeout_s=3 * float(limits.timeout_s), memory_mb=limits.memory_mb)

    spec = {"mode": mode, "timeout": float(limits.timeout_s), "memory": limits.memory_mb << 20,
            "jobs": jobs}
    res = run_sandboxed(_PY + ["/cq/driver.py"], files={
        "/cq/wire.py": _WIRE_SRC, "/cq/driver.py": _DRIVER_SRC, "/cq/jobs.json": json.dumps(spec)},
        limits=_driver_limits(len(jobs), limits), workdir="/root", env=_ENV)
    out: dict[str, dict] = {}
    for line in (res.stdout or "").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("id"), str):
            out[row["id"]] = row
    if len(out) < len(jobs):
        err = (res.stderr or "").strip().splitlines()
        why = res.killed or (err[-1][:200] if err else f"exit {res.returncode}")
        if mode == "record" and not out and res.returncode not in (0, None) and not res.killed:
            # only trusted code runs here: a broken driver is a bug to report, not a score
            raise RuntimeError(f"coding judge driver failed: {why}")
        for j in jobs:
            out.setdefault(j["id"], {"id": j["id"], "status": "no_verdict", "detail": why,
                                     "calls": [], "passed": False, "missing": []})
    return out


def _batches(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def _run_jobs(mode: str, jobs: list[dict], limits: ExecLimits, workers: int,
              batch: int = 32) -> dict[str, dict]:
    """Jobs in batches (``workers`` sandboxes at once); jobs left without an answer by a
    dead batch are retried one per sandbox."""
    out: dict[str, dict] = {}
    if not jobs:
        return out
    groups = _batches(jobs, batch)
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(groups)))) as pool:
        for part in pool.map(lambda g: _run_driver(mode, g, limits), groups):
            out.update(part)
    left = [j for j in jobs if out.get(j["id"], {}).get("status") == "no_verdict"]
    if left:
        with ThreadPoolExecutor(max_workers=max(1, min(workers, len(left)))) as pool:
            for part in pool.map(lambda j: _run_driver(mode, [j], limits), left):
                out.update(part)
    return out


# ------------------------------------------------------------------------ recording
_PLANS: dict[str, CallPlan] = {}
_PLANS_LOCK = threading.Lock()


def _plan_key(problem: CodeProblem) -> str:
    blob = json.dumps([JUDGE_SOURCE_HASH, problem.id, problem.dataset, problem.instruction,
                       problem.entry_point, problem.test_code, problem.reference,
                       problem.setup_code])
    return hashlib.sha256(blob.encode()).hexdigest()


def plan_calls(problems: Sequence[CodeProblem], limits: ExecLimits = ExecLimits(), *,
               workers: int = 2) -> dict[str, CallPlan]:
    """The recorded inputs of each problem (problem id -> :class:`CallPlan`); recorded
    once per problem content in this process (reference runs in trusted sandboxes,
    batched), then served from memory."""
    keys = {p.id: _plan_key(p) for p in problems}
    with _PLANS_LOCK:
        todo = {p.id: p for p in problems if keys[p.id] not in _PLANS}
    jobs = [{"id": pid, "program": reference_program(p), "entries": list(entries(p)),
             "test": p.test_code} for pid, p in todo.items()]
    rows = _run_jobs("record", jobs, limits, workers, batch=64)
    fresh: dict[str, CallPlan] = {}
    for pid in todo:
        row = rows.get(pid)
        if row is None or "calls" not in row:
            fresh[pid] = CallPlan((), False, "recording gave no answer" if row is None
                                  else str(row.get("detail", ""))[:300])
        else:
            calls = tuple(dict.fromkeys(str(c) for c in row["calls"]))
            fresh[pid] = CallPlan(calls, bool(row.get("passed")), str(row.get("detail", ""))[:300])
    with _PLANS_LOCK:
        for pid, plan in fresh.items():
            if plan.calls:  # an empty recording is not cached (it may be a dying sandbox)
                _PLANS[keys[pid]] = plan
        return {p.id: fresh.get(p.id) or _PLANS[keys[p.id]] for p in problems}


# ------------------------------------------------------------------------ candidates
def run_candidate(program: CodeProgram, calls: Sequence[str],
                  limits: ExecLimits = ExecLimits()) -> CandidateRun:
    """Run the candidate in a fresh sandbox on ``calls``; parse its plain-data results.

    Returns a :class:`CandidateRun` whose ``failure`` is set when the run cannot pass
    (killed, a call without a result, a duplicate or unparseable report).
    Raises ``SandboxUnavailableError`` only if no sandbox can be made.
    """
    from cycleqd.sandbox import run_sandboxed

    calls = list(calls)
    blobs = []
    for key in calls:
        try:
            blobs.append(marshal.dumps(wire.decode_call(key)))
        except (ValueError, wire.WireError) as e:  # e.g. a bytearray or range argument
            return CandidateRun(failure=Verdict(False, "judge_error",
                                                f"input not transferable: {e}"[:200]))
    res = run_sandboxed(_PY + ["/cq/harness.py", str(limits.max_result_bytes)], files={
        "/cq/wire.py": _WIRE_SRC, "/cq/harness.py": _HARNESS_SRC,
        "/cq/solution.py": program.solution, "/cq/calls.bin": marshal.dumps(blobs)},
        limits=limits.sandbox_limits(), workdir="/root", env=_ENV)
    run = CandidateRun(wall_s=res.wall_s)
    err = (res.stderr or "").strip().splitlines()
    last_err = err[-1][:200] if err else ""
    if res.killed is not None or res.timed_out:
        kind = {"wall_time": "timeout", "cpu_time": "timeout", "memory": "memory",
                "output_limit": "output_limit"}.get(res.killed or "wall_time", "sandbox_error")
        run.failure = Verdict(False, kind, res.killed or "timed_out", res.wall_s)
        return run
    seen: dict[int, tuple[str, str]] = {}
    times: dict[int, float] = {}
    total = 0
    for line in (res.stdout or "").split("\n"):
        if line.startswith("T\t"):
            parts = line.split("\t")
            if len(parts) == 3 and parts[1].isdigit() and int(parts[1]) < len(calls):
                try:
                    times[int(parts[1])] = float(parts[2])
                except ValueError:
                    pass
            continue
        if not line.startswith("R\t"):
            continue
        parts = line.split("\t", 3)
        if len(parts) != 4 or not parts[1].isdigit() or parts[2] not in ("ok", "err", "bad"):
            continue
        i = int(parts[1])
        if i >= len(calls):
            continue
        if i in seen:
            run.failure = Verdict(False, "bad_output", f"two results for call {i}", res.wall_s)
            return run
        total += len(parts[3])
        if len(parts[3]) > limits.max_result_bytes or total > limits.max_result_bytes:
            run.failure = Verdict(False, "bad_output", "results larger than max_result_bytes",
                                  res.wall_s)
            return run
        seen[i] = (parts[2], parts[3])
    absent = [i for i in range(len(calls)) if i not in seen]
    if absent:
        why = f"exit {res.returncode}" + (f"; {last_err}" if last_err else "")
        run.failure = Verdict(False, "no_result",
                              f"no result for {len(absent)} of {len(calls)} calls ({why})",
                              res.wall_s)
        return run
    run.results = {calls[i]: v for i, v in seen.items()}
    run.times = {calls[i]: t for i, t in times.items()}
    return run


# ------------------------------------------------------------------------ judging
_JUDGE_STATUS = {"pass", "fail", "error", "missing", "timeout"}


def judge_samples(samples: Mapping[str, tuple[CodeProblem, CodeProgram]],
                  limits: ExecLimits = ExecLimits(), *, workers: int = 2) -> dict[str, Verdict]:
    """Judge candidates: sample id -> (problem, program) to sample id -> :class:`Verdict`.

    Raises ``SandboxUnavailableError`` if no sandbox can be made; anything a sample does
    ends as that sample's failed Verdict.
    """
    if not samples:
        return {}
    problems = {p.id: p for p, _ in samples.values()}
    plans = plan_calls(list(problems.values()), limits, workers=workers)
    asked: dict[str, list[str]] = {}
    tables: dict[str, dict[str, tuple[str, str]]] = {s: {} for s in samples}
    walls: dict[str, float] = {s: 0.0 for s in samples}
    verdicts: dict[str, Verdict] = {}
    todo: dict[str, list[str]] = {}
    for sid, (p, _) in samples.items():
        plan = plans[p.id]
        if not plan.calls:
            verdicts[sid] = Verdict(False, "judge_error",
                                    f"no test inputs recorded for {p.id}: {plan.detail}"[:300])
            continue
        todo[sid] = list(plan.calls)
    for rnd in range(MAX_ROUNDS):
        if not todo:
            break
        ids = list(todo)
        asks = [(samples[s][1], todo[s]) for s in ids]
        with ThreadPoolExecutor(max_workers=max(1, min(workers, len(ids)))) as pool:
            runs = list(pool.map(lambda a: run_candidate(a[0], a[1], limits), asks))
        jobs = []
        for sid, run in zip(ids, runs):
            walls[sid] += run.wall_s
            asked.setdefault(sid, []).extend(todo[sid])
            if run.failure is not None:
                f = run.failure
                verdicts[sid] = Verdict(False, f.status, f.detail, walls[sid])
                continue
            tables[sid].update(run.results)
            p = samples[sid][0]
            jobs.append({"id": sid, "program": judge_program(p), "entries": list(entries(p)),
                         "test": p.test_code,
                         "table": {k: list(v) for k, v in tables[sid].items()}})
        rows = _run_jobs("judge", jobs, limits, workers)
        todo = {}
        for job in jobs:
            sid = job["id"]
            row = rows.get(sid)
            if row is None or row.get("status") not in _JUDGE_STATUS:
                why = str((row or {}).get("detail", ""))[:200]
                verdicts[sid] = Verdict(False, "judge_error", f"the judge gave no verdict: {why}",
                                        walls[sid])
                continue
            status, detail = row["status"], str(row.get("detail", ""))[:300]
            if status == "missing":
                new = [k for k in dict.fromkeys(map(str, row.get("missing", [])))
                       if k not in tables[sid]]
                if new and rnd + 1 < MAX_ROUNDS:
                    todo[sid] = new
                else:
                    verdicts[sid] = Verdict(False, "judge_error",
                                            "the tests kept asking for new inputs", walls[sid])
                continue
            verdicts[sid] = Verdict(status == "pass", status, detail, walls[sid])
    return verdicts

"""A reply made into a program and judged: :func:`prepare_program` (extract, sanitize,
assemble with the problem's setup -- :func:`build_program`), :func:`run_program` /
:func:`run_programs` (the sandboxed judge of :mod:`cycleqd.skills.coding.judge`)."""

from __future__ import annotations

from collections.abc import Mapping

from cycleqd.skills.coding.data import CodeProblem
from cycleqd.skills.coding.extract import defines, extract_code, sanitize_code
from cycleqd.skills.coding.judge import CodeProgram, ExecLimits, Verdict, judge_samples
from cycleqd.skills.coding.plusjudge import judge_plus

__all__ = ["PROGRAM_VERSION", "build_program", "prepare_program", "run_program", "run_programs"]

#: Bump when program assembly changes (part of CodingSkill's cache key; the judge has
#: its own JUDGE_VERSION).
PROGRAM_VERSION = "3"


def build_program(problem: CodeProblem, code: str) -> CodeProgram:
    """What runs in the candidate's sandbox: setup + solution, WITHOUT the tests (those run
    only in the judge, see :mod:`cycleqd.skills.coding.judge`).

    HumanEval: the problem's prompt goes first (its imports and helper functions), then the
    solution; a bare indented body is appended to the prompt as a completion.

    Returns:
        :class:`CodeProgram` (``str(program)`` is the candidate-side source).
    """
    parts = []
    if problem.setup_code:
        parts.append(problem.setup_code)
    if problem.dataset == "humaneval":
        first = next((ln for ln in code.splitlines() if ln.strip()), "")
        if first[:1] in (" ", "\t") and not defines(code, problem.entry_point):
            parts.append(problem.instruction + code)
        else:
            parts.append(problem.instruction + "    pass\n")
            parts.append(code)
    else:
        parts.append(code)
    return CodeProgram(problem, "\n\n".join(p.rstrip("\n") for p in parts) + "\n")


def prepare_program(problem: CodeProblem, reply: str) -> CodeProgram | Verdict:
    """Reply -> program (extract, sanitize, assemble); any failure on the way (e.g. a parse
    bomb making ``ast`` raise RecursionError/MemoryError) is returned as a failed
    :class:`Verdict` with status ``extract_error`` instead of raised."""
    try:
        return build_program(problem, sanitize_code(extract_code(reply, problem.entry_point),
                                                    problem.entry_point))
    except Exception as e:  # noqa: BLE001 - one bad reply is one failed sample
        return Verdict(False, "extract_error", f"{type(e).__name__}: {str(e)[:200]}")

def run_program(program: CodeProgram, limits: ExecLimits = ExecLimits()) -> Verdict:
    """Judge one program made by :func:`build_program` (candidate sandbox + separate judge).
    Never raises for anything the program does; raises ``SandboxUnavailableError`` if no
    sandbox can be made and ``TypeError`` for a plain string (a program with its tests
    inside can no longer be judged: the candidate would see the tests)."""
    if not isinstance(program, CodeProgram):
        raise TypeError("run_program takes a CodeProgram from build_program(problem, code), "
                        f"got {type(program).__name__}")
    return run_programs({"_": program}, limits, workers=1)["_"]


def run_programs(programs: Mapping[str, CodeProgram], limits: ExecLimits = ExecLimits(), *,
                 workers: int = 2) -> dict[str, Verdict]:
    """Judge many programs, ``workers`` sandboxes at a time (MBPP+ problems by the official
    EvalPlus rule, :func:`.plusjudge.judge_plus`; the others by :func:`.judge.judge_samples`).

    Returns:
        id -> :class:`Verdict` (same keys as ``programs``).
    Raises:
        ValueError: bad ``workers``; TypeError: a value that is not a CodeProgram.
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive int, got {workers!r}")
    bad = [k for k, v in programs.items() if not isinstance(v, CodeProgram)]
    if bad:
        raise TypeError(f"programs must be CodeProgram objects (build_program); not: {bad[:3]}")
    plus = {k: (v.problem, v) for k, v in programs.items() if v.problem.dataset == "mbppplus"}
    out = judge_plus(plus, limits, workers=workers) if plus else {}
    out.update(judge_samples({k: (v.problem, v) for k, v in programs.items() if k not in plus},
                             limits, workers=workers))
    return {k: out[k] for k in programs}

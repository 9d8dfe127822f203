"""Reference solutions through the coding judge: counts and sandbox time per problem.

Runs every MBPP (sanitized, 427), HumanEval (164) and MBPP+ (399; the official EvalPlus-base
judge: canonical outputs as ground truth) reference solution as a model reply
through the full CodingSkill path (extraction -> candidate sandbox -> separate judge) and
prints how many pass, the wall time, and the candidate-sandbox seconds per problem. Works
against older checkouts too (only ``CodingSkill.score_completions`` and ``Verdict.wall_s``
are used), so ``PYTHONPATH=<old checkout>`` gives the "before" figures.

Usage::

    PYTHONPATH=$PWD python benchmarks/coding_reference.py [--datasets mbpp humaneval mbppplus]
        [--workers 2] [--limit N]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._machine import describe, load  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=["mbpp", "humaneval"],
                    choices=["mbpp", "humaneval", "mbppplus"],
                    help="(--dataset works too)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--limit", type=int, default=None)
    args = ap.parse_args(argv)

    from cycleqd.skills.coding.skill import CodingSkill

    print(f"cpu: {describe()}; workers={args.workers}; {load()}")
    all_ok = True
    for ds in args.datasets:
        skill = CodingSkill(ds, split={"mbpp": "all", "mbppplus": "all"}.get(ds, "test"),
                            limit=args.limit, workers=args.workers)
        if ds in ("mbpp", "mbppplus"):
            replies = {p.id: p.reference for p in skill.problems}
        else:  # the canonical solution as a bare completion of the prompt
            replies = {p.id: p.reference[len(p.instruction):] for p in skill.problems}
        t0 = time.perf_counter()
        verdicts = skill.score_completions(replies)
        wall = time.perf_counter() - t0
        passed = sum(v.passed for v in verdicts.values())
        n = len(verdicts)
        sandbox = sum(v.wall_s for v in verdicts.values())
        second = None
        if "cycleqd.skills.coding.judge" in sys.modules:  # new judge: inputs now recorded
            t1 = time.perf_counter()
            skill.score_completions(replies)
            second = time.perf_counter() - t1
        print(f"{ds}: {passed}/{n} reference solutions pass; wall {wall:.1f} s "
              f"({1000 * wall / n:.0f} ms/problem)"
              + (f", again with recorded inputs {second:.1f} s ({1000 * second / n:.0f} ms/problem)"
                 if second is not None else "")
              + f"; candidate sandbox {1000 * sandbox / n:.0f} ms/problem")
        for pid, v in verdicts.items():
            if not v.passed:
                print(f"  FAIL {pid}: {v.status} {v.detail[:120]}")
        all_ok &= passed == n
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""Reference commands on the OS-interaction data: a perfect scripted agent runs each task's
reference (``example``) command in its machine and answers with the output (``match``
tasks: answers the expected string). Prints pass counts and which tasks fail, by reason.

    PYTHONPATH=$PWD python benchmarks/os_reference.py --split all [--limit N] [--workers 2]
        [--machine auto|rootfs|host] [--data FILE] [--out per_task.json]
    # CycleQD's 110 official search tasks (os_search_samples.json, converted on the fly):
    PYTHONPATH=$PWD python benchmarks/os_reference.py --official ../shared/data/cycleqd-official/os_search_samples.json
    # the same tasks under the skill's own official protocol (its loader, 7-message problem,
    # 5 rounds, 5 s commands, unanswered judged with ""; one evaluation unless --repeats):
    PYTHONPATH=$PWD python benchmarks/os_reference.py --protocol official [--repeats 5]
    # compare two runs (e.g. before = another checkout's code, after = this one):
    python benchmarks/os_reference.py --compare before.json after.json

Measured 2026-12-02 (``--protocol official``, one evaluation, Debian image, 2 workers,
128 s): 100/110. The 10 others: 5 tasks share their description with another task of
the set (22, 23, 35, 144, 145), so this agent, which finds the task by its description,
answers the other's answer (each passes alone); ``find`` from ``/`` prints "Permission
denied" lines for ``/proc`` entries of the machine, so the one-line answer of 11 and 166
cannot be written (stdout alone, the reference, is right); 26's init writes through fd
123321, over this host's open-file hard limit (20000); 57 counts ``bash`` processes and
the reference machine, started from the post-init snapshot, has none where the agent's
shell has one; 153's official (inlined) size checker parses ``int("4.0K")`` and fails,
as it would in the official run.

A reference whose output spans several lines cannot be written into one
``Act: answer(...)`` line: such tasks are counted apart ("multi-line reference"). Runs
with any version of cycleqd's OS skill (``--machine`` is ignored by code without it).
"""

from __future__ import annotations

import argparse
import inspect
import json
import shlex
import sys
import time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._machine import describe  # noqa: E402


class ReferenceAgent:
    """Turn 1: run the task's reference command; turn 2: answer its output."""

    fingerprint = "reference-agent"

    def __init__(self, items) -> None:
        self.by_desc = {it.description: it for it in items}

    def generate(self, conversations, *, max_new_tokens, stop=()):
        out = []
        for conv in conversations:
            desc = conv[6]["content"].split("My problem is:\n\n", 1)[1]
            it = self.by_desc[desc]
            n = sum(1 for m in conv[7:] if m["role"] == "assistant")
            if it.match is not None:
                out.append(f"Think: known.\n\nAct: answer({it.match.get('answer', '')})")
            elif n == 0:
                ex = it.example
                code = ex.code if ex.language == "bash" else "python3 -c " + shlex.quote(ex.code)
                out.append(f"Think: run it.\n\nAct: bash\n\n```bash\n{code}\n```")
            else:
                obs = conv[-1]["content"]
                ans = obs.split("The output of the OS:\n\n", 1)[1].strip() if "\n\n" in obs else ""
                out.append(f"Think: got it.\n\nAct: answer({ans})")
        return out


def _official_to_agentbench(path: str) -> list[dict]:
    """The official samples' decoded ``config.config`` (lists ``[language, code]``) as
    AgentBench task objects."""
    def script(x):
        return None if x is None else {"language": x[0], "code": x[1]}

    out = []
    for s in json.loads(Path(path).read_text()):
        c = s["config"]["config"]
        e: dict = {"description": c["description"]}
        if c.get("init_script"):
            e["create"] = {"init": [script(x) for x in c["init_script"]]}
        if c.get("start"):
            e["start"] = script(c["start"])
        if c.get("match"):
            e["evaluation"] = {"match": c["match"]}
        else:
            e["evaluation"] = {"check": [script(x) for x in c["check"]],
                               "example": script(c.get("example_script"))}
        out.append(e)
    return out


def _run(args) -> dict:
    from cycleqd.skills.agentbench.os_interaction import OSInteractionSkill

    if args.protocol == "official":
        kw = dict(protocol="official", repeats=args.repeats, limit=args.limit,
                  episode_batch=args.batch, workers=args.workers, machine=args.machine)
        if args.data:
            kw["data_path"] = args.data
        args.official = None
    if args.official:
        import tempfile

        tmp = Path(tempfile.mkdtemp()) / "official_search.json"
        tmp.write_text(json.dumps(_official_to_agentbench(args.official)))
        args.data, args.split = str(tmp), "all"
    if args.protocol != "official":
        kw = dict(split=args.split, limit=args.limit, episode_batch=args.batch, workers=args.workers,
                  max_rounds=3)
        if args.data:
            kw["data_path"] = args.data
        if "machine" in inspect.signature(OSInteractionSkill).parameters:
            kw["machine"] = args.machine
    sk = OSInteractionSkill(**kw)
    machine = getattr(sk, "rootfs", None)
    t0 = time.monotonic()
    r = sk.evaluate(ReferenceAgent(sk.items))
    wall = time.monotonic() - t0
    rows = {}
    for it in sk.items:
        d = sk.last_details.get(it.id, {})
        ref = d.get("reference")
        multi = ref is not None and len(ref.strip().splitlines()) > 1
        rows[it.id] = {"pass": r.outcomes[it.id] == 1.0, "score": r.outcomes[it.id], "multi_line": multi,
                       "setup": d.get("setup") or (d.get("init") and str(d.get("init"))),
                       "reference_error": d.get("reference_error"), "end": d.get("end"),
                       "error": d.get("error")}
    return {"machine": str(machine) if machine is not None else "host-tree sandbox",
            "cpu": describe(), "wall_s": round(wall, 1), "tasks": rows}


def _summary(res: dict) -> str:
    rows = res["tasks"]
    n = len(rows)
    npass = sum(v["pass"] for v in rows.values())
    single = {k: v for k, v in rows.items() if not v["multi_line"]}
    sp = sum(v["pass"] for v in single.values())
    setup = sum(1 for v in rows.values() if v["setup"])
    referr = sum(1 for v in rows.values() if v["reference_error"])
    return (f"{npass}/{n} pass ({sp}/{len(single)} with a single-line reference); "
            f"init failed: {setup}; reference failed: {referr}; "
            f"machine: {res['machine']}; {res['wall_s']} s wall on {res['cpu']}")


def _compare(a_path: str, b_path: str) -> None:
    a, b = (json.loads(Path(p).read_text()) for p in (a_path, b_path))
    print("before:", _summary(a))
    print("after: ", _summary(b))
    common = sorted(set(a["tasks"]) & set(b["tasks"]))
    fixed = [k for k in common if not a["tasks"][k]["pass"] and b["tasks"][k]["pass"]]
    broke = [k for k in common if a["tasks"][k]["pass"] and not b["tasks"][k]["pass"]]
    print(f"now pass ({len(fixed)}): {' '.join(fixed)}")
    print(f"no longer pass ({len(broke)}): {' '.join(broke)}")
    for k in broke:
        print("  ", k, {kk: vv for kk, vv in b["tasks"][k].items() if vv})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--split", default="all")
    p.add_argument("--data", default=None, help="a task file or data folder")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--machine", default="auto", choices=["auto", "rootfs", "host"])
    p.add_argument("--official", default=None, help="CycleQD's os_search_samples.json")
    p.add_argument("--protocol", default="project", choices=["project", "official"],
                   help="official: the skill's protocol='official' (its own loader of the official data)")
    p.add_argument("--repeats", type=int, default=1, help="evaluations averaged (--protocol official)")
    p.add_argument("--out", default=None, help="write per-task results (JSON) here")
    p.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"))
    args = p.parse_args()
    if args.compare:
        _compare(*args.compare)
        return
    res = _run(args)
    print(_summary(res))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    sys.exit(main())

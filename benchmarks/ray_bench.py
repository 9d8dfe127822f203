"""Ray executor scaling on an evaluation-bound workload (not a test).

Each skill is a "remote judge": it waits ``--eval-s`` seconds per evaluation (an API call, a
judge model on another machine, a sandbox round trip) and then scores the child with the
tiny synthetic skill. A generation evaluates all K=3 skills, so one worker does at most
``60 / (3 * eval_s)`` generations per minute. The same run (tiny synthetic model, same seed)
is made with 1, 2 and 4 Ray workers on one local Ray cluster, side by side, and the script
prints generations per minute and the scaling efficiency

    efficiency(W) = (gen/min with W workers) / (W * gen/min with 1 worker)

against the targets (>= 0.9 at 2 workers, >= 0.8 at 4). Throughput is measured from the end
of the seed evaluations to the last generation (worker start-up and seeding excluded), from
the run's own metrics.jsonl timestamps.

    python benchmarks/ray_bench.py                       # 1, 2, 4 workers, 32 generations, 0.5 s
    python benchmarks/ray_bench.py --workers 1 2 4 8 --generations 48 --eval-s 0.25
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

TARGETS = {2: 0.9, 4: 0.8}


class JudgeSkill:
    """Wraps a skill: waits ``delay`` seconds (the remote judge's latency), then scores."""

    def __init__(self, inner, delay: float):
        self.inner, self.name, self.delay = inner, inner.name, float(delay)

    def evaluate(self, model):
        time.sleep(self.delay)
        return self.inner.evaluate(model)


def tiny_config(cache_dir: Path, generations: int):
    from cycleqd.config import parse_config

    return parse_config({
        "name": "ray-bench", "seed": 0, "cache_dir": str(cache_dir),
        "skills": [{"name": n, "type": "synthetic", "bc_range": [0.0, 1.0], "bins": 10}
                   for n in ("alpha", "beta", "gamma")],
        "model": {"synthetic": {"arch": "llama", "seed": 0, "hidden_size": 64, "num_layers": 2,
                                "expert_rank": 4, "expert_scale": 0.05}},
        "qd": {"generations": generations, "snapshot_every": 1000},
    })


def measure(cfg, workers: int, eval_s: float, out: Path) -> dict:
    from cycleqd.engine.build import build_components
    from cycleqd.engine.loop import Components, CycleQDRun
    from cycleqd.engine.rundir import RunDir
    from cycleqd.engine.workers import ray_step_executor

    base = build_components(cfg)
    comps = Components(base.space, [JudgeSkill(s, eval_s) for s in base.skills], base.adapter)
    run = CycleQDRun(cfg, comps, out, progress=False)
    t = time.perf_counter()
    run.executor = ex = ray_step_executor(run.ctx, setup="ship", workers=workers, progress=False)
    start_s = time.perf_counter() - t
    try:
        res = run.run()
        st = ex.stats()
    finally:
        ex.close()
    metrics = RunDir(out).read_metrics()
    seed_end = max(m["wall_s"] for m in metrics if m["generation"] == 0)
    gens = [m for m in metrics if 1 <= m["generation"] <= cfg.qd.generations and m.get("kind") != "aggregate"]
    assert [m["generation"] for m in gens] == list(range(1, cfg.qd.generations + 1))
    span = max(m["wall_s"] for m in gens) - seed_end
    return {"workers": workers, "generations": len(gens), "seconds": span, "gen_per_min": 60.0 * len(gens) / span,
            "start_s": start_s, "utilisation": [w["utilisation"] for w in st["workers"]],
            "qd_score": sum(s["qd_score"] for s in res.stats.values())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--generations", type=int, default=32)
    p.add_argument("--eval-s", type=float, default=0.5, help="judge latency per skill evaluation (s)")
    p.add_argument("--json", help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    if 1 not in args.workers:
        raise SystemExit("--workers must include 1 (the baseline of the efficiency)")
    import ray

    ray.init(num_cpus=max(args.workers) + 1, include_dashboard=False, log_to_driver=False)
    # JudgeSkill lives in this script, which the workers cannot import: ship it by value
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    rows = []
    with tempfile.TemporaryDirectory(prefix="cycleqd-ray-bench-") as tmp:
        cfg = tiny_config(Path(tmp) / "cache", args.generations)
        for w in args.workers:
            rows.append(measure(cfg, w, args.eval_s, Path(tmp) / f"run-w{w}"))
            print(f"  {w} worker(s): {rows[-1]['gen_per_min']:.1f} gen/min", file=sys.stderr, flush=True)
    ray.shutdown()
    base = next(r for r in rows if r["workers"] == 1)["gen_per_min"]
    ideal = 60.0 / (len(cfg.skills) * args.eval_s)
    print(f"\nRay executor scaling: tiny synthetic model, {len(cfg.skills)} skills x {args.eval_s} s judge "
          f"latency per evaluation, {args.generations} generations per run (ideal 1 worker: {ideal:.1f} gen/min)")
    print(f"{'workers':>7} {'gen/min':>8} {'speedup':>8} {'efficiency':>10} {'target':>7} {'gen wall s':>10} "
          f"{'start s':>8} {'worker busy':>16} {'QD score':>9}")
    ok = True
    for r in rows:
        eff = r["gen_per_min"] / (r["workers"] * base)
        r["efficiency"] = eff
        tgt = TARGETS.get(r["workers"])
        verdict = "" if tgt is None else (">=%.1f %s" % (tgt, "ok" if eff >= tgt else "MISS"))
        ok &= tgt is None or eff >= tgt
        busy = "/".join(f"{u:.2f}" for u in r["utilisation"])
        print(f"{r['workers']:>7} {r['gen_per_min']:>8.1f} {r['gen_per_min'] / base:>8.2f} {eff:>10.2f} {verdict:>7} "
              f"{r['seconds']:>10.1f} {r['start_s']:>8.1f} {busy:>16} {r['qd_score']:>9.2f}")
    print("all targets met" if ok else "some targets missed")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

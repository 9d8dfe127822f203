"""CycleQD's ablations on the vision setting, over several seeds (issue 7).

Conditions (each changes one thing from CycleQD as in the paper):

* ``cycleqd``   -- K archives with the quality rotating, SVD-expert mutation, elite sampling.
* ``single``    -- one archive whose quality is the mean of all skills (= summed quality
  up to the constant K) and whose BCs are all K skills (engine ``qd.mode: single``); the
  SVD basis expert rotates over the K skills per generation (the scheduler's ``Ask.basis``).
* ``gaussian``  -- Gaussian mutation on the same matrices, its std matched to the SVD
  mutation's expected energy (``gaussian_std_matched``).
* ``uniform``   -- uniform parent sampling instead of elite sampling.
* ``no_mutation`` -- crossover only.

Per run it records the final aggregated model's mean test accuracy over the K domains,
the mean test accuracy of the best-mean elite (the archive model with the highest mean
search accuracy -- a single model, selected without the test split), and the QD score (sum over the K cyclic archives of the elites' search-split qualities; a
single-archive run's elites are projected into those K archives so that the numbers are
comparable). The table gives mean +- std (sample std, ddof=1) over seeds, and for each
ablation the paired difference to ``cycleqd`` (same seeds) with a paired t-test p-value.

Every finished run is saved (``<out>/<condition>/seed_<s>/result.json``) and skipped when
the script is re-run, so an interrupted ablation loses at most the run in progress.

    python benchmarks/ablate_vision.py --out runs/ablate_vision            # 5 seeds x 5 conditions
    python benchmarks/ablate_vision.py --out /tmp/abl --toy --seeds 0 1    # seconds
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

CONDITIONS: dict[str, dict] = {
    "cycleqd": dict(mode="cyclic", sampling="elite", mutation="svd_expert"),
    "single": dict(mode="single", sampling="elite", mutation="svd_expert"),
    "gaussian": dict(mode="cyclic", sampling="elite", mutation="gaussian"),
    "uniform": dict(mode="cyclic", sampling="uniform", mutation="svd_expert"),
    "no_mutation": dict(mode="cyclic", sampling="elite", mutation="none"),
}
LABELS = {
    "cycleqd": "CycleQD (cyclic, SVD-expert mutation, elite sampling)",
    "single": "single archive, summed quality",
    "gaussian": "Gaussian mutation (energy-matched)",
    "uniform": "uniform sampling",
    "no_mutation": "no mutation",
}


def mean_std(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    s = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else float("nan")
    return m, s


def paired(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """Mean and std of the paired differences a - b, and the two-sided paired t-test p."""
    d = [x - y for x, y in zip(a, b)]
    m, s = mean_std(d)
    if len(d) < 2:
        return m, s, float("nan")
    from scipy import stats

    p = float(stats.ttest_rel(a, b).pvalue) if any(abs(x) > 0 for x in d) else 1.0
    return m, s, p


def run_one(setup, cond: str, seed: int, generations: int, out: Path, *, keep_genomes: bool = False) -> dict:
    from cycleqd.vision.pipeline import run_search

    folder = out / cond / f"seed_{seed}"
    result_path = folder / "result.json"
    if result_path.exists():
        res = json.loads(result_path.read_text())
        if res["config"]["generations"] == generations and "best_mean" in res:
            return res
    shutil.rmtree(folder, ignore_errors=True)  # an unfinished run: start it again
    folder.mkdir(parents=True)
    res = run_search(setup, folder / "run", generations=generations, seed=seed, **CONDITIONS[cond])
    res["condition"] = cond
    tmp = folder / ".result.json.tmp"
    tmp.write_text(json.dumps(res, indent=1, default=str))
    os.replace(tmp, result_path)
    if not keep_genomes:
        shutil.rmtree(folder / "run" / "genomes", ignore_errors=True)
    return res


def summarize(results: dict[str, list[dict]], skills: list[str]) -> tuple[list[dict], str]:
    """Rows (JSON) and the markdown table."""
    base_acc = [r["mean_test"] for r in results.get("cycleqd", [])]
    base_qd = [r["qd"]["qd_score"] for r in results.get("cycleqd", [])]
    base_bm = [sum(r["best_mean"]["test"][k] for k in skills) / len(skills) for r in results.get("cycleqd", [])]
    rows = []
    for cond, runs in results.items():
        if not runs:
            continue
        acc = [r["mean_test"] for r in runs]
        qd = [r["qd"]["qd_score"] for r in runs]
        cov = [r["qd"]["coverage"] for r in runs]
        bps = [sum(r["best_per_skill"][k]["test"] for k in skills) / len(skills) for r in runs]
        bm = [sum(r["best_mean"]["test"][k] for k in skills) / len(skills) for r in runs]
        row = {"condition": cond, "label": LABELS[cond], "seeds": [r["config"]["seed"] for r in runs],
               "agg_mean_test": mean_std(acc), "qd_score": mean_std(qd), "coverage": mean_std(cov),
               "best_per_skill_mean_test": mean_std(bps), "best_mean_elite_test": mean_std(bm),
               "per_seed": {"agg_mean_test": acc, "qd_score": qd, "best_mean_elite_test": bm},
               "wall_s": mean_std([r["wall_s"] for r in runs])}
        if cond != "cycleqd" and len(base_acc) == len(acc):
            row["delta_acc_vs_cycleqd"] = paired(acc, base_acc)
            row["delta_qd_vs_cycleqd"] = paired(qd, base_qd)
            row["delta_best_mean_vs_cycleqd"] = paired(bm, base_bm)
        rows.append(row)
    pct = lambda ms: f"{100 * ms[0]:.1f} ± {100 * ms[1]:.1f}"
    num = lambda ms: f"{ms[0]:.1f} ± {ms[1]:.1f}"
    lines = ["| condition | aggregated model: mean test acc (%) | Δ vs CycleQD (pp), p | QD score | "
             "Δ QD vs CycleQD, p | coverage (%) | best-mean elite: mean test acc (%) | Δ vs CycleQD (pp), p "
             "| best-per-skill mean test (%) | s/run |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        da = r.get("delta_acc_vs_cycleqd")
        dq = r.get("delta_qd_vs_cycleqd")
        db = r.get("delta_best_mean_vs_cycleqd")
        lines.append("| " + " | ".join([
            r["label"], pct(r["agg_mean_test"]),
            f"{100 * da[0]:+.1f} ± {100 * da[1]:.1f}, p={da[2]:.2g}" if da else "",
            num(r["qd_score"]), f"{dq[0]:+.1f} ± {dq[1]:.1f}, p={dq[2]:.2g}" if dq else "",
            pct(r["coverage"]), pct(r["best_mean_elite_test"]),
            f"{100 * db[0]:+.1f} ± {100 * db[1]:.1f}, p={db[2]:.2g}" if db else "",
            pct(r["best_per_skill_mean_test"]), f"{r['wall_s'][0]:.0f}"]) + " |")
    return rows, "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description="CycleQD ablations on the vision setting")
    ap.add_argument("--out", required=True, help="output folder (finished runs in it are reused)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--generations", type=int, default=None, help="default: the demo's (1200; toy 24)")
    ap.add_argument("--conditions", nargs="+", default=list(CONDITIONS), choices=list(CONDITIONS))
    ap.add_argument("--toy", action="store_true", help="toy recipe (CI-sized)")
    ap.add_argument("--cache-dir", default=None, help="trained-model cache root")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--keep-genomes", action="store_true", help="keep each run's stored genomes")
    a = ap.parse_args(argv)
    if len(a.seeds) != len(set(a.seeds)):
        ap.error(f"--seeds has duplicates: {a.seeds}")

    import torch

    from cycleqd.vision.demo import DEFAULT_GENERATIONS, TOY_GENERATIONS
    from cycleqd.vision.pipeline import build_setup

    gens = a.generations or (TOY_GENERATIONS if a.toy else DEFAULT_GENERATIONS)
    if gens < 1:
        ap.error("--generations must be >= 1")
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    setup = build_setup(toy=a.toy, cache_root=a.cache_dir)
    skills = setup.skill_names
    results: dict[str, list[dict]] = {c: [] for c in a.conditions}
    n, total = 0, len(a.conditions) * len(a.seeds)
    for seed in a.seeds:  # seed-major: a partial run still covers every condition
        for cond in a.conditions:
            n += 1
            t = time.perf_counter()
            r = run_one(setup, cond, seed, gens, out, keep_genomes=a.keep_genomes)
            results[cond].append(r)
            print(f"[{n}/{total}] {cond:12s} seed {seed}: aggregated mean test "
                  f"{100 * r['mean_test']:.1f}%, QD score {r['qd']['qd_score']:.1f} "
                  f"({time.perf_counter() - t:.0f} s)", file=sys.stderr, flush=True)
    rows, md = summarize(results, skills)
    wall = time.perf_counter() - t0
    header = (f"# CycleQD ablations, vision setting (sklearn digits; K={len(skills)}: {', '.join(skills)})\n\n"
              f"{len(a.seeds)} seeds ({', '.join(map(str, a.seeds))}), {gens} generations per run; "
              f"mean ± std over seeds; Δ = paired difference to CycleQD (same seeds), p = paired t-test. "
              f"Accuracy on the test splits, QD score on the search splits (sum over the {len(skills)} "
              f"cyclic archives, {15 ** (len(skills) - 1)} cells each).\n\n")
    text = header + md + f"\n\nWall time: {wall:.0f} s (this invocation).\n"
    (out / "ablation.md").write_text(text)
    summary = {"rows": rows, "markdown": md, "generations": gens, "seeds": a.seeds,
               "recipe": setup.recipe.to_json(), "bc_ranges": setup.bc_ranges, "wall_s": wall}
    (out / "ablation.json").write_text(json.dumps(summary, indent=1, default=str))
    print(text)
    return summary


if __name__ == "__main__":
    main()

"""Issue 14, item 4: which final model should a CycleQD run return? The vision setting over
several seeds.

Per seed ``s`` the data split and the training change (``VisionRecipe(split_seed=s,
train_seed=s)``; the domain transforms stay fixed) and the CycleQD run uses seed ``s``. Rows:

* ``base``, ``expert: <domain>`` (one per domain), ``multi-domain fine-tune`` (the
  pipeline's baseline with the experts' total training budget);
* ``task arithmetic`` and ``TIES`` over the experts, lambda / density x lambda grid-searched
  on the **validation** split (:func:`cycleqd.vision.pipeline.merge_baselines`);
* ``CycleQD final: <strategy>`` for every strategy of ``final.strategy: auto``
  (:data:`cycleqd.config.AUTO_STRATEGIES`), each rebuilt from the run's archives with
  :func:`cycleqd.engine.final.select_final` and choosing (where it chooses) on the
  **validation** split, and ``CycleQD final: auto`` -- the run's own final model (the engine
  chose it on validation and wrote ``final.json``; the script checks that the rebuilt
  strategies reproduce that record's validation means and choice).

Protocol: per seed every model is built and every choice made first (search and validation
splits only); then every model is scored once on the **test** split. The value of a row is
the mean test accuracy over the K = 3 domains. The table gives mean +- 95% CI (Student t,
n - 1 df) over seeds and, for every row, the paired difference to the best merge baseline
(task arithmetic or TIES, whichever has the higher mean test accuracy over seeds: the
strongest comparator, a reporting choice, never a model choice) with paired tests:
``scipy.stats.ttest_rel`` and ``wilcoxon`` when scipy is installed, and always an exact
paired sign-flip permutation test (numpy; Monte Carlo with 100,000 flips beyond 16 seeds).

Each finished seed is saved (``<out>/seed_<s>/result.json``) and skipped when the script is
re-run.

    python benchmarks/vision_fidelity.py --out runs/vision_fidelity          # 5 seeds, 1200 generations
    python benchmarks/vision_fidelity.py --out /tmp/fid --toy --seeds 0 1    # toy: about a minute
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from cycleqd.config import AUTO_STRATEGIES
from cycleqd.engine.final import select_final
from cycleqd.vision.demo import DEFAULT_GENERATIONS
from cycleqd.vision.pipeline import build_setup, engine_run, merge_baselines
from cycleqd.vision.training import VisionRecipe

TOY_GENERATIONS = 8
BASELINES = ("task arithmetic", "TIES")
PERM_EXACT_MAX = 16        # exact sign-flip enumeration up to this many seeds
PERM_SAMPLES = 100_000     # Monte Carlo sign flips beyond it
# two-sided 95% Student-t quantiles t_{0.975, df} for df = 1..30 (used without scipy)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
         2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
         2.052, 2.048, 2.045, 2.042)

try:
    from scipy import stats as _stats
except ImportError:  # pragma: no cover - scipy is a dependency of the vision data
    _stats = None


def row_names(domains) -> list[str]:
    """Every row of the table, in order."""
    return (["base"] + [f"expert: {d}" for d in domains] + ["multi-domain fine-tune", *BASELINES]
            + [f"CycleQD final: {s}" for s in (*AUTO_STRATEGIES, "auto")])


def recipe_for(seed: int, toy: bool) -> VisionRecipe:
    return VisionRecipe.toy(split_seed=seed, train_seed=seed) if toy else VisionRecipe(split_seed=seed, train_seed=seed)


def one_seed(seed: int, *, toy: bool, generations: int, run_dir: Path, cache_root: str | None,
             final_params: dict) -> dict:
    """Build, choose (search/validation only), then score every row's model on test."""
    setup = build_setup(recipe_for(seed, toy), cache_root=cache_root)
    names = setup.skill_names
    t = time.perf_counter()
    # --- 1. every model and every choice: search and validation splits only
    weights = {"base": setup.base, **{f"expert: {d}": setup.models.experts[d] for d in names},
               "multi-domain fine-tune": setup.models.multidomain}
    taus, notes = {}, {}
    bl = merge_baselines(setup, split="validation")
    for row, key in zip(BASELINES, ("task_arithmetic", "ties")):
        taus[row], notes[row] = bl[key]["tau"], {"params": bl[key]["params"], "validation": bl[key]["validation"]}
    run = engine_run(setup, run_dir, generations=generations, seed=seed,
                     final={"strategy": "auto", "params": final_params})
    rec = json.loads((run_dir / "final.json").read_text())

    def validation(genome):
        return setup.tau_scores(run.space.task_vector(genome), split="validation")

    rebuilt = {}
    for strat in AUTO_STRATEGIES:
        g, r = select_final(run.space, run.result.archives, run.store.get, [(strat, dict(final_params.get(strat, {})))],
                            validation)
        taus[f"CycleQD final: {strat}"] = run.space.task_vector(g)
        rebuilt[strat] = r["candidates"][0]
        notes[f"CycleQD final: {strat}"] = {"validation": r["candidates"][0]["validation"],
                                            "own_choice": r["candidates"][0].get("search")}
    taus["CycleQD final: auto"] = run.store.get("aggregate")
    notes["CycleQD final: auto"] = {"chosen": rec["chosen"], "validation_mean": rec["validation_mean"]}
    for c in rec["candidates"]:   # the engine's choice is the one the rebuilt strategies give
        if not math.isclose(c["validation_mean"], rebuilt[c["strategy"]]["validation_mean"], abs_tol=1e-9):
            raise RuntimeError(f"seed {seed}: {c['strategy']} validation mean {rebuilt[c['strategy']]['validation_mean']} "
                               f"differs from final.json's {c['validation_mean']}")
    select_s = time.perf_counter() - t
    # --- 2. the test split, once per model, after every choice is made
    test = {r: setup.scores(w, split="test") for r, w in weights.items()}
    test.update({r: setup.tau_scores(tau, split="test") for r, tau in taus.items()})
    return {"seed": seed, "recipe_hash": setup.recipe.hash(), "generations": generations, "final_params": final_params,
            "test": test, "test_mean": {r: sum(sc[d] for d in names) / len(names) for r, sc in test.items()},
            "notes": notes, "final_json": rec, "wall_s": {"select": round(select_s, 2),
                                                          "cycleqd": round(run.wall_s, 2)}}


def t975(df: int) -> float:
    if _stats is not None:
        return float(_stats.t.ppf(0.975, df))
    return _T975[df - 1] if df <= len(_T975) else 1.96


def mean_ci(xs) -> tuple[float, float]:
    """(mean, half-width of the 95% Student-t CI); half-width NaN for one value."""
    x = np.asarray(xs, dtype=float)
    if len(x) < 2:
        return float(x.mean()), float("nan")
    return float(x.mean()), t975(len(x) - 1) * float(x.std(ddof=1)) / math.sqrt(len(x))


def sign_flip_p(diff, *, seed: int = 0) -> float:
    """Two-sided paired permutation p-value of mean(diff) = 0: the share of sign flips whose
    |mean| is >= the observed one (exact up to :data:`PERM_EXACT_MAX` pairs)."""
    d = np.asarray(diff, dtype=float)
    obs = abs(d.mean())
    if len(d) <= PERM_EXACT_MAX:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=len(d))))
    else:
        signs = np.random.default_rng(seed).choice((1.0, -1.0), size=(PERM_SAMPLES, len(d)))
    return float(np.mean(np.abs(signs @ d / len(d)) >= obs - 1e-12))


def paired(a, b) -> dict:
    """Paired comparison of a row (``a``) with the baseline (``b``), per seed."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    m, h = mean_ci(d)
    out = {"diff_mean": m, "diff_ci95": h, "p_sign_flip": sign_flip_p(d), "p_ttest_rel": None, "p_wilcoxon": None}
    if _stats is not None and len(d) >= 2 and np.any(d != 0):
        out["p_ttest_rel"] = float(_stats.ttest_rel(a, b).pvalue)
        try:
            out["p_wilcoxon"] = float(_stats.wilcoxon(a, b).pvalue)
        except ValueError:
            pass
    return out


def summarise(results: list[dict], domains) -> dict:
    rows = row_names(domains)
    per = {r: [res["test_mean"][r] for res in results] for r in rows}
    ref = max(BASELINES, key=lambda r: float(np.mean(per[r])))
    out = []
    for r in rows:
        m, h = mean_ci(per[r])
        out.append({"row": r, "mean": m, "ci95": h, "per_seed": per[r],
                    "per_domain": {d: float(np.mean([res["test"][r][d] for res in results])) for d in domains},
                    "vs_best_baseline": None if r == ref else paired(per[r], per[ref])})
    chosen = [res["final_json"]["chosen"] for res in results]
    return {"best_baseline": ref, "rows": out, "auto_chose": chosen, "scipy": _stats is not None}


def _p(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def to_markdown(summary: dict, seeds, domains) -> str:
    ref = summary["best_baseline"]
    head = (f"Mean test accuracy (%) over {', '.join(domains)}; mean ± 95% CI over seeds {list(seeds)}; "
            f"Δ and p-values: paired vs the best merge baseline ({ref}, tuned on validation). "
            f"auto chose: {', '.join(summary['auto_chose'])}.\n\n")
    lines = ["| model | test mean | " + " | ".join(domains) + " | Δ vs best baseline | p t-test | p Wilcoxon | p sign-flip |",
             "|---|---:|" + "---:|" * len(domains) + "---:|---:|---:|---:|"]
    for r in summary["rows"]:
        ci = "" if math.isnan(r["ci95"]) else f" ± {100 * r['ci95']:.1f}"
        v = r["vs_best_baseline"]
        cmp = ["(reference)", "", "", ""] if v is None else [
            f"{100 * v['diff_mean']:+.1f}" + ("" if math.isnan(v["diff_ci95"]) else f" ± {100 * v['diff_ci95']:.1f}"),
            _p(v["p_ttest_rel"]), _p(v["p_wilcoxon"]), _p(v["p_sign_flip"])]
        lines.append(f"| {r['row']} | {100 * r['mean']:.1f}{ci} | "
                     + " | ".join(f"{100 * r['per_domain'][d]:.1f}" for d in domains) + " | " + " | ".join(cmp) + " |")
    return head + "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="output folder (fidelity.md, fidelity.json, seed_<s>/)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--generations", type=int, default=None,
                    help=f"CycleQD generations (default {DEFAULT_GENERATIONS}; --toy: {TOY_GENERATIONS})")
    ap.add_argument("--toy", action="store_true", help="toy recipe and few generations (about a minute)")
    ap.add_argument("--cache-dir", default=None, help="trained-model cache root")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--final-params", default="{}",
                    help='JSON {strategy: params} for the final strategies, e.g. \'{"weight_search": {"budget": 8}}\'')
    a = ap.parse_args(argv)
    gens = a.generations if a.generations is not None else (TOY_GENERATIONS if a.toy else DEFAULT_GENERATIONS)
    if gens < 1 or len(set(a.seeds)) != len(a.seeds) or a.threads < 1:
        ap.error("--generations and --threads must be >= 1 and --seeds distinct")
    try:
        final_params = json.loads(a.final_params)
    except ValueError as e:
        ap.error(f"--final-params: not JSON ({e})")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(a.threads)
    results = []
    for s in a.seeds:
        f = out / f"seed_{s}" / "result.json"
        t = time.perf_counter()
        old = json.loads(f.read_text()) if f.is_file() else {}
        if (old.get("generations"), old.get("recipe_hash"), old.get("final_params")) == (
                gens, recipe_for(s, a.toy).hash(), final_params):   # the same seed finished before
            res = old
        else:
            run_dir = out / f"seed_{s}" / "run"
            if run_dir.exists():   # an interrupted seed: start it again
                shutil.rmtree(run_dir)
            res = one_seed(s, toy=a.toy, generations=gens, run_dir=run_dir, cache_root=a.cache_dir,
                           final_params=final_params)
            f.write_text(json.dumps(res, indent=1))
        print(f"seed {s}: done ({time.perf_counter() - t:.0f} s), auto chose {res['final_json']['chosen']}",
              file=sys.stderr)
        results.append(res)
    domains = list(results[0]["test"]["base"])
    summary = summarise(results, domains)
    summary.update(seeds=a.seeds, generations=gens, toy=a.toy, final_params=final_params,
                   protocol="choices on search/validation only; test scored once per model afterwards")
    md = to_markdown(summary, a.seeds, domains)
    (out / "fidelity.md").write_text(md + "\n")
    (out / "fidelity.json").write_text(json.dumps(summary, indent=1))
    print(md)
    return summary


if __name__ == "__main__":
    main()

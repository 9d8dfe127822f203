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
from cycleqd.registry import AGGREGATIONS
from cycleqd.vision.pipeline import SAMPLINGS, build_setup, engine_run, merge_baselines
from cycleqd.vision.training import VisionRecipe

TOY_GENERATIONS = 8
RESULT_VERSION = 2          # result.json layout (2: diagnostics, run settings, extra finals)
#: the run's operator settings (official values; the demo's); ``--mutation-rate`` etc. change them
RUN_DEFAULTS = {"mutation_rate": 0.1, "crossover_sigma": 0.01, "use_cma": False, "sampling": "elite", "bins": 15}
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


def row_names(domains, extra=()) -> list[str]:
    """Every row of the table, in order (``extra``: the extra final rows' labels)."""
    return (["base"] + [f"expert: {d}" for d in domains] + ["multi-domain fine-tune", *BASELINES]
            + [f"CycleQD final: {s}" for s in (*AUTO_STRATEGIES, "auto", *extra)])


def recipe_for(seed: int, toy: bool) -> VisionRecipe:
    return VisionRecipe.toy(split_seed=seed, train_seed=seed) if toy else VisionRecipe(split_seed=seed, train_seed=seed)


def _plan(strategy: str, params: dict) -> list[tuple[str, dict]]:
    """An extra final row's plan: one strategy, or ``auto`` over every strategy of
    :data:`AUTO_STRATEGIES` with ``params`` = ``{strategy: params}``."""
    if strategy == "auto":
        return [(n, dict(params.get(n, {}))) for n in AUTO_STRATEGIES]
    return [(strategy, dict(params))]


def _finished_run(setup, run_dir: Path, generations: int, seed: int, final: dict, run_kw: dict):
    """``(archives, store, space)`` of a finished run in ``run_dir`` with exactly this
    configuration (config fingerprint, generations, final.json written), else None."""
    from cycleqd.engine.loop import seed_ids
    from cycleqd.engine.runview import RunView
    from cycleqd.executors.store import GenomeStore
    from cycleqd.ops import CROSSOVERS, DenseWeightSpace
    from cycleqd.vision.pipeline import make_mutation, run_config

    if not (run_dir / "final.json").is_file():
        return None
    mut, mut_kw = make_mutation("svd_expert", setup.taus, rate=run_kw["mutation_rate"])
    cfg = run_config(setup, generations=generations, seed=seed, sampling=run_kw["sampling"],
                     mutation_kwargs=mut_kw, final=final, crossover_sigma=run_kw["crossover_sigma"],
                     use_cma=run_kw["use_cma"], bins=run_kw["bins"])
    try:
        view = RunView(run_dir)
        if view.config.fingerprint() != cfg.fingerprint() or view.generation != generations:
            return None
        archives = view.archives
    except Exception:   # an unreadable or interrupted run directory: run it again
        return None
    space = DenseWeightSpace(setup.base, setup.taus, CROSSOVERS["linear"](sigma=run_kw["crossover_sigma"]), mut)
    return archives, GenomeStore(run_dir / "genomes", space, dict(zip(seed_ids(cfg), setup.taus))), space


def diagnose(setup, space, archives, get, taus: dict, validation, chosen: dict) -> dict:
    """Weight-space and validation measurements of one seed (no test split).

    ``coef``: every row's task vector on the experts (:class:`ExpertBasis`: all tensors, and
    the 2-D matrices the SVD mutation acts on), the archives' bests, and the landscape
    (:func:`archive_landscape` / :func:`landscape_summary`: every elite's validation mean,
    cell, quality rank, coefficients). ``chosen``: the hyper-parameters each choosing row picked."""
    from cycleqd.ops.base import TensorSelector
    from cycleqd.vision.diagnostics import ExpertBasis, archive_landscape, landscape_summary

    sel = TensorSelector()
    mats = [k for k, t in setup.taus[0].items() if sel(k, t.shape)]
    full, mat = ExpertBasis(setup.taus), ExpertBasis(setup.taus, mats)
    coef = {r: {"all": full.coefficients(t), "matrices": mat.coefficients(t)} for r, t in taus.items()}
    bests = {}
    for a in archives:
        e = a.best()
        t = space.task_vector(get(e.id))
        v = validation(t)
        bests[a.quality_skill] = {"id": e.id, "quality": float(a.quality_of(e.scores)),
                                  "validation_mean": sum(v.values()) / len(v),
                                  "all": full.coefficients(t), "matrices": mat.coefficients(t)}
    rows = archive_landscape(archives, get, space, full, validation)
    return {"coef": coef, "bests": bests, "landscape": landscape_summary(rows), "chosen": chosen,
            "elites": [{k: r[k] for k in ("archive", "id", "cell", "rank", "quality", "search_mean",
                                          "validation_mean")} | {"coef_sum": r["coef"]["sum"]} for r in rows]}


def one_seed(seed: int, *, toy: bool, generations: int, run_dir: Path, cache_root: str | None,
             final_params: dict, run_kw: dict | None = None, extra_finals: dict | None = None) -> dict:
    """Build, choose (search/validation only), then score every row's model on test.

    ``run_kw``: the run's operator settings (:data:`RUN_DEFAULTS` keys); ``extra_finals``:
    ``{label: [strategy, params]}``, extra rows ``CycleQD final: <label>`` built from the same
    archives and chosen on validation (``strategy`` may be ``auto``, params then per strategy).
    A finished run directory with the same configuration is reused (not run again)."""
    run_kw = {**RUN_DEFAULTS, **(run_kw or {})}
    extra_finals = extra_finals or {}
    setup = build_setup(recipe_for(seed, toy), cache_root=cache_root)
    names = setup.skill_names
    t = time.perf_counter()
    # --- 1. every model and every choice: search and validation splits only
    weights = {"base": setup.base, **{f"expert: {d}": setup.models.experts[d] for d in names},
               "multi-domain fine-tune": setup.models.multidomain}
    taus, notes, chosen = {}, {}, {}
    bl = merge_baselines(setup, split="validation")
    for row, key in zip(BASELINES, ("task_arithmetic", "ties")):
        taus[row], notes[row] = bl[key]["tau"], {"params": bl[key]["params"], "validation": bl[key]["validation"]}
        chosen[row] = bl[key]["params"]
    final = {"strategy": "auto", "params": final_params}
    old = _finished_run(setup, run_dir, generations, seed, final, run_kw)
    if old is None:
        if run_dir.exists():   # an interrupted or different run: start it again
            shutil.rmtree(run_dir)
        run = engine_run(setup, run_dir, generations=generations, seed=seed, final=final,
                         sampling=run_kw["sampling"], mutation_rate=run_kw["mutation_rate"],
                         crossover_sigma=run_kw["crossover_sigma"], use_cma=run_kw["use_cma"], bins=run_kw["bins"])
        archives, store, space, run_wall = run.result.archives, run.store, run.space, run.wall_s
    else:
        (archives, store, space), run_wall = old, None
    rec = json.loads((run_dir / "final.json").read_text())

    def validation(genome):
        return setup.tau_scores(space.task_vector(genome), split="validation")

    rebuilt = {}
    for strat in AUTO_STRATEGIES:
        g, r = select_final(space, archives, store.get, [(strat, dict(final_params.get(strat, {})))], validation)
        taus[f"CycleQD final: {strat}"] = space.task_vector(g)
        rebuilt[strat] = r["candidates"][0]
        own = r["candidates"][0].get("search")
        notes[f"CycleQD final: {strat}"] = {"validation": r["candidates"][0]["validation"], "own_choice": own}
        if own:
            chosen[f"CycleQD final: {strat}"] = {k: v for k, v in own["candidates"][own["chosen"]].items()
                                                 if k not in ("validation", "validation_mean")}
    taus["CycleQD final: auto"] = store.get("aggregate")
    notes["CycleQD final: auto"] = {"chosen": rec["chosen"], "validation_mean": rec["validation_mean"]}
    for c in rec["candidates"]:   # the engine's choice is the one the rebuilt strategies give
        if not math.isclose(c["validation_mean"], rebuilt[c["strategy"]]["validation_mean"], abs_tol=1e-9):
            raise RuntimeError(f"seed {seed}: {c['strategy']} validation mean {rebuilt[c['strategy']]['validation_mean']} "
                               f"differs from final.json's {c['validation_mean']}")
    for label, (strat, params) in extra_finals.items():
        g, r = select_final(space, archives, store.get, _plan(strat, params), validation)
        taus[f"CycleQD final: {label}"] = space.task_vector(g)
        notes[f"CycleQD final: {label}"] = {"chosen": r["chosen"], "validation_mean": r["validation_mean"]}
        cand = next(c for c in r["candidates"] if c["strategy"] == r["chosen"])
        own = cand.get("search")   # what the strategy chose itself, else its fixed parameters
        chosen[f"CycleQD final: {label}"] = {"strategy": r["chosen"], **(
            {k: v for k, v in own["candidates"][own["chosen"]].items() if k not in ("validation", "validation_mean")}
            if own else cand["params"])}
    diag = diagnose(setup, space, archives, store.get,
                    {r: tau for r, tau in taus.items()}, validation, chosen)
    select_s = time.perf_counter() - t
    # --- 2. the test split, once per model, after every choice is made
    test = {r: setup.scores(w, split="test") for r, w in weights.items()}
    test.update({r: setup.tau_scores(tau, split="test") for r, tau in taus.items()})
    return {"version": RESULT_VERSION, "seed": seed, "recipe_hash": setup.recipe.hash(), "generations": generations,
            "final_params": final_params, "run_kw": run_kw, "extra_finals": extra_finals,
            "test": test, "test_mean": {r: sum(sc[d] for d in names) / len(names) for r, sc in test.items()},
            "notes": notes, "final_json": rec, "diagnostics": diag,
            "wall_s": {"select": round(select_s, 2), "cycleqd": None if run_wall is None else round(run_wall, 2)}}


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
    rows = row_names(domains, list(results[0].get("extra_finals", {})))
    per = {r: [res["test_mean"][r] for res in results] for r in rows}
    ref = max(BASELINES, key=lambda r: float(np.mean(per[r])))
    out = []
    for r in rows:
        m, h = mean_ci(per[r])
        out.append({"row": r, "mean": m, "ci95": h, "per_seed": per[r],
                    "per_domain": {d: float(np.mean([res["test"][r][d] for res in results])) for d in domains},
                    "vs_best_baseline": None if r == ref else paired(per[r], per[ref])})
    chosen = [res["final_json"]["chosen"] for res in results]
    return {"best_baseline": ref, "rows": out, "auto_chose": chosen, "scipy": _stats is not None,
            "diagnostics": diagnostics_summary(results)}


def diagnostics_summary(results: list[dict]) -> dict:
    """Per row: mean over seeds of the coefficient sum on the experts (all tensors; 2-D
    matrices), of the residual outside their span and of the chosen hyper-parameters; per
    seed: the landscape digest (where the best validation elites sit)."""
    rows = list(results[0]["diagnostics"]["coef"])
    coef = {}
    for r in rows:
        cs = [res["diagnostics"]["coef"][r] for res in results]
        coef[r] = {"sum_all": float(np.mean([c["all"]["sum"] for c in cs])),
                   "sum_matrices": float(np.mean([c["matrices"]["sum"] for c in cs])),
                   "c_all": [float(x) for x in np.mean([c["all"]["c"] for c in cs], 0)],
                   "residual_all": float(np.mean([c["all"]["residual"] for c in cs])),
                   "chosen": [res["diagnostics"]["chosen"].get(r) for res in results]}
    bests = {}
    for k in results[0]["diagnostics"]["bests"]:
        bs = [res["diagnostics"]["bests"][k] for res in results]
        bests[k] = {"sum_all": float(np.mean([b["all"]["sum"] for b in bs])),
                    "c_all": [float(x) for x in np.mean([b["all"]["c"] for b in bs], 0)],
                    "validation_mean": float(np.mean([b["validation_mean"] for b in bs])),
                    "is_expert": sum(b["id"].startswith("expert") for b in bs)}
    land = []
    for res in results:
        ls = res["diagnostics"]["landscape"]
        ta_v = float(np.mean(list(res["notes"]["task arithmetic"]["validation"].values())))
        top = ls["top_by_validation"][0]
        land.append({"seed": res["seed"], "n_elites": ls["n_elites"], "coef_sum_range": ls["coef_sum_range"],
                     "task_arithmetic_validation": ta_v, "top_elite": top,
                     "best_validation_of_bests": max(a["best_validation_mean"] for a in ls["archives"].values())})
    optimism = {}   # reported after every choice: how much a row's validation mean overstates its test mean
    for r in rows:
        vs = [_validation_mean(res["notes"].get(r, {})) for res in results]
        if all(v is not None for v in vs):
            te = [res["test_mean"][r] for res in results]
            optimism[r] = {"validation": float(np.mean(vs)), "test": float(np.mean(te)),
                           "validation_minus_test": float(np.mean(np.subtract(vs, te)))}
    return {"coef": coef, "bests": bests, "landscape": land, "optimism": optimism}


def _validation_mean(note: dict):
    if "validation_mean" in note:
        return note["validation_mean"]
    if "validation" in note:
        return float(np.mean(list(note["validation"].values())))
    return None


def _p(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def _fmt_chosen(ch) -> str:
    if not ch:
        return ""
    return "; ".join(",".join(f"{k}={_num(v)}" for k, v in c.items()) if c else "-" for c in ch)


def _num(v) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, list):
        return "[" + " ".join(f"{x:.2f}" for x in v) + "]"
    return str(v)


def diagnostics_markdown(d: dict) -> str:
    """The diagnostic measurements as markdown (weights and validation only)."""
    out = ["Task vectors on the experts' task vectors (least squares over all 38,282 parameters; "
           "Σc = coefficient sum, K·λ for task arithmetic; 'matrices' = the 2-D tensors the SVD mutation "
           "changes), means over seeds; chosen = each seed's validation choice.\n",
           "| model | c (rotated, noisy, occluded) | Σc all | Σc matrices | residual | chosen per seed |",
           "|---|---|---:|---:|---:|---|"]
    for r, c in d["coef"].items():
        out.append(f"| {r} | {_num(c['c_all'])} | {c['sum_all']:.2f} | {c['sum_matrices']:.2f} | "
                   f"{c['residual_all']:.3f} | {_fmt_chosen(c['chosen'])} |")
    out += ["", "Archive bests (the merge inputs of every final strategy but best_elite), means over seeds:\n",
            "| archive | c | Σc | validation mean | seeds where the best is the expert |", "|---|---|---:|---:|---:|"]
    for k, b in d["bests"].items():
        out.append(f"| {k} | {_num(b['c_all'])} | {b['sum_all']:.2f} | {100 * b['validation_mean']:.1f} | {b['is_expert']} |")
    out += ["", "Where the good multi-skill models sit (validation mean over the 3 domains, %):\n",
            "| seed | elites | Σc range over elites | task arithmetic (validation) | best of the archive bests | "
            "top elite: validation | its archive, quality rank, cell | its c |", "|---:|---:|---|---:|---:|---:|---|---|"]
    for x in d["landscape"]:
        t = x["top_elite"]
        out.append(f"| {x['seed']} | {x['n_elites']} | {x['coef_sum_range'][0]:.2f}–{x['coef_sum_range'][1]:.2f} | "
                   f"{100 * x['task_arithmetic_validation']:.1f} | {100 * x['best_validation_of_bests']:.1f} | "
                   f"{100 * t['validation_mean']:.1f} | {t['archive']}, {t['rank']}, {tuple(t['cell'])} | {_num(t['c'])} |")
    if d.get("optimism"):
        out += ["", "Validation vs test mean (%) of every chosen row, means over seeds: a choice among many "
                "candidates on the validation split overstates its test accuracy (selection optimism).\n",
                "| model | validation | test | validation − test |", "|---|---:|---:|---:|"]
        for r, o in d["optimism"].items():
            out.append(f"| {r} | {100 * o['validation']:.1f} | {100 * o['test']:.1f} | "
                       f"{100 * o['validation_minus_test']:+.1f} |")
    return "\n".join(out)


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


def compare(dirs: list[str]) -> str:
    """Variant table over finished fidelity folders (``label=DIR``): every CycleQD final row
    of each, paired vs task arithmetic on the same seeds (the baselines do not depend on the
    run's settings: the script checks their per-seed test means are identical)."""
    out = ["| variant | row | test mean ± 95% CI | Δ vs task arithmetic | p t-test | p Wilcoxon | p sign-flip | auto chose |",
           "|---|---|---:|---:|---:|---:|---:|---|"]
    ta_ref = None
    for spec in dirs:
        label, _, d = spec.rpartition("=")
        summ = json.loads((Path(d) / "fidelity.json").read_text())
        rows = {r["row"]: r for r in summ["rows"]}
        ta = rows["task arithmetic"]["per_seed"]
        key = (tuple(summ["seeds"]), tuple(round(x, 12) for x in ta))
        if ta_ref is None:
            ta_ref = key
            m, h = mean_ci(ta)
            out.append(f"| (all) | task arithmetic | {100 * m:.1f} ± {100 * h:.1f} | (reference) | | | | |")
        elif key != ta_ref:
            raise SystemExit(f"{d}: other seeds or task-arithmetic results than {dirs[0]}; not paired")
        for r in summ["rows"]:
            if not r["row"].startswith("CycleQD final"):
                continue
            v = paired(r["per_seed"], ta)
            m, h = mean_ci(r["per_seed"])
            chose = ", ".join(summ["auto_chose"]) if r["row"].endswith(": auto") else ""
            out.append(f"| {label or d} | {r['row'][len('CycleQD final: '):]} | {100 * m:.1f} ± {100 * h:.1f} | "
                       f"{100 * v['diff_mean']:+.1f} ± {100 * v['diff_ci95']:.1f} | {_p(v['p_ttest_rel'])} | "
                       f"{_p(v['p_wilcoxon'])} | {_p(v['p_sign_flip'])} | {chose} |")
    return "\n".join(out)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", help="output folder (fidelity.md, fidelity.json, seed_<s>/)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--generations", type=int, default=None,
                    help=f"CycleQD generations (default {DEFAULT_GENERATIONS}; --toy: {TOY_GENERATIONS})")
    ap.add_argument("--toy", action="store_true", help="toy recipe and few generations (about a minute)")
    ap.add_argument("--cache-dir", default=None, help="trained-model cache root")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--final-params", default="{}",
                    help='JSON {strategy: params} for the final strategies, e.g. \'{"weight_search": {"budget": 8}}\'')
    ap.add_argument("--extra-finals", default="{}",
                    help='JSON {label: [strategy, params]}: extra final rows from the same archives, chosen on '
                         'validation; strategy "auto" takes {strategy: params}')
    ap.add_argument("--mutation-rate", type=float, default=RUN_DEFAULTS["mutation_rate"])
    ap.add_argument("--crossover-sigma", type=float, default=RUN_DEFAULTS["crossover_sigma"])
    ap.add_argument("--use-cma", action="store_true", help="official qd.use_cma (per-child mu, sigma, rate)")
    ap.add_argument("--sampling", default=RUN_DEFAULTS["sampling"], choices=SAMPLINGS)
    ap.add_argument("--bins", type=int, default=RUN_DEFAULTS["bins"], help="bins per BC axis")
    ap.add_argument("--compare", nargs="+", metavar="LABEL=DIR",
                    help="print the variant table of finished --out folders and exit")
    a = ap.parse_args(argv)
    if a.compare:
        md = compare(a.compare)
        print(md)
        return {"markdown": md}
    if not a.out:
        ap.error("--out is required (unless --compare)")
    gens = a.generations if a.generations is not None else (TOY_GENERATIONS if a.toy else DEFAULT_GENERATIONS)
    if gens < 1 or len(set(a.seeds)) != len(a.seeds) or a.threads < 1 or a.bins < 2:
        ap.error("--generations and --threads must be >= 1, --bins >= 2 and --seeds distinct")
    if not (a.mutation_rate >= 0 and a.crossover_sigma >= 0):
        ap.error("--mutation-rate and --crossover-sigma must be >= 0")
    try:
        final_params = json.loads(a.final_params)
        extra = json.loads(a.extra_finals)
    except ValueError as e:
        ap.error(f"--final-params/--extra-finals: not JSON ({e})")
    if not isinstance(extra, dict) or not all(isinstance(v, list) and len(v) == 2 and isinstance(v[1], dict)
                                              for v in extra.values()):
        ap.error("--extra-finals: expected {label: [strategy, {params}]}")
    for label, (strat, params) in extra.items():   # bad names/params: one line, before any work
        try:
            for n, p in _plan(strat, params):
                AGGREGATIONS.build(n, p, field=f"--extra-finals {label}")
        except ValueError as e:
            ap.error(str(e).splitlines()[0])
    run_kw = {"mutation_rate": a.mutation_rate, "crossover_sigma": a.crossover_sigma, "use_cma": a.use_cma,
              "sampling": a.sampling, "bins": a.bins}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(a.threads)
    results = []
    for s in a.seeds:
        f = out / f"seed_{s}" / "result.json"
        t = time.perf_counter()
        old = json.loads(f.read_text()) if f.is_file() else {}
        if (old.get("version"), old.get("generations"), old.get("recipe_hash"), old.get("final_params"),
                old.get("run_kw"), old.get("extra_finals")) == (
                RESULT_VERSION, gens, recipe_for(s, a.toy).hash(), final_params, run_kw, extra):   # finished before
            res = old
        else:
            res = one_seed(s, toy=a.toy, generations=gens, run_dir=out / f"seed_{s}" / "run", cache_root=a.cache_dir,
                           final_params=final_params, run_kw=run_kw, extra_finals=extra)
            f.write_text(json.dumps(res, indent=1))
        print(f"seed {s}: done ({time.perf_counter() - t:.0f} s), auto chose {res['final_json']['chosen']}",
              file=sys.stderr)
        results.append(res)
    domains = list(results[0]["test"]["base"])
    summary = summarise(results, domains)
    summary.update(seeds=a.seeds, generations=gens, toy=a.toy, final_params=final_params, run_kw=run_kw,
                   extra_finals=extra, protocol="choices on search/validation only; test scored once per model afterwards")
    md = (to_markdown(summary, a.seeds, domains) + "\n\n" + diagnostics_markdown(summary["diagnostics"]))
    (out / "fidelity.md").write_text(md + "\n")
    (out / "fidelity.json").write_text(json.dumps(summary, indent=1))
    print(md)
    return summary


if __name__ == "__main__":
    main()

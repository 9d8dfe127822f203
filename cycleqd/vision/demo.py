"""``cycleqd demo --domain vision``: CycleQD on image models, end to end, in minutes on a CPU.

1. Data: scikit-learn's bundled digits (1,797 real 8x8 images), split into disjoint
   train / search / test images, then transformed into the domains ``rotated``,
   ``noisy``, ``occluded`` (see :mod:`cycleqd.vision.data`).
2. Models: a small CNN base trained on clean images and K = 3 experts fine-tuned from it,
   one per domain, plus a multi-domain fine-tune with the experts' total budget (cached
   by recipe hash, see :mod:`cycleqd.vision.training`).
3. CycleQD with the engine (K archives, quality rotating, elite sampling, linear
   crossover, SVD-expert mutation, model aggregation) scored on the search splits.
4. The final model chosen on the validation splits (``final.strategy``, default
   :data:`DEFAULT_FINAL`; ``RUN_DIR/final.json``), and the baselines task arithmetic and
   TIES with their hyper-parameters tuned on the same validation splits (no choice ever
   reads the test split).
5. The test-split table (markdown + JSON) and the elite maps, written to ``out_dir``.

Output layout::

    OUT_DIR/
      table.md, table.json      the results table (+ everything measured, JSON)
      curves.png                coverage / QD score / best quality per generation
      aggregate.safetensors     the aggregated model's full weights (DigitCNN state dict)
      run/                      the engine's run directory (config.yaml, state.json,
                                metrics.jsonl, archives/, genomes/, maps/elite_maps.png ...)
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from cycleqd._checks import check_int
from cycleqd.engine.plots import plot_curves
from cycleqd.engine.runview import RunView
from cycleqd.vision.pipeline import (
    BINS,
    TA_LAMBDAS,
    VisionSetup,
    build_setup,
    merge_baselines,
    run_search,
)
from cycleqd.vision.training import VisionRecipe

DEFAULT_GENERATIONS = 1200  # the paper's number of generations
TOY_GENERATIONS = 24
#: the demo's final-model strategy: every strategy of :data:`cycleqd.config.AUTO_STRATEGIES`,
#: the best validation mean kept, with the final ``task_arithmetic`` given the same lambda grid
#: as the task-arithmetic baseline (:data:`TA_LAMBDAS`; its default grid 0.2, 0.4, ... is
#: coarser). docs/vision.md gives what each strategy and this choice measure over seeds.
DEFAULT_FINAL = {"strategy": "auto", "params": {"task_arithmetic": {"lambdas": list(TA_LAMBDAS)}}}
FINAL_ROW = "CycleQD final model"


def _row(name: str, scores: dict[str, float], skills: Sequence[str], note: str = "") -> dict[str, Any]:
    return {"model": name, **{k: float(scores[k]) for k in skills},
            "mean": float(sum(scores[k] for k in skills) / len(skills)),
            "clean": float(scores["clean"]) if "clean" in scores else None, "note": note}


def results_table(setup: VisionSetup, baselines: dict, run: dict) -> list[dict[str, Any]]:
    """The demo table's rows: test accuracy per skill domain, their mean, clean accuracy."""
    names = setup.skill_names
    m, r = setup.models, setup.recipe
    rows = [_row("base", setup.scores(m.base, split="test", clean=True), names,
                 f"clean train, {r.base_steps} steps")]
    for d in names:
        rows.append(_row(f"expert: {d}", setup.scores(m.experts[d], split="test", clean=True), names,
                         f"base + {r.expert_steps} steps on {d}"))
    ta, ties = baselines["task_arithmetic"], baselines["ties"]
    rows.append(_row("task arithmetic", setup.tau_scores(ta["tau"], split="test", clean=True), names,
                     f"lambda={ta['params']['lambda']:g} (validation-tuned)"))
    rows.append(_row("TIES", setup.tau_scores(ties["tau"], split="test", clean=True), names,
                     f"density={ties['params']['density']:g}, lambda={ties['params']['lambda']:g} "
                     "(validation-tuned)"))
    rows.append(_row("multi-domain fine-tune", setup.scores(m.multidomain, split="test", clean=True), names,
                     f"base + {r.multidomain_steps} steps on all {len(names)} domains"))
    per_skill = run["best_per_skill"]
    rows.append(_row("CycleQD best per skill", {k: per_skill[k]["test"] for k in names}, names,
                     "column k: the elite best on k (search); not one model: "
                     + ", ".join(f"{k}={per_skill[k]['id']}" for k in names)))
    bm = run["best_mean"]
    rows.append(_row("CycleQD best-mean elite", bm["test"], names,
                     f"elite {bm['id']}: highest mean search accuracy in the archives"))
    for q, b in run["best"].items():
        rows.append(_row(f"CycleQD archive best: {q}", b["test"], names, f"elite {b['id']}"))
    if run["aggregate"] is not None:
        fin = run.get("final") or {}
        how = (f"final.strategy={fin.get('strategy')}: chose {fin.get('chosen')} on validation"
               if fin.get("split") == "validation" else "model aggregation of the archives' best")
        rows.append(_row(FINAL_ROW, run["aggregate"]["test"], names, how))
    return rows


def to_markdown(rows: list[dict[str, Any]], skills: Sequence[str]) -> str:
    """Rows as a GitHub markdown table (accuracies in %)."""
    head = ["model"] + list(skills) + ["mean", "clean", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(skills) + 2) + ["---"]) + "|"]
    for r in rows:
        cells = [r["model"]] + [f"{100 * r[k]:.1f}" for k in skills] + [f"{100 * r['mean']:.1f}",
                                                                        "" if r["clean"] is None else f"{100 * r['clean']:.1f}",
                                                                        r["note"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _final_line(run: dict) -> str:
    fin = run.get("final")
    if run["aggregate"] is None:
        return "NOT AVAILABLE"
    if not fin:
        return "model aggregation of the archives' best"
    return f"final.strategy={fin['strategy']}, chose {fin['chosen']} (validation mean {100 * fin['validation_mean']:.1f}%)" \
        if fin.get("validation_mean") is not None else f"{fin['chosen']}"


def _write_aggregate(setup: VisionSetup, run_dir: Path, out: Path) -> bool:
    from safetensors.torch import save_file

    from cycleqd.ops.base import apply_task_vector
    from cycleqd.ops.space import DenseWeightSpace

    p = run_dir / "genomes" / "aggregate.safetensors"
    if not p.exists():
        return False
    space = DenseWeightSpace(setup.base, setup.taus, None, None)  # type: ignore[arg-type]
    weights = apply_task_vector(setup.base, space.load(p))
    save_file({k: v.contiguous() for k, v in weights.items()}, str(out))
    return True


def main(out_dir: str | Path, *, generations: int | None = None, seed: int = 0, toy: bool = False,
         cache_root: str | Path | None = None, recipe: VisionRecipe | None = None,
         progress: bool = True, threads: int | None = 1, quiet: bool = False,
         final: str | dict | None = DEFAULT_FINAL) -> dict[str, Any]:
    """Run the vision demo into ``out_dir`` and return the results (also in ``table.json``).

    Args:
        out_dir: output folder (created); must not already hold a demo run.
        generations: CycleQD generations (default 1200, the paper's; toy: 24).
        seed: the CycleQD run seed (the data splits and training use the recipe's seeds).
        toy: tiny CNN, short training, few generations (for CI; seconds).
        cache_root: where trained models are cached (default :func:`cycleqd.paths.cache_dir`:
            ``$CYCLEQD_CACHE`` or ``~/.cache/cycleqd``).
        recipe: override the data/training recipe.
        progress: show the engine's progress bar.
        threads: torch intra-op threads for the run (1 is fastest for this small CNN;
            ``None`` leaves torch's setting); restored afterwards.
        quiet: do not print the table.
        final: the run's ``final`` section (a strategy name, ``"auto"``, or ``{"strategy":
            ..., "params": ...}``; chosen on the validation split), None for the engine's
            default (``operators.aggregation``: ``mean``, no choice).
    Returns:
        dict with ``rows`` (the table), ``markdown``, ``run`` (see
        :func:`cycleqd.vision.pipeline.run_search`; ``run["final"]`` is final.json),
        ``baselines`` (chosen params and validation scores), ``recipe``, ``timings``
        (seconds) and ``paths``.
    Raises:
        ValueError: generations < 1 or threads < 1.
        FileExistsError: ``out_dir`` already holds a demo run.
    """
    gens = generations if generations is not None else (TOY_GENERATIONS if toy else DEFAULT_GENERATIONS)
    check_int("generations", gens)
    check_int("threads", threads, optional=True)
    out = Path(out_dir)
    run_dir = out / "run"
    if (run_dir / "state.json").exists() or (run_dir / "metrics.jsonl").exists() or (out / "table.json").exists():
        raise FileExistsError(f"{out} already holds a vision demo run; choose another output folder")
    out.mkdir(parents=True, exist_ok=True)
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    t_all = time.perf_counter()
    try:
        setup = build_setup(recipe, toy=toy, cache_root=cache_root)
        t = time.perf_counter()
        baselines = merge_baselines(setup, split="validation")
        t_base = time.perf_counter() - t
        run = run_search(setup, run_dir, generations=gens, seed=seed, progress=progress, final=final)
        t = time.perf_counter()
        rows = results_table(setup, baselines, run)
        t_table = time.perf_counter() - t
        curves = plot_curves(RunView(run_dir).metrics, out / "curves.png")
        agg_path = out / "aggregate.safetensors"
        has_agg = _write_aggregate(setup, run_dir, agg_path)
    finally:
        torch.set_num_threads(old_threads)
    names = setup.skill_names
    md = to_markdown(rows, names)
    timings = {**{k: round(v, 3) for k, v in setup.timings.items()}, "baselines_s": round(t_base, 3),
               "cycleqd_s": round(run["wall_s"], 3), "table_s": round(t_table, 3),
               "total_s": round(time.perf_counter() - t_all, 3)}
    qd = run["qd"]
    header = (f"# CycleQD on image models (sklearn digits, K={len(names)}: {', '.join(names)})\n\n"
              f"Test-split accuracy (%), {len(setup.data[names[0]]['test'])} test images per domain; "
              f"archives on the search split; final model and baselines' hyper-parameters chosen on the "
              f"validation split; the test split is only reported. CycleQD: {gens} generations, seed {seed}, "
              f"linear crossover + SVD-expert mutation, elite sampling; final model: "
              f"{_final_line(run)}.\n\n")
    qd_line = (f"\n\nQD score (sum over the {len(names)} archives, search accuracy): {qd['qd_score']:.2f}; "
               f"mean coverage {100 * qd['coverage']:.1f}% of {BINS ** (len(names) - 1)} cells per archive. "
               f"Wall time: {timings['total_s']:.0f} s (models {'from cache' if setup.timings['models_cached'] else 'trained'}: "
               f"{timings['models_s']:.1f} s, CycleQD {timings['cycleqd_s']:.1f} s).\n")
    (out / "table.md").write_text(header + md + qd_line)
    result = {"rows": rows, "markdown": md, "run": run,
              "baselines": {k: {"params": v["params"], "validation": v["validation"]} for k, v in baselines.items()},
              "recipe": setup.recipe.to_json(), "recipe_hash": setup.recipe.hash(),
              "model_cache": str(setup.models.path), "train_log": setup.models.log,
              "timings": timings,
              "paths": {"table_md": str(out / "table.md"), "table_json": str(out / "table.json"),
                        "curves": str(curves), "run_dir": str(run_dir),
                        "elite_maps": str(run_dir / "maps" / "elite_maps.png"),
                        "aggregate": str(agg_path) if has_agg else None}}
    (out / "table.json").write_text(json.dumps(result, indent=1, default=str))
    if not quiet:
        print(header + md + qd_line)
        print(f"written to {out}")
    return result


if __name__ == "__main__":  # python -m cycleqd.vision.demo OUT_DIR [--toy] [--generations N] [--seed S]
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--generations", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--toy", action="store_true")
    ap.add_argument("--cache-dir", default=None)
    a = ap.parse_args()
    main(a.out_dir, generations=a.generations, seed=a.seed, toy=a.toy, cache_root=a.cache_dir)

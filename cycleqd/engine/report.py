"""``cycleqd report RUN_DIR``: a markdown and/or HTML summary of a run.

Contents: the setup, QD metrics per archive (coverage, QD score, best quality), the elite
maps, metric curves over generations, the best model per skill (with its scores on every
skill), the aggregated model, and time spent per phase.
"""

from __future__ import annotations

import html
from pathlib import Path

import yaml

from cycleqd.engine.plots import plot_all_maps, plot_curves
from cycleqd.engine.rundir import RunDir, atomic_write_text
from cycleqd.qd.archive import GridArchive
from cycleqd.qd.metrics import archive_stats


def _table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def build_markdown(run_dir: Path) -> str:
    """The report as markdown (images referenced relative to the run directory).

    Raises:
        FileNotFoundError: ``run_dir`` holds no state.json.
    """
    rd = RunDir(run_dir)
    state = rd.load_state()
    cfg = yaml.safe_load(rd.config.read_text())
    archives = [GridArchive.from_json(a) for a in state["archives"]]
    metrics = rd.read_metrics()
    skills = [s["name"] for s in cfg["skills"]]
    seeds = {m["child"] for m in metrics if m["generation"] == 0}
    plot_all_maps(archives, rd.maps, seed_ids=seeds)
    plot_curves(metrics, rd.maps / "curves.png")
    gens = [m for m in metrics if m["generation"] >= 1 and m.get("kind") != "aggregate"]
    lines = [f"# CycleQD run `{cfg['name']}`", "",
             f"Run directory `{rd.root}` — generation **{state['generation']} / {cfg['qd']['generations']}**, "
             f"seed {cfg['seed']}, sampling `{cfg['qd']['sampling']}`, mode `{cfg['qd']['mode']}`, "
             f"crossover `{cfg['operators']['crossover']['name']}`, mutation `{cfg['operators']['mutation']['name']}`.",
             "", "## Archives", ""]
    rows = []
    for a in archives:
        st = archive_stats(a)
        rows.append([a.quality_skill, ", ".join(f"{x.skill} [{x.lo}, {x.hi}]×{x.bins}" for x in a.axes),
                     f"{st['coverage']:.3f}", f"{st['qd_score']:.3f}", f"{st['best_quality']:.3f}",
                     str(int(st["num_elites"]))])
    lines += [_table(["quality", "BC axes", "coverage", "QD score", "best quality", "elites"], rows), "",
              "![elite maps](maps/elite_maps.png)", "",
              "Elite maps: two BCs on the axes, quality as colour; red boxes are the seed models (experts).",
              "", "## Best model per skill", ""]
    rows = []
    for a in archives:
        b = a.best()
        if b is None:
            continue
        rows.append([a.quality_skill, f"`{b.id}`", str(b.generation)] +
                    [f"{b.scores.get(s, float('nan')):.3f}" for s in skills] +
                    [f"{sum(b.scores.values()) / len(b.scores):.3f}"])
    agg = [m for m in metrics if m.get("kind") == "aggregate"]
    if agg:
        sc = agg[-1]["scores"]
        rows.append(["**aggregated**", "`aggregate`", "-"] + [f"{sc.get(s, float('nan')):.3f}" for s in skills]
                    + [f"{sum(sc.values()) / len(sc):.3f}"])
    seed_rows = [m for m in metrics if m["generation"] == 0]
    for m in seed_rows:
        rows.append(["seed", f"`{m['child']}`", "0"] + [f"{m['scores'].get(s, float('nan')):.3f}" for s in skills]
                    + [f"{sum(m['scores'].values()) / len(m['scores']):.3f}"])
    lines += [_table(["archive", "model", "generation"] + skills + ["mean"], rows), "",
              "## Over generations", "", "![curves](maps/curves.png)", ""]
    if gens:
        keys = sorted({k for m in gens for k in m["timings"]})
        tot = {k: sum(m["timings"].get(k, 0.0) for m in gens) for k in keys}
        entered = sum(1 for m in gens if m["entered"])
        lines += [f"{len(gens)} children; {entered} entered at least one archive "
                  f"({entered / len(gens):.0%}). Time per child (mean, seconds):", "",
                  _table(keys, [[f"{tot[k] / len(gens):.4f}" for k in keys]]), ""]
    return "\n".join(lines)


def write_report(run_dir: Path, formats: str = "both") -> list[Path]:
    """Write ``report.md`` and/or ``report.html`` into ``run_dir``; returns their paths."""
    md = build_markdown(run_dir)
    out = []
    if formats in ("md", "both"):
        p = Path(run_dir) / "report.md"
        atomic_write_text(p, md)
        out.append(p)
    if formats in ("html", "both"):
        try:
            import markdown as mdlib  # type: ignore

            body = mdlib.markdown(md, extensions=["tables"])
        except ImportError:
            body = "<pre>" + html.escape(md) + "</pre>"
        p = Path(run_dir) / "report.html"
        atomic_write_text(p, "<!doctype html><html><head><meta charset='utf-8'><title>CycleQD report</title>"
                             "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}"
                             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px}"
                             "img{max-width:100%}</style></head><body>" + body + "</body></html>")
        out.append(p)
    return out

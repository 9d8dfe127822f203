"""``cycleqd report RUN_DIR``: a markdown and/or HTML summary of a run.

Contents: the setup, QD metrics per archive (coverage, QD score, best quality), the elite
maps, metric curves over generations, the best model per skill (with its scores on every
skill), the aggregated model, every elite with its cells and the Pareto front, and time spent per phase.

Safety: everything the report did not write itself -- run and skill names, operator names,
model ids, the run directory's path, all read from ``config.yaml``, ``state.json`` and
``metrics.jsonl`` -- is untrusted text. The report is built as a small document model
(headings, paragraphs, tables, images with fixed paths) in which such text is a
:class:`Text` part, and rendered twice: to markdown with every markdown and HTML
metacharacter escaped, and to HTML directly (not through a markdown converter) with
``html.escape``. No raw HTML from a config reaches either file, and the report contains no
link built from config text (only its own relative image paths).
"""

from __future__ import annotations

import html
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, Union

from cycleqd._io import atomic_write_text
from cycleqd.engine.elites import add_to_report as add_elites_to_report
from cycleqd.engine.plots import plot_all_maps, plot_curves
from cycleqd.engine.runview import RunView
from cycleqd.qd.metrics import archive_stats


@dataclass(frozen=True)
class Text:
    """Untrusted text (from a config or run file): escaped in every output format.
    ``code=True`` renders it in a code style."""

    value: Any
    code: bool = False


@dataclass(frozen=True)
class Strong:
    """Bold text written by the report itself (trusted)."""

    value: str


Part = Union[str, Text, Strong]  # a plain ``str`` is text the report wrote itself (trusted)


@dataclass
class Doc:
    """The report as blocks: ``("h", level, parts)``, ``("p", parts)``,
    ``("table", header, rows)`` (cells are lists of parts), ``("img", alt, src)``."""

    blocks: list[tuple] = field(default_factory=list)

    def h(self, level: int, *parts: Part) -> None:
        self.blocks.append(("h", level, list(parts)))

    def p(self, *parts: Part) -> None:
        self.blocks.append(("p", list(parts)))

    def table(self, header: Sequence[Sequence[Part] | Part], rows: Sequence[Sequence[Sequence[Part] | Part]]) -> None:
        def cell(c):
            return list(c) if isinstance(c, (list, tuple)) else [c]

        self.blocks.append(("table", [cell(c) for c in header], [[cell(c) for c in r] for r in rows]))

    def img(self, alt: str, src: str) -> None:
        self.blocks.append(("img", alt, src))


# -- rendering ----------------------------------------------------------------------------------
_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|])")


def md_escape(value: Any) -> str:
    """Untrusted text as inert markdown: HTML metacharacters become entities, markdown
    punctuation is backslash-escaped (no emphasis, links, autolinks, code or tables can
    start), newlines become spaces."""
    s = " ".join(str(value).split())
    s = html.escape(s, quote=False)  # & < >  (entities contain no markdown punctuation)
    return _MD_SPECIAL.sub(r"\\\1", s)


def _md_parts(parts: Sequence[Part]) -> str:
    out = []
    for p in parts:
        if isinstance(p, Text):
            out.append(md_escape(p.value))
        elif isinstance(p, Strong):
            out.append(f"**{p.value}**")
        else:
            out.append(p)
    return "".join(out)


def render_markdown(doc: Doc) -> str:
    lines: list[str] = []
    for b in doc.blocks:
        if b[0] == "h":
            lines += ["#" * b[1] + " " + _md_parts(b[2]), ""]
        elif b[0] == "p":
            lines += [_md_parts(b[1]), ""]
        elif b[0] == "table":
            header, rows = b[1], b[2]
            lines.append("| " + " | ".join(_md_parts(c) for c in header) + " |")
            lines.append("|" + "---|" * len(header))
            lines += ["| " + " | ".join(_md_parts(c) for c in r) + " |" for r in rows]
            lines.append("")
        elif b[0] == "img":
            lines += [f"![{b[1]}]({b[2]})", ""]
    return "\n".join(lines)


def _html_parts(parts: Sequence[Part]) -> str:
    out = []
    for p in parts:
        if isinstance(p, Text):
            t = html.escape(str(p.value), quote=True)
            out.append(f"<code>{t}</code>" if p.code else t)
        elif isinstance(p, Strong):
            out.append(f"<strong>{html.escape(p.value)}</strong>")
        else:
            out.append(html.escape(p))
    return "".join(out)


_CSS = ("body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 8px}img{max-width:100%}")


def render_html(doc: Doc, title: str) -> str:
    """A standalone HTML page; every string is escaped, image sources are the report's own
    relative paths."""
    body = []
    for b in doc.blocks:
        if b[0] == "h":
            body.append(f"<h{b[1]}>{_html_parts(b[2])}</h{b[1]}>")
        elif b[0] == "p":
            body.append(f"<p>{_html_parts(b[1])}</p>")
        elif b[0] == "table":
            head = "".join(f"<th>{_html_parts(c)}</th>" for c in b[1])
            rows = "".join("<tr>" + "".join(f"<td>{_html_parts(c)}</td>" for c in r) + "</tr>" for r in b[2])
            body.append(f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>{rows}</tbody>\n</table>")
        elif b[0] == "img":
            src = b[2]
            if not re.fullmatch(r"[A-Za-z0-9_./-]+", src) or src.startswith("/") or ".." in src:
                continue  # only the report's own relative image paths
            body.append(f"<p><img alt=\"{html.escape(b[1])}\" src=\"{html.escape(src)}\"></p>")
    return ("<!doctype html><html><head><meta charset='utf-8'>"
            "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; img-src 'self'; "
            "style-src 'unsafe-inline'\">"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")


# -- content ------------------------------------------------------------------------------------
def _fmt(v: Any) -> str:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return "-"
    return f"{x:.3f}" if math.isfinite(x) else "-"


def _mean(scores: dict) -> str:
    vals = [float(v) for v in scores.values() if isinstance(v, (int, float))]
    return _fmt(sum(vals) / len(vals)) if vals else "-"


def build_report(run_dir: Path) -> tuple[Doc, str]:
    """The report as a :class:`Doc` and the run's name (untrusted text), read through
    :class:`~cycleqd.engine.runview.RunView`.

    Raises:
        RunDirError: no config.yaml, or a damaged state.json / metrics line.
        FileNotFoundError: ``run_dir`` holds no state.json.
        ConfigError: the run's config.yaml does not validate.
    """
    run = RunView(run_dir)
    cfg, archives, metrics = run.config, run.archives, run.metrics
    skills = cfg.skill_names
    seeds = {m["child"] for m in run.seed_records()}
    plot_all_maps(archives, run.rd.maps, seed_ids=seeds)
    plot_curves(metrics, run.rd.maps / "curves.png")
    gens = [m for m in metrics if m["generation"] >= 1 and m.get("kind") != "aggregate"]
    doc = Doc()
    doc.h(1, "CycleQD run ", Text(cfg.name, code=True))
    doc.p("Run directory ", Text(run.root, code=True), " — generation ",
          Strong(f"{run.generation} / {cfg.qd.generations}"),
          ", seed ", Text(cfg.seed), ", sampling ", Text(cfg.qd.sampling, code=True),
          ", mode ", Text(cfg.qd.mode, code=True),
          ", crossover ", Text(cfg.operators.crossover.name, code=True),
          ", mutation ", Text(cfg.operators.mutation.name, code=True), ".")
    doc.h(2, "Archives")
    rows = []
    for a in archives:
        st = archive_stats(a)
        axes: list[Part] = []
        for i, x in enumerate(a.axes):
            axes += ([", "] if i else []) + [Text(x.skill), f" [{_fmt(x.lo)}, {_fmt(x.hi)}]×{int(x.bins)}"]
        rows.append([[Text(a.quality_skill)], axes, f"{st['coverage']:.3f}", f"{st['qd_score']:.3f}",
                     f"{st['best_quality']:.3f}", str(int(st["num_elites"]))])
    doc.table(["quality", "BC axes", "coverage", "QD score", "best quality", "elites"], rows)
    doc.img("elite maps", "maps/elite_maps.png")
    doc.p("Elite maps: two BCs on the axes, quality as colour; red boxes are the seed models (experts).")
    doc.h(2, "Best model per skill")
    rows = []
    for a in archives:
        b = a.best()
        if b is None:
            continue
        rows.append([[Text(a.quality_skill)], [Text(b.id, code=True)], str(int(b.generation))]
                    + [_fmt(b.scores.get(s)) for s in skills] + [_mean(b.scores)])
    sc = run.aggregate_scores()
    if sc is not None:
        rows.append([[Strong("aggregated")], [Text("aggregate", code=True)], "-"]
                    + [_fmt(sc.get(s)) for s in skills] + [_mean(sc)])
    for m in run.seed_records():
        sc = m.get("scores") or {}
        rows.append(["seed", [Text(m["child"], code=True)], "0"] + [_fmt(sc.get(s)) for s in skills] + [_mean(sc)])
    doc.table(["archive", "model", "generation"] + [[Text(s)] for s in skills] + ["mean"], rows)
    add_elites_to_report(doc, run_dir, Text)
    doc.h(2, "Over generations")
    doc.img("curves", "maps/curves.png")
    if gens:
        keys = sorted({str(k) for m in gens for k in m.get("timings", {})})
        tot = {k: sum(float(m.get("timings", {}).get(k, 0.0)) for m in gens) for k in keys}
        entered = sum(1 for m in gens if m.get("entered"))
        rejected = sum(1 for m in gens if m.get("rejected"))
        doc.p(f"{len(gens)} children; {entered} entered at least one archive ({entered / len(gens):.0%})"
              + (f"; {rejected} rejected (non-finite weights or scores, see metrics.jsonl)" if rejected else "")
              + ". Time per child (mean, seconds):")
        doc.table([[Text(k)] for k in keys], [[f"{tot[k] / len(gens):.4f}" for k in keys]])
    return doc, cfg.name


def build_markdown(run_dir: Path) -> str:
    """The report as markdown (images referenced relative to the run directory; all text
    from the run's files escaped).

    Raises:
        FileNotFoundError: ``run_dir`` holds no state.json.
    """
    return render_markdown(build_report(run_dir)[0])


def write_report(run_dir: Path, formats: str = "both") -> list[Path]:
    """Write ``report.md`` and/or ``report.html`` into ``run_dir``; returns their paths."""
    doc, name = build_report(run_dir)
    out = []
    if formats in ("md", "both"):
        p = Path(run_dir) / "report.md"
        atomic_write_text(p, render_markdown(doc))
        out.append(p)
    if formats in ("html", "both"):
        p = Path(run_dir) / "report.html"
        atomic_write_text(p, render_html(doc, f"CycleQD report: {name}"))
        out.append(p)
    return out

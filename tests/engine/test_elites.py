"""Issue 14 item 3: `cycleqd elites` (every elite, scores, Pareto front), `export --select`
by preference, the elite table in the report, and `i,j` labels on the elite maps."""

from __future__ import annotations

import json
import shlex

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from cycleqd.cli import main  # noqa: E402
from cycleqd.engine.elites import (EliteRow, EliteTable, PreferenceError, elite_table,  # noqa: E402
                                   format_text, mark_front, parse_preference, select, table_rows)
from cycleqd.engine.plots import INDEX_LABEL_GID, SEED_LABEL_GID, plot_elite_map  # noqa: E402
from cycleqd.qd.archive import Elite, make_archives  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_synthetic_run):
    return tiny_synthetic_run(tmp_path_factory.mktemp("elitesrun"), generations=8, snapshot_every=4)[0]


def _table(vectors: dict[str, tuple[float, float]]) -> EliteTable:
    rows = [EliteRow(i, 0 if i.startswith("expert") else 1, [f"a:{n},0"], {"a": v[0], "b": v[1]})
            for n, (i, v) in enumerate(vectors.items())]
    mark_front(rows, ["a", "b"])
    return EliteTable(["a", "b"], rows)


def test_table_lists_every_archive_elite_once_with_its_scores(run, capsys):
    arch = json.loads((run / "archives.json").read_text())["archives"]
    where: dict[str, set[str]] = {}
    scores: dict[str, dict] = {}
    for a in arch:
        for e in a["elites"]:
            where.setdefault(e["id"], set()).add(f"{a['quality_skill']}:{','.join(map(str, e['cell']))}")
            scores[e["id"]] = e["scores"]
    table = elite_table(run)
    assert len({r.id for r in table.rows}) == len(table.rows)
    assert {r.id: set(r.locations) for r in table.rows} == where
    assert {r.id: r.scores for r in table.rows} == scores
    assert any(r.seed for r in table.rows)
    assert all(r.seed == (r.id.startswith("expert:") or r.id == "base") for r in table.rows)
    assert main(["elites", str(run), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["skills"] == ["a", "b"] and len(out["elites"]) == len(where)
    for e in out["elites"]:
        assert e["scores"] == scores[e["id"]] and e["mean"] == pytest.approx(sum(scores[e["id"]].values()) / 2)
    # the text table: one line per elite with its scores, the seeds labelled, the front starred
    assert main(["elites", str(run)]) == 0
    lines = capsys.readouterr().out.splitlines()
    for r in table.rows:
        line = next(ln for ln in lines if ln.split()[0] == r.id)
        cols = line.split()
        assert cols[1] == ("seed" if r.seed else str(r.generation))
        assert f"{r.scores['a']:.3f}" in cols and f"{r.scores['b']:.3f}" in cols
        assert cols[-1] == ("*" if r.front else f"{r.mean(['a', 'b']):.3f}")
    assert main(["elites", str(run), "--front", "--json"]) == 0
    front = {e["id"] for e in json.loads(capsys.readouterr().out)["elites"]}
    assert front == {r.id for r in table.rows if r.front} and front
    assert main(["elites", str(run), "--sort", "a", "--json"]) == 0
    got = [e["scores"]["a"] for e in json.loads(capsys.readouterr().out)["elites"]]
    assert got == sorted(got, reverse=True)
    assert main(["elites", str(run), "--sort", "zz"]) == 2
    assert "--sort 'zz'" in capsys.readouterr().err


def test_pareto_front_known_answer():
    t = _table({"A": (1.0, 0.0), "B": (0.0, 1.0), "C": (0.5, 0.5), "D": (0.4, 0.4),
                "E": (0.5, 0.5), "F": (1.0, 0.0), "G": (0.9, 0.0), "H": (0.5, 0.6)})
    assert {r.id for r in t.rows if r.front} == {"A", "B", "F", "H"}
    t = _table({"C": (0.5, 0.5), "E": (0.5, 0.5), "D": (0.4, 0.5)})
    assert {r.id for r in t.rows if r.front} == {"C", "E"}       # equal vectors: both on the front


def test_select_by_weights_constraints_and_both():
    t = _table({"expert:a": (0.8, 0.1), "expert:b": (0.1, 0.7), "g1": (0.5, 0.5), "g2": (0.6, 0.45),
                "g3": (0.45, 0.6)})
    assert select(t, "a=1")[0].id == "expert:a"
    assert select(t, "b=1")[0].id == "expert:b"
    # g2 and g3 tie on the weighted sum (1.05) and the mean: the smaller id wins
    assert select(t, "a=1,b=1")[0].id == "g2" and select(t, "a=2,b=2")[0].id == "g2"
    assert select(t, "a=1,b=0.5")[0].id == "expert:a"            # 0.85 vs g2 0.825
    row, why = select(t, "a>=0.5")
    assert row.id == "g2" and "satisfying a>=0.5" in why and "among 3 of 5" in why
    assert select(t, "a>=0.5,b=1")[0].id == "g1"
    assert select(t, "a>0.5,b>=0.45")[0].id == "g2"
    assert select(t, "b<0.2")[0].id == "expert:a"


@pytest.mark.parametrize("pref, words", [
    ("coding=2", ["'coding=2'", "unknown skill 'coding'", "['a', 'b']"]),
    ("a>>0.3", ["'a>>0.3'", "SKILL=WEIGHT"]),
    ("a=1,,b=1", ["''", "SKILL=WEIGHT"]),
    ("a=-1", ["'a=-1'", ">= 0"]),
    ("a=1,a=2", ["'a=2'", "twice"]),
    ("a=0,b=0", ["every weight is 0"]),
    ("", ["empty"]),
])
def test_bad_preference_names_the_token(pref, words):
    with pytest.raises(PreferenceError) as e:
        parse_preference(pref, ["a", "b"])
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_no_elite_satisfying_lists_the_closest():
    t = _table({"g1": (0.5, 0.5), "g2": (0.6, 0.15), "g3": (0.1, 0.1), "g4": (0.0, 0.0)})
    with pytest.raises(PreferenceError) as e:
        select(t, "a>=0.7,b>=0.3")
    msg = str(e.value)
    assert "no elite satisfies" in msg and "\n" not in msg
    assert msg.index("g1 (a=0.500, b=0.500)") < msg.index("g2 (a=0.600, b=0.150)") < msg.index("g3")
    assert "g4" not in msg


def test_export_select_exports_the_chosen_elite(run, tmp_path, capsys):
    table = elite_table(run)
    bred = [r for r in table.rows if r.front and not r.seed]
    assert bred, "the tiny run breeds a model on the Pareto front"
    r = bred[0]
    # at least as good as a front elite on both skills: only it (or an equal vector) qualifies
    want = min((x for x in table.rows if x.scores == r.scores), key=lambda x: x.id)
    pref = f"a>={r.scores['a']!r},b>={r.scores['b']!r}"
    assert main(["export", str(run), "--select", pref, str(tmp_path / "sel")]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"selected {want.id} (") and "highest mean score" in out
    assert main(["export", str(run), "--model", want.id, str(tmp_path / "by_id")]) == 0
    sel, ref = load_file(tmp_path / "sel" / "model.safetensors"), load_file(tmp_path / "by_id" / "model.safetensors")
    assert sel.keys() == ref.keys() and all((sel[k] == ref[k]).all() for k in sel)
    assert json.loads((tmp_path / "sel" / "cycleqd_export.json").read_text())["model_id"] == want.id
    assert f"--select {shlex.quote(pref)}" in (tmp_path / "sel" / "README.md").read_text()  # the command
    # weights: the best b is chosen (here the b expert or a child beating it)
    capsys.readouterr()
    best_b = min(table.rows, key=lambda x: (-x.scores["b"], -x.mean(["a", "b"]), x.id))
    assert main(["export", str(run), "--select", "b=1", str(tmp_path / "b")]) == 0
    assert capsys.readouterr().out.startswith(f"selected {best_b.id} (")
    # a preference no elite meets: one line, nothing written
    assert main(["export", str(run), "--select", "a>=2", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "no elite satisfies" in err and not (tmp_path / "none").exists()
    assert main(["export", str(run), "--select", "zz=1", str(tmp_path / "none")]) == 2
    assert "unknown skill 'zz'" in capsys.readouterr().err


def test_report_shows_the_elite_table_and_front(run):
    from cycleqd.engine.report import write_report

    md, html = write_report(run)
    text = md.read_text()
    assert "## Elites and Pareto front" in text
    table = elite_table(run)
    for r in table.rows:
        line = next(ln for ln in text.splitlines() if ln.startswith(f"| {r.id} |"))
        assert f"{r.scores['a']:.3f}" in line and line.rstrip(" |").endswith("*") == r.front
    assert f"{sum(r.front for r in table.rows)} of {len(table.rows)} are on the Pareto front" in text
    assert "Elites and Pareto front" in html.read_text()


@pytest.mark.parametrize("skills, bins", [(["coding", "db", "os"], 6), (["coding", "db", "os", "math"], 4)])
def test_maps_label_every_filled_cell_with_its_export_index(skills, bins):
    arcs = make_archives(skills, {s: (0.0, 1.0) for s in skills}, {s: bins for s in skills})
    scores = {f"expert:{s}": {t: (0.9 if t == s else 0.05) for t in skills} for s in skills}
    scores.update({f"g{i}": {t: ((i * 7 + k * 3) % 10) / 10 for k, t in enumerate(skills)} for i in range(12)})
    for a in arcs:
        for mid, sc in scores.items():
            a.add(Elite(mid, sc, 0 if mid.startswith("expert") else 1, ()))
    arc = arcs[0]
    fig, ax = plt.subplots(figsize=(4.6, 4.0), dpi=110)
    plot_elite_map(arc, "unused.png", seed_ids={i for i in scores if i.startswith("expert")}, ax=ax)
    fig.tight_layout()
    fig.canvas.draw()
    labels = [t for t in ax.texts if t.get_gid() == INDEX_LABEL_GID]
    # every map position shows the index of the elite drawn there (the best projected onto it)
    shown: dict[tuple[int, int], tuple] = {}
    for cell, e in sorted(arc, key=lambda ce: ce[0]):      # ties: the smaller cell index
        ij = cell[:2]
        if ij not in shown or arc.quality_of(e.scores) > arc.quality_of(arc.elites[shown[ij]].scores):
            shown[ij] = cell
    assert sorted(t.get_text() for t in labels) == sorted(",".join(map(str, c)) for c in shown.values())
    x_ax, y_ax = arc.axes[:2]
    w, h = (x_ax.hi - x_ax.lo) / x_ax.bins, (y_ax.hi - y_ax.lo) / y_ax.bins
    r = fig.canvas.get_renderer()
    for t in labels:
        i, j = map(int, t.get_text().split(",")[:2])
        (x0, y0), (x1, y1) = ax.transData.transform([(x_ax.lo + i * w, y_ax.lo + j * h),
                                                    (x_ax.lo + (i + 1) * w, y_ax.lo + (j + 1) * h)])
        bb = t.get_window_extent(renderer=r)
        assert bb.x0 >= x0 - 0.5 and bb.x1 <= x1 + 0.5 and bb.y0 >= y0 - 0.5 and bb.y1 <= y1 + 0.5
        assert t.get_fontsize() >= 4.5
    assert [t for t in ax.texts if t.get_gid() == SEED_LABEL_GID]     # seeds keep their names
    plt.close(fig)


def test_test_column_only_when_held_out_scores_are_recorded(run, tmp_path, capsys):
    rd = tmp_path / "run"
    rd.mkdir()
    for f in ("state.json", "config.yaml"):
        (rd / f).write_bytes((run / f).read_bytes())
    assert "test mean" not in format_text(elite_table(rd))
    table = elite_table(rd)
    some = table.rows[1]
    (tmp_path / "comparison.json").write_text(json.dumps(
        {"rows": [{"id": some.id, "scores": {"a": 0.25, "b": 0.75}}]}))   # as `cycleqd demo` writes it
    table = elite_table(rd)
    assert table.by_id()[some.id].test == {"a": 0.25, "b": 0.75}
    header, rows = table_rows(table)
    col = header.index("test mean")
    assert {r[0]: r[col] for r in rows} == {r.id: ("0.500" if r.id == some.id else "-") for r in table.rows}

"""Red-team attacks on resume's run-state checks (issue 18 item 1) that are accepted silently.

Each test corrupts a run directory in a way the committed metrics contradict, and asserts
that ``cycleqd resume`` refuses with a one-line error. They FAIL on the current code: the
corruption is accepted and the run continues from archives that are not the ones the run
committed.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from cycleqd.cli import main
from cycleqd.config import parse_config
from cycleqd.engine.build import build_components
from cycleqd.engine.loop import run_cycleqd
from tests.conftest import tiny_config_dict

G, STOP, EVERY = 12, 8, 5


@pytest.fixture(scope="module")
def template(tmp_path_factory, cache_dir):
    d = tmp_path_factory.mktemp("partial") / "run"
    cfg = parse_config(tiny_config_dict(cache_dir, generations=G, snapshot_every=EVERY))
    run_cycleqd(build_components(cfg), cfg, d, progress=False, stop_after=STOP)
    return d


@pytest.fixture()
def run_dir(template, tmp_path):
    d = tmp_path / "run"
    subprocess.run(["cp", "-a", str(template), str(d)], check=True)
    return d


def _state(d):
    return json.loads((d / "state.json").read_text())


def _resume(capsys, d):
    rc = main(["resume", str(d), "--no-progress"])
    out, err = capsys.readouterr()
    return rc, out, err


def test_elite_deleted_from_state_is_refused(capsys, run_dir):
    """Drop one child elite (and its digest) from state.json: every remaining elite is
    consistent, so resume continues with an archive that lost a committed elite, although
    the last metrics line records the archive's size (``archives.<skill>``) and the
    child's ``entered`` list says it went in."""
    st = _state(run_dir)
    k, j = next((k, j) for k, a in enumerate(st["archives"]) for j, e in enumerate(a["elites"])
                if e["generation"] >= 1)
    gone = st["archives"][k]["elites"].pop(j)
    if gone["id"] not in {e["id"] for a in st["archives"] for e in a["elites"]}:
        st["genomes"].pop(gone["id"], None)
    (run_dir / "state.json").write_text(json.dumps(st))
    rc, out, err = _resume(capsys, run_dir)
    assert rc == 2, ("resume accepted an archive that lost elite "
                     f"{gone['id']} (rc={rc}); stderr: {err[-300:]}")
    assert err.startswith("error: ") and gone["id"] in err or "elite" in err


def test_elite_swapped_for_a_losing_child_is_refused(capsys, run_dir):
    """Replace an elite by a child of the same cell that lost to it (its metrics line says
    it did not enter that archive). Scores, cell and quality are all consistent with the
    metrics line of that child, so only the metrics' ``entered`` lists can tell."""
    st = _state(run_dir)
    recs = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # find a (archive, elite, loser) triple: a child that did not enter archive k but
    # maps to the cell of an elite of archive k
    from cycleqd.qd.archive import GridArchive  # noqa: F401  (the archive rules)
    for k, a in enumerate(st["archives"]):
        cells = {tuple(e["cell"]): j for j, e in enumerate(a["elites"])}
        q = a["quality_skill"]
        for r in recs:
            if r["generation"] < 1 or q in r.get("entered", []) or r["child"] not in st["genomes"]:
                continue
            # the child's cell under this archive's axes
            cell = []
            for ax in a["axes"]:
                v = r["scores"][ax["skill"]]
                b = int((v - ax["lo"]) / (ax["hi"] - ax["lo"]) * ax["bins"])
                cell.append(min(max(b, 0), ax["bins"] - 1))
            j = cells.get(tuple(cell))
            if j is None:
                continue
            a["elites"][j] = {"cell": cell, "quality": float(r["scores"][q]), "id": r["child"],
                              "scores": {s: float(v) for s, v in r["scores"].items()},
                              "generation": r["generation"], "parents": r["parents"]}
            (run_dir / "state.json").write_text(json.dumps(st))
            rc, out, err = _resume(capsys, run_dir)
            assert rc == 2, ("resume accepted archive " + q + " holding " + r["child"] +
                             ", which metrics.jsonl says never entered it")
            return
    pytest.skip("no losing child with a stored genome in this tiny run")


def test_stray_pending_config_does_not_overwrite_config_before_validation(capsys, run_dir):
    """``state.json`` with a ``pending_config`` whose fingerprint is not the state's (a
    corrupted or foreign state file): ``cmd_resume`` calls ``finish_pending_config`` before
    any check, so config.yaml is overwritten with it, and only then is the resume refused
    ("config differs") -- the refusal has destroyed the run's own config.yaml, which its
    message tells the user to resume with."""
    import yaml

    cfg_before = (run_dir / "config.yaml").read_text()
    other = yaml.safe_load(cfg_before)
    other["seed"] = 12345
    st = _state(run_dir)
    st["pending_config"] = yaml.safe_dump(other)
    (run_dir / "state.json").write_text(json.dumps(st))
    rc, out, err = _resume(capsys, run_dir)
    assert (run_dir / "config.yaml").read_text() == cfg_before, (
        f"resume (rc={rc}) replaced config.yaml with state.json's pending_config "
        f"before validating it; stderr: {err.strip()[-200:]}")


def test_seed_expert_rewritten_between_runs_is_noticed_on_resume(capsys, tmp_path):
    """state.json records a digest for every *stored* genome but none for the seed models,
    which are re-read from the config's paths on resume. An expert retrained in place
    between the kill and the resume is accepted silently: the archives keep the seed
    elites' scores of the old expert while parents drawn from them (and the SVD mutation's
    task vectors) now use the new weights. Resume must notice (refuse, or re-score the
    seeds)."""
    import torch
    from safetensors.torch import load_file, save_file

    cache = tmp_path / "cache"
    d = tmp_path / "run"
    cfg = parse_config(tiny_config_dict(cache, generations=G, snapshot_every=EVERY))
    run_cycleqd(build_components(cfg), cfg, d, progress=False, stop_after=3)
    (f,) = list((cache / "synthetic").glob("*/expert-a/model.safetensors"))
    sd = load_file(str(f))
    save_file({k: (v * 1.5 if v.ndim == 2 else v) for k, v in sd.items()}, str(f),
              metadata={"format": "pt"})
    rc, out, err = _resume(capsys, d)
    assert rc == 2, ("resume accepted a run whose seed expert 'a' was rewritten after the "
                     "seed elites were scored")


def test_aggregate_scores_edited_in_state_are_refused(capsys, tmp_path, cache_dir):
    """A finished run: ``state.json``'s ``aggregate`` (the final model's scores, what the
    run reports) is checked for finiteness only. Edited to other finite scores, resume
    accepts it ("run already complete", exit 0; a resumed run returns it as
    ``RunResult.aggregate``), although metrics.jsonl's aggregate line recorded the true
    ones (elites get exactly this cross-check; the aggregate does not)."""
    d = tmp_path / "run"
    cfg = parse_config(tiny_config_dict(cache_dir, generations=3, snapshot_every=EVERY))
    run_cycleqd(build_components(cfg), cfg, d, progress=False)
    st = _state(d)
    assert st["aggregate"] is not None
    st["aggregate"] = {k: 0.999 for k in st["aggregate"]}
    (d / "state.json").write_text(json.dumps(st))
    rc, out, err = _resume(capsys, d)
    assert rc == 2, ("resume accepted aggregate scores that metrics.jsonl contradicts: "
                     f"rc={rc} {out.strip()[-150:]}")

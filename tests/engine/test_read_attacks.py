"""Attacks on the read-only commands (export, elites, report): a damaged genome, foreign or
tampered ids, a tampered score, non-finite preferences, out-of-range cells, slow failures and
the messages they print. Each must be refused in one line, like `cycleqd resume` refuses it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from cycleqd.cli import main
from cycleqd.engine import runview
from cycleqd.engine.elites import PreferenceError, parse_preference, pick_model
from cycleqd.engine.rundir import RunDirError
from cycleqd.engine.runview import ModelIdError, RunView


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_synthetic_run):
    return tiny_synthetic_run(tmp_path_factory.mktemp("attackrun"), generations=6)[0]


@pytest.fixture
def rd(run, tmp_path):
    """A copy of the run to tamper with."""
    return shutil.copytree(run, tmp_path / "run")


def _bred(rd) -> str:
    """A bred elite's id (one with a stored genome)."""
    st = json.loads((rd / "state.json").read_text())
    return sorted(i for i in st["genomes"] if i.startswith("g"))[-1]


@pytest.fixture
def no_space(monkeypatch):
    """Fail the test if the run's weight space (the models, torch work) is built."""
    def boom(*a, **k):
        raise AssertionError("the weight space was built before the cheap checks")
    monkeypatch.setattr(runview, "weight_space", boom)


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_export_refuses_a_damaged_genome(rd, tmp_path, capsys):
    mid = _bred(rd)
    g = next((rd / "genomes").glob(f"{mid}.*"))
    data = bytearray(g.read_bytes())
    data[-1] ^= 0xFF                         # a weight byte: the safetensors header stays valid
    g.write_bytes(bytes(data))
    assert main(["export", str(rd), "--model", mid, str(tmp_path / "o")]) == 2
    err = _err(capsys)
    assert f"genome file {g} is damaged" in err and "sha256" in err and "was recorded" in err
    assert not (tmp_path / "o").exists()
    with pytest.raises(RunDirError, match="is damaged"):
        RunView(rd).genome(mid)


@pytest.mark.parametrize("mid", ["../../other/genomes/g000001", "g000001/../g000002", "/etc/passwd",
                                 "expert:../a", "g1", "", "g999999", "expert:zz"])
def test_export_refuses_an_id_that_is_not_the_runs(rd, tmp_path, capsys, no_space, mid):
    assert main(["export", str(rd), "--model", mid, str(tmp_path / "o")]) == 2
    assert repr(mid) in _err(capsys)
    with pytest.raises(ModelIdError):
        RunView(rd).check_model_id(mid)
    assert not (tmp_path / "o").exists()


def test_a_tampered_state_id_is_not_exported_by_cell(rd, tmp_path, capsys, no_space):
    st = json.loads((rd / "state.json").read_text())
    e = next(e for a in st["archives"] if a["quality_skill"] == "a" for e in a["elites"])
    e["id"] = "../../x/genomes/g000046"
    (rd / "state.json").write_text(json.dumps(st))
    cell = f"a:{','.join(map(str, e['cell']))}"
    assert main(["export", str(rd), "--cell", cell, str(tmp_path / "o")]) == 2
    assert "'../../x/genomes/g000046'" in _err(capsys)


def test_the_store_refuses_path_separators(tmp_path):
    from cycleqd.executors.store import GenomeStore

    store = GenomeStore(tmp_path / "g", type("S", (), {"genome_suffix": ".genome.safetensors"})(), {})
    assert store.path("g000001").parent == tmp_path / "g"
    for bad in ("../x", "a/b", "..", "", "a\\b"):
        with pytest.raises(ValueError, match="path separators"):
            store.path(bad)


def test_a_tampered_score_is_refused_by_export_elites_and_report(rd, tmp_path, capsys):
    st = json.loads((rd / "state.json").read_text())
    a = next(a for a in st["archives"] if a["quality_skill"] == "a")
    e = min((e for e in a["elites"] if e["id"].startswith("g")), key=lambda e: e["scores"]["a"])
    e["scores"]["a"] = 0.99                  # would make `--archive a` pick it
    (rd / "state.json").write_text(json.dumps(st))
    want = f"elite {e['id']} has scores"
    assert main(["export", str(rd), "--archive", "a", str(tmp_path / "o")]) == 2
    err = _err(capsys)
    assert want in err and "metrics.jsonl recorded" in err and not (tmp_path / "o").exists()
    assert main(["elites", str(rd)]) == 2
    assert want in _err(capsys)
    assert main(["report", str(rd)]) == 2
    assert want in _err(capsys)


@pytest.mark.parametrize("pref", ["a=1e309", "a>=1e309", "b<-1e309", "a=1,b>1e400"])
def test_non_finite_preference_numbers_are_refused(pref):
    with pytest.raises(PreferenceError, match="not a finite number"):
        parse_preference(pref, ["a", "b"])


def test_messages_name_flags_not_python(rd, tmp_path, capsys, no_space):
    out = tmp_path / "o"
    out.mkdir()
    (out / "x").write_text("keep")
    assert main(["export", str(rd), "--model", "base", str(out)]) == 2
    err = _err(capsys)
    assert "pass --overwrite to replace it" in err and "overwrite=True" not in err
    assert main(["export", str(rd), "--select", "", str(tmp_path / "e")]) == 2
    err = _err(capsys)
    assert "empty preference" in err and "model_id" not in err
    with pytest.raises(ValueError, match="--model, --cell, --archive, --aggregate, --select"):
        pick_model(RunView(rd))
    with pytest.raises(ValueError, match="--model, --cell"):
        pick_model(RunView(rd), model_id="base", archive="a")


@pytest.mark.parametrize("cell, bad", [("a:99", 99), ("a:-1", -1), ("b:6", 6)])
def test_an_out_of_range_cell_says_so(rd, tmp_path, capsys, no_space, cell, bad):
    assert main(["export", str(rd), "--cell", cell, str(tmp_path / "o")]) == 2
    err = _err(capsys)
    assert f"cell index {bad} out of range 0..5 for axis" in err and "empty" not in err


def test_cheap_failures_come_before_any_model_work(rd, tmp_path, capsys, no_space):
    out = tmp_path / "o"
    out.mkdir()
    (out / "x").write_text("keep")
    # an existing OUT is refused before the preference is resolved (no "selected" line)
    assert main(["export", str(rd), "--select", "a=1", str(out)]) == 2
    cap = capsys.readouterr()
    assert "selected" not in cap.out and "not empty" in cap.err
    # and without torch imported at all (a fresh interpreter)
    code = ("import sys; from cycleqd.cli import main; "
            f"rc = main(['export', {str(rd)!r}, '--model', 'g999999', {str(tmp_path / 'p')!r}]); "
            "print(rc, 'torch' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ}, timeout=120)
    assert res.stdout.split() == ["2", "False"], res.stdout + res.stderr
    assert "genome of 'g999999' not found" in res.stderr


def test_export_names_the_model_it_exported(rd, tmp_path, capsys):
    view = RunView(rd)
    best = view.archive("b").best()
    cell = next(c for c, e in view.archive("b") if e is best)
    assert main(["export", str(rd), "--archive", "b", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out.strip()
    assert out == (f"exported {best.id} (best of archive b, b:{','.join(map(str, cell))}) "
                   f"to {tmp_path / 'o'}")
    assert json.loads((tmp_path / "o" / "cycleqd_export.json").read_text())["model_id"] == best.id


@pytest.mark.parametrize("cmd", ["elites", "export"])
def test_help_describes_the_run_dir(cmd, capsys):
    with pytest.raises(SystemExit):
        main([cmd, "--help"])
    assert "the run directory" in capsys.readouterr().out

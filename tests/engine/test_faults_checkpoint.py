"""Fault injection into a run directory's checkpoint (issue 18 item 1): each corruption of
``state.json``, the genomes, ``metrics.jsonl`` or the snapshots either gets a clear one-line
refusal naming the file and the problem (and the newest snapshot to resume from instead) or a
correct recovery; never silent acceptance, never a lost finished generation. Recovery through
``cycleqd resume RUN --from-snapshot N`` ends with the archives of an uninterrupted run."""

from __future__ import annotations

import json
import math
import re
import subprocess
from pathlib import Path

import pytest

from cycleqd.cli import main
from cycleqd.config import parse_config
from cycleqd.engine.build import build_components
from cycleqd.engine.loop import run_cycleqd
from tests.conftest import tiny_config_dict

G, STOP, EVERY = 12, 8, 5      # partial run: generation 8 of 12; snapshots at 0 and 5


def _cfg(cache_dir, **qd):
    return parse_config(tiny_config_dict(cache_dir, generations=G, snapshot_every=EVERY, **qd))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir):
    """An uninterrupted run of G generations (archives and metrics to compare with)."""
    d = tmp_path_factory.mktemp("ref") / "run"
    cfg = _cfg(cache_dir)
    run_cycleqd(build_components(cfg), cfg, d, progress=False)
    return d


@pytest.fixture(scope="module")
def template(tmp_path_factory, cache_dir):
    """A run stopped after generation STOP (as after a clean kill)."""
    d = tmp_path_factory.mktemp("partial") / "run"
    cfg = _cfg(cache_dir)
    run_cycleqd(build_components(cfg), cfg, d, progress=False, stop_after=STOP)
    return d


@pytest.fixture()
def run_dir(template, tmp_path):
    d = tmp_path / "run"
    subprocess.run(["cp", "-a", str(template), str(d)], check=True)   # keeps the hard links
    return d


def _resume(capsys, run_dir, *extra):
    rc = main(["resume", str(run_dir), "--no-progress", *extra])
    out, err = capsys.readouterr()
    return rc, out, err


def _refused(capsys, run_dir, *needles):
    """Assert a one-line refusal (exit 2, no traceback) containing ``needles``; return it."""
    state_before = (run_dir / "state.json").read_bytes() if (run_dir / "state.json").exists() else None
    metrics_before = (run_dir / "metrics.jsonl").read_bytes()
    rc, out, err = _resume(capsys, run_dir)
    msg = err.strip()
    assert rc == 2, (rc, out, err)
    assert msg.startswith("error: ") and "\n" not in msg and "Traceback" not in err, err
    for n in needles:
        assert n in msg, (n, msg)
    # nothing was changed by the refusal
    assert (run_dir / "metrics.jsonl").read_bytes() == metrics_before
    if state_before is not None:
        assert (run_dir / "state.json").read_bytes() == state_before
    return msg


def _hint(msg: str) -> int:
    m = re.search(r"--from-snapshot (\d+)", msg)
    assert m, msg
    return int(m.group(1))


def _archives(d: Path):
    return json.loads((d / "state.json").read_text())["archives"]


def _metrics(d: Path):
    return [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]


def _recovers_from_hint(capsys, run_dir, reference, msg):
    """Resuming from the snapshot the message points at completes the run exactly."""
    snap = _hint(msg)
    assert (run_dir / "archives" / f"gen_{snap:06d}.json").exists()
    rc, out, err = _resume(capsys, run_dir, "--from-snapshot", str(snap))
    assert rc == 0, err
    assert f"restored generation {snap}" in err
    assert _archives(run_dir) == _archives(reference)
    got, ref = _metrics(run_dir), _metrics(reference)
    assert [(m["generation"], m["child"], m["scores"], m["parents"]) for m in got] == \
        [(m["generation"], m["child"], m["scores"], m["parents"]) for m in ref]


def _state(run_dir):
    return json.loads((run_dir / "state.json").read_text())


def _write_state(run_dir, st):
    (run_dir / "state.json").write_text(json.dumps(st))


def _child_elite(st):
    """(archive index, elite index) of an elite made by the run (not a seed)."""
    for k, a in enumerate(st["archives"]):
        for j, e in enumerate(a["elites"]):
            if e["generation"] >= 1:
                return k, j
    raise AssertionError("no child elite")


# -------------------------------------------------------------------------------- state.json
def test_deleted_state_refuses_instead_of_restarting(capsys, run_dir, reference, fault):
    fault.inject("state.json: deleted")
    (run_dir / "state.json").unlink()
    msg = _refused(capsys, run_dir, "state.json: file is missing", "not a fresh run", "--from-snapshot 5")
    assert len(_metrics(run_dir)) == 3 + STOP                  # metrics not wiped
    _recovers_from_hint(capsys, run_dir, reference, msg)
    fault.survived()


def test_deleted_state_during_seeding_still_restarts(capsys, tmp_path, cache_dir, reference, fault):
    """The one legitimate case: killed while the seed models were being scored."""
    fault.inject("state.json: deleted before the first commit")
    cfg = _cfg(cache_dir)
    d = tmp_path / "run"
    run_cycleqd(build_components(cfg), cfg, d, progress=False, stop_after=0)
    (d / "state.json").unlink()
    lines = (d / "metrics.jsonl").read_text().splitlines()
    (d / "metrics.jsonl").write_text("\n".join(lines[:2]) + "\n")     # 2 of 3 seeds scored
    rc, out, err = _resume(capsys, d)
    assert rc == 0, err
    assert _archives(d) == _archives(reference)
    fault.survived()


@pytest.mark.parametrize("gen,needle", [(999, "beyond the run's qd.generations (12)"),
                                        (10, "covers generations up to 8 only, the checkpoint says 10")])
def test_generation_out_of_range(capsys, run_dir, reference, fault, gen, needle):
    fault.inject("state.json: generation out of range")
    st = _state(run_dir)
    st["generation"] = gen
    _write_state(run_dir, st)
    msg = _refused(capsys, run_dir, str(run_dir / "state.json") if gen == 999 else "metrics.jsonl", needle)
    _recovers_from_hint(capsys, run_dir, reference, msg)
    fault.survived()


def test_elite_moved_to_wrong_cell(capsys, run_dir, fault):
    fault.inject("state.json: elite in the wrong cell")
    st = _state(run_dir)
    k, j = _child_elite(st)
    e = st["archives"][k]["elites"][j]
    occupied = {tuple(x["cell"]) for x in st["archives"][k]["elites"]}
    bins = [a["bins"] for a in st["archives"][k]["axes"]]
    e["cell"] = next([i, jj] for i in range(bins[0]) for jj in range(bins[1]) if (i, jj) not in occupied)
    _write_state(run_dir, st)
    _refused(capsys, run_dir, f"elite {e['id']} sits in cell", "but its scores put it in", "--from-snapshot")
    fault.survived()


def test_two_elites_in_one_cell(capsys, run_dir, fault):
    fault.inject("state.json: two elites in one cell")
    st = _state(run_dir)
    k, j = _child_elite(st)
    st["archives"][k]["elites"].append(dict(st["archives"][k]["elites"][j]))
    _write_state(run_dir, st)
    _refused(capsys, run_dir, "two elites in cell", "--from-snapshot")
    fault.survived()


@pytest.mark.parametrize("where,value", [("quality", math.nan), ("score", math.inf), ("score", -math.inf),
                                         ("quality", math.inf)])
def test_non_finite_quality_or_score(capsys, run_dir, fault, where, value):
    fault.inject(f"state.json: non-finite {where}")
    st = _state(run_dir)
    k, j = _child_elite(st)
    e = st["archives"][k]["elites"][j]
    if where == "quality":
        e["quality"] = value
    else:
        e["scores"][next(iter(e["scores"]))] = value
    _write_state(run_dir, st)                # json writes NaN / Infinity
    _refused(capsys, run_dir, "is not a finite number", f"archives.{k}.elites.{j}", "--from-snapshot")
    fault.survived()


def test_scores_edited_consistently_still_caught(capsys, run_dir, fault):
    """Scores, cell and quality changed together: only the metrics line can tell."""
    fault.inject("state.json: elite scores rewritten")
    st = _state(run_dir)
    k, j = _child_elite(st)
    e = st["archives"][k]["elites"][j]
    q = st["archives"][k]["quality_skill"]
    e["scores"][q] = e["quality"] = min(1.0, e["scores"][q] + 1e-9)
    _write_state(run_dir, st)
    _refused(capsys, run_dir, f"elite {e['id']} has scores", "metrics.jsonl recorded")
    fault.survived()


@pytest.mark.parametrize("key", ["archives", "generation", "config_fingerprint", "seed"])
def test_missing_key_is_one_line(capsys, run_dir, reference, fault, key):
    fault.inject("state.json: missing key")
    st = _state(run_dir)
    del st[key]
    _write_state(run_dir, st)
    msg = _refused(capsys, run_dir, f"state.json: {key}: missing key", "--from-snapshot 5")
    _recovers_from_hint(capsys, run_dir, reference, msg)
    fault.survived()


@pytest.mark.parametrize("how", ["truncated", "empty", "not an object"])
def test_unreadable_state(capsys, run_dir, fault, how):
    fault.inject("state.json: unreadable")
    p = run_dir / "state.json"
    p.write_bytes({"truncated": p.read_bytes()[:100], "empty": b"", "not an object": b"[1, 2]"}[how])
    _refused(capsys, run_dir, "state.json:", "--from-snapshot 5")
    fault.survived()


# -------------------------------------------------------------------------------- genomes
def _a_genome(run_dir):
    st = _state(run_dir)
    mid = sorted(st["genomes"])[-1]
    return mid, next((run_dir / "genomes").glob(f"{mid}.*"))


@pytest.mark.parametrize("how", ["deleted", "truncated", "emptied", "bit flipped"])
def test_damaged_genome_found_on_resume(capsys, run_dir, reference, fault, how):
    fault.inject(f"genome: {how}")
    mid, p = _a_genome(run_dir)
    data = p.read_bytes()
    if how == "deleted":
        p.unlink()
    elif how == "truncated":
        with open(p, "r+b") as f:   # in place, like a disk error (a hard-linked snapshot copy shares it)
            f.truncate(len(data) // 2)
    elif how == "emptied":
        with open(p, "r+b") as f:
            f.truncate(0)
    else:
        with open(p, "r+b") as f:
            f.seek(len(data) - 3)
            f.write(bytes([data[-3] ^ 0x01]))
    msg = _refused(capsys, run_dir, "references a bad genome", p.name,
                   "is missing" if how == "deleted" else "is damaged")
    _recovers_from_hint(capsys, run_dir, reference, msg)
    fault.survived()


def test_genome_files_are_recorded_with_their_digest(run_dir):
    import hashlib

    st = _state(run_dir)
    assert st["format"] == 2
    ids = {e["id"] for a in st["archives"] for e in a["elites"] if e["generation"] >= 1}
    assert set(st["genomes"]) == ids
    for mid, digest in st["genomes"].items():
        p = next((run_dir / "genomes").glob(f"{mid}.*"))
        assert hashlib.sha256(p.read_bytes()).hexdigest() == digest


# -------------------------------------------------------------------------------- metrics.jsonl
def test_bad_middle_metrics_line_is_not_silently_dropped(capsys, run_dir, reference, fault):
    fault.inject("metrics.jsonl: bad line in the middle")
    lines = (run_dir / "metrics.jsonl").read_text().splitlines(keepends=True)
    lines[3 + 6] = lines[3 + 6][:40] + "\n"          # generation 7's line cut short
    (run_dir / "metrics.jsonl").write_text("".join(lines))
    msg = _refused(capsys, run_dir, "metrics.jsonl: line 10 is not valid JSON", "--from-snapshot 5")
    _recovers_from_hint(capsys, run_dir, reference, msg)
    assert (run_dir / "metrics.jsonl.before-snapshot-5").exists()      # the old file is kept
    fault.survived()


def test_bad_metrics_line_also_fails_the_report(run_dir, capsys, fault):
    fault.inject("metrics.jsonl: bad line read by the report")
    lines = (run_dir / "metrics.jsonl").read_text().splitlines(keepends=True)
    lines[5] = "{not json\n"
    (run_dir / "metrics.jsonl").write_text("".join(lines))
    assert main(["report", str(run_dir)]) == 2
    assert "metrics.jsonl: line 6 is not valid JSON" in capsys.readouterr().err
    fault.survived()


@pytest.mark.parametrize("how", ["deleted", "duplicated", "swapped"])
def test_missing_or_duplicated_metrics_line(capsys, run_dir, fault, how):
    fault.inject(f"metrics.jsonl: line {how}")
    lines = (run_dir / "metrics.jsonl").read_text().splitlines(keepends=True)
    if how == "deleted":
        del lines[6]
    elif how == "duplicated":
        lines.insert(6, lines[6])
    else:
        lines[6], lines[7] = lines[7], lines[6]
    (run_dir / "metrics.jsonl").write_text("".join(lines))
    line = 8 if how == "duplicated" else 7     # the first line that is not the expected one
    _refused(capsys, run_dir, f"metrics.jsonl: line {line}: expected generation", "--from-snapshot")
    fault.survived()


def test_torn_last_line_after_a_crash_is_dropped(capsys, run_dir, reference, fault):
    """A crash mid-append leaves a torn last line past the commit point: legitimately cut."""
    fault.inject("metrics.jsonl: torn last line (crash)")
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"generation": 9, "child": "g000009", "sco')
    rc, out, err = _resume(capsys, run_dir)
    assert rc == 0, err
    assert _archives(run_dir) == _archives(reference)
    assert [m["generation"] for m in _metrics(run_dir)] == [m["generation"] for m in _metrics(reference)]
    fault.survived()


def test_uncommitted_complete_line_is_redone_once(capsys, run_dir, reference, fault):
    """Killed between the metrics line and state.json: the line is cut and redone, once."""
    fault.inject("metrics.jsonl: line past the commit point (crash)")
    lines = _metrics(reference)
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(lines[3 + STOP]) + "\n")
    rc, out, err = _resume(capsys, run_dir)
    assert rc == 0, err
    assert [m["generation"] for m in _metrics(run_dir)] == [m["generation"] for m in lines]
    fault.survived()


# -------------------------------------------------------------------------------- snapshots
def test_hint_skips_a_damaged_snapshot(capsys, run_dir, fault):
    fault.inject("snapshot: damaged newest snapshot")
    (run_dir / "state.json").unlink()
    snap = run_dir / "archives" / "gen_000005.json"
    snap.write_text(snap.read_text()[:200])
    msg = _refused(capsys, run_dir, "--from-snapshot 0")     # the next good one
    assert "gen_000000.json" in msg
    fault.survived()


def test_from_bad_snapshot_refuses(capsys, run_dir, fault):
    fault.inject("snapshot: resume from a bad snapshot")
    g = next((run_dir / "archives" / "gen_000005.genomes").iterdir())
    g.unlink()
    rc, out, err = _resume(capsys, run_dir, "--from-snapshot", "5")
    assert rc == 2 and "cannot resume from snapshot 5" in err and g.name in err and "\n" not in err.strip()
    rc, out, err = _resume(capsys, run_dir, "--from-snapshot", "3")
    assert rc == 2 and "gen_000003.json: file is missing" in err
    fault.survived()


def test_snapshot_genomes_are_kept_for_the_newest_two(reference):
    kept = sorted(p.name for p in (reference / "archives").glob("*.genomes"))
    assert kept == ["gen_000010.genomes", "gen_000012.genomes"]
    snap = json.loads((reference / "archives" / "gen_000010.json").read_text())
    ids = {e["id"] for a in snap["archives"] for e in a["elites"] if e["generation"] >= 1}
    assert set(snap["genomes"]) == ids
    assert {p.name.split(".")[0] for p in (reference / "archives" / "gen_000010.genomes").iterdir()} == ids


def test_old_format_state_without_digests_still_resumes(capsys, run_dir, reference, fault):
    """A run directory written before digests were recorded resumes (genomes checked by loading)."""
    fault.inject("state.json: old format (no digests)")
    st = _state(run_dir)
    del st["format"], st["genomes"]
    _write_state(run_dir, st)
    rc, out, err = _resume(capsys, run_dir)
    assert rc == 0, err
    assert _archives(run_dir) == _archives(reference)
    fault.survived()


def test_old_format_state_with_a_corrupt_genome_refuses(capsys, run_dir, fault):
    fault.inject("genome: corrupt, old-format state")
    st = _state(run_dir)
    mid = sorted(st["genomes"])[-1]
    del st["format"], st["genomes"]
    _write_state(run_dir, st)
    p = next((run_dir / "genomes").glob(f"{mid}.*"))
    p.write_bytes(p.read_bytes()[:50])
    rc, out, err = _resume(capsys, run_dir)
    assert rc == 2 and "references a bad genome" in err and p.name in err, err
    fault.survived()

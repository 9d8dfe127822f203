"""Resume checks added for the red-team findings on run state (tests/security/test_redteam_rundir.py):
the archives are replayed from the committed metrics lines, the seed models' weight
fingerprints survive snapshot restores and --generations extensions."""

from __future__ import annotations

import json
import subprocess

import pytest

from cycleqd.cli import main
from cycleqd.config import parse_config
from cycleqd.engine.build import build_components
from cycleqd.engine.loop import run_cycleqd
from tests.conftest import tiny_config_dict

G, STOP, EVERY = 10, 7, 5


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    root = tmp_path_factory.mktemp("replay")
    cache, d = root / "cache", root / "run"
    cfg = parse_config(tiny_config_dict(cache, generations=G, snapshot_every=EVERY))
    run_cycleqd(build_components(cfg), cfg, d, progress=False, stop_after=STOP)
    return root


@pytest.fixture()
def root(template, tmp_path):
    r = tmp_path / "r"
    subprocess.run(["cp", "-a", str(template), str(r)], check=True)
    # the config names the template's cache: point it at the copy
    cfg = (r / "run" / "config.yaml").read_text().replace(str(template), str(r))
    (r / "run" / "config.yaml").write_text(cfg)
    st = json.loads((r / "run" / "state.json").read_text())
    st["config_fingerprint"] = parse_config(__import__("yaml").safe_load(cfg)).fingerprint()
    (r / "run" / "state.json").write_text(json.dumps(st))
    return r


def _resume(capsys, *args):
    rc = main(["resume", *map(str, args), "--no-progress"])
    return (rc, *capsys.readouterr())


def test_state_records_seed_fingerprints(root):
    st = json.loads((root / "run" / "state.json").read_text())
    assert set(st["seed_fingerprints"]) == {"expert:a", "expert:b", "expert:c"}
    snap = json.loads((root / "run" / "archives" / "gen_000005.json").read_text())
    assert snap["seed_fingerprints"] == st["seed_fingerprints"]


def test_edited_entered_list_is_refused(capsys, root):
    d = root / "run"
    lines = (d / "metrics.jsonl").read_text().splitlines()
    recs = [json.loads(x) for x in lines]
    i = next(i for i, r in enumerate(recs) if r["generation"] >= 1 and r["entered"])
    recs[i]["entered"] = []
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    rc, out, err = _resume(capsys, d)
    assert rc == 2 and "replaying the committed lines" in err and len(err.strip().splitlines()) == 1


def test_expert_rewritten_is_noticed_after_snapshot_restore(capsys, root):
    from safetensors.torch import load_file, save_file

    d = root / "run"
    (f,) = list((root / "cache" / "synthetic").glob("*/expert-b/model.safetensors"))
    sd = load_file(str(f))
    save_file({k: (v * 1.5 if v.ndim == 2 else v) for k, v in sd.items()}, str(f), metadata={"format": "pt"})
    rc, out, err = _resume(capsys, d, "--from-snapshot", 5)
    assert rc == 2 and "expert for skill b changed since the run started" in err, err


def test_extended_run_resumes_and_replays(capsys, root):
    d = root / "run"
    rc, out, err = _resume(capsys, d, "--generations", G + 2)
    assert rc == 0, err
    st = json.loads((d / "state.json").read_text())
    assert st["generation"] == G + 2 and st["aggregate"] is not None and "seed_fingerprints" in st
    rc, out, err = _resume(capsys, d)   # complete: every check passes again
    assert rc == 0, err

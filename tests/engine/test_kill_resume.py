"""A run killed with SIGKILL at random moments and resumed ends with archives identical to
an uninterrupted run with the same seed (real subprocesses, real kills)."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from tests.conftest import tiny_config_dict


def _cmd(*args):
    return [sys.executable, "-m", "cycleqd.cli", *args, "--no-progress"]


def _start(args, env):
    return subprocess.Popen(_cmd(*args), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _generation_reached(run_dir: Path) -> int:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return max(json.loads(l)["generation"] for l in lines) if lines else -1
    except (FileNotFoundError, ValueError):
        return -1


def test_sigkill_at_random_points_then_resume_matches_uninterrupted(tmp_path, cache_dir):
    G = 40
    d = tiny_config_dict(cache_dir, generations=G, snapshot_every=7)
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(d))
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    ref = tmp_path / "ref"
    subprocess.run(_cmd("run", str(cfg_path), "--out", str(ref)), env=env, check=True,
                   stdout=subprocess.DEVNULL)

    run_dir = tmp_path / "killed"
    rng = random.Random(1234)
    # kill points: while the seed models are scored, then at random generations, each at a
    # random moment within that generation (merge, mutation, evaluation or checkpoint)
    targets = [0] + sorted(rng.sample(range(1, G - 2), 4))
    kills = 0
    for target in targets:
        args = ["resume", str(run_dir)] if (run_dir / "config.yaml").exists() else \
            ["run", str(cfg_path), "--out", str(run_dir)]
        proc = _start(args, env)
        while proc.poll() is None and _generation_reached(run_dir) < target:
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.15))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
    proc = _start(["resume", str(run_dir)] if (run_dir / "config.yaml").exists()
                  else ["run", str(cfg_path), "--out", str(run_dir)], env)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert kills >= 4, f"only {kills} kills landed"
    ref_state = json.loads((ref / "state.json").read_text())
    state = json.loads((run_dir / "state.json").read_text())
    assert state["generation"] == G
    assert state["archives"] == ref_state["archives"]
    ref_lines = [json.loads(l) for l in (ref / "metrics.jsonl").read_text().splitlines()]
    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["generation"] for m in lines] == [m["generation"] for m in ref_lines]  # each exactly once
    assert [m["scores"] for m in lines] == [m["scores"] for m in ref_lines]
    assert [m["parents"] for m in lines] == [m["parents"] for m in ref_lines]


def test_same_archives_as_another_checkout(tmp_path, cache_dir):
    """Opt-in (``CYCLEQD_COMPARE_WITH=/path/to/other/checkout``): the same config and seed run
    with this checkout's code and with the other's give the same archives, aggregate and
    metrics apart from timings (checks that checkpointing changes leave the search alone)."""
    import pytest

    other = os.environ.get("CYCLEQD_COMPARE_WITH")
    if not other:
        pytest.skip("set CYCLEQD_COMPARE_WITH to another checkout to compare with")
    here = str(Path(__file__).resolve().parents[2])
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_config_dict(cache_dir, generations=20)))
    for name, root in (("here", here), ("other", other)):
        subprocess.run(_cmd("run", str(cfg_path), "--out", str(tmp_path / name)), check=True,
                       env={**os.environ, "PYTHONHASHSEED": "0", "PYTHONPATH": root}, cwd=root,
                       stdout=subprocess.DEVNULL)
    states = [json.loads((tmp_path / n / "state.json").read_text()) for n in ("here", "other")]
    assert states[0]["archives"] == states[1]["archives"]
    assert states[0]["aggregate"] == states[1]["aggregate"]
    strip = [[{k: v for k, v in json.loads(l).items() if k not in ("timings", "wall_s")}
              for l in (tmp_path / n / "metrics.jsonl").read_text().splitlines()] for n in ("here", "other")]
    assert strip[0] == strip[1]

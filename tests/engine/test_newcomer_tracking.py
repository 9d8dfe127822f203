"""Issue 15 item 8: experiment tracking. TensorBoard event files and W&B offline runs carry
the figures of metrics.jsonl (coverage, QD score, best quality per archive, child scores,
timings) and the elite maps as images."""

from __future__ import annotations

import json
import sys

import pytest
import yaml

from cycleqd.cli import main
from cycleqd.config import ConfigError, parse_config
from cycleqd.tracking import Tracker, check_available, flatten_record
from tests.conftest import tiny_config_dict

GENERATIONS = 3


def _run(tmp_path, cache_dir, *flags: str, **tracking) -> tuple[int, list[dict]]:
    d = tiny_config_dict(cache_dir, generations=GENERATIONS)
    if tracking:
        d["tracking"] = tracking
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(d))
    rc = main(["run", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "run"), "--no-progress", *flags])
    metrics = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    return rc, metrics


def test_flatten_record_names_every_figure():
    rec = {"generation": 4, "child": "g000004", "scores": {"a": 0.5, "b": 0.25}, "entered": ["a"],
           "timings": {"crossover_s": 0.1}, "wall_s": 3.0,
           "archives": {"a": {"coverage": 0.1, "qd_score": 1.5, "best_quality": 0.9, "num_elites": 3}}}
    step, v = flatten_record(rec)
    assert step == 4
    assert v == {"child/a": 0.5, "child/b": 0.25, "child/entered": 1.0, "timings/crossover_s": 0.1,
                 "wall_s": 3.0, "archive/a/coverage": 0.1, "archive/a/qd_score": 1.5,
                 "archive/a/best_quality": 0.9, "archive/a/num_elites": 3.0}
    assert "seed/expert:a/a" in flatten_record({**rec, "generation": 0, "child": "expert:a"})[1]
    assert "aggregate/b" in flatten_record({**rec, "kind": "aggregate"})[1]


def test_tracking_config_is_checked_and_not_in_the_fingerprint(tmp_path):
    d = tiny_config_dict(tmp_path)
    plain = parse_config(d)
    tracked = parse_config({**d, "tracking": {"tensorboard": True, "wandb": {"project": "p", "mode": "offline"}}})
    assert tracked.tracking.wandb.mode == "offline"
    assert tracked.fingerprint() == plain.fingerprint()   # resuming with tracking on is the same run
    with pytest.raises(ConfigError, match="tracking.wandb.mode"):
        parse_config({**d, "tracking": {"wandb": {"project": "p", "mode": "offlin"}}})
    with pytest.raises(ConfigError, match="tracking.tensorbord"):
        parse_config({**d, "tracking": {"tensorbord": True}})


def test_missing_package_is_one_line_before_any_model(tmp_path, cache_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "wandb" else real(n, *a))
    d = tiny_config_dict(cache_dir)
    d["tracking"] = {"wandb": {"project": "p"}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(d))
    assert main(["run", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "error: tracking.wandb needs the wandb package: pip install 'cycleqd[wandb]'" in err
    assert "building weight space" not in err and not (tmp_path / "run").exists()
    with pytest.raises(ImportError, match="cycleqd\\[wandb\\]"):
        check_available(parse_config(d))


def test_tensorboard_event_file_holds_the_metrics_and_maps(tmp_path, cache_dir):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rc, metrics = _run(tmp_path, cache_dir, "--tensorboard")
    assert rc == 0
    ea = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    ea.Reload()
    tags = ea.Tags()
    for a in ("a", "b", "c"):
        for key in ("coverage", "qd_score", "best_quality", "num_elites"):
            assert f"archive/{a}/{key}" in tags["scalars"]
        assert f"child/{a}" in tags["scalars"] and f"aggregate/{a}" in tags["scalars"]
        assert f"seed/expert:{a}/{a}" in tags["scalars"]
        assert f"maps/archive_{a}" in tags["images"]
    assert "maps/elite_maps" in tags["images"] and any(t.startswith("timings/") for t in tags["scalars"])
    # the values are metrics.jsonl's, generation by generation
    gens = [m for m in metrics if m["generation"] >= 1 and m.get("kind") != "aggregate"]
    assert len(gens) == GENERATIONS
    child = {e.step: e.value for e in ea.Scalars("child/b")}
    cov = {e.step: e.value for e in ea.Scalars("archive/a/coverage")}
    qd = {e.step: e.value for e in ea.Scalars("archive/c/qd_score")}
    for m in gens:
        g = m["generation"]
        assert child[g] == pytest.approx(m["scores"]["b"], rel=1e-6)
        assert cov[g] == pytest.approx(m["archives"]["a"]["coverage"], rel=1e-6)
        assert qd[g] == pytest.approx(m["archives"]["c"]["qd_score"], rel=1e-6)
    agg = [m for m in metrics if m.get("kind") == "aggregate"][0]
    assert ea.Scalars("aggregate/a")[-1].value == pytest.approx(agg["scores"]["a"], rel=1e-6)
    img = ea.Images("maps/elite_maps")[-1]
    assert img.width > 300 and img.height > 100


def test_wandb_offline_run_without_network(tmp_path, cache_dir, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_API_KEY", "")
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    rc, metrics = _run(tmp_path, cache_dir, "--wandb", "cycleqd-test", "--wandb-mode", "offline")
    assert rc == 0
    runs = sorted((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((tmp_path / "run").iterdir())
    data = next(runs[0].glob("run-*.wandb")).read_bytes()   # W&B's record log (protobuf)
    for key in ("archive/a/coverage", "archive/b/qd_score", "archive/c/best_quality", "child/a",
                "aggregate/b", "seed/expert:c/c", "timings/", "maps/elite_maps"):
        assert key.encode() in data, key
    images = list((runs[0] / "files" / "media" / "images" / "maps").glob("elite_maps_*.png"))
    assert images and images[0].stat().st_size > 1000
    # resume continues the same W&B run (its id is kept in the run directory)
    run_id = json.loads((tmp_path / "run" / "tracking.json").read_text())["wandb_id"]
    assert runs[0].name.endswith(run_id)


def test_a_failing_backend_warns_once_and_never_stops_the_run(tmp_path, capsys):
    pytest.importorskip("tensorboard")
    t = Tracker(tmp_path, tensorboard=True)

    class Broken:
        def add_scalar(self, *a, **k):
            raise OSError("disk gone")

        def close(self):
            pass

    t._tb = Broken()
    t.log_record({"generation": 1, "scores": {"a": 0.1}})
    t.log_record({"generation": 2, "scores": {"a": 0.1}})
    err = capsys.readouterr().err
    assert err.count("warning: tensorboard logging failed (OSError: disk gone)") == 1
    assert not t.active
    t.close()


def test_resume_with_tensorboard_flag_logs_the_remaining_generations(tmp_path, cache_dir):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    d = tiny_config_dict(cache_dir, generations=2)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(d))
    assert main(["run", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    assert not (tmp_path / "run" / "tensorboard").exists()
    assert main(["resume", str(tmp_path / "run"), "--generations", "4", "--tensorboard", "--no-progress"]) == 0
    ea = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"scalars": 0})
    ea.Reload()
    assert sorted({e.step for e in ea.Scalars("child/a")}) == [3, 4]


def test_documented_tracking_section_parses(tmp_path):
    import re
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "python-api.md").read_text()
    block = next(b for b in re.findall(r"```yaml\n(.*?)```", doc, flags=re.S) if "tracking:" in b)
    cfg = parse_config({**tiny_config_dict(tmp_path), **yaml.safe_load(block)})
    assert cfg.tracking.tensorboard and cfg.tracking.wandb.mode == "offline"

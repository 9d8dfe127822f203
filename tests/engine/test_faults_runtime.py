"""Faults while a run is running (issue 18 items 2 and 5, issue 15 item 6): two processes on
one run directory, a stale lock, a full disk (a real small tmpfs when root, and injected
ENOSPC everywhere), SIGTERM and Ctrl-C, and `resume` of a finished run."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cycleqd.cli import main
from cycleqd.config import parse_config
from cycleqd.engine.build import build_components
from cycleqd.engine.loop import run_cycleqd
from tests.conftest import tiny_config_dict

G = 12


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir):
    d = tmp_path_factory.mktemp("ref") / "run"
    cfg = parse_config(tiny_config_dict(cache_dir, generations=G))
    run_cycleqd(build_components(cfg), cfg, d, progress=False)
    return d


@pytest.fixture()
def cfg_path(tmp_path, cache_dir):
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(tiny_config_dict(cache_dir, generations=G)))
    return p


def _archives(d: Path):
    return json.loads((d / "state.json").read_text())["archives"]


def _metrics(d: Path):
    return [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]


def _same_as_reference(d: Path, reference: Path) -> None:
    assert _archives(d) == _archives(reference)
    assert [(m["generation"], m["child"], m["scores"]) for m in _metrics(d)] == \
        [(m["generation"], m["child"], m["scores"]) for m in _metrics(reference)]


def _one_line_error(err: str) -> str:
    """The error: one line starting with ``error: ``, the last on stderr, no traceback (the
    stage lines printed as each stage starts may precede it)."""
    lines = err.strip().splitlines()
    errors = [l for l in lines if l.startswith("error: ")]
    assert "Traceback" not in err and len(errors) == 1 and lines[-1] == errors[0], err
    return errors[0]


# ------------------------------------------------------------------------ processes
def _cmd(*args):
    return [sys.executable, "-m", "cycleqd.cli", *args, "--no-progress"]


def _env():
    root = str(Path(__file__).resolve().parents[2])
    return {**os.environ, "PYTHONHASHSEED": "0", "PYTHONPATH": root}


def _start(*args):
    return subprocess.Popen(_cmd(*args), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_generation(d: Path, gen: int, proc, timeout=300) -> None:
    t = time.time()
    while time.time() - t < timeout:
        try:
            if json.loads((d / "state.json").read_text())["generation"] >= gen:
                return
        except (FileNotFoundError, ValueError, KeyError):
            pass
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    raise AssertionError("run too slow")


def _slow_cfg(tmp_path, cache_dir, generations=400):
    p = tmp_path / "long.yaml"
    p.write_text(yaml.safe_dump(tiny_config_dict(cache_dir, generations=generations)))
    return p


def test_two_processes_on_one_run_dir(tmp_path, cache_dir, fault):
    """A second `resume` (or `run --out`) on a live run refuses naming the holder's pid; the
    first run is undisturbed; after the holder is SIGKILLed its stale lock is taken over."""
    fault.inject("lock: second process on a live run")
    d = tmp_path / "run"
    a = _start("run", str(_slow_cfg(tmp_path, cache_dir)), "--out", str(d))
    try:
        _wait_generation(d, 2, a)
        b = _start("resume", str(d))
        _, err = b.communicate(timeout=120)
        assert b.returncode == 2, err
        msg = _one_line_error(err)
        assert f"is in use by pid {a.pid} on " in msg and "one process per run directory" in msg
        c = _start("run", str(_slow_cfg(tmp_path, cache_dir)), "--out", str(d))
        _, err = c.communicate(timeout=120)
        assert c.returncode == 2 and f"in use by pid {a.pid}" in _one_line_error(err)
        assert a.poll() is None                      # the first run goes on
        fault.survived()

        fault.inject("lock: stale lock of a killed process")
        a.send_signal(signal.SIGKILL)
        a.wait()
        assert json.loads((d / ".lock").read_text())["pid"] == a.pid   # left behind
        done = json.loads((d / "state.json").read_text())["generation"]
        e = _start("resume", str(d))
        _wait_generation(d, done + 2, e)
        e.send_signal(signal.SIGTERM)
        _, err = e.communicate(timeout=120)
        assert f"note: took over the lock of pid {a.pid}" in err, err
        assert e.returncode == 143, err
    finally:
        for p in (a,):
            if p.poll() is None:
                p.kill()
                p.wait()
    gens = [m["generation"] for m in _metrics(d)]
    st = json.loads((d / "state.json").read_text())
    assert gens == [0, 0, 0] + list(range(1, st["generation"] + 1))   # each generation exactly once
    assert (d / ".lock").read_text() == ""                           # released cleanly
    fault.survived()


def test_sigterm_commits_and_prints_the_resume_hint(tmp_path, cfg_path, reference, fault):
    fault.inject("signal: SIGTERM mid-run")
    d = tmp_path / "run"
    p = _start("run", str(cfg_path), "--out", str(d))
    _wait_generation(d, 3, p)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 143, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == \
        f"terminated (SIGTERM): finished generations are saved; continue with `cycleqd resume {d}`"
    st = json.loads((d / "state.json").read_text())
    assert len(_metrics(d)) == 3 + st["generation"]           # stopped on a committed generation
    r = _start("resume", str(d))
    _, err = r.communicate(timeout=300)
    assert r.returncode == 0, err
    _same_as_reference(d, reference)
    fault.survived()


def test_ctrl_c_names_the_real_run_dir(tmp_path, cfg_path, fault):
    fault.inject("signal: Ctrl-C mid-run")
    d = tmp_path / "run"
    p = _start("run", str(cfg_path), "--out", str(d))
    _wait_generation(d, 2, p)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert err.strip().splitlines()[-1] == \
        f"interrupted: finished generations are saved; continue with `cycleqd resume {d}`"
    assert "RUN_DIR" not in err
    fault.survived()


# ------------------------------------------------------------------------ finished runs
def test_resume_of_a_finished_run_changes_nothing(tmp_path, cfg_path, capsys, fault):
    fault.inject("finished run: resumed again")
    d = tmp_path / "run"
    assert main(["run", str(cfg_path), "--out", str(d), "--no-progress"]) == 0
    before = {p: p.read_bytes() for p in (d / "metrics.jsonl", d / "state.json")}
    capsys.readouterr()
    assert main(["resume", str(d), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"run already complete ({G} generations)" in out
    assert {p: p.read_bytes() for p in before} == before
    assert main(["report", str(d)]) == 0
    assert "**aggregated**" in (d / "report.md").read_text()
    fault.survived()


def test_generations_extends_a_finished_run(tmp_path, cache_dir, capsys, reference, fault):
    """`resume RUN --generations N` continues a finished run; it ends as a run of N from the start."""
    fault.inject("finished run: extended with --generations")
    p = tmp_path / "short.yaml"
    p.write_text(yaml.safe_dump(tiny_config_dict(cache_dir, generations=7)))
    d = tmp_path / "run"
    assert main(["run", str(p), "--out", str(d), "--no-progress"]) == 0
    old_agg = [m for m in _metrics(d) if m.get("kind") == "aggregate"]
    assert main(["resume", str(d), "--no-progress", "--generations", str(G)]) == 0
    _same_as_reference(d, reference)
    assert yaml.safe_load((d / "config.yaml").read_text())["qd"]["generations"] == G
    prev = [json.loads(l) for l in (d / "aggregates-previous.jsonl").read_text().splitlines()]
    assert [m["scores"] for m in prev] == [m["scores"] for m in old_agg] and prev[0]["run_generations"] == 7
    assert main(["resume", str(d), "--no-progress", "--generations", "5"]) == 2
    assert "already done 12 generations" in capsys.readouterr().err
    fault.survived()


# ------------------------------------------------------------------------ disk full
def _disk_full_message(err: str, d: Path) -> str:
    msg = _one_line_error(err)
    assert msg.startswith("error: disk full while writing ")
    assert msg.endswith(f"; finished generations are saved; free space and run `cycleqd resume {d}`")
    return msg


@pytest.mark.parametrize("nth", [2, 9, 25, 40, 75, 110])
def test_injected_enospc_in_any_write(tmp_path, cfg_path, capsys, monkeypatch, reference, fault, nth):
    """ENOSPC from the nth fsync (every checkpoint file, metrics line and genome is fsynced):
    one line naming the file, exit 1; then resume ends as an uninterrupted run."""
    fault.inject("disk full: injected ENOSPC (fsync)")
    calls = [0]
    real = os.fsync

    def fsync(fd):
        calls[0] += 1
        if calls[0] == nth:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    d = tmp_path / "run"
    assert main(["run", str(cfg_path), "--out", str(d), "--no-progress"]) == 1
    err = capsys.readouterr().err
    monkeypatch.setattr(os, "fsync", real)
    if (d / "config.yaml").exists():
        _disk_full_message(err, d)
        assert main(["resume", str(d), "--no-progress"]) == 0, capsys.readouterr().err
    else:   # full while creating the run directory: nothing finished, the same `run` again
        assert "nothing was finished yet" in _one_line_error(err)
        assert main(["run", str(cfg_path), "--out", str(d), "--no-progress"]) == 0
    _same_as_reference(d, reference)
    fault.survived()


def test_injected_enospc_in_genome_save(tmp_path, cfg_path, capsys, monkeypatch, reference, fault):
    """safetensors reports a full disk as SafetensorError('... No space left on device (os error 28)')."""
    fault.inject("disk full: genome write (safetensors)")
    import cycleqd.ops.genome as og
    import cycleqd.ops.space as osp

    real = {m: m.save_file for m in (og, osp)}
    calls = [0]

    def make(orig):
        def save_file(tensors, filename, metadata=None):
            calls[0] += 1
            if calls[0] == 4:
                Path(filename).write_bytes(b"partial")
                raise Exception("Error while serializing: I/O error: No space left on device (os error 28)")
            return orig(tensors, filename, metadata=metadata)
        return save_file

    for m, f in real.items():
        monkeypatch.setattr(m, "save_file", make(f))
    d = tmp_path / "run"
    assert main(["run", str(cfg_path), "--out", str(d), "--no-progress"]) == 1
    msg = _disk_full_message(capsys.readouterr().err, d)
    assert "genomes" in msg
    assert not [p for p in (d / "genomes").iterdir() if ".tmp-" in p.name]   # partial file removed
    for m, f in real.items():
        monkeypatch.setattr(m, "save_file", f)
    assert main(["resume", str(d), "--no-progress"]) == 0
    _same_as_reference(d, reference)
    fault.survived()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
@pytest.mark.parametrize("free_kib", [150, 600, 1000, 1400])
def test_real_full_tmpfs(tmp_path, cfg_path, capsys, reference, fault, free_kib):
    """A real small filesystem fills up mid-run: one line, exit 1, every finished generation
    intact; after freeing space `cycleqd resume` ends as an uninterrupted run."""
    fault.inject("disk full: real tmpfs")
    mnt = tmp_path / "fs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={free_kib + 64}k", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        filler = mnt / "filler"
        filler.write_bytes(b"\0" * 64 * 1024)
        d = mnt / "run"
        rc = main(["run", str(cfg_path), "--out", str(d), "--no-progress"])
        err = capsys.readouterr().err
        assert rc == 1, err
        msg = _disk_full_message(err, d)
        committed = json.loads((d / "state.json").read_text())["generation"] if (d / "state.json").exists() else -1
        assert len([m for m in _metrics(d) if m["generation"] <= max(committed, 0)]) >= 3 + max(committed, 0) \
            if committed >= 0 else True
        subprocess.run(["mount", "-o", "remount,size=64m", str(mnt)], check=True)
        assert main(["resume", str(d), "--no-progress"]) == 0, capsys.readouterr().err
        _same_as_reference(d, reference)
        print(f"free {free_kib} KiB: {msg}")
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
    fault.survived()


def test_sigint_ignored_by_the_parent_shell_stays_ignored(tmp_path, cache_dir, fault):
    """`cmd & kill -INT $!` in a script without job control: SIGINT is SIG_IGN in the run;
    it is left so (no "stopping once ..." line, the run completes with 0); SIGTERM still works."""
    fault.inject("signal: SIGINT ignored by the parent")
    d = tmp_path / "run"
    cfg = _slow_cfg(tmp_path, cache_dir, generations=8)
    p = subprocess.Popen(_cmd("run", str(cfg), "--out", str(d)), env=_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    _wait_generation(d, 2, p)
    for _ in range(3):
        p.send_signal(signal.SIGINT)
        time.sleep(0.05)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    assert "stopping" not in err and "interrupted" not in err, err
    assert json.loads((d / "state.json").read_text())["generation"] == 8
    fault.survived()


def test_interrupt_before_the_run_dir_exists_offers_no_resume(tmp_path, cfg_path, capsys,
                                                              monkeypatch, fault):
    fault.inject("signal: Ctrl-C before the run directory exists")
    import cycleqd.engine.build as build

    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(build, "build_components", interrupted)
    d = tmp_path / "early"
    assert main(["run", str(cfg_path), "--out", str(d), "--no-progress"]) == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == "interrupted before the run directory was created; nothing to resume"
    assert "cycleqd resume" not in err
    fault.survived()

"""Issue 15 items 5 and 10: each stage is printed as it starts; with --no-progress or a
non-terminal output one plain line per generation (no carriage returns in a log file); the
progress bar keeps to one line at 80 columns."""

from __future__ import annotations

import io
import re
import sys

import yaml

from cycleqd.cli import main
from cycleqd.engine.loop import _Progress
from cycleqd.qd.archive import Elite, make_archives
from tests.conftest import tiny_config_dict


def _run(tmp_path, cache_dir, *extra: str, generations: int = 3) -> int:
    d = tiny_config_dict(cache_dir, generations=generations)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(d))
    return main(["run", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "run"), *extra])


def _check_stages_and_lines(err: str, generations: int) -> None:
    assert "\r" not in err, "a log file must not get carriage-return progress"
    order = ["loading config", "building weight space and models", "seeding archives: scoring seed model 1/3",
             "seeding archives: scoring seed model 3/3", "generation loop", "gen 1/", f"gen {generations}/",
             "model aggregation"]
    pos = [err.find(s) for s in order]
    assert all(p >= 0 for p in pos), [s for s, p in zip(order, pos) if p < 0]
    assert pos == sorted(pos), "stages out of order"
    gen_lines = [ln for ln in err.splitlines() if ln.startswith("gen ")]
    assert len(gen_lines) == generations
    for i, ln in enumerate(gen_lines, 1):
        # generation, quality skill, child scores, entered archives, elapsed
        assert re.match(rf"gen {i}/{generations}  q=[abc]  child a=\d\.\d{{3}} b=\d\.\d{{3}} c=\d\.\d{{3}}  "
                        rf"entered (\S+)  coverage a=[\d.]+ b=[\d.]+ c=[\d.]+  \d+\.\ds$", ln), ln


def test_no_progress_prints_stages_and_one_line_per_generation(tmp_path, cache_dir, capsys):
    assert _run(tmp_path, cache_dir, "--no-progress") == 0
    _check_stages_and_lines(capsys.readouterr().err, 3)


def test_non_tty_output_gets_lines_not_a_bar(tmp_path, cache_dir, capsys):
    # capsys: stdout/stderr are not terminals, as with `cycleqd run ... > log 2>&1`
    assert not sys.stderr.isatty()
    assert _run(tmp_path, cache_dir, generations=2) == 0
    _check_stages_and_lines(capsys.readouterr().err, 2)


class _TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bar_stays_on_one_80_column_line(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    stream = _TTY()
    monkeypatch.setattr(sys, "stderr", stream)
    monkeypatch.setattr(sys, "stdout", _TTY())
    skills = ["coding_mbpp", "database_dbbench", "operating_system", "maths_gsm8k"]
    archives = make_archives(skills, {s: (0.0, 1.0) for s in skills}, {s: 15 for s in skills})
    for a in archives:
        a.add(Elite("x", {s: 0.5 for s in skills}, 1, ()))
    bar = _Progress(1200, 0, "auto")
    assert bar.mode == "bar"
    for g in range(1, 4):
        bar.update("database_dbbench", archives, {s: 0.5 for s in skills}, ["coding_mbpp"], g)
    bar.close()
    frames = [f for f in re.split(r"[\r\n]", stream.getvalue()) if f.strip()]
    assert frames and any("3/1200" in f for f in frames)
    assert max(len(f) for f in frames) <= 80, max(frames, key=len)
    assert any("q=database_dbbench" in f for f in frames)


def test_off_prints_nothing(capsys):
    archives = make_archives(["a", "b"], {"a": (0, 1), "b": (0, 1)}, {"a": 4, "b": 4})
    bar = _Progress(5, 0, "off")
    bar.stage("x")
    bar.update("a", archives, {"a": 0.1}, [], 1)
    bar.close()
    assert capsys.readouterr().err == ""

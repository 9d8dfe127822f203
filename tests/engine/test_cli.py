from pathlib import Path

import yaml

from cycleqd.cli import main
from tests.conftest import tiny_config_dict

REPO = Path(__file__).resolve().parents[2]


def test_help_explains_the_commands(capsys):
    try:
        main(["--help"])
    except SystemExit as e:
        assert e.code == 0
    out = capsys.readouterr().out
    for word in ("CycleQD", "run", "resume", "report", "export", "demo", "MAP-Elites"):
        assert word in out


def test_validate_reports_errors_with_exit_code_2(tmp_path, capsys):
    d = tiny_config_dict(tmp_path)
    d["skills"][0]["bc_range"] = [1.0, 0.0]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(d))
    assert main(["validate", str(tmp_path / "c.yaml")]) == 2
    assert "skills.0.bc_range: min (1.0) must be < max (0.0)" in capsys.readouterr().err
    assert main(["validate", str(REPO / "configs" / "tiny.yaml")]) == 0


def test_run_then_report_renders_markdown_and_html(tmp_path, cache_dir):
    d = tiny_config_dict(cache_dir, generations=6)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(d))
    assert main(["run", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    assert main(["run", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    assert main(["report", str(tmp_path / "run")]) == 0
    md = (tmp_path / "run" / "report.md").read_text()
    assert "## Best model per skill" in md and "maps/elite_maps.png" in md and "QD score" in md
    assert (tmp_path / "run" / "maps" / "curves.png").stat().st_size > 1000
    html = (tmp_path / "run" / "report.html").read_text()
    assert "<table>" in html and "<img" in html
    assert main(["report", str(tmp_path / "nothing")]) == 2


def test_resume_help_names_the_recovery_options(capsys):
    try:
        main(["resume", "--help"])
    except SystemExit as e:
        assert e.code == 0
    out = capsys.readouterr().out
    assert "--from-snapshot" in out and "--generations" in out and ".lock" in out


def test_resume_of_something_that_is_not_a_run(tmp_path, capsys):
    assert main(["resume", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {tmp_path} is not a cycleqd run directory (no config.yaml)"

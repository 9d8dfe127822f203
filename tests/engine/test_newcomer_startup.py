"""Issue 15 items 5 and 10: `cycleqd --help`, `--version`, `init` and `import cycleqd` start
without torch/transformers; the hub's download progress bars are never switched off."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

_PROBE = r"""
import json, sys
from cycleqd.cli import main
try:
    rc = main(sys.argv[1:])
except SystemExit as e:
    rc = e.code
heavy = sorted(m for m in ("torch", "transformers", "huggingface_hub") if m in sys.modules)
print("@@" + json.dumps({"rc": rc, "heavy": heavy}))
"""


def _probe(*argv: str, cwd: Path = REPO) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", _PROBE, *argv], capture_output=True, text=True,
                         env=env, cwd=cwd, timeout=120)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("@@")]
    assert line, out.stdout + out.stderr
    return json.loads(line[-1][2:])


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["run", "--help"], ["demo", "--help"],
                                  ["resume", "--help"], ["report", "--help"]])
def test_help_and_version_do_not_import_torch(argv):
    r = _probe(*argv)
    assert r["rc"] == 0
    assert r["heavy"] == [], f"cycleqd {' '.join(argv)} imported {r['heavy']}"


def test_init_does_not_import_torch(tmp_path):
    r = _probe("init", str(tmp_path / "c"))
    assert r["rc"] == 0 and r["heavy"] == []
    assert (tmp_path / "c" / "tiny.yaml").is_file()


def test_validate_does_not_import_torch():
    r = _probe("validate", "tiny")
    assert r["rc"] == 0
    assert "torch" not in r["heavy"]


def test_import_cycleqd_is_light_and_exposes_the_registries():
    code = ("import sys, cycleqd; a = 'torch' in sys.modules; "
            "print(a, sorted(cycleqd.CROSSOVERS)[:1], 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=str(REPO)))
    # the registries are filled without importing torch (cycleqd.ops binds it lazily)
    assert out.stdout.split() == ["False", "['dare']", "False"], out.stderr


def test_version(capsys):
    from cycleqd import __version__
    from cycleqd.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"cycleqd {__version__}"


def test_hub_download_progress_stays_on():
    code = ("import sys; from cycleqd.cli import main, _library_progress\n"
            "main(['init', sys.argv[1]])\n"
            "from huggingface_hub.utils import are_progress_bars_disabled as off\n"
            "a = off()\n"
            "_library_progress(False)   # not a terminal: transformers' own bars off ...\n"
            "from transformers.utils import logging as l\n"
            "print(a, off(), l.is_progress_bar_enabled())")
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        out = subprocess.run([sys.executable, "-c", code, d], capture_output=True, text=True,
                             timeout=300, env=dict(os.environ, PYTHONPATH=str(REPO)))
    # ... but the hub's download bars stay on
    assert out.stdout.split()[-3:] == ["False", "False", "False"], out.stdout + out.stderr

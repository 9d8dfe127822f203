"""Issue 15 item 4: `cycleqd validate` (and `cycleqd run`, before any model loads) checks
everything that can be checked without weights, one line naming the field per problem."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cycleqd import configs
from cycleqd.cli import main

REPO = Path(__file__).resolve().parents[2]


#: the paper config's skills under the project protocol (paper.yaml itself uses the official
#: protocol, which fixes most parameters these tests vary)
PROJECT_SKILLS = [
    {"name": "coding", "type": "mbpp", "bc_range": [0.0, 0.75], "bins": 15, "params": {"split": "search"}},
    {"name": "db", "type": "dbbench", "bc_range": [0.0, 0.45], "bins": 15, "params": {"split": "search"}},
    {"name": "os", "type": "os", "bc_range": [0.0, 0.45], "bins": 15, "params": {"split": "search"}},
]


def _config(tmp_path: Path, edit) -> Path:
    d = yaml.safe_load(configs.path("paper").read_text())
    d["skills"] = [dict(s, params=dict(s["params"])) for s in PROJECT_SKILLS]
    d["model"] = {"base": str(tmp_path), "experts": {s["name"]: str(tmp_path) for s in d["skills"]}}
    edit(d)
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


def _validate(capsys, path: Path) -> tuple[int, str]:
    rc = main(["validate", str(path)])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("edit,line", [
    (lambda d: d["operators"]["mutation"].update(rate=-0.1), "operators.mutation.rate: must be >= 0, got -0.1"),
    (lambda d: d["operators"]["crossover"].update(sigmaa=0.1),
     "operators.crossover.sigmaa: 'linear' takes no argument 'sigmaa' (did you mean 'sigma'?)"),
    (lambda d: d["skills"][0]["params"].update(max_new_token=64),
     "skills.0.params.max_new_token: 'mbpp' takes no argument 'max_new_token' (did you mean 'max_new_tokens'?)"),
    (lambda d: d["skills"][0]["params"].update(limit="ten"),
     "skills.0.params.limit: expected int | None, got 'ten' (str)"),
    (lambda d: d["skills"][2]["params"].update(max_rounds=True),
     "skills.2.params.max_rounds: expected int, got True (bool)"),
    (lambda d: d["skills"][1]["params"].update(data_path="/nonexistent/dbbench.jsonl"),
     "skills.1.params.data_path: '/nonexistent/dbbench.jsonl' does not exist"),
    (lambda d: d["backend"].update(device="gpu"), "backend.device: unknown device 'gpu'"),
    (lambda d: d["backend"].update(device="cuda:x"), "backend.device: unknown device 'cuda:x'"),
    (lambda d: d["model"].update(base="/nonexistent/base"), "model.base: '/nonexistent/base' does not exist"),
])
def test_validate_names_each_problem_in_one_line(tmp_path, capsys, edit, line):
    rc, err = _validate(capsys, _config(tmp_path, edit))
    assert rc == 2 and line in err and "Traceback" not in err, err
    assert err.count("\n") <= 2, err     # at most a header ("invalid config FILE:") and the line


@pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:1", "mps"])
def test_good_devices_pass(tmp_path, capsys, device):
    rc, err = _validate(capsys, _config(tmp_path, lambda d: d["backend"].update(device=device)))
    assert rc == 0, err


def _lmeval(task: str, include: Path | None = None):
    def edit(d):
        params = {"task": task, **({"include_path": str(include), "include_defaults": False} if include else {})}
        d["skills"][2] = {"name": "lm", "type": "lmeval", "params": params}
        d["model"]["experts"] = {s["name"]: d["model"]["base"] for s in d["skills"]}
    return edit


def test_unknown_lmeval_task_is_named(tmp_path, capsys):
    pytest.importorskip("lm_eval")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "mine.yaml").write_text("task: my_task\ndataset_path: x\noutput_type: generate_until\n"
                                     "doc_to_text: q\ndoc_to_target: a\n")
    rc, err = _validate(capsys, _config(tmp_path, _lmeval("my_tsak", tasks)))
    assert rc == 2 and "skills.2.params.task: unknown lm-eval task (did you mean 'my_task'?)" in err, err
    rc, err = _validate(capsys, _config(tmp_path, _lmeval("my_task", tasks)))
    assert rc == 0, err


def test_a_known_lmeval_task_is_found_without_importing_lm_eval(tmp_path):
    pytest.importorskip("lm_eval")
    code = ("import sys; from cycleqd.cli import main; rc = main(['validate', sys.argv[1]]); "
            "print(rc, 'lm_eval' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(_config(tmp_path, _lmeval("arc_easy")))],
                         capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert out.stdout.split()[-3:] == ["0", "False", "False"], out.stdout + out.stderr


@pytest.mark.parametrize("name", configs.names())
def test_every_shipped_config_validates(capsys, name):
    assert main(["validate", name]) == 0, capsys.readouterr().err
    assert "valid" in capsys.readouterr().out


def test_run_checks_the_same_before_any_model_loads(tmp_path):
    """`cycleqd run` stops on a misspelt skill parameter before importing torch."""
    from tests.conftest import tiny_config_dict

    d = tiny_config_dict(tmp_path / "cache")
    d["skills"][0]["params"] = {"temprature": 2.0}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(d))
    code = ("import sys, json; from cycleqd.cli import main; rc = main(sys.argv[1:]); "
            "print('@@' + json.dumps([rc, 'torch' in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code, "run", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "r"),
                          "--no-progress"], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PYTHONPATH=str(REPO)))
    res = json.loads([ln for ln in out.stdout.splitlines() if ln.startswith("@@")][-1][2:])
    assert res == [2, False], out.stderr
    assert "skills.0.params.temprature: 'synthetic' takes no argument 'temprature' (did you mean " \
           "'temperature'?)" in out.stderr

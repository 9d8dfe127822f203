"""What `cycleqd run` refuses, `cycleqd validate` (or `run` before building anything)
refuses too, in one line: skill params the constructors reject, missing benchmark data,
unsafe run names, devices torch does not have, unusable --out folders, config-error style."""

from __future__ import annotations

import pytest
import yaml

from cycleqd import configs
from cycleqd.cli import main
from cycleqd.skills.agentbench.data import DB_SPLITS, OS_SPLITS
from cycleqd.skills.coding.data import MBPP_SPLITS
from tests.engine.test_validate import _config, _validate


@pytest.mark.parametrize("i,params,line", [
    (0, {"split": "tset"}, f"skills.0.params.split: split must be one of {MBPP_SPLITS}, got 'tset'"),
    (1, {"split": "tset"}, f"skills.1.params.split: split must be one of {list(DB_SPLITS)}, got 'tset'"),
    (2, {"split": "tset"}, f"skills.2.params.split: split must be one of {list(OS_SPLITS)}, got 'tset'"),
    (0, {"limit": -3}, "skills.0.params.limit: limit must be a positive int or None, got -3"),
    (1, {"limit": -3}, "skills.1.params.limit: limit must be a positive int or None, got -3"),
    (0, {"max_new_tokens": 0}, "skills.0.params.max_new_tokens: max_new_tokens must be a positive int, got 0"),
    (2, {"max_new_tokens": 0}, "skills.2.params.max_new_tokens: max_new_tokens must be a positive int, got 0"),
    (0, {"data_path": "/etc/passwd"}, "skills.0.params.data_path: '/etc/passwd' is not a .jsonl/.json file"),
    (1, {"data_path": "/etc/passwd"}, "skills.1.params.data_path: '/etc/passwd' is not a .jsonl file"),
    (2, {"data_path": "/etc"}, "skills.2.params.data_path: os_interaction/training.json not found"),
])
def test_validate_rejects_what_the_skill_constructors_reject(tmp_path, capsys, i, params, line):
    rc, err = _validate(capsys, _config(tmp_path, lambda d: d["skills"][i]["params"].update(params)))
    assert rc == 2 and "Traceback" not in err and err.count("\n") <= 2, err
    assert line.split(": ", 1)[0] in err and line.split(": ", 1)[1] in err, err


def test_validate_checks_benchmark_data_like_run(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CYCLEQD_DATA_DIR", str(tmp_path / "empty"))
    (tmp_path / "empty").mkdir()
    rc, err = _validate(capsys, _config(tmp_path, lambda d: None))
    assert rc == 2 and err.startswith("error: benchmark data missing in ") and err.count("\n") == 1, err
    assert "cycleqd data fetch mbpp dbbench os" in err, err


@pytest.mark.parametrize("name", ["../../evil", "/tmp/abs", "..", ".hidden", "a\\b", "a\tb", "x" * 101, ""])
def test_unsafe_run_names_are_refused(tmp_path, capsys, name):
    rc = main(["validate", "tiny", "--set", f"name={name}"])
    err = capsys.readouterr().err
    assert rc == 2 and "name: must be a plain file name" in err and "(from --set name)" in err, err


@pytest.mark.parametrize("name", ["tiny", "paper-llama3-8b", "my run 2", "x" * 100])
def test_plain_run_names_pass(capsys, name):
    assert main(["validate", "tiny", "--set", f"name={name}"]) == 0, capsys.readouterr().err


def test_cuda_without_cuda_is_refused_before_any_model(tmp_path, monkeypatch):
    import torch

    from cycleqd.config import ConfigError
    from cycleqd.engine.build import check_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"^backend.device: cuda requested but torch has no CUDA "
                                          r"\(torch.cuda.is_available\(\) is False\)$"):
        check_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    check_device("cuda:1")
    with pytest.raises(ConfigError, match=r"^backend.device: cuda:99 requested but torch sees 2 CUDA"):
        check_device("cuda:99")
    check_device("cpu")


def test_run_refuses_cuda_through_the_cli(tmp_path, capsys, monkeypatch):
    import torch

    from tests.conftest import tiny_config_dict

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    d = tiny_config_dict(tmp_path / "cache")
    d["backend"] = {"device": "cuda"}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(d))
    rc = main(["run", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "r"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "error: backend.device: cuda requested but torch has no CUDA" in err, err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("setup,msg", [
    (lambda p: p.write_text("x"), "is a file, not a folder"),
    (lambda p: (p.mkdir(), (p / "notes.txt").write_text("x")), "folder is not empty and not a run directory"),
    (lambda p: (p.mkdir(), (p / "config.yaml").write_text("x"), (p / "state.json").write_text("{}")),
     "already holds a run"),
])
def test_run_refuses_an_unusable_out_before_building(tmp_path, capsys, monkeypatch, setup, msg):
    import cycleqd.cli as cli

    monkeypatch.setattr(cli, "_run", lambda *a, **k: pytest.fail("built despite a bad --out"))
    out = tmp_path / "out"
    setup(out)
    rc = main(["run", "tiny", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and msg in err and "Errno" not in err and err.count("\n") <= 2, err


def test_malformed_set_is_an_error_line(capsys):
    rc = main(["validate", "tiny", "--set", "foo"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: --set expects KEY=VALUE"), err


def test_a_directory_as_config_says_so(tmp_path, capsys):
    rc = main(["validate", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and f"{tmp_path} is a directory" in err, err


def test_unknown_keys_get_a_did_you_mean(tmp_path, capsys):
    rc, err = _validate(capsys, _config(tmp_path, lambda d: d["qd"].update(generatons=3)))
    assert rc == 2 and "qd.generatons: unknown key (did you mean 'generations'?)" in err, err
    rc = main(["validate", "tiny", "--set", "backend.devcie=cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "backend.devcie: unknown key (did you mean 'device'?)" in err, err
    assert "(from --set backend.devcie)" in err, err
    assert configs.names()

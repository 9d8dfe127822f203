"""`cycleqd train-expert`: options, errors, caching by (base, data, recipe)."""

from __future__ import annotations

import argparse

import pytest

from cycleqd.training.cli import add_arguments, main


def _args(**kw):
    ns = add_arguments(argparse.ArgumentParser()).parse_args([])
    for k, v in kw.items():
        setattr(ns, k, v)
    return ns


def test_unknown_skill_is_named():
    with pytest.raises(ValueError, match="unknown skill 'nope'"):
        main(_args(skill="nope"))


def test_trains_once_then_reuses(tmp_path, capsys):
    from cycleqd.models.tiny import make_tiny_llama

    base = make_tiny_llama(tmp_path / "base", hidden_size=32, num_layers=1, vocab_size=512)
    kw = dict(skill="coding", base=str(base), steps=2, batch_size=1, limit=3, max_length=2048,
              cache_dir=str(tmp_path / "cache"), no_progress=True)
    assert main(_args(**kw)) == 0
    first = capsys.readouterr().out.strip().splitlines()[-1]
    stamp = (tmp_path / "cache" / "experts").joinpath(first.rsplit("/", 1)[-1], "adapter_model.safetensors").stat().st_mtime_ns
    assert main(_args(**kw)) == 0
    out = capsys.readouterr().out
    assert "cached" in out and out.strip().splitlines()[-1] == first
    assert (tmp_path / "cache" / "experts" / first.rsplit("/", 1)[-1] / "adapter_model.safetensors").stat().st_mtime_ns == stamp
    # another recipe -> another adapter
    assert main(_args(**{**kw, "lr": 1e-3})) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] != first


def test_alias_and_multitask_steps(tmp_path, monkeypatch):
    import cycleqd.training.experts as ex

    seen = {}
    monkeypatch.setattr(ex, "ensure_expert", lambda spec, base, **k: seen.setdefault("spec", spec) and base)
    monkeypatch.setattr("cycleqd.training.cli.resolve_base", lambda spec, cache: tmp_path)
    main(_args(skill="multitask"))
    assert seen["spec"].skill_types == ("mbpp", "dbbench", "os") and seen["spec"].recipe.steps == 72
    seen.clear()
    main(_args(skill="dbbench", steps=5))
    assert seen["spec"].name == "db" and seen["spec"].recipe.steps == 5

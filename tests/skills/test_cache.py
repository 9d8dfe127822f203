"""SampleCache: per-sample outcomes by (fingerprint, skill, sample id) in SQLite."""

from __future__ import annotations

import multiprocessing as mp
import pickle

import pytest

from cycleqd.skills.cache import SampleCache


def test_round_trip_and_partial_hits(tmp_path):
    c = SampleCache(tmp_path / "c" / "s.sqlite")
    assert c.get_many("fp1", "mbpp", ["a", "b"]) == {}
    c.put_many("fp1", "mbpp", {"a": 1.0, "b": 0.0})
    assert c.get_many("fp1", "mbpp", ["a", "b", "z"]) == {"a": 1.0, "b": 0.0}
    # namespaces: another fingerprint or skill key sees nothing
    assert c.get_many("fp2", "mbpp", ["a"]) == {}
    assert c.get_many("fp1", "humaneval", ["a"]) == {}
    c.put_many("fp1", "mbpp", {"a": 0.0})  # overwrite
    assert c.get_many("fp1", "mbpp", ["a"]) == {"a": 0.0}
    assert len(c) == 2 and c.count(fingerprint="fp1", skill="mbpp") == 2


def test_persists_across_instances_and_pickles(tmp_path):
    p = tmp_path / "s.sqlite"
    SampleCache(p).put_many("fp", "k", {"x": 0.5}, details={"x": {"reply": "def f(): pass"}})
    c2 = pickle.loads(pickle.dumps(SampleCache(p)))
    assert c2.get_many("fp", "k", ["x"]) == {"x": 0.5}
    assert c2.get_details("fp", "k", ["x"]) == {"x": {"reply": "def f(): pass"}}


def test_many_ids_are_chunked(tmp_path):
    c = SampleCache(tmp_path / "s.sqlite")
    outcomes = {f"id{i}": float(i % 2) for i in range(2500)}
    c.put_many("fp", "k", outcomes)
    assert c.get_many("fp", "k", list(outcomes)) == outcomes


def test_bad_input_writes_nothing(tmp_path):
    c = SampleCache(tmp_path / "s.sqlite")
    with pytest.raises(ValueError, match="not finite"):
        c.put_many("fp", "k", {"a": 1.0, "b": float("nan")})
    with pytest.raises(ValueError, match="not JSON"):
        c.put_many("fp", "k", {"a": 1.0}, details={"a": object()})
    assert len(c) == 0
    with pytest.raises(ValueError, match="fingerprint"):
        c.get_many("", "k", ["a"])
    with pytest.raises(ValueError, match="skill"):
        c.put_many("fp", "", {"a": 1.0})
    with pytest.raises(ValueError, match="memory"):
        SampleCache(":memory:")


def test_delete(tmp_path):
    c = SampleCache(tmp_path / "s.sqlite")
    c.put_many("fp1", "k", {"a": 1.0})
    c.put_many("fp2", "k", {"a": 1.0})
    assert c.delete(fingerprint="fp1") == 1
    assert c.get_many("fp2", "k", ["a"]) == {"a": 1.0} and len(c) == 1


def _writer(path, worker):
    c = SampleCache(path)
    for i in range(50):
        c.put_many(f"fp{worker}", "k", {f"s{i}": float(i % 2)})


def test_concurrent_processes(tmp_path):
    p = tmp_path / "s.sqlite"
    SampleCache(p)
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(str(p), w)) for w in range(3)]
    for pr in procs:
        pr.start()
    for pr in procs:
        pr.join(60)
        assert pr.exitcode == 0
    c = SampleCache(p)
    assert len(c) == 150
    assert c.get_many("fp2", "k", ["s3"]) == {"s3": 1.0}

"""SampleCache: per-sample outcomes by (model key, skill key, item content key) in SQLite."""

from __future__ import annotations

import multiprocessing as mp
import pickle
import sqlite3

import pytest

from cycleqd.skills.cache import SampleCache

K = {s: f"i-{s}" for s in ("a", "b", "x", "z")}  # sample id -> item key


def test_round_trip_and_partial_hits(tmp_path):
    c = SampleCache(tmp_path / "c" / "s.sqlite")
    assert c.get_many("fp1", "mbpp", {"a": K["a"], "b": K["b"]}) == {}
    c.put_many("fp1", "mbpp", {"a": 1.0, "b": 0.0}, items=K)
    assert c.get_many("fp1", "mbpp", K) == {"a": 1.0, "b": 0.0}
    assert c.get_many("fp2", "mbpp", {"a": K["a"]}) == {}
    assert c.get_many("fp1", "humaneval", {"a": K["a"]}) == {}
    c.put_many("fp1", "mbpp", {"a": 0.0}, items=K)  # overwrite
    assert c.get_many("fp1", "mbpp", {"a": K["a"]}) == {"a": 0.0}
    assert len(c) == 2 and c.count(model="fp1", skill="mbpp") == 2


def test_rows_are_found_by_item_content_not_by_sample_id(tmp_path):
    c = SampleCache(tmp_path / "s.sqlite")
    c.put_many("fp", "k", {"dbbench/0": 1.0}, items={"dbbench/0": "i-file-a-item-0"})
    # the same id naming another item (another file) is a miss ...
    assert c.get_many("fp", "k", {"dbbench/0": "i-file-b-item-0"}) == {}
    # ... and the same item under another id is a hit
    assert c.get_many("fp", "k", {"other/7": "i-file-a-item-0"}) == {"other/7": 1.0}
    # two ids of identical items both get it
    assert c.get_many("fp", "k", {"p": "i-file-a-item-0", "q": "i-file-a-item-0"}) == \
        {"p": 1.0, "q": 1.0}


def test_bare_ids_are_refused(tmp_path):
    """A list of ids (the old API) would key by position: refused with a clear message."""
    c = SampleCache(tmp_path / "s.sqlite")
    with pytest.raises(TypeError, match="item_key"):
        c.get_many("fp", "k", ["a", "b"])
    with pytest.raises(TypeError, match="item_key"):
        c.put_many("fp", "k", {"a": 1.0}, items=["a"])
    with pytest.raises(TypeError):
        c.put_many("fp", "k", {"a": 1.0})  # items is required
    with pytest.raises(ValueError, match="no item key"):
        c.put_many("fp", "k", {"a": 1.0, "b": 1.0}, items={"a": "i-a"})
    with pytest.raises(ValueError, match="item key"):
        c.get_many("fp", "k", {"a": ""})
    assert len(c) == 0


def test_details_survive_reopen_and_pickle(tmp_path):
    p = tmp_path / "s.sqlite"
    SampleCache(p).put_many("fp", "k", {"x": 0.5}, details={"x": {"reply": "def f(): pass"}},
                            items=K)
    c2 = pickle.loads(pickle.dumps(SampleCache(p)))
    assert c2.get_many("fp", "k", {"x": K["x"]}) == {"x": 0.5}
    assert c2.get_details("fp", "k", {"x": K["x"]}) == {"x": {"reply": "def f(): pass"}}


def test_many_ids_chunked(tmp_path):
    c = SampleCache(tmp_path / "s.sqlite")
    outcomes = {f"id{i}": float(i % 2) for i in range(2500)}
    keys = {k: f"i-{k}" for k in outcomes}
    c.put_many("fp", "k", outcomes, items=keys)
    assert c.get_many("fp", "k", keys) == outcomes


def test_bad_values_rejected_before_writing(tmp_path):
    c = SampleCache(tmp_path / "s.sqlite")
    with pytest.raises(ValueError, match="not finite"):
        c.put_many("fp", "k", {"a": 1.0, "b": float("nan")}, items=K)
    with pytest.raises(ValueError, match="not JSON"):
        c.put_many("fp", "k", {"a": 1.0}, details={"a": object()}, items=K)
    assert len(c) == 0
    with pytest.raises(ValueError, match="model key"):
        c.get_many("", "k", {"a": K["a"]})
    with pytest.raises(ValueError, match="skill"):
        c.put_many("fp", "", {"a": 1.0}, items=K)
    with pytest.raises(ValueError, match="memory"):
        SampleCache(":memory:")


def test_delete(tmp_path):
    c = SampleCache(tmp_path / "s.sqlite")
    c.put_many("fp1", "k", {"a": 1.0}, items=K)
    c.put_many("fp2", "k", {"a": 1.0}, items=K)
    assert c.delete(model="fp1") == 1
    assert c.get_many("fp2", "k", {"a": K["a"]}) == {"a": 1.0} and len(c) == 1


def test_rows_of_the_old_schema_are_never_read(tmp_path):
    """A cache file written by the positional-id schema (table ``outcomes``) stays where it
    is but is ignored: its rows cannot say which item they scored."""
    p = tmp_path / "s.sqlite"
    old = sqlite3.connect(p)
    old.execute("CREATE TABLE outcomes (fingerprint TEXT NOT NULL, skill TEXT NOT NULL, "
                "sample_id TEXT NOT NULL, score REAL NOT NULL, detail TEXT, created REAL NOT NULL, "
                "PRIMARY KEY (fingerprint, skill, sample_id)) WITHOUT ROWID")
    old.execute("INSERT INTO outcomes VALUES ('fp', 'k', 'a', 1.0, NULL, 0)")
    old.commit()
    old.close()
    c = SampleCache(p)
    assert len(c) == 0
    assert c.get_many("fp", "k", {"a": "a"}) == {} and c.get_many("fp", "k", {"a": K["a"]}) == {}
    c.put_many("fp", "k", {"a": 0.0}, items=K)
    assert c.get_many("fp", "k", {"a": K["a"]}) == {"a": 0.0}


def _writer(path, worker):
    c = SampleCache(path)
    for i in range(50):
        c.put_many(f"fp{worker}", "k", {f"s{i}": float(i % 2)}, items={f"s{i}": f"i-s{i}"})


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
    assert c.get_many("fp2", "k", {"s3": "i-s3"}) == {"s3": 1.0}

import pytest

from cycleqd.qd.archive import BCAxis, Elite, GridArchive, make_archives


def test_bin_index_follows_official_semantics():
    ax = BCAxis("db", 0.0, 0.45, 15)
    edges = ax.edges()
    assert ax.index(0.0) == 0                     # min -> first bin
    assert ax.index(edges[1]) == 0                # right-closed bins
    assert ax.index(edges[1] + 1e-9) == 1
    assert ax.index(0.45) == 14
    assert ax.index(0.9) == 14 and ax.index(-1) == 0   # clamped into edge bins


@pytest.mark.parametrize("lo,hi,bins", [(0.5, 0.5, 3), (0.6, 0.2, 3), (0.0, 1.0, 0)])
def test_axis_rejects_bad_ranges(lo, hi, bins):
    with pytest.raises(ValueError, match="axis 'x'"):
        BCAxis("x", lo, hi, bins)


def test_insertion_strictly_better_and_into_the_right_cell():
    a, b, c = make_archives(["a", "b", "c"], {s: (0, 1) for s in "abc"}, {s: 4 for s in "abc"})
    assert [x.skill for x in a.axes] == ["b", "c"] and b.quality_skill == "b"
    e1 = Elite("m1", {"a": 0.5, "b": 0.1, "c": 0.9})
    assert a.add(e1) and a.cell_of(e1.scores) == (0, 3)
    assert not a.add(Elite("m2", {"a": 0.5, "b": 0.2, "c": 0.8}))     # equal quality: incumbent stays
    assert a.add(Elite("m3", {"a": 0.6, "b": 0.2, "c": 0.8}))
    assert a.elites[(0, 3)].id == "m3" and len(a) == 1
    assert not a.add(Elite("m4", {"a": 0.55, "b": 0.2, "c": 0.8}))


def test_json_round_trip_and_metrics():
    from cycleqd.qd.metrics import archive_stats

    (a, *_rest) = make_archives(["a", "b"], {"a": (0, 1), "b": (0, 0.5)}, {"a": 5, "b": 5})
    for i, q in enumerate([0.1, 0.7, 0.4]):
        a.add(Elite(f"m{i}", {"a": q, "b": i * 0.2}, generation=i, parents=("x", "y")))
    back = GridArchive.from_json(a.to_json())
    assert back.to_json() == a.to_json()
    st = archive_stats(a)
    assert st["coverage"] == pytest.approx(3 / 5) and st["qd_score"] == pytest.approx(1.2)
    assert st["best_quality"] == pytest.approx(0.7)


@pytest.mark.parametrize("mode", ["cyclic", "single"])
def test_gate_snapshot_agrees_with_add(mode):
    """ArchiveGate.would_accept answers as add would have at snapshot time: over many random
    archives and children, with coarse scores so ties and empty cells both come up often."""
    import pickle

    import numpy as np

    from cycleqd.qd.archive import MEAN_QUALITY

    rng = np.random.default_rng(0)
    skills = ["a", "b", "c"]
    seen = {"tie": 0, "empty": 0, "accept": 0, "refuse": 0}
    for trial in range(200):
        if mode == "cyclic":
            arch = make_archives(skills, {s: (0, 1) for s in skills}, {s: 3 for s in skills})[trial % 3]
        else:
            arch = GridArchive(MEAN_QUALITY, tuple(BCAxis(s, 0.0, 1.0, 2) for s in skills))
        score = lambda: {s: float(rng.integers(0, 5)) / 4 for s in skills}   # noqa: E731
        for i in range(int(rng.integers(0, 8))):
            arch.add(Elite(f"e{i}", score()))
        gate = pickle.loads(pickle.dumps(arch.gate()))    # travels with a job
        for j in range(10):
            child = Elite(f"c{j}", score())
            inc = arch.elites.get(arch.cell_of(child.scores))
            if inc is None:
                seen["empty"] += 1
            elif arch.quality_of(inc.scores) == arch.quality_of(child.scores):
                seen["tie"] += 1
            expect = gate.would_accept(child.scores)
            trial_arch = GridArchive.from_json(arch.to_json())
            assert trial_arch.add(child) == expect
            seen["accept" if expect else "refuse"] += 1
    assert min(seen.values()) > 20, seen     # every case was exercised


def test_gate_is_immutable_and_does_not_follow_the_archive():
    import dataclasses

    a = make_archives(["a", "b"], {s: (0, 1) for s in "ab"}, {s: 2 for s in "ab"})[0]
    a.add(Elite("m1", {"a": 0.5, "b": 0.2}))
    gate = a.gate()
    assert gate.incumbents == (((0,), 0.5),)
    with pytest.raises(dataclasses.FrozenInstanceError):
        gate.incumbents = ()
    a.add(Elite("m2", {"a": 0.9, "b": 0.2}))
    assert gate.would_accept({"a": 0.7, "b": 0.1})          # as the archive was at gate()
    assert not a.gate().would_accept({"a": 0.7, "b": 0.1})

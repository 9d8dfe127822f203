import pytest

from cycleqd.qd.archive import Elite, make_archives
from cycleqd.qd.scheduler import CycleQDScheduler


def _sched(flip=1):
    archives = make_archives(["a", "b", "c"], {s: (0, 1) for s in "abc"}, {s: 5 for s in "abc"})
    s = CycleQDScheduler(archives, seed=3, flip_interval=flip)
    s.seed_archives([Elite(f"expert:{k}", {x: (0.9 if x == k else 0.1) for x in "abc"}) for k in "abc"])
    return s


@pytest.mark.parametrize("flip", [1, 2, 3])
def test_quality_skill_rotates(flip):
    s = _sched(flip)
    assert [s.quality_skill(g) for g in range(1, 10)] == [(g // flip) % 3 for g in range(1, 10)]


def test_ask_samples_two_distinct_parents_from_the_quality_archive_and_is_seeded():
    s1, s2 = _sched(), _sched()
    asks1 = []
    for g in range(1, 7):
        a = s1.ask(g)
        assert len(set(a.parents)) == 2 and a.skill == g % 3
        assert all(p in {e.id for _, e in s1.archives[a.skill]} for p in a.parents)
        s1.tell(g, Elite(f"g{g}", {"a": 0.5, "b": 0.5, "c": g / 10}, g, a.parents))
        asks1.append(a)
    asks2 = []
    for g in range(1, 7):
        a = s2.ask(g)
        s2.tell(g, Elite(f"g{g}", {"a": 0.5, "b": 0.5, "c": g / 10}, g, a.parents))
        asks2.append(a)
    assert asks1 == asks2


def test_tell_offers_the_child_to_every_archive():
    s = _sched()
    a = s.ask(1)
    entered = s.tell(1, Elite("g1", {"a": 0.5, "b": 0.5, "c": 0.5}, 1, a.parents))
    assert entered == ["a", "b", "c"]
    a = s.ask(2)
    entered = s.tell(2, Elite("g2", {"a": 0.6, "b": 0.4, "c": 0.5}, 2, a.parents))
    # same cell as g1 in archive b (a=0.6 and c=0.5 bins differ from g1? a: 0.6 -> bin 2, 0.5 -> bin 2)
    assert "a" in entered and "b" not in entered


def test_out_of_order_calls_are_refused():
    s = _sched()
    s.ask(1)
    with pytest.raises(RuntimeError, match="out of order"):
        s.ask(3)
    with pytest.raises(RuntimeError, match="without a matching"):
        s.tell(2, Elite("x", {"a": 0, "b": 0, "c": 0}))
    s.ask(2)                                   # two in flight is allowed (async executors)
    s.tell(1, Elite("g1", {"a": 0.2, "b": 0.2, "c": 0.2}))
    s.tell(2, Elite("g2", {"a": 0.3, "b": 0.2, "c": 0.2}))


@pytest.mark.parametrize("flip", [1, 2])
def test_ask_carries_the_mutation_basis_in_both_modes(flip):
    from cycleqd.qd.archive import MEAN_QUALITY, BCAxis, GridArchive

    cyc = _sched(flip)                         # cyclic: the basis is the archive's skill
    for g in range(1, 10):
        a = cyc.ask(g)
        assert a.basis == a.skill == (g // flip) % 3
        cyc.tell(g, None)
    single = GridArchive(MEAN_QUALITY, tuple(BCAxis(s, 0.0, 1.0, 3) for s in "abc"))
    s = CycleQDScheduler([single], seed=3, flip_interval=flip, num_skills=3)
    for k in "abc":
        s.tell_seed(Elite(f"expert:{k}", {x: (0.9 if x == k else 0.1) for x in "abc"}))
    asks = []
    for g in range(1, 10):
        asks.append(s.ask(g))
        s.tell(g, None)
    assert [a.skill for a in asks] == [0] * 9                       # one archive
    assert [a.basis for a in asks] == [(g // flip) % 3 for g in range(1, 10)]   # K bases in turn
    with pytest.raises(ValueError, match="num_skills"):
        CycleQDScheduler([single], seed=3, num_skills=0)


def test_seeds_enter_through_the_scheduler_before_the_first_ask():
    archives = make_archives(["a", "b", "c"], {s: (0, 1) for s in "abc"}, {s: 5 for s in "abc"})
    s = CycleQDScheduler(archives, seed=3)
    assert s.tell_seed(Elite("expert:a", {"a": 0.9, "b": 0.1, "c": 0.1})) == ["a", "b", "c"]
    assert s.tell_seed(Elite("expert:a2", {"a": 0.85, "b": 0.1, "c": 0.1})) == []   # same cells: worse or tied
    s.tell_seed(Elite("expert:b", {"a": 0.1, "b": 0.9, "c": 0.1}))
    s.ask(1)
    with pytest.raises(RuntimeError, match="tell_seed"):
        s.tell_seed(Elite("late", {"a": 0.5, "b": 0.5, "c": 0.5}))

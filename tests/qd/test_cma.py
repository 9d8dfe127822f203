"""CMA-ES operator-parameter policy (official ``qd.use_cma``, SakanaAI/CycleQD main.py)."""

import numpy as np
import pytest

from cycleqd.qd.archive import make_archives
from cycleqd.qd.cma import CMAParameterPolicy, OperatorParams, cma_fitness

CELLS = [(1, 2), (3, 4)]


@pytest.fixture()
def archives():
    return make_archives(["a", "b", "c"], {s: (0.0, 1.0) for s in "abc"}, {s: 8 for s in "abc"})


def _drive(policy, n, fit=lambda i: 0.1 * (i % 7)):
    out = []
    for i in range(n):
        out.append(policy.ask(i % 3, CELLS))
        policy.tell(i % 3, fit(i))
    return out


def test_seeded_and_leaves_the_global_generator_alone(archives):
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    a = _drive(CMAParameterPolicy(archives, seed=0), 60)
    assert (np.random.get_state()[1] == before).all()
    np.random.seed(7)   # the global generator does not matter
    assert _drive(CMAParameterPolicy(archives, seed=0), 60) == a
    assert _drive(CMAParameterPolicy(archives, seed=1), 60) != a
    assert len(set(a)) == 60 and all(isinstance(p, OperatorParams) for p in a)


def test_mapping_is_official_linear_map_without_bias(archives):
    # official main.py: params = (p1 ++ p2) / tile(grid_sizes, 2) @ solution.reshape(n_in, -1)
    p = CMAParameterPolicy(archives, seed=0)
    p._es[0].ask = lambda: [np.arange(12.0)] * 8
    got = p.ask(0, CELLS)   # x = [1, 2, 3, 4] / 8, W[i, j] = 3 i + j
    assert (got.mu, got.sigma, got.rate) == pytest.approx((60 / 8, 70 / 8, 80 / 8))
    assert got.crossover() == {"mu": got.mu, "sigma": got.sigma} and got.mutation() == {"rate": got.rate}
    assert p.n_in == [4, 4, 4]   # 4x3 matrix with K = 3 skills
    with pytest.raises(ValueError, match="parent cells"):
        p.ask(0, [(1, 2)])


def test_fitness_is_normalised_cell_plus_quality(archives):
    # archive a: BC axes b, c with 8 bins on [0, 1]; b=0.3 -> bin 2, c=0.9 -> bin 7
    assert cma_fitness(archives[0], {"a": 0.5, "b": 0.3, "c": 0.9}) == pytest.approx(2 / 8 + 7 / 8 + 0.5)
    assert cma_fitness(archives[0], None) == 0.0


def test_told_after_every_popsize_children_of_that_skill_negated(archives):
    p = CMAParameterPolicy(archives, seed=0)
    told = []
    real_tell = p._es[0].tell
    p._es[0].tell = lambda sols, fits: (told.append(list(fits)), real_tell(sols, fits))
    for i in range(8):
        assert p.ready(0)
        p.ask(0, CELLS)
        p.ask(1, CELLS)
        assert p.tell(1, 0.5) is (i == 7)   # skill 1 counts its own children
    assert not p.ready(0)
    with pytest.raises(RuntimeError, match="handed out"):
        p.ask(0, CELLS)
    assert [p.tell(0, 0.1 * i) for i in range(8)] == [False] * 7 + [True]
    assert told == [[-0.1 * i for i in range(8)]] and p._es[0].countiter == 1
    assert p._es[1].countiter == 1 and p._es[2].countiter == 0 and p.ready(0)
    with pytest.raises(RuntimeError, match="without an outstanding ask"):
        p.tell(0, 1.0)


def test_restore_replays_to_the_same_proposals(archives):
    full = CMAParameterPolicy(archives, seed=4, popsize=3)
    _drive(full, 20)   # mid-population for every skill
    again = CMAParameterPolicy(archives, seed=4, popsize=3)
    again.restore(full.to_json())
    assert [again.ask(k, CELLS) for k in (0, 1, 2)] == [full.ask(k, CELLS) for k in (0, 1, 2)]
    assert full.to_json()["fitnesses"][0] == [0.1 * (i % 7) for i in range(0, 20, 3)]
    with pytest.raises(ValueError, match="popsize"):
        CMAParameterPolicy(archives, seed=4, popsize=8).restore(full.to_json())

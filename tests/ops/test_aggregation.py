"""Model aggregation of the archives' best models."""

from __future__ import annotations

import pytest
import torch

from cycleqd.ops import AGGREGATIONS, DenseWeightSpace, SVDGenome, SVDGenomeWeightSpace, aggregate
from cycleqd.ops import make_crossover, make_mutation


@pytest.fixture()
def spaces(tiny_tensors, tmp_path):
    base, taus = tiny_tensors["base"], tiny_tensors["taus"]
    xo, mu = make_crossover("linear"), make_mutation("svd_expert", experts=taus, cache_dir=tmp_path)
    return DenseWeightSpace(base, taus, xo, mu), SVDGenomeWeightSpace(base, taus, xo, mu)


def _bests(space):
    e = space.expert_genomes()
    g = torch.Generator().manual_seed(0)
    child = space.mutate(space.crossover([e[0], e[1]], g), 2, g)
    return [child, e[1], e[2]]


def test_registry_names():
    assert {"paper", "quality", "weighted", "task_arithmetic", "ties", "dare_ties", "slerp"} <= set(AGGREGATIONS)


def test_paper_default_is_equal_weight_mean_in_both_spaces(spaces):
    dense, svd = spaces
    bd, bs = _bests(dense), _bests(svd)
    ad = aggregate(dense, bd, [0.5, 0.4, 0.3])
    as_ = aggregate(svd, bs, [0.5, 0.4, 0.3])
    assert isinstance(as_, SVDGenome)  # stays compact
    want = {k: sum(b[k] for b in bd) / 3 for k in bd[0]}
    wd, ws = dense.task_vector(ad), svd.task_vector(as_)
    for k in want:
        torch.testing.assert_close(wd[k], want[k])
        torch.testing.assert_close(ws[k], want[k], atol=1e-6, rtol=1e-5)


def test_quality_weighting(spaces):
    dense, _ = spaces
    b = _bests(dense)
    a = dense.task_vector(aggregate(dense, b, [0.6, 0.2, 0.2], method="quality"))
    k = next(iter(a))
    torch.testing.assert_close(a[k], 0.6 * b[0][k] + 0.2 * b[1][k] + 0.2 * b[2][k])


def test_ties_aggregate_is_dense_and_storable_in_svd_space(spaces, tmp_path):
    _, svd = spaces
    a = aggregate(svd, _bests(svd), [1, 1, 1], method="ties", density=0.5)
    assert isinstance(a, dict)
    p = tmp_path / "aggregate.genome.safetensors"
    svd.save(a, p)
    back = svd.load(p)
    w1, w2 = svd.materialize(a), svd.materialize(back)
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


def test_bad_aggregation_input(spaces):
    dense, _ = spaces
    with pytest.raises(ValueError, match="aggregation.name"):
        aggregate(dense, _bests(dense), method="best-of")
    with pytest.raises(ValueError, match="3 archives"):
        aggregate(dense, _bests(dense), method="weighted", weights=[1, 2])
    with pytest.raises(ValueError, match="qualities"):
        aggregate(dense, _bests(dense), [1.0], method="paper")

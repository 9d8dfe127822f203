import numpy as np
import pytest
from scipy import stats

from cycleqd.qd.archive import Elite, make_archives
from cycleqd.qd.sampling import sample_parents, selection_probabilities


def _archive(n=6):
    arch = make_archives(["q", "x", "y"], {s: (0, 1) for s in "qxy"}, {s: 10 for s in "qxy"})[0]
    rng = np.random.default_rng(1)
    for i in range(n):
        arch.add(Elite(f"m{i}", {"q": float(rng.uniform()), "x": (i + 0.5) / n, "y": float(rng.uniform())}))
    assert len(arch) == n
    return arch


def test_paper_probabilities_match_formula():
    arch = _archive()
    cells, p = selection_probabilities(arch, "elite")
    cols = [np.array([arch.elites[c].scores[k] for c in cells]) for k in "qxy"]
    expected = np.ones(len(cells))
    for col in cols:
        norm = 0.5 + 0.3 * (col - col.min()) / (col.max() - col.min())
        assert norm.min() == pytest.approx(0.5) and norm.max() == pytest.approx(0.8)
        expected *= norm
    np.testing.assert_allclose(p, expected / expected.sum())


def test_official_variant_spans_half_to_1_3_over_cells():
    arch = _archive()
    cells, p = selection_probabilities(arch, "elite_official")
    q = np.array([arch.elites[c].scores["q"] for c in cells])
    expected = 0.5 + (q - q.min()) * 0.8 / (q.max() - q.min())
    for i in range(2):
        ci = np.array([c[i] for c in cells], dtype=float)
        expected = expected * (np.ones_like(ci) if ci.min() == ci.max() else 0.5 + (ci - ci.min()) * 0.8 / (ci.max() - ci.min()))
    np.testing.assert_allclose(p, expected / expected.sum())
    assert p.max() / p.min() > 1.0


def test_first_parent_frequencies_match_probabilities_chi_square():
    arch = _archive()
    cells, p = selection_probabilities(arch, "elite")
    rng = np.random.default_rng(0)
    n = 6000
    counts = np.zeros(len(cells))
    index = {arch.elites[c].id: i for i, c in enumerate(cells)}
    for _ in range(n):
        first, second = sample_parents(arch, rng, n=2, scheme="elite")
        assert first.id != second.id
        counts[index[first.id]] += 1
    chi2, pval = stats.chisquare(counts, p * n)
    assert pval > 1e-3, (counts, p * n)
    # and it is not uniform: the best-scoring elite is drawn clearly more than the worst
    assert counts[p.argmax()] > 1.5 * counts[p.argmin()]


def test_uniform_and_degenerate_archives():
    arch = _archive(4)
    _, p = selection_probabilities(arch, "uniform")
    np.testing.assert_allclose(p, 0.25)
    one = make_archives(["q", "x"], {"q": (0, 1), "x": (0, 1)}, {"q": 3, "x": 3})[0]
    one.add(Elite("only", {"q": 0.3, "x": 0.3}))
    for scheme in ("elite", "elite_official", "uniform"):
        parents = sample_parents(one, np.random.default_rng(0), n=2, scheme=scheme)
        assert [e.id for e in parents] == ["only"]
    with pytest.raises(ValueError, match="unknown sampling scheme"):
        selection_probabilities(arch, "best")

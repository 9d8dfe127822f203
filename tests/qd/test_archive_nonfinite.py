"""Issue 18 item 3: a NaN/inf score never reaches an archive (it used to poison the cell,
the QD score and the sampling probabilities)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cycleqd.qd.archive import Elite, GridArchive, make_archives
from cycleqd.qd.metrics import archive_stats
from cycleqd.qd.sampling import selection_probabilities


def _archive():
    return make_archives(["a", "b", "c"], {s: (0.0, 1.0) for s in "abc"}, {s: 5 for s in "abc"})[0]


@pytest.mark.parametrize("scores,what", [
    ({"a": math.nan, "b": 0.5, "c": 0.5}, r"non-finite score a=nan"),
    ({"a": 0.5, "b": math.inf, "c": 0.5}, r"non-finite score b=inf"),
    ({"a": 0.5, "b": 0.5, "c": -math.inf}, r"non-finite score c=-inf"),
])
def test_add_refuses_non_finite_scores(scores, what):
    arch = _archive()
    arch.add(Elite("ok", {"a": 0.4, "b": 0.5, "c": 0.5}))
    with pytest.raises(ValueError, match=rf"archive 'a': model 'bad' has a {what}"):
        arch.add(Elite("bad", scores))
    assert [e.id for _, e in arch] == ["ok"]
    st = archive_stats(arch)
    assert all(math.isfinite(v) for v in st.values())
    _, p = selection_probabilities(arch)
    assert np.isfinite(p).all()


def test_cell_of_refuses_a_nan_bc():
    with pytest.raises(ValueError, match=r"BC score b=nan is not a finite number"):
        _archive().cell_of({"a": 0.1, "b": math.nan, "c": 0.2})


def test_from_json_refuses_a_nan_elite():
    arch = _archive()
    arch.add(Elite("x", {"a": 0.4, "b": 0.5, "c": 0.5}))
    d = arch.to_json()
    d["elites"][0]["scores"]["a"] = float("nan")
    with pytest.raises(ValueError, match=r"model 'x' has a non-finite score a=nan"):
        GridArchive.from_json(d)


def test_mean_quality_archive_refuses_nan_too():
    from cycleqd.qd.archive import MEAN_QUALITY, BCAxis

    arch = GridArchive(MEAN_QUALITY, (BCAxis("a", 0, 1, 4), BCAxis("b", 0, 1, 4)))
    with pytest.raises(ValueError, match="non-finite"):
        arch.add(Elite("m", {"a": 0.5, "b": math.nan}))

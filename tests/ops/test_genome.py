"""Compact SVD genomes: rebuilt weights equal the dense child; storage round trip; bytes."""

from __future__ import annotations

import pytest
import torch

from cycleqd.ops import DenseWeightSpace, SVDGenomeWeightSpace, make_crossover, make_mutation


def _spaces(tiny_tensors, tmp_path, **mut):
    base, taus = tiny_tensors["base"], tiny_tensors["taus"]
    xo = make_crossover({"name": "linear", "sigma": 0.05})
    mu = make_mutation({"name": "svd_expert", "rate": 0.1, **mut}, experts=taus, cache_dir=tmp_path)
    return DenseWeightSpace(base, taus, xo, mu), SVDGenomeWeightSpace(base, taus, xo, mu)


def _evolve(space, gens=6):
    """A fixed little lineage: parents from a growing pool, quality skill cycling."""
    pool = list(space.expert_genomes())
    K = len(pool)
    for g in range(gens):
        gen = torch.Generator().manual_seed(100 + g)
        i, j = (g * 2) % len(pool), (g * 2 + 1) % len(pool)
        child = space.mutate(space.crossover([pool[i], pool[j]], gen), g % K, gen)
        pool.append(child)
    return pool


@pytest.mark.parametrize("rank,method", [(None, "exact"), (3, "exact"), (3, "lowrank")])
def test_rebuilt_weights_equal_dense_child(tiny_tensors, tmp_path, rank, method):
    """Exact at full rank and, because the residual rides with c, under rank truncation."""
    dense, svd = _spaces(tiny_tensors, tmp_path, rank=rank, svd_method=method)
    pd, ps = _evolve(dense), _evolve(svd)
    for gd, gs in zip(pd, ps):
        wd, ws = dense.materialize(gd), svd.materialize(gs)
        assert max(float((wd[k] - ws[k]).abs().max()) for k in wd) <= 1e-5
    # the last children mix mutations from several experts' bases
    assert sum(bool(t.abs().sum(dim=1).ne(0).sum() > 1) for t in ps[-1].m.values()) > 0


def test_genome_save_load_roundtrip_and_size(tiny_tensors, tmp_path):
    _, svd = _spaces(tiny_tensors, tmp_path)
    child = _evolve(svd)[-1]
    p = tmp_path / f"child{svd.genome_suffix}"
    nbytes = svd.save(child, p)
    back = svd.load(p)
    torch.testing.assert_close(back.c, child.c)
    w1, w2 = svd.materialize(child), svd.materialize(back)
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    # size: K + K * sum(r) floats (+ header); far below a checkpoint
    n_coef = sum(t.numel() for t in child.m.values())
    assert nbytes < 4 * n_coef + 8 * 3 + 20_000
    assert nbytes < 0.1 * svd.checkpoint_nbytes()


def test_expert_and_base_genomes(tiny_tensors, tmp_path):
    dense, svd = _spaces(tiny_tensors, tmp_path)
    for k, g in enumerate(svd.expert_genomes()):
        tv = svd.task_vector(g)
        assert max(float((tv[n] - tiny_tensors["taus"][k][n]).abs().max()) for n in tv) == 0
    w = svd.materialize(svd.base_genome())
    assert all(torch.equal(w[n], tiny_tensors["base"][n]) for n in w)


def test_incompatible_operators_and_bad_files(tiny_tensors, tmp_path):
    base, taus = tiny_tensors["base"], tiny_tensors["taus"]
    with pytest.raises(ValueError, match="linear crossover"):
        SVDGenomeWeightSpace(base, taus, make_crossover({"name": "ties"}), make_mutation("none"))
    with pytest.raises(ValueError, match="svd_expert or none"):
        SVDGenomeWeightSpace(base, taus, make_crossover("linear"), make_mutation("gaussian"))
    _, svd = _spaces(tiny_tensors, tmp_path)
    bad = tmp_path / "bad.genome.safetensors"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="cannot read genome"):
        svd.load(bad)
    dense_file = tmp_path / "dense.safetensors"
    DenseWeightSpace(base, taus, make_crossover("linear"), make_mutation("none")).save(taus[0], dense_file)
    back = svd.load(dense_file)  # dense task vectors (aggregates) are accepted too
    assert isinstance(back, dict) and torch.equal(back[next(iter(back))], taus[0][next(iter(back))])


def test_dense_space_load_errors(tiny_tensors, tmp_path):
    dense, _ = _spaces(tiny_tensors, tmp_path)
    p = tmp_path / "x.safetensors"
    p.write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="cannot read"):
        dense.load(p)


def test_collect_garbage_keeps_referenced_and_live_writes(tmp_path):
    import os

    from cycleqd.ops.space import collect_garbage

    for n in ("a.genome.safetensors", "b.genome.safetensors", "c.genome.safetensors.tmp-999999999",
              f"d.genome.safetensors.tmp-{os.getpid()}", "notes.txt"):
        (tmp_path / n).write_text("x")
    gone = collect_garbage(tmp_path, [tmp_path / "a.genome.safetensors"], suffix=".genome.safetensors")
    assert sorted(p.name for p in gone) == ["b.genome.safetensors", "c.genome.safetensors.tmp-999999999"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "a.genome.safetensors", f"d.genome.safetensors.tmp-{os.getpid()}", "notes.txt"]


def test_experts_with_different_numerical_ranks(tmp_path):
    """Experts keep different numbers of SVD directions (LoRA ranks 2 and 5): genomes pad."""
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(12, 9, generator=g), "b": torch.randn(9, generator=g)}
    taus = [{"w": torch.randn(12, r, generator=g) @ torch.randn(r, 9, generator=g) * 0.1,
             "b": torch.randn(9, generator=g) * 0.1} for r in (2, 5)]
    xo = make_crossover("linear")
    mu = make_mutation({"name": "svd_expert", "rate": 0.3}, experts=taus)
    dense, svd = DenseWeightSpace(base, taus, xo, mu), SVDGenomeWeightSpace(base, taus, xo, mu)
    assert [mu.basis(k)["w"][1].numel() for k in (0, 1)] == [2, 5]
    pd, ps = _evolve(dense, 8), _evolve(svd, 8)
    for gd, gs in zip(pd, ps):
        wd, ws = dense.materialize(gd), svd.materialize(gs)
        assert max(float((wd[k] - ws[k]).abs().max()) for k in wd) <= 1e-6
    p = tmp_path / "x.genome.safetensors"
    svd.save(ps[-1], p)
    assert all(torch.equal(a, b) for a, b in zip(svd.materialize(svd.load(p)).values(),
                                                 svd.materialize(ps[-1]).values()))

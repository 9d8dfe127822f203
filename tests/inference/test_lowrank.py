"""Low-rank children: the factored forward gives the materialised child's logits, per row."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from cycleqd.inference.lowrank import LowRankChildren
from cycleqd.models.tiny import make_tiny_expert, make_tiny_llama, make_tiny_qwen2
from cycleqd.ops import DenseWeightSpace, SVDGenomeWeightSpace, make_crossover, make_mutation


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def models(request, tmp_path_factory):
    """Tiny base (Llama untied / Qwen2 tied with q/k/v biases) and three experts: two
    LoRA-like (rank 3) and one full fine-tune (dense full-rank delta on every tensor)."""
    root = tmp_path_factory.mktemp(f"lowrank-{request.param}")
    make = make_tiny_llama if request.param == "llama" else make_tiny_qwen2
    base_dir = make(root / "base", seed=0, hidden_size=32, num_layers=2, vocab_size=320)
    base = load_file(str(base_dir / "model.safetensors"))
    taus = []
    for i in range(2):
        e = load_file(str(make_tiny_expert(base_dir, root / f"e{i}", seed=10 + i, rank=3, scale=0.05)
                          / "model.safetensors"))
        taus.append({k: e[k].float() - base[k].float() for k in base})
    g = torch.Generator().manual_seed(7)
    taus.append({k: torch.randn(v.shape, generator=g) * 0.02 for k, v in base.items()})
    model = AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32).eval()
    ref = AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32).eval()
    return {"base": base, "taus": taus, "model": model, "ref": ref}


def _space(models, kind, tmp_path):
    xo = make_crossover({"name": "linear", "sigma": 0.05})
    base, taus = models["base"], models["taus"]
    if kind == "dense":
        mu = make_mutation({"name": "svd_expert", "rate": 0.1}, experts=taus, cache_dir=tmp_path)
        return DenseWeightSpace(base, taus, xo, mu)
    if kind == "none":
        return SVDGenomeWeightSpace(base, taus, xo, make_mutation("none"))
    rank = {"full": None, "trunc": 2}[kind]
    mu = make_mutation({"name": "svd_expert", "rate": 0.5, "rank": rank}, experts=taus, cache_dir=tmp_path)
    return SVDGenomeWeightSpace(base, taus, xo, mu)


def _children(space):
    """expert, crossover, mutation, crossover+mutation, and a grandchild of those."""
    g = torch.Generator().manual_seed(3)
    e = space.expert_genomes()
    x = space.crossover([e[0], e[1]], g)
    m = space.mutate(e[2], 0, g)
    xm = space.mutate(space.crossover([e[1], e[2]], g), 1, g)
    gc = space.mutate(space.crossover([xm, m], g), 2, g)
    return {"expert": e[1], "crossover": x, "mutation": m, "crossover+mutation": xm, "grandchild": gc}


def _ref_logits(models, space, genome, ids):
    missing, unexpected = models["ref"].load_state_dict(space.materialize(genome), strict=False)
    assert not unexpected
    with torch.no_grad():
        return models["ref"](ids).logits


def _close(a, b):
    scale = float(b.abs().max())
    return float((a - b).abs().max()) <= 1e-4 * scale, float((a - b).abs().max()) / scale


IDS = torch.randint(0, 320, (1, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kind", ["full", "trunc", "none", "dense"])
def test_logits_equal_materialised_child(models, kind, tmp_path):
    space = _space(models, kind, tmp_path)
    kids = _children(space)
    with LowRankChildren(models["model"], space) as lr:
        for what, genome in kids.items():
            lr.set_children([genome])
            with torch.no_grad():
                got = models["model"](IDS).logits
            ok, rel = _close(got, _ref_logits(models, space, genome, IDS))
            assert ok, f"{kind}/{what}: rel err {rel:.2e}"
    with torch.no_grad():   # leaving the context restores the base forward
        base_logits = models["model"](IDS).logits
    assert _close(base_logits, _ref_logits(models, space, space.base_genome(), IDS))[0]


@pytest.mark.parametrize("kind", ["full", "trunc", "dense"])
def test_mixed_batch_rows_get_their_own_child(models, kind, tmp_path):
    space = _space(models, kind, tmp_path)
    kids = list(_children(space).values())[1:4]
    ids = torch.randint(0, 320, (4, 10), generator=torch.Generator().manual_seed(1))
    rows = [2, 0, 1, 2]
    with LowRankChildren(models["model"], space) as lr:
        lr.set_children(kids, rows=rows)
        with torch.no_grad():
            got = models["model"](ids).logits
        with pytest.raises(ValueError, match="batch has 1 rows"):
            models["model"](ids[:1])
    for b, c in enumerate(rows):
        ok, rel = _close(got[b], _ref_logits(models, space, kids[c], ids[b:b + 1])[0])
        assert ok, f"row {b} (child {c}): rel err {rel:.2e}"
    # the children really differ, so the test can tell rows apart
    assert not _close(got[1], got[2])[0]


def test_greedy_generation_equal(models, tmp_path):
    space = _space(models, "trunc", tmp_path)
    kids = list(_children(space).values())[2:5]
    prompt = torch.randint(0, 320, (3, 6), generator=torch.Generator().manual_seed(2))
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with LowRankChildren(models["model"], space) as lr, torch.no_grad():
        lr.set_children(kids)
        got = models["model"].generate(prompt, attention_mask=torch.ones_like(prompt), **kw)
    for b, kid in enumerate(kids):
        models["ref"].load_state_dict(space.materialize(kid), strict=False)
        with torch.no_grad():
            want = models["ref"].generate(prompt[b:b + 1], attention_mask=torch.ones_like(prompt[b:b + 1]), **kw)
        assert torch.equal(got[b], want[0])


def test_factored_where_it_pays_and_bad_input(models, tmp_path):
    """LoRA experts ride as rank-3 factors; the full fine-tune (no basis) is applied densely;
    a rank-2 basis keeps the residual; a foreign model is refused."""
    lr = LowRankChildren(models["model"], _space(models, "none", tmp_path))
    f = lr.linears["model.layers.0.self_attn.q_proj"][1]
    assert [(k, r) for k, _, r in f.spans] == [(0, 3), (1, 3)] and set(f.dense_c) == {2} and not f.resid
    tr = LowRankChildren(models["model"], _space(models, "trunc", tmp_path))
    f = tr.linears["model.layers.0.self_attn.q_proj"][1]
    assert [r for _, _, r in f.spans] == [2, 2, 2] and set(f.resid) == {0, 1, 2}
    with pytest.raises(ValueError, match="rows must index"):
        tr.set_children([tr.space.base_genome()], rows=[1])
    other = AutoModelForCausalLM.from_config(models["model"].config)
    other.add_module("extra", torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="'extra.weight' has no tensor"):
        LowRankChildren(other, tr.space)

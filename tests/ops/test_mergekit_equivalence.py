"""Our crossover operators against mergekit on the same tiny models (fp32, |diff| <= 1e-5).

mergekit (test-only dependency) runs in-process on the models' HF folders; we merge the
same models' task vectors with cycleqd operators and compare the full weights tensor by
tensor. DARE is random: mergekit's Bernoulli draw is replaced by the masks our operator
drew, so both sides prune the same entries.
"""

from __future__ import annotations

import glob
from pathlib import Path

import pytest
import torch

mergekit = pytest.importorskip("mergekit")

from mergekit.config import MergeConfiguration  # noqa: E402
from mergekit.merge import run_merge  # noqa: E402
from mergekit.options import MergeOptions  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from cycleqd.ops import make_crossover  # noqa: E402

TOL = 1e-5


def run_mergekit(cfg: dict, out: Path) -> dict:
    run_merge(MergeConfiguration.model_validate(cfg), str(out),
              MergeOptions(copy_tokenizer=False, quiet=True, write_model_card=False))
    sd = {}
    for f in glob.glob(str(out / "*.safetensors")):
        sd.update(load_file(f))
    return sd


def ours(op_spec: dict, tiny_tensors, parents=(0, 1, 2), seed=0):
    base = tiny_tensors["base"]
    op = make_crossover(op_spec, base=base)
    tau = op([tiny_tensors["taus"][i] for i in parents], generator=torch.Generator().manual_seed(seed))
    return op, {k: base[k].float() + tau[k] for k in base}


def mk_models(tiny_dirs, weights, **params):
    return [{"model": str(e), "parameters": {"weight": w, **params}}
            for e, w in zip(tiny_dirs["experts"], weights)]


W = [0.5, 0.8, 1.1]


@pytest.mark.parametrize("normalize,lam", [(False, 1.0), (True, 1.0), (False, 0.7)])
def test_task_arithmetic_matches_mergekit(tiny_dirs, tiny_tensors, tmp_path, mad, normalize, lam):
    ref = run_mergekit({"merge_method": "task_arithmetic", "base_model": str(tiny_dirs["base"]),
                        "dtype": "float32", "models": mk_models(tiny_dirs, W),
                        "parameters": {"normalize": normalize, "lambda": lam}}, tmp_path)
    _, mine = ours({"name": "task_arithmetic", "weights": W, "normalize": normalize, "lambda": lam},
                   tiny_tensors)
    assert mad(mine, ref) <= TOL


def test_linear_crossover_matches_mergekit_linear(tiny_dirs, tiny_tensors, tmp_path, mad):
    """CycleQD's model-wise linear merge == mergekit ``linear`` of the full models with the
    (normalised) weights our operator drew."""
    op = make_crossover({"name": "linear", "sigma": 0.3})
    w = op.merge_weights(2, torch.Generator().manual_seed(3))
    assert abs(sum(w) - 1) < 1e-12 and w[0] != w[1]
    ref = run_mergekit({"merge_method": "linear", "dtype": "float32",
                        "models": mk_models(tiny_dirs, w)[:2]}, tmp_path)
    _, mine = ours({"name": "linear", "sigma": 0.3}, tiny_tensors, parents=(0, 1), seed=3)
    assert mad(mine, ref) <= TOL


@pytest.mark.parametrize("density,lam", [(0.5, 1.0), (0.2, 0.9)])
def test_ties_matches_mergekit(tiny_dirs, tiny_tensors, tmp_path, mad, density, lam):
    ref = run_mergekit({"merge_method": "ties", "base_model": str(tiny_dirs["base"]), "dtype": "float32",
                        "models": mk_models(tiny_dirs, W, density=density),
                        "parameters": {"lambda": lam}}, tmp_path)
    _, mine = ours({"name": "ties", "weights": W, "density": density, "lambda": lam}, tiny_tensors)
    assert mad(mine, ref) <= TOL


@pytest.mark.parametrize("method", ["dare", "dare_ties"])
def test_dare_matches_mergekit_given_same_mask(tiny_dirs, tiny_tensors, tmp_path, mad, monkeypatch, method):
    import mergekit.sparsify as sp

    op, mine = ours({"name": method, "weights": W, "density": 0.6, "keep_masks": True}, tiny_tensors, seed=5)
    taus = tiny_tensors["taus"]
    masks = {}
    for (name, i), keep in op.last_masks.items():
        masks[(tuple(taus[i][name].shape), taus[i][name].numpy().tobytes())] = keep
    used = []

    def bernoulli_with_our_mask(tensor, density, rescale_norm=None):
        keep = masks[(tuple(tensor.shape), tensor.float().numpy().tobytes())]
        used.append(1)
        return sp.rescaled_masked_tensor(tensor.float(), keep.to(torch.float32), rescale_norm)

    monkeypatch.setattr(sp, "bernoulli", bernoulli_with_our_mask)
    ref = run_mergekit({"merge_method": "dare_linear" if method == "dare" else "dare_ties",
                        "base_model": str(tiny_dirs["base"]), "dtype": "float32",
                        "models": mk_models(tiny_dirs, W, density=0.6)}, tmp_path)
    assert len(used) == 3 * len(tiny_tensors["base"])  # every tensor of every model
    assert mad(mine, ref) <= TOL
    # and the masks really dropped ~40 % of the entries
    kept = torch.cat([m.flatten().float() for m in op.last_masks.values()]).mean()
    assert 0.5 < float(kept) < 0.7


@pytest.mark.parametrize("t", [0.3, 0.75])
def test_slerp_matches_mergekit(tiny_dirs, tiny_tensors, tmp_path, mad, t):
    e0, e1 = (str(p) for p in tiny_dirs["experts"][:2])
    ref = run_mergekit({"merge_method": "slerp", "base_model": e0, "dtype": "float32",
                        "models": [{"model": e0}, {"model": e1}], "parameters": {"t": t}}, tmp_path)
    _, mine = ours({"name": "slerp", "t": t}, tiny_tensors, parents=(0, 1))
    assert mad(mine, ref) <= TOL

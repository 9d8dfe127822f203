"""Issue 18 item 3: an expert or base with one NaN/inf/3e38 weight is refused at load time,
naming the model and the tensor, before any task vector, SVD or merge is computed."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from cycleqd.models.build import build_weight_space
from cycleqd.models.sources import ModelLoadError
from cycleqd.models.validate import MAX_ABS_WEIGHT, check_finite

XO, MU = {"name": "linear"}, {"name": "svd_expert", "rate": 0.1}
TENSOR = "model.layers.1.mlp.up_proj.weight"


def _corrupt(src, dst, name, value, index=7):
    shutil.copytree(src, dst)
    f = dst / "model.safetensors"
    sd = load_file(str(f))
    sd[name].view(-1)[index] = value
    save_file(sd, str(f), metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("value,what", [(math.nan, "1 NaN"), (math.inf, "1 inf"), (-math.inf, "1 inf"),
                                        (3e38, r"1 beyond \+-65504 \(max \|w\| 3e\+38\)")])
def test_expert_with_one_bad_weight_is_refused_naming_the_tensor(llama, tmp_path, value, what):
    bad = _corrupt(llama["experts"][1], tmp_path / "bad", TENSOR, value)
    with pytest.raises(ModelLoadError, match=rf"^expert 1 \(.*bad\): tensor '{TENSOR}' is not finite: "
                                             rf"{what}; first at flat index 7"):
        build_weight_space(str(llama["base"]), [str(llama["experts"][0]), str(bad)], XO, MU,
                           cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache" / "svd").exists()  # refused before any SVD was computed


def test_base_with_a_nan_weight_is_refused(llama, tmp_path):
    bad = _corrupt(llama["base"], tmp_path / "badbase", "model.embed_tokens.weight", math.nan, 0)
    with pytest.raises(ModelLoadError, match=r"^base .*badbase: tensor 'model.embed_tokens.weight' is not finite"):
        build_weight_space(str(bad), [str(e) for e in llama["experts"]], XO, MU, cache_dir=tmp_path / "cache")


def test_fp16_expert_with_inf_is_refused(llama, tmp_path):
    bad = tmp_path / "fp16"
    shutil.copytree(llama["experts"][0], bad)
    f = bad / "model.safetensors"
    sd = {k: v.half() for k, v in load_file(str(f)).items()}
    sd[TENSOR].view(-1)[2] = float("inf")
    save_file(sd, str(f), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=rf"tensor '{TENSOR}' is not finite: 1 inf"):
        build_weight_space(str(llama["base"]), [str(bad)], XO, MU, cache_dir=tmp_path / "cache")


def test_lora_adapter_with_nan_factor_is_refused(llama, lora_dir, tmp_path):
    bad = tmp_path / "badlora"
    shutil.copytree(lora_dir, bad)
    f = bad / "adapter_model.safetensors"
    sd = load_file(str(f))
    k = next(k for k in sorted(sd) if "lora_B" in k)
    sd[k].view(-1)[0] = float("nan")
    save_file(sd, str(f), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=rf"tensor '{k}' is not finite: 1 NaN"):
        build_weight_space(str(llama["base"]), [str(bad)], XO, MU, cache_dir=tmp_path / "cache")


def test_check_finite_bound_is_the_float16_range():
    assert MAX_ABS_WEIGHT == 65504.0
    check_finite({"w": torch.tensor([65504.0, -65504.0, 1.0])}, "m")     # the fp16 range is fine
    check_finite({"ids": torch.tensor([2**40])}, "m")                    # integer buffers skipped
    with pytest.raises(ModelLoadError, match=r"^m: tensor 'w' is not finite: 1 beyond"):
        check_finite({"w": torch.tensor([1.0, 70000.0])}, "m")
    # a NaN at the end of a large tensor is found
    big = torch.zeros((1 << 24) + 5)
    big[-1] = float("nan")
    with pytest.raises(ModelLoadError, match=r"1 NaN; first at flat index 16777220"):
        check_finite({"big": big}, "m")


def test_stream_merge_refuses_output_that_overflows_the_dtype(llama, tmp_path):
    """Merged weights cast to float16 must stay finite (tensor named, nothing written)."""
    from cycleqd.engine.export import stream_merge

    big = _corrupt(llama["experts"][0], tmp_path / "big", TENSOR, 60000.0)
    with pytest.raises(ValueError, match=rf"merged tensor '{TENSOR}' is not finite in torch.float16"):
        stream_merge(str(llama["base"]), [str(big), str(big)], {"name": "task_arithmetic"},
                     tmp_path / "out", cache_dir=tmp_path / "cache", dtype=torch.float16)
    assert not (tmp_path / "out").exists()

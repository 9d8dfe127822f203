"""VLLMBackend: in-place weight-swap logic on a stand-in engine (CPU), and the real engine
on a GPU (skipped cleanly where vLLM or CUDA is absent)."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest
import torch

from cycleqd.inference.vllm_backend import (
    VLLMBackend,
    find_engine_model,
    safetensors_shapes,
)


class _FakeVLLMModel(torch.nn.Module):
    """Mimics a vLLM model: fused qkv parameter, HF-named ``load_weights``."""

    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Parameter(torch.zeros(6, 2))
        self.norm = torch.nn.Parameter(torch.zeros(2))
        self.calls = 0

    def load_weights(self, weights):
        self.calls += 1
        loaded = set()
        for name, t in weights:
            if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")):
                k = "qkv"[["q", "k", "v"].index(name.split(".")[-2][0])]
                off = {"q": 0, "k": 2, "v": 4}[k]
                self.qkv.data[off:off + 2].copy_(t)
            else:
                self.norm.data.copy_(t)
            loaded.add(name)
        return loaded


SHAPES = {"q_proj.weight": (2, 2), "k_proj.weight": (2, 2), "v_proj.weight": (2, 2),
          "norm.weight": (2,)}


def _engine(path: str):
    model = _FakeVLLMModel()
    resets = []
    node = model
    for name in reversed(path.split(".")):
        node = SimpleNamespace(**{name: node})
    node.reset_prefix_cache = lambda: resets.append(1)
    return node, model, resets


@pytest.mark.parametrize("path", [
    "llm_engine.model_executor.driver_worker.worker.model_runner.model",
    "llm_engine.model_executor.driver_worker.model_runner.model",
    "llm_engine.driver_worker.model_runner.model",
])
def test_in_place_swap_reaches_engine_model(path):
    llm, model, resets = _engine(path)
    assert find_engine_model(llm) is model
    be = VLLMBackend(None, llm=llm, reference_shapes=SHAPES, fingerprint="base")
    qkv_ptr = model.qkv.data_ptr()
    sd = {"q_proj.weight": torch.ones(2, 2), "k_proj.weight": 2 * torch.ones(2, 2),
          "v_proj.weight": 3 * torch.ones(2, 2), "norm.weight": torch.tensor([5.0, 6.0])}
    be.load_weights(sd, fingerprint="child-7")
    assert model.calls == 1 and model.qkv.data_ptr() == qkv_ptr
    assert model.qkv[:, 0].tolist() == [1, 1, 2, 2, 3, 3] and model.norm.tolist() == [5, 6]
    assert resets == [1], "the prefix cache must be reset after a swap"
    assert be.fingerprint == "child-7" and be.last_swap_s is not None


def test_rpc_path_when_model_is_out_of_process():
    calls = []
    llm = SimpleNamespace(collective_rpc=lambda fn, args=(): calls.append((fn, args)),
                          reset_prefix_cache=lambda: calls.append("reset"))
    be = VLLMBackend(None, llm=llm, reference_shapes=SHAPES)
    sd = {k: torch.zeros(v) for k, v in SHAPES.items()}
    be.load_weights(sd, fingerprint="c")
    fn, args = calls[0]
    assert fn.__name__ == "_rpc_load_weights" and dict(args[0]).keys() == sd.keys()
    assert calls[1] == "reset"
    # the worker-side function loads through the model's load_weights
    worker_model = _FakeVLLMModel()
    assert fn(SimpleNamespace(model_runner=SimpleNamespace(model=worker_model)), args[0]) == 4


def test_bad_weights_rejected_before_engine_is_touched():
    llm, model, resets = _engine("llm_engine.model_executor.driver_worker.worker.model_runner.model")
    be = VLLMBackend(None, llm=llm, reference_shapes=SHAPES, fingerprint="base")
    with pytest.raises(ValueError, match="shape"):
        be.load_weights({**{k: torch.zeros(v) for k, v in SHAPES.items()},
                         "norm.weight": torch.zeros(3)}, fingerprint="x")
    with pytest.raises(ValueError, match="missing"):
        be.load_weights({"norm.weight": torch.zeros(2)}, fingerprint="x")
    assert model.calls == 0 and resets == [] and be.fingerprint == "base"


def test_shapes_from_checkpoint_and_constructor_errors(tiny_llama_dirs):
    shapes = safetensors_shapes(tiny_llama_dirs[0])
    assert shapes["model.embed_tokens.weight"][1] == 64
    with pytest.raises(ValueError, match="model_path or reference_shapes"):
        VLLMBackend(None, llm=object())


_HAS_VLLM = importlib.util.find_spec("vllm") is not None
_HAS_CUDA = torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not (_HAS_VLLM and _HAS_CUDA), reason="needs vllm and a CUDA GPU")
def test_real_engine_swap_matches_hf(tiny_llama_dirs, convs):
    """On a GPU: vLLM greedy agrees with HF greedy for the base, and after an in-place swap
    to other weights vLLM gives that model's replies (no engine restart). Random tiny models
    have flat logits, so kernels may flip a near tie: agreement is counted per prompt."""
    from safetensors.torch import load_file

    from cycleqd.inference import HFBackend

    def agree(x, y):
        return sum(u == v for u, v in zip(x, y))

    a, b = tiny_llama_dirs
    be = VLLMBackend(a, dtype="float32", gpu_memory_utilization=0.2, max_model_len=1024)
    ref_a = HFBackend.from_pretrained(a, device="cuda").generate(convs, max_new_tokens=12)
    ref_b = HFBackend.from_pretrained(b, device="cuda").generate(convs, max_new_tokens=12)
    assert agree(ref_a, ref_b) <= 1
    n = len(convs)
    assert agree(be.generate(convs, max_new_tokens=12), ref_a) >= n - 2
    be.load_weights(load_file(str(b / "model.safetensors")), fingerprint="b")
    out_b = be.generate(convs, max_new_tokens=12)
    assert agree(out_b, ref_b) >= n - 2 and agree(out_b, ref_a) <= 2
    be.load_weights(load_file(str(a / "model.safetensors")), fingerprint="a")
    assert agree(be.generate(convs, max_new_tokens=12), ref_a) >= n - 2

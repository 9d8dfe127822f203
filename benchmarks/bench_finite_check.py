"""Cost of the per-child non-finite weight check (issue 18 item 3) on SmolLM2-135M-shaped
weights (random, 134.5M parameters, 211 tensors), fp32 and bf16.

    PYTHONPATH=$PWD python benchmarks/bench_finite_check.py

Prints min / median seconds of ``cycleqd.engine.step.non_finite_weights`` over 7 calls and
the CPU model (``lscpu``)."""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

from cycleqd.engine.step import non_finite_weights

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._machine import describe, load  # noqa: E402


def smollm2_shaped() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    w = {"model.embed_tokens.weight": torch.randn(49152, 576, generator=g)}
    shapes = {"q_proj": (576, 576), "k_proj": (192, 576), "v_proj": (192, 576), "o_proj": (576, 576),
              "gate_proj": (1536, 576), "up_proj": (1536, 576), "down_proj": (576, 1536)}
    for layer in range(30):
        for n, s in shapes.items():
            w[f"model.layers.{layer}.{n}.weight"] = torch.randn(*s, generator=g)
    return w


def main() -> None:
    cpu = describe()
    w = smollm2_shaped()
    n = sum(t.numel() for t in w.values())
    print(f"CPU: {cpu}; {load()}; torch threads {torch.get_num_threads()}; {n / 1e6:.1f}M parameters, {len(w)} tensors")
    for dt in (torch.float32, torch.bfloat16):
        ww = {k: v.to(dt) for k, v in w.items()}
        non_finite_weights(ww)
        ts = []
        for _ in range(7):
            t = time.perf_counter()
            assert non_finite_weights(ww) is None
            ts.append(time.perf_counter() - t)
        print(f"{str(dt):>15}: min {min(ts):.3f} s, median {statistics.median(ts):.3f} s per child")


if __name__ == "__main__":
    main()

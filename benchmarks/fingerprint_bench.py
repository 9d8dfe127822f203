"""What keying the sample cache by content costs (issue 12, item 4).

Prints, measured on this machine:

* ``fingerprint_state_dict`` of a SmolLM2-135M-shaped state dict (30 layers, hidden 576,
  vocab 49152, tied embeddings: 134.5 M parameters) in fp32 and bf16 -- the engine pays this
  once per evaluated model (seed or child, :func:`cycleqd.engine.step.score_child`);
* ``item_keys`` of every item of the DB-Bench, OS and MBPP files (paid once per skill
  evaluation, when the data is present);
* ``backend_key`` of an ``HFBackend`` (first call: hashes the tokenizer; later calls: memo).

    python benchmarks/fingerprint_bench.py            # ~20 s on 2 cores
"""

from __future__ import annotations

import time
import sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._machine import describe, load as load_avg  # noqa: E402


def _best(fn, repeat: int = 3) -> float:
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return min(ts)


def main() -> None:

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from cycleqd.inference.fingerprint import fingerprint_state_dict

    print(f"CPU: {describe()}; torch {torch.__version__}; {load_avg()}")
    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                      tie_word_embeddings=True, max_position_embeddings=2048)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(cfg).state_dict().items()
                  if k != "lm_head.weight"}
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    n = sum(v.numel() for v in sd.values())
    for dt in (torch.float32, torch.bfloat16):
        s = {k: v.to(dt) for k, v in sd.items()}
        mb = sum(v.numel() * v.element_size() for v in s.values()) / 1e6
        t = _best(lambda: fingerprint_state_dict(s))
        print(f"fingerprint_state_dict SmolLM2-135M shape ({n / 1e6:.1f} M params, {dt}, "
              f"{mb:.0f} MB): {t:.3f} s ({mb / 1e3 / t:.2f} GB/s)")

    from cycleqd.skills.cache import backend_key, item_keys
    loaders = []
    try:
        from cycleqd.skills.agentbench.data import load_dbbench, load_os
        loaders += [("DB-Bench all", lambda: load_dbbench(split="all")),
                    ("OS training all", lambda: load_os(split="all"))]
    except ImportError:  # pragma: no cover
        pass
    from cycleqd.skills.coding.data import load_code_problems
    loaders.append(("MBPP all", lambda: load_code_problems("mbpp", None, "all", None)))
    for name, load in loaders:
        try:
            items = load()
        except (FileNotFoundError, ValueError) as e:
            print(f"item_keys {name}: skipped ({e})")
            continue
        t = _best(lambda: item_keys(items))
        print(f"item_keys {name} ({len(items)} items): {t * 1e3:.1f} ms")

    import tempfile

    from cycleqd.inference import HFBackend
    from cycleqd.models.tiny import make_tiny_llama
    with tempfile.TemporaryDirectory() as d:
        be = HFBackend.from_pretrained(make_tiny_llama(f"{d}/m", seed=0), fingerprint="w")
        t = time.perf_counter()
        backend_key(be)
        first = time.perf_counter() - t
        later = _best(lambda: backend_key(be))
        print(f"backend_key HFBackend (tiny model): first {first * 1e3:.1f} ms, "
              f"later {later * 1e3:.2f} ms")


if __name__ == "__main__":
    main()

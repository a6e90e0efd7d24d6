#!/usr/bin/env bash
# Serving capacity (conf/experiment/capacity.yaml: LLaMA-7B, MHA vs CHAI's two 7B lists; capacity_33b.yaml: LLaMA-33B,
# MHA vs the 33B list) on the offline GPU machine, after `source scripts/gpu_setup.sh`; run from anywhere. Extra
# arguments are Hydra overrides of each experiment:
#   bash scripts/gpu_capacity.sh                              # both experiments, 7B first
#   EXPERIMENTS=capacity_33b bash scripts/gpu_capacity.sh     # one of them
#   bash scripts/gpu_capacity.sh 'capacity.seq_lens=[2048]'   # fewer cells
# Writes $OUT/results/capacity/runs.jsonl (copy it to results/capacity/runs.jsonl of the repository), $OUT/capacity.log
# and $OUT/capacity_table.md. Records accumulate in RESULTS (default outputs/gpu_capacity, git-ignored: kept on a warm
# machine between calls) and finished cells are reused, so a call cut short by BUDGET_S (default 540 s for all the
# experiments together) goes on in the next; a cell cut short is searched again from its start.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out} RESULTS=${RESULTS:-$PWD/outputs/gpu_capacity} PY=${PYTHON:-python3}
# Expandable segments unless the caller chose an allocator setting: without them the first H200 run ran out of
# memory at 82 sequences though 81 peaked ~20 GB below the budget, most likely segments split between prefill tensors
# of different sizes, so fragmentation, not the K,V cache, decided the batch. Each cell records the setting
# (capacity.allocator_env) and is keyed by it.
if [[ -z "${PYTORCH_ALLOC_CONF:-}${PYTORCH_CUDA_ALLOC_CONF:-}" ]]; then
  export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
fi
mkdir -p "$OUT/results" "$RESULTS/capacity"
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv 2>&1 | tee -a "$OUT/capacity.log"
echo "allocator: PYTORCH_ALLOC_CONF=${PYTORCH_ALLOC_CONF:-} PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-}" \
  | tee -a "$OUT/capacity.log"
deadline=$(( $(date +%s) + ${BUDGET_S:-540} ))
for experiment in ${EXPERIMENTS:-capacity capacity_33b}; do
  left=$(( deadline - $(date +%s) ))
  if (( left < 60 )); then echo "budget spent: $experiment not started" | tee -a "$OUT/capacity.log"; break; fi
  timeout --signal=INT "$left" "$PY" run.py "experiment=$experiment" "results_dir=$RESULTS" \
    logger.wandb.mode=disabled "hydra.sweep.dir=$RESULTS/hydra/$experiment" "$@" 2>&1 | tee -a "$OUT/capacity.log"
done
cp -r "$RESULTS/capacity" "$OUT/results/"
touch "$RESULTS/capacity/runs.jsonl"
"$PY" -m chai.report.capacity_table "$RESULTS/capacity/runs.jsonl" > "$OUT/capacity_table.md"
echo "table: $OUT/capacity_table.md"; head -8 "$OUT/capacity_table.md"

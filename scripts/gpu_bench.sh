#!/usr/bin/env bash
# The latency and K,V-memory grid (conf/experiment/bench_{smoke,core,full}.yaml: the grid and the method sweep) on
# the offline GPU machine, after `source scripts/gpu_setup.sh`; run from anywhere. Extra arguments are Hydra
# overrides of the experiment:
#   GRID=smoke bash scripts/gpu_bench.sh     # batch 1 x seq 256: checks the machine and every path in ~2 minutes
#   GRID=core bash scripts/gpu_bench.sh      # batch 1/8/16 x seq 2048/4096: the cells the README's targets name
#   bash scripts/gpu_bench.sh                # GRID=full: batch 1/8/16 x seq 256..4096
#   GRID=core bash scripts/gpu_bench.sh model=llama33b bench/method=chai method.layer_clusters=llama33b \
#       'bench.batch_sizes=[1,8]'            # one method on another model (bench.static_step=eager over 2 GPUs)
#   PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True GRID=core bash scripts/gpu_bench.sh model=llama33b ...
#                                            # near the memory limit (a cell's key and record then name the setting)
#   GRID=token_methods bash scripts/gpu_bench.sh   # SepLLM, StreamingLLM, AnLLM-EP with real eviction on C4 text
#                                            # against full-cache MHA and, apart, recomputation: batch 1/8 x 4k/8k on
#                                            # the Llama-2-7B shape, ~6 min; needs SmolLM2's tokenizer and C4 here
#                                            # (gpu_carry.sh's gguf parts and data.tgz, unpacked by gpu_setup.sh)
# Writes $OUT/results/bench/runs.jsonl (append its new lines to results/bench/h200/runs.jsonl of the repository: the
# committed records are kept one file per GPU, which the report reads together), $OUT/bench.log and
# $OUT/bench_table.md. Records accumulate in RESULTS (default outputs/gpu_bench, git-ignored: kept on a warm machine
# between calls) and recorded cells are reused, so a call cut short by BUDGET_S (default 540 s) goes on in the next.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out} RESULTS=${RESULTS:-$PWD/outputs/gpu_bench} PY=${PYTHON:-python3}
mkdir -p "$OUT/results" "$RESULTS/bench"
nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv 2>&1 | tee -a "$OUT/bench.log"
timeout --signal=INT "${BUDGET_S:-540}" "$PY" run.py "experiment=bench_${GRID:-full}" "results_dir=$RESULTS" \
  logger.wandb.mode=disabled "hydra.sweep.dir=$RESULTS/hydra" "$@" 2>&1 | tee -a "$OUT/bench.log"
cp -r "$RESULTS/bench" "$OUT/results/"
touch "$RESULTS/bench/runs.jsonl"
"$PY" -m chai.report.bench_table "$RESULTS/bench/runs.jsonl" > "$OUT/bench_table.md"
echo "table: $OUT/bench_table.md"; head -5 "$OUT/bench_table.md"

#!/usr/bin/env bash
# LLaMA-7B latency and K,V-memory bench (mode=bench) on one GPU: the MHA baselines (eager, SDPA, static cache with
# the decode step as a CUDA graph), CHAI with both released 7B cluster lists, DEJAVU-static at 50%, SparQ at 8x.
# Random weights, fp16 (timing does not depend on weight values). Run from the repository root on the GPU machine:
# offline, with hydra/omegaconf importable (PYTHONPATH=/tmp/site). Writes
#   $OUT/results/bench/runs.jsonl   one record per (method, path, batch, seq_len) cell, plus one per run:
#                                   copy it to results/bench/runs.jsonl of the repository
#   $OUT/bench_table.md             the key ratios as a markdown table
#   $OUT/bench.log                  one line per cell as it is measured
#
#   bash scripts/gpu_bench.sh                # GRID=full: batch 1/8/16 x seq 256..4096 (15 cells)
#   GRID=core bash scripts/gpu_bench.sh      # batch 1/8/16 x seq 2048/4096 (6 cells): the cells the targets name
#   GRID=smoke bash scripts/gpu_bench.sh     # batch 1 x seq 256: checks the machine and every path in ~2 minutes
# Records accumulate in RESULTS (default outputs/gpu_bench, git-ignored, so kept on a machine between calls) and are
# copied to $OUT after every run. Recorded cells are reused (same settings, same GPU): `core` then `full` measures
# each cell once, and a call cut short goes on where it stopped. Runs stop by BUDGET_S (default 540 s) so the table
# is always written.
# Knobs: NEW_TOKENS (16), REPEATS (2), WARMUP (1), STATIC_STEP (auto = compile on CUDA | cudagraph | eager;
# eager for a model spread over GPUs, where no CUDA graph spans them), BATCH, SEQ, PYTHON,
# MODEL (llama7b) and CHAI_ARGS (the two released 7B lists; also to rehearse the script on a tiny model on a CPU),
# BASELINES_ONLY_CHAI=1 (skip DEJAVU and SparQ: LLaMA-33B on one H200 is
#   MODEL=llama33b CHAI_ARGS=method.layer_clusters=llama33b BATCH=[1,8] BASELINES_ONLY_CHAI=1 GRID=core ...).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
RESULTS=${RESULTS:-$PWD/outputs/gpu_bench}
PY=${PYTHON:-python3}
GRID=${GRID:-full}
case "$GRID" in
  full) SEQ=${SEQ:-[256,512,1024,2048,4096]} ;;
  core) SEQ=${SEQ:-[2048,4096]} ;;
  smoke) SEQ=${SEQ:-[256]}; BATCH=${BATCH:-[1]} ;;
  *) echo "GRID must be full, core or smoke" >&2; exit 2 ;;
esac
BATCH=${BATCH:-[1,8,16]}
DEADLINE=$(( $(date +%s) + ${BUDGET_S:-540} ))
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
MODEL=${MODEL:-llama7b}
CHAI_ARGS=${CHAI_ARGS:-method.layer_clusters=llama7b_jul2024,llama7b_dec2024}
common=(mode=bench "model=$MODEL" model.init=random experiment_name=bench "results_dir=$RESULTS"
        logger.wandb.mode=disabled "bench.batch_sizes=$BATCH" "bench.seq_lens=$SEQ"
        "bench.new_tokens=${NEW_TOKENS:-16}" "bench.repeats=${REPEATS:-2}" "bench.warmup=${WARMUP:-1}"
        "bench.static_step=${STATIC_STEP:-auto}" "hydra.sweep.dir=$RESULTS/hydra")

run() {  # one process per call: the model is built once and reused by the jobs of a multirun (-m)
  local left=$(( DEADLINE - $(date +%s) )) flags=()
  if [[ "$1" == "-m" ]]; then flags=(-m); shift; fi  # Hydra wants its flags before the overrides
  if (( left < 30 )); then echo "skipped (time budget spent): $*" | tee -a "$OUT/bench.log"; return; fi
  echo "== ${flags[*]} $* (${left}s left)" | tee -a "$OUT/bench.log"
  timeout --signal=INT "$left" "$PY" run.py "${flags[@]}" "${common[@]}" "$@" 2>&1 | grep -v -i "warning" | tee -a "$OUT/bench.log"
  mkdir -p "$OUT/results" && cp -r "$RESULTS/bench" "$OUT/results/" 2>/dev/null
}

# Which heads DEJAVU-static drops does not change its timing, only how many: random scores stand in for C4's.
"$PY" -c 'import json, random, sys; from chai.config import compose_model
a = compose_model(sys.argv[1]).arch; random.seed(0)
rows = [[random.random() for _ in range(a.num_attention_heads)] for _ in range(a.num_hidden_layers)]
print(json.dumps({"head_importance": rows}))' "$MODEL" > "$OUT/dejavu_random_head_scores.json"

nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv 2>&1 | tee -a "$OUT/bench.log"
# The first run also measures the MHA baselines of every cell; later runs reuse them.
run -m method=chai $CHAI_ARGS
if [[ "${BASELINES_ONLY_CHAI:-0}" != 1 ]]; then  # 1: CHAI and the MHA baselines only (the larger models)
  run method=dejavu_static method.sparsity=0.5 "method.head_scores=$OUT/dejavu_random_head_scores.json"
  run method=sparq_8x
fi

mkdir -p "$RESULTS/bench" && touch "$RESULTS/bench/runs.jsonl"
"$PY" -m chai.report.bench_table "$RESULTS/bench/runs.jsonl" > "$OUT/bench_table.md"
echo "table: $OUT/bench_table.md"; head -5 "$OUT/bench_table.md"

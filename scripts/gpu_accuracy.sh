#!/usr/bin/env bash
# Accuracy experiments of the embedded SmolLM2 on the offline GPU machine (after `source scripts/gpu_setup.sh`).
# Each argument is a stage: an experiment (conf/experiment/) and any Hydra overrides, as one word; stages run in
# order, or side by side with PARALLEL=1 (a small model leaves the GPU mostly idle; records are appended with one
# write each, so concurrent stages share a results file safely). E.g. the README's tables:
#   PARALLEL=1 bash scripts/gpu_accuracy.sh table table_dejavu ablations table_sparq \
#     "membership_tokens method.membership_tokens=1,3" "membership_tokens method.membership_tokens=5,10" \
#     "sweep_clusters task=piqa method=chai method.num_clusters=range(1,10)" \
#     "sweep_clusters task=piqa method=chai_static,random_groups method.num_clusters=range(1,10)"
#   bash scripts/gpu_accuracy.sh analysis    # calibration, then membership changes (experiment_name=analysis)
# Records go to /tmp/chai_results (resumable: a re-run skips finished cells, so a stage cut short by BUDGET_S, default
# 540 s, goes on in the next call); the records and each stage's log are copied to $OUT (per-sample outputs stay on
# the machine). The repository's calibration artifacts are used when present, so GPU and CPU runs share cluster counts.
set -uo pipefail
cd "$(dirname "$0")/.."
res=/tmp/chai_results
mkdir -p "$res/calibration" "$OUT/results" "$OUT/logs"
cp -n results/calibration/*.json "$res/calibration/" 2>/dev/null
common=(model=smollm2 device=cuda eval.batch_size=64 logger.wandb.mode=disabled "results_dir=$res")
run_stage() {  # $1: stage number, $2: the stage ("EXPERIMENT [OVERRIDES...]")
  local words log="$OUT/logs/stage$1_${2%% *}.log"
  read -ra words <<< "$2"  # split on spaces, no globbing: bench.batch_sizes=[1,8] stays as written
  echo "== stage $1: $2"
  # Hydra's output folder per stage: parallel stages started in the same second would share a timestamped one.
  timeout --signal=INT "${BUDGET_S:-540}" python3 run.py "experiment=${words[0]}" "${words[@]:1}" "${common[@]}" \
    "hydra.sweep.dir=/tmp/hydra/stage$1" "hydra.run.dir=/tmp/hydra/stage$1" 2> "$log"
}
n=0
for stage in "$@"; do
  n=$((n + 1))
  if [[ -n "${PARALLEL:-}" ]]; then run_stage "$n" "$stage" > "/tmp/stage$n.out" & else run_stage "$n" "$stage"; fi
done
wait
if [[ -n "${PARALLEL:-}" ]]; then for i in $(seq 1 "$n"); do cat "/tmp/stage$i.out"; done; fi
for f in "$res"/*/runs.jsonl; do cp "$f" "$OUT/results/$(basename "$(dirname "$f")").runs.jsonl"; done
cp "$res"/calibration/*.json "$OUT/results/" 2>/dev/null
ls -la "$OUT/results"

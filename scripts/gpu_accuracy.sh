#!/usr/bin/env bash
# Accuracy experiments of the embedded SmolLM2 on the offline GPU machine (after `source scripts/gpu_setup.sh`).
# Each argument is a stage: an experiment (conf/experiment/) and any Hydra overrides, as one word; stages run in
# order, or side by side with PARALLEL=1, JOBS (default 4) at a time (a small model leaves the GPU mostly idle;
# records are appended with one write each, so concurrent stages share a results file safely). Sixteen at a time is
# too many: each process then scores full HellaSwag (40,168 requests) at ~48 requests/s, 14 minutes, longer than one
# call, and a cell cut short starts again from nothing. E.g. the README's tables:
#   PARALLEL=1 bash scripts/gpu_accuracy.sh table table_dejavu ablations table_sparq \
#     "membership_tokens method.membership_tokens=1,3" "membership_tokens method.membership_tokens=5,10" \
#     "sweep_clusters task=piqa method=chai method.num_clusters=range(1,10)" \
#     "sweep_clusters task=piqa method=chai_static,random_groups method.num_clusters=range(1,10)"
#   bash scripts/gpu_accuracy.sh analysis    # calibration, then membership changes (experiment_name=analysis)
# Records go to /tmp/chai_results, seeded from the committed results/ (resumable: a re-run skips finished cells, so a
# stage cut short by BUDGET_S, default 540 s, goes on in the next call); changed records files and the stage logs
# (one tar) are copied to $OUT (per-sample outputs stay on the machine). The repository's calibration artifacts are used when present, so GPU and CPU runs share cluster counts.
set -uo pipefail
cd "$(dirname "$0")/.."
res=/tmp/chai_results
mkdir -p "$res/calibration" "$OUT/results" /tmp/stage_logs
cp -n results/calibration/*.json "$res/calibration/" 2>/dev/null
for f in results/*/runs.jsonl; do  # committed records: a fresh machine resumes where the last one stopped
  exp=$(basename "$(dirname "$f")"); mkdir -p "$res/$exp"; cp -n "$f" "$res/$exp/runs.jsonl"
done
common=(model=smollm2 device=cuda eval.batch_size=64 logger.wandb.mode=disabled "results_dir=$res")
deadline=$((SECONDS + ${BUDGET_S:-540}))  # every stage, queued ones too, stops by then
run_stage() {  # $1: stage number, $2: the stage ("EXPERIMENT [OVERRIDES...]")
  local words log="/tmp/stage_logs/stage$1_${2%% *}.log"
  read -ra words <<< "$2"  # split on spaces, no globbing: bench.batch_sizes=[1,8] stays as written
  echo "== stage $1: $2"
  # Hydra's output folder per stage: parallel stages started in the same second would share a timestamped one.
  (( deadline - SECONDS > 30 )) || { echo "   (no time left this call: resumes next call)"; return; }
  timeout --signal=INT "$((deadline - SECONDS))" python3 run.py "experiment=${words[0]}" "${words[@]:1}" "${common[@]}" \
    "hydra.sweep.dir=/tmp/hydra/stage$1" "hydra.run.dir=/tmp/hydra/stage$1" 2> "$log"
}
n=0
outs=$(mktemp -d /tmp/stage_out.XXXX)  # per invocation: two drivers side by side must not print each other's stages
for stage in "$@"; do
  n=$((n + 1))
  if [[ -n "${PARALLEL:-}" ]]; then
    while (( $(jobs -rp | wc -l) >= ${JOBS:-4} )); do wait -n; done  # at most JOBS stages share the GPU
    run_stage "$n" "$stage" > "$outs/stage$n.out" &
  else run_stage "$n" "$stage"; fi
done
wait
if [[ -n "${PARALLEL:-}" ]]; then for i in $(seq 1 "$n"); do cat "$outs/stage$i.out"; done; fi
# $OUT brings back at most 8 files: the records of the experiments that ran, the calibration artifacts, one log tar.
for f in "$res"/*/runs.jsonl; do
  cmp -s "$f" "results/$(basename "$(dirname "$f")")/runs.jsonl" || cp "$f" "$OUT/results/$(basename "$(dirname "$f")").runs.jsonl"
done
for f in "$res"/calibration/*.json; do cmp -s "$f" "results/calibration/$(basename "$f")" || cp "$f" "$OUT/results/"; done
tar czf "$OUT/logs.tgz" -C /tmp stage_logs
ls -la "$OUT/results"

#!/usr/bin/env bash
# Accuracy runs of the embedded SmolLM2 on an offline GPU machine (after `source scripts/gpu_setup.sh`).
# Usage: BUDGET_S=540 bash scripts/gpu_accuracy.sh STAGE [STAGE ...]   (stages below, run in order)
# Records go to /tmp/chai_results (resumable: a re-run skips finished cells, so a stage cut short by the budget
# goes on in the next call) and only the records are copied to $OUT (per-sample outputs stay on the machine).
# The repository's calibration artifact is used when present, so GPU and CPU runs share cluster counts.
set -uo pipefail
res=/tmp/chai_results
deadline=$(( $(date +%s) + ${BUDGET_S:-540} ))
mkdir -p "$res/calibration" "$OUT/results"
cp -n results/calibration/*.json "$res/calibration/" 2>/dev/null
common=(model=smollm2 device=cuda eval.batch_size=64 logger.wandb.mode=disabled "results_dir=$res")
run() {
  local left=$(( deadline - $(date +%s) ))
  if (( left < 20 )); then echo "== skipped (budget): $*"; return; fi
  echo "== $* (${left}s left)"
  timeout --signal=INT "$left" python3 run.py "$@" "${common[@]}" 2>&1 \
    | grep -E "^(mha|chai|dejavu|sparq|random)|error|skip:|Error" | grep -v Warning
}
for stage in "$@"; do
  case $stage in
    calibrate)  run mode=calibrate experiment_name=analysis ;;
    membership) run mode=membership experiment_name=analysis ;;
    table)      run experiment=table ;;
    dejavu)     run experiment=table_dejavu ;;
    ablations)  run experiment=ablations ;;
    sparq)      run -m method=sparq_2x,sparq_4x,sparq_8x task=piqa,arc_easy experiment_name=accuracy ;;
    mtokens)    run experiment=membership_tokens ;;
    clusters)   run experiment=sweep_clusters task=piqa method.num_clusters=1,2,3,4,5,6,7,8,9 ;;
    *) echo "unknown stage $stage" ;;
  esac
done
for f in "$res"/*/runs.jsonl; do cp "$f" "$OUT/results/$(basename "$(dirname "$f")").runs.jsonl"; done
cp "$res"/calibration/*.json "$OUT/results/" 2>/dev/null
ls -la "$OUT/results"

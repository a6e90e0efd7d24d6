#!/usr/bin/env bash
# Accuracy runs of the embedded SmolLM2 on an offline GPU machine (after `source scripts/gpu_setup.sh`).
# Usage: bash scripts/gpu_accuracy.sh STAGE [STAGE ...]   with STAGE one of the experiment names below.
# Records go to /tmp/chai_results (resumable: a re-run skips finished cells) and are copied to $OUT at the end,
# records only (per-sample outputs stay on the machine).
set -uo pipefail
res=/tmp/chai_results
common=(model=smollm2 device=cuda eval.batch_size=64 logger.wandb.mode=disabled results_dir=$res)
run() { echo "== $*"; python3 run.py "${common[@]}" "$@" 2>&1 | grep -E "^(mha|chai|dejavu|sparq|random)|error|skip|Traceback" ; }
for stage in "$@"; do
  case $stage in
    calibrate)  run mode=calibrate experiment_name=analysis ;;
    analysis)   run experiment=analysis ;;
    table)      run experiment=table ;;
    dejavu)     run experiment=table_dejavu ;;
    ablations)  run experiment=ablations ;;
    sparq)      run -m method=sparq_2x,sparq_4x,sparq_8x task=piqa,arc_easy experiment_name=accuracy ;;
    membership) run experiment=membership_tokens ;;
    clusters)   run experiment=sweep_clusters task=piqa ;;
    *) echo "unknown stage $stage" ;;
  esac
done
mkdir -p "$OUT/results"
for f in $res/*/runs.jsonl; do d=$(basename "$(dirname "$f")"); cp "$f" "$OUT/results/$d.runs.jsonl"; done
cp $res/calibration/*.json "$OUT/results/" 2>/dev/null
ls -la "$OUT/results"

#!/usr/bin/env bash
# Accuracy runs of the embedded SmolLM2 on an offline GPU machine (after `source scripts/gpu_setup.sh`).
# Usage: BUDGET_S=540 bash scripts/gpu_accuracy.sh STAGE [STAGE ...]   (stages below, run in order)
#        PARALLEL=1 ... runs the stages side by side instead (a small model leaves the GPU mostly idle; records are
#        appended with one write each, so concurrent stages share a results file safely)
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
  # Hydra's output folder per stage: parallel stages started in the same second would share a timestamped one.
  timeout --signal=INT "$left" python3 run.py "$@" "${common[@]}" "hydra.sweep.dir=/tmp/hydra/${STAGE:-run}" \
    "hydra.run.dir=/tmp/hydra/${STAGE:-run}" 2>&1 \
    | grep -E "^(mha|chai|dejavu|sparq|random)|error|skip:|Error" | grep -v Warning
}
run_stage() {
  local stage=$1 STAGE=$1
  case $stage in
    calibrate)  run mode=calibrate experiment_name=analysis ;;
    membership) run mode=membership experiment_name=analysis ;;
    table)      run experiment=table ;;
    dejavu)     run experiment=table_dejavu ;;
    ablations)  run experiment=ablations ;;
    sparq)      run -m method=sparq_2x,sparq_4x,sparq_8x task=piqa,hellaswag,arc_challenge,arc_easy,boolq experiment_name=accuracy ;;
    mtokens)    run experiment=membership_tokens ;;
    mtokens_early) run experiment=membership_tokens method.membership_tokens=1,3 ;;  # the two halves of mtokens
    mtokens_late)  run experiment=membership_tokens method.membership_tokens=5,10 ;;
    clusters)   run experiment=sweep_clusters task=piqa method.num_clusters=1,2,3,4,5,6,7,8,9 ;;
    clusters_chai)  run experiment=sweep_clusters task=piqa method=chai method.num_clusters=1,2,3,4,5,6,7,8,9 ;;
    clusters_fixed) run experiment=sweep_clusters task=piqa method=chai_static,random_groups \
                      method.num_clusters=1,2,3,4,5,6,7,8,9 ;;
    first_layer)      run experiment=sweep_first_layer ;;
    first_layer_piqa) run experiment=sweep_first_layer task=piqa ;;  # the two halves of first_layer
    first_layer_arc)  run experiment=sweep_first_layer task=arc_easy ;;
    *) echo "unknown stage $stage" ;;
  esac
}
for stage in "$@"; do
  if [[ -n "${PARALLEL:-}" ]]; then run_stage "$stage" > "/tmp/stage_$stage.log" 2>&1 & else run_stage "$stage"; fi
done
wait
[[ -n "${PARALLEL:-}" ]] && for stage in "$@"; do echo "### $stage"; cat "/tmp/stage_$stage.log"; done
for f in "$res"/*/runs.jsonl; do cp "$f" "$OUT/results/$(basename "$(dirname "$f")").runs.jsonl"; done
cp "$res"/calibration/*.json "$OUT/results/" 2>/dev/null
ls -la "$OUT/results"

#!/usr/bin/env bash
# The accuracy-against-memory sweep (conf/experiment/frontier.yaml) on the offline GPU machine, after
# `source scripts/gpu_setup.sh`: the calibration artifact first (once; every CHAI cell reads its sensitivity table,
# and parallel stages must not each compute it), then one stage per method setting, side by side. Resumable: a
# re-run skips finished cells; JOBS stages at a time, default 4 (stages stop CALL_S seconds after the start, default 570, and go on next call). Records come back under $OUT/results.
set -uo pipefail
cd "$(dirname "$0")/.."
res=/tmp/chai_results
artifact=$res/calibration/smollm2.json
mkdir -p "$res/calibration" /tmp/stage_logs
cp -n results/calibration/smollm2.json "$artifact" 2>/dev/null  # a committed artifact with the table is reused
if ! python3 -c "import json,sys; sys.exit('sensitivity' not in json.load(open('$artifact')))" 2>/dev/null; then
  echo "== calibrate"
  python3 run.py mode=calibrate model=smollm2 device=cuda calibration.batch_size=64 calibration.sensitivity.batch_size=64 \
    logger.wandb.mode=disabled "results_dir=$res" hydra.run.dir=/tmp/hydra/calibrate 2> /tmp/stage_logs/calibrate.log | tail -3
fi
budget="method.count_rule=budget"
stages=(
  "frontier method=mha"
  "frontier method=chai method.count_rule=threshold model.expand_kv_heads=false"
  "frontier method=chai method.count_rule=threshold model.expand_kv_heads=true"
  "frontier method=chai $budget method.budget=0.1 model.expand_kv_heads=false"
  "frontier method=chai $budget method.budget=0.1 model.expand_kv_heads=true"
  "frontier method=chai $budget method.budget=0.2 model.expand_kv_heads=false"
  "frontier method=chai $budget method.budget=0.2 model.expand_kv_heads=true"
  "frontier method=chai $budget method.budget=0.3 model.expand_kv_heads=false"
  "frontier method=chai $budget method.budget=0.3 model.expand_kv_heads=true"
  "frontier method=chai_static,random_groups $budget method.budget=0.2"
  "frontier method=dejavu_static method.sparsity=0.1,0.3"
  "frontier method=dejavu_static method.sparsity=0.5"
  "frontier method=dejavu_static_dense"
  "frontier method=sparq_8x"
  "frontier method=sparq_rowwise_2x"
  "frontier method=sparq_rowwise_8x"
)
# Each stage stops (and resumes next call) in time for the records to be copied out before the call's limit.
BUDGET_S=${BUDGET_S:-$(( ${CALL_S:-570} - SECONDS - 30 ))} PARALLEL=1 bash scripts/gpu_accuracy.sh "${stages[@]}" "$@"

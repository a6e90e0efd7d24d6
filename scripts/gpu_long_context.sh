#!/usr/bin/env bash
# The long-context sweep (conf/experiment/long_context.yaml: every method at its headline setting on the five
# RULER-style tasks at 1024..8192 tokens, C4 perplexity at 2048..8192, WikiText-2) on the offline GPU machine, after
# `source scripts/gpu_setup.sh`. Arguments are Hydra overrides of every cell; `method=`, `task=` and `task.length=`
# narrow the grid instead (comma lists), e.g.
#   bash scripts/gpu_long_context.sh                                    # the whole grid (~35 min of H200 time)
#   bash scripts/gpu_long_context.sh method=mha,chai task.length=8192   # a corner of it
#   GRIDS=synthetic JOBS=6 bash scripts/gpu_long_context.sh task.n=100
# First the task files: every (task, length) the grid needs is generated with the model's tokenizer into the cache
# ($CHAI_CACHE_DIR/task_data, reused by its manifest), in BUILD_JOBS processes at once (default: every core; 35-42 s a
# file at 8k and n=64 on the H200 host), so no GPU stage waits on tokenization; the SmolLM2 snapshot is made there too,
# once. Then one stage per (grid, method, task, batch size) over the lengths not recorded yet (a cell's run key, as
# run.py computes it, against the records: a stage of recorded cells is never started, and no task file is made that
# only recorded cells read), JOBS side by side (default 4; each a Hydra multirun over its lengths), the longest first
# by an estimate of its time (`seconds` below), and none started that the estimate says cannot end before the
# deadline (a stage cut short loses its cell: a shorter one after it may still fit). A length's batch
# holds at most BATCH_TOKENS tokens (default 65536: 16 up to 4096, 8 at 8192), capped by the experiment's
# eval.batch_size: the eager attention's fp32 scores at 8k x 16 alone were 36 GiB.
# WikiText needs wikitext2/wiki.test.raw in $CHAI_DATA_DIR: gpu_carry.sh's data.tgz holds it (built before
# 2026-12-02 it did not: delete .carry/data and run gpu_carry.sh again); without it the WikiText stages are skipped
# with one line. A folder .carry/lc_data, when carried, is copied over the data directory too.
# Resumable like gpu_accuracy.sh: records go to /tmp/chai_results seeded from the committed results/, a finished cell
# (same run key) is left out of its stage, and every stage stops BUDGET_S seconds after the start (default 540) and goes
# on next call. The changed records come back as $OUT/results/long_context.runs.jsonl (copy it to
# results/long_context/runs.jsonl), the logs as $OUT/logs.tgz.
set -uo pipefail
cd "$(dirname "$0")/.."
res=/tmp/chai_results
logs=/tmp/lc_logs
mkdir -p "$res/calibration" "$res/long_context" "$OUT/results" "$logs"
cp -n results/calibration/*.json "$res/calibration/" 2>/dev/null  # CHAI's and DejaVu's calibration, as committed
[ -f results/long_context/runs.jsonl ] && cp -n results/long_context/runs.jsonl "$res/long_context/runs.jsonl"
data=${CHAI_DATA_DIR:-../shared/data}
[ -d .carry/lc_data ] && mkdir -p "$data" && cp -rn .carry/lc_data/. "$data/"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} TOKENIZERS_PARALLELISM=false
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
deadline=$((SECONDS + ${BUDGET_S:-540}))
common=("device=${DEVICE:-cuda}" logger.wandb.mode=disabled "results_dir=$res")  # DEVICE=cpu: a smoke run here

echo "== task files (and the stage list)"
stages_file=$logs/stages.txt
# The grid is read from the experiment's own sweep (conf/long_context/<grid>.yaml), never restated here.
grids=${GRIDS:-synthetic c4_ppl wikitext}
cores=$(env -u OMP_NUM_THREADS nproc)  # nproc obeys OMP_NUM_THREADS: builds ran 2 at a time on 16 cores
timeout "$((deadline - SECONDS))" python3 - "$stages_file" "${BUILD_JOBS:-$cores}" "$grids" "${BATCH_TOKENS:-65536}" \
  "$res" "${common[@]}" -- "$@" \
  <<'EOF' 2>&1 \
  | tee "$logs/build.log" | grep -v "^ "
import sys
import time
from multiprocessing import get_context
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from chai.models import load_tokenizer
from chai.paths import CONF_DIR, data_file
from chai.records import records_by_key, run_key
from chai.tasks import generated_data, kind_of

stages_file, jobs, grids, batch_tokens, res = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(), int(sys.argv[4]), \
    sys.argv[5]
common, extra = sys.argv[6:sys.argv.index("--")], sys.argv[sys.argv.index("--") + 1:]
recorded = set(records_by_key(Path(res) / "long_context" / "runs.jsonl"))  # finished cells (no error)
AXES = ("method", "task", "task.length")  # the swept keys: given on the command line, they narrow the grid
MISSING = object()
tokenizer = None  # set before the pool forks: every worker has it


def split(overrides: list[str]) -> dict[str, list[str]]:
    return {o.get_key_element(): list(o.sweep_string_iterator()) if o.is_sweep_override()
            else [o.get_value_element_as_str()] for o in OverridesParser.create().parse_overrides(overrides)}


def build(cell) -> str:
    started = time.time()
    path, _ = generated_data(cell.task, cell.data_dir, tokenizer)
    return f"  {path.name}: {time.time() - started:.0f} s"


def batches(lengths, cfg) -> list[tuple[int, list]]:
    """[(batch size, lengths)]: at most batch_tokens tokens a batch (an 8k window at batch 16 asked for a 36 GiB
    fp32 score matrix in the eager attention, and five jobs share one GPU); a grid without lengths (WikiText) has
    eval.max_length-token windows."""
    by_batch = {}
    for length in lengths or [None]:
        window = int(length) if length else int(cfg.eval.max_length)
        by_batch.setdefault(max(1, min(int(cfg.eval.batch_size), batch_tokens // window)), []).append(length)
    return [(b, [x for x in group if x]) for b, group in by_batch.items()]


def seconds(lengths: list, method: str, task_cfg, window: int) -> int:
    """A stage's expected wall time beside JOBS - 1 others on one H200 (2026-12-02, 8 jobs): a generation cell
    ~150 s at 8192 tokens, about in proportion below; SparQ's decode steps ~2.3x that; a perplexity cell (no
    generation) about half. Only to order the stages and to start none that cannot end before the deadline."""
    generates = task_cfg.get("kind") == "long_context"  # the RULER-style tasks; C4 and WikiText score text
    per_cell = 150 * (2.3 if method.startswith("sparq") else 1.0) * (1.0 if generates else 0.5)
    return int(sum(per_cell * (int(x) if x else window) / 8192 for x in lengths or [None])) + 20


def recorded_already(base: list[str], method: str, task: str, length, batch: int) -> bool:
    """Whether the cell a stage would run is recorded (the key run.py checks before running it): a stage of
    recorded cells only would start Python, compose and skip, ~15 s of a job slot each."""
    cell = compose(config_name="config", overrides=[*base, f"method={method}", f"task={task}", *common,
                                                    *([f"task.length={length}"] if length else []),
                                                    f"eval.batch_size={batch}"])
    return run_key(OmegaConf.to_container(cell, resolve=True)) in recorded


def fits(cfg, override: str) -> bool:
    """Whether `override` names a key of this grid's config (or adds one, or is Hydra's)."""
    key = override.split("=")[0]
    return key.startswith(("+", "~", "hydra.")) or OmegaConf.select(cfg, key, default=MISSING) is not MISSING


asked = split([o for o in extra if o.split("=")[0] in AXES])
rest = [o for o in extra if o.split("=")[0] not in AXES]
narrow = lambda key, values: [v for v in values if key not in asked or v in asked[key]]  # noqa: E731
stages, cells, model_cfg, needed, done = [], [], None, set(), 0
with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
    for grid in grids:
        plain = compose(config_name="config", overrides=["experiment=long_context", f"long_context={grid}"])
        mine = [o for o in rest if fits(plain, o)]  # task.n=100 is for the tasks that have an n (not WikiText)
        base = ["experiment=long_context", f"long_context={grid}", *mine]
        cfg = compose(config_name="config", overrides=base, return_hydra_config=True)
        model_cfg, swept = cfg.model, split([f"{k}={v}" for k, v in cfg.hydra.sweeper.params.items()])
        methods = asked.get("method", swept["method"])
        tasks, lengths = narrow("task", swept.get("task", [cfg.task.name])), swept.get("task.length")
        lengths = narrow("task.length", lengths) if lengths else None
        if not tasks or lengths == [] or not methods:
            continue
        if cfg.task.get("local_file"):  # a built-in task read from the data directory (WikiText)
            try:
                data_file(cfg.task.local_file, cfg.data_dir)
            except Exception as error:
                print(f"skip  {grid}: {str(error).splitlines()[0]}")
                continue
        task_cfgs = {t: compose(config_name="config", overrides=[*base, f"task={t}"]).task for t in tasks}
        for batch, group in batches(lengths, cfg):
            for t in tasks:
                for m in methods:
                    todo = [x for x in group or [None] if not recorded_already(base, m, t, x, batch)]
                    done += len(group or [None]) - len(todo)
                    needed.update((t, x) for x in todo)
                    shown = (f" task.length={','.join(todo)}" if group else "") + f" eval.batch_size={batch}"
                    line = " ".join([f"long_context={grid} method={m} task={t}{shown}", *mine])
                    stages += [(seconds(todo, m, task_cfgs[t], int(cfg.eval.max_length)), line)] if todo else []
        for task in tasks:
            for length in lengths or [None]:
                if (task, length) not in needed:  # every method's cell recorded: no file to make
                    continue
                cell = compose(config_name="config", overrides=[*base, f"task={task}"]
                               + ([f"task.length={length}"] if length else []))
                if kind_of(cell.task) != "builtin":
                    cells.append(cell)
stages.sort(key=lambda stage: -stage[0])  # the longest first: the last ones to start are the short ones
with open(stages_file, "w") as f:
    f.write("".join(f"{cost} {line}\n" for cost, line in stages))
if cells:
    tokenizer = load_tokenizer(model_cfg)  # makes the model snapshot once, before the stages load it side by side
cells.sort(key=lambda c: -c.task.length)  # the longest first: the pool ends evenly
print(f"{done} cells recorded already; {len(stages)} stages to run; {len(cells)} task files, {jobs} at a time")
with get_context("fork").Pool(jobs) as pool:
    for line in pool.imap_unordered(build, cells):
        print(line, flush=True)
EOF
[ -s "$stages_file" ] || { echo "no stages (see $logs/build.log)"; tail -5 "$logs/build.log"; exit 1; }

run_stage() {  # $1: stage number, $2: its overrides, $3: its expected seconds
  local words log="$logs/stage$1.log" left=$((deadline - SECONDS))
  read -ra words <<< "$2"
  # A stage that cannot end in time would be killed with its cell half done: leave it whole to the next call.
  (( left > $3 )) || { echo "== stage $1: $2 (needs ~$3 s, $left s left: resumes next call)"; return; }
  echo "== stage $1: $2"
  timeout --signal=INT "$((deadline - SECONDS))" python3 run.py experiment=long_context "${words[@]}" "${common[@]}" \
    "hydra.sweep.dir=/tmp/hydra/lc$1" "hydra.run.dir=/tmp/hydra/lc$1" > "$log" 2>&1
  echo "   stage $1 exit $? ($(grep -c '"run_id"' "$res/long_context/runs.jsonl" 2>/dev/null || echo 0) records so far)"
}
n=0
while read -r cost stage; do  # the longest first (stages.txt is sorted so); a later, shorter one may still fit
  n=$((n + 1))
  while (( $(jobs -rp | wc -l) >= ${JOBS:-4} )); do wait -n; done  # at most JOBS stages share the GPU
  run_stage "$n" "$stage" "$cost" &
done < "$stages_file"
wait
f=$res/long_context/runs.jsonl
[ -f "$f" ] && ! cmp -s "$f" results/long_context/runs.jsonl && cp "$f" "$OUT/results/long_context.runs.jsonl"
tar czf "$OUT/logs.tgz" -C "$(dirname "$logs")" "$(basename "$logs")"
[ -f "$f" ] && python3 - "$f" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
ok = [r for r in rows if not r.get("error")]
print(f"{len(rows)} long_context records, {len(rows) - len(ok)} failed:",
      sorted({(r.get("method"), r.get("task"), (r.get("error") or "")[:60]) for r in rows if r.get("error")})[:10])
EOF
ls -la "$OUT/results"

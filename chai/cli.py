"""What `run.py` does with a composed config: run the mode, record the result, mirror it, resume sweeps, and say
what happened in a few lines (one summary per run, one table at the end of a multirun)."""

import contextlib
import logging
import os
import sys
import time
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from chai.config import offline_hub
from chai.paths import results_dir
from chai.records import TIME_FORMAT, already_recorded, append_jsonl, mirror_to_wandb, read_jsonl, record_key, run_key


def runs_path(cfg):
    return results_dir(cfg.results_dir) / cfg.experiment_name / "runs.jsonl"


def quiet_libraries() -> None:
    """Keep a run's output to what a person reads: lm-eval's INFO/WARNING log (seeds, "pretrained kwarg is not a
    str", task paths) and the instant progress bars of transformers and datasets say nothing about the result.
    `LMEVAL_LOG_LEVEL=INFO` brings lm-eval's log back."""
    if not os.environ.get("LMEVAL_LOG_LEVEL"):
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
    with contextlib.suppress(ImportError):
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()


def run_mode(cfg, overrides: list[str], in_sweep: bool = False) -> dict | None:
    """Run one cell through the mode's runner (chai.runners.RUNNERS). A finished cell with the same settings is
    skipped (`resume=true`; a bench grid resumes cell by cell instead); a failing cell is written as a record with
    `error` so a sweep goes on; alone, a bad-input error ends the run with its one line."""
    # torch, transformers and lm-eval come with the runners: imported here, once the input is known good.
    from chai.runners import RESUMED_AS_A_WHOLE, RUNNERS
    from chai.methods import display_of
    from chai.runners.record import failure, start

    config = OmegaConf.to_container(cfg, resolve=True)
    path = runs_path(cfg)
    if cfg.resume and cfg.mode in RESUMED_AS_A_WHOLE and already_recorded(path, config):
        print(f"skip: {cfg.method.name}/{cfg.model.name}/{cfg.task.name} already recorded in {path}")
        return None
    quiet_libraries()
    record = start(config, overrides, cfg.mode, path)
    try:
        with offline_hub() if cfg.offline else contextlib.nullcontext():
            record.update(RUNNERS[cfg.mode](cfg, record))
    except Exception as err:  # noqa: BLE001 - a failure is a recorded row, not a lost sweep
        record.update(failure(err))
        shown = display_of(config.get("method") or {})  # the report and the migration check name failed cells too
        if shown is not None and "display" not in record:
            record["display"] = shown
        append_jsonl(path, record)
        if in_sweep:
            print(f"failed (recorded): {record['error']}", file=sys.stderr)
            return record
        raise
    append_jsonl(path, record)
    mirrored = mirror_to_wandb(record, config["logger"]["wandb"])
    summarize(record)
    if mirrored:
        print(mirrored)
    return record


# ---------------------------------------------------------------------------------------------- one run
def pct(value, stderr=None) -> str:
    return f"{100 * value:.1f}" + (f" ± {100 * stderr:.1f}" if isinstance(stderr, (int, float)) else "")


def in_bytes(count: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.3g} {unit}"
    return f"{count:.0f} B"


def head(record: dict) -> str:
    return f"{record['method']} | {record['model']} | {record['task']}"


SCALE_METRICS = ("perplexity", "bits_per_byte")  # shown as they are; every other float metric is a share, in %


def metric_text(name: str, value: float, stderr=None) -> str:
    """`acc 65.2 ± 1.1 %`, or `token_perplexity 23.41` for a metric that is not a share."""
    if any(part in name for part in SCALE_METRICS):
        return f"{name} {value:.4g}"
    return f"{name} {pct(value, stderr)} %"


def eval_lines(record: dict) -> list[str]:
    metrics = record.get("metrics", {})
    shown = ", ".join(metric_text(k, v, metrics.get(f"{k}_stderr")) for k, v in metrics.items()
                      if isinstance(v, float) and not k.endswith("_stderr"))
    kv = record.get("kv_bytes_per_token", {}).get("measured", {}).get("total")
    wall = record.get("timing", {}).get("wall_s")
    return [f"{head(record)} | n={record.get('n_examples')}: {shown} | "
            f"K,V {kv:.0f} bytes/token | {wall:.1f} s -> {record['results_path']}"]


def calibrate_lines(record: dict) -> list[str]:
    cal = record["calibration"]
    return [f"calibrate | {record['model']}: {cal['n_docs']} documents in {record['timing']['wall_s']:.1f} s "
            f"-> {cal['path']}", f"clusters per layer: {cal['chosen']}"]


def bench_lines(record: dict) -> list[str]:
    """The run's cells as a small table (they are also records of their own in the same runs.jsonl)."""
    summary = record["bench_summary"]
    lines = [f"bench | {record['method']} | {record['model']}: {summary['measured']} cells measured, "
             f"{summary['reused']} reused, {summary['errors']} failed -> {summary['cells_path']}"]
    rows = [("path", "B x S", "TTFT ms", "TTNT ms", "K,V cache")]
    for cell in summary.get("cells", []):
        size = f"{cell['batch']} x {cell['seq_len']}"
        if cell.get("error"):
            rows.append((cell["path"], size, f"{'OOM' if cell.get('oom') else 'failed'}: {cell['error'][:100]}"))
        else:
            rows.append((cell["path"], size, f"{cell['ttft_ms']:.2f}", f"{cell['ttnt_ms']:.3f}",
                         in_bytes(cell["kv_bytes"])))
    lines += columns(rows) if len(rows) > 1 else []
    lines += [f"left out: {why}" for why in summary.get("skipped_paths", [])]
    return lines


def membership_lines(record: dict) -> list[str]:
    found = record["membership"]
    changed = ", ".join(f"t={t} {100 * f:.0f}%" for t, f in zip(found["tokens"], found["changed_fraction"])
                        if t in (1, 2, 3, 5, 10))
    return [f"membership | {record['model']}: {found['n_docs']} documents, heads whose cluster differs from the "
            f"one decided after t={found['reference_tokens']} tokens: {changed} -> {record['results_path']}"]


def capacity_lines(record: dict) -> list[str]:
    """The run's capacity cells as a small table (each is also a record of its own in the same runs.jsonl)."""
    summary = record["capacity_summary"]
    budget = in_bytes(summary["budget"]["budget_bytes"])
    lines = [f"capacity | {record['method']} | {record['model']}: {summary['measured']} cells measured, "
             f"{summary['reused']} reused, {summary['errors']} failed, budget {budget} -> {summary['cells_path']}"]
    rows = [("path", "S", "predicted B", "largest B", "tokens/s", "e2e s")]
    for cell in summary["cells"]:
        shown = (f"{cell['tokens_per_s']:.1f}", f"{cell['e2e_s']:.2f}") if cell["tokens_per_s"] else ("-", "-")
        rows.append((cell["path"], cell["seq_len"], cell["predicted"], cell["measured"], *shown)
                    if not cell["error"] else (cell["path"], cell["seq_len"], f"failed: {cell['error'][:100]}"))
    return lines + columns(rows) + [f"left out: {why}" for why in summary["skipped_paths"]]


SUMMARIES = {"eval": eval_lines, "calibrate": calibrate_lines, "bench": bench_lines, "membership": membership_lines,
             "capacity": capacity_lines}


def summarize(record: dict) -> None:
    """A finished run in the figures of its mode (read from the record it wrote)."""
    print("\n".join(SUMMARIES[record["mode"]](record)), flush=True)


def columns(rows: list[tuple]) -> list[str]:
    """Rows of strings as left-aligned columns (first row: the header, underlined). A shorter row's last cell (a
    failure's message) runs on past the columns instead of widening one."""
    full = [row for row in rows if len(row) == len(rows[0])]
    widths = [max(len(str(row[i])) for row in full) for i in range(len(rows[0]))]
    lines = ["  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    return [lines[0], "  ".join("-" * w for w in widths), *lines[1:]]


# ---------------------------------------------------------------------------------------------- a multirun
def baseline_name(record: dict) -> str:
    """The baseline method of the record's run (`bench.baseline_method`, one home for the bench and this table)."""
    return record["config"]["bench"]["baseline_method"]


def reference_key(record: dict) -> str:
    """The run key of the baseline (MHA) run with this record's settings (the row its delta is taken against)."""
    return run_key({**record["config"], "method": {"name": baseline_name(record)}})


def minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 100 else f"{int(seconds // 60)} min {seconds % 60:02.0f} s"


def own_settings(records: list[dict]) -> list[str]:
    """Per record, the overrides that not every record shares (method, model and task have their own columns)."""
    sets = [set(r.get("overrides", [])) for r in records]
    shared = set.intersection(*sets) if sets else set()
    return [" ".join(sorted(o for o in own - shared if not o.startswith(("method=", "model=", "task="))))
            for own in sets]


HEADLINE_METRICS = ("acc", "string_match_all", "token_perplexity")  # a task's main score, the first it has


def headline_metric(records: list[dict]) -> str:
    """The first of HEADLINE_METRICS that some finished record has (a multirun over several kinds of task shows
    the first kind's; the others' rows then say n/a)."""
    found = {m for r in records if not r.get("error") for m in r.get("metrics", {})}
    return next((m for m in HEADLINE_METRICS if m in found), "acc")


def score_text(metric: str, value, stderr=None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4g}" if any(part in metric for part in SCALE_METRICS) else pct(value, stderr)


def sweep_table(records: list[dict], metric: str | None = None) -> list[str]:
    """One row per eval job: the headline score (accuracy ± standard error in %, or a perplexity), the difference
    from the MHA job with otherwise equal settings (points, or perplexity), K,V bytes per token (measured; % of
    MHA) and the scoring wall time."""
    metric = metric or headline_metric(records)
    share = not any(part in metric for part in SCALE_METRICS)
    mha = {record_key(r): r for r in records if r["method"] == baseline_name(r) and not r.get("error")}
    varying = [k for k in ("model", "task") if len({r[k] for r in records}) > 1]
    settings = own_settings(records)
    rows = [("method", *varying, *(("settings",) if any(settings) else ()), f"{metric} (%)" if share else metric,
             "vs MHA (points)" if share else "vs MHA",
             "K,V bytes/token", "wall")]
    for rec, own in zip(records, settings):
        label = (rec["method"], *(rec[k] for k in varying), *((own,) if any(settings) else ()))
        if rec.get("error"):
            rows.append((*label, f"failed: {rec['error']}"))
            continue
        value, stderr = rec["metrics"].get(metric), rec["metrics"].get(f"{metric}_stderr")
        base = mha.get(reference_key(rec))
        kv = rec["kv_bytes_per_token"]["measured"]["total"]
        reference = base["metrics"].get(metric) if base and rec is not base else None
        delta = "" if value is None or reference is None else (
            f"{100 * (value - reference):+.1f}" if share else f"{value - reference:+.4g}")
        kv_share = f" ({100 * kv / base['kv_bytes_per_token']['measured']['total']:.1f}%)" if base else ""
        rows.append((*label, score_text(metric, value, stderr), delta, f"{kv:.0f}{kv_share}",
                     minutes(rec["timing"]["wall_s"])))
    return columns(rows)


def job_records(sweep_dir: Path, output_subdir: str) -> list[dict | None]:
    """Each job's record, found from the config Hydra saved in the job's folder: its run key in the runs.jsonl it
    wrote to (the latest such record; a skipped job's finished one). Works for any launcher, local or SLURM."""
    saved = sorted(sweep_dir.glob(f"*/{output_subdir}/config.yaml"), key=lambda p: (len(p.parts[-3]), p.parts[-3]))
    found = []
    for path in saved:  # job folders 0, 1, ..., 10: shorter names first sorts them as numbers
        config = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
        records = read_jsonl(results_dir(config["results_dir"]) / config["experiment_name"] / "runs.jsonl")
        key = run_key(config)
        found.append(next((r for r in reversed(records) if record_key(r) == key), None))
    return found


def sweep_report(records: list[dict | None], seconds: float, since: str) -> list[str]:
    """The end of a multirun: eval jobs as one table, other modes' jobs by their own summaries, then where the
    records are and which rows a run before `since` (a record's time format) recorded (resume)."""
    missing = sum(r is None for r in records)
    records = [r for r in records if r]
    evals = [r for r in records if r["mode"] == "eval"]
    lines = [f"{len(records) + missing} jobs in {minutes(seconds)}:"]
    lines += sweep_table(evals) if evals else []
    for rec in records:
        if rec["mode"] != "eval":
            lines += SUMMARIES[rec["mode"]](rec) if not rec.get("error") else [f"{head(rec)}: {rec['error']}"]
    earlier = sum(r["time"] < since for r in records)
    if earlier:
        lines.append(f"{earlier} of these rows were recorded by an earlier run (resume=false runs them again)")
    if missing:
        lines.append(f"{missing} jobs left no record (see the log above)")
    paths = sorted({r["results_path"] for r in records})
    return lines + [f"records: {', '.join(paths)}" + (" (per-sample outputs in samples/ beside it)" if evals else "")]


class SweepTable(Callback):
    """Hydra callback (conf/config.yaml `hydra.callbacks`): a multirun ends with one table of its jobs, read back
    from the records they wrote, so it shows also when every job was skipped as already recorded."""

    started, since = time.time(), ""

    def on_multirun_start(self, config, **kwargs) -> None:
        self.started, self.since = time.time(), time.strftime(TIME_FORMAT)

    def on_multirun_end(self, config, **kwargs) -> None:
        try:
            records = job_records(Path(config.hydra.sweep.dir), config.hydra.output_subdir or ".hydra")
            lines = sweep_report(records, time.time() - self.started, self.since)
        except Exception as err:  # noqa: BLE001 - the jobs are done and recorded: a table we cannot make is no failure
            lines = [f"(no table of the jobs: {type(err).__name__}: {err})"]
        print("\n" + "\n".join(lines), flush=True)

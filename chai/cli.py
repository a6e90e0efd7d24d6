"""What `run.py` does with a composed config: run the mode, record the result, mirror it, resume sweeps."""

import contextlib
import importlib
import sys
import traceback

from omegaconf import OmegaConf

from chai.errors import ChaiError
from chai.models import offline_hub
from chai.paths import results_dir
from chai.records import append_jsonl, mirror_to_wandb, new_record, read_jsonl, run_key

MODE_RUNNERS = {"eval": "chai.evaluate", "calibrate": "chai.calibrate", "bench": "chai.bench", "membership": "chai.membership"}


def runs_path(cfg):
    return results_dir(cfg.results_dir) / cfg.experiment_name / "runs.jsonl"


def already_recorded(path, key: str) -> bool:
    return any(r.get("run_key") == key and not r.get("error") for r in read_jsonl(path))


def run_mode(cfg, overrides: list[str], in_sweep: bool = False) -> dict | None:
    """Run one cell. A finished cell with the same settings is skipped (`resume=true`); a failing cell is written
    as a record with `error` so a sweep goes on; alone, a bad-input error ends the run with its one line."""
    config = OmegaConf.to_container(cfg, resolve=True)
    path = runs_path(cfg)
    # A bench run always runs: its cells resume one by one, keyed by what a run's key cannot see (device, the
    # static step as resolved, kernel launch settings).
    if cfg.resume and cfg.mode != "bench" and already_recorded(path, run_key(config)):
        print(f"skip: {cfg.method.name}/{cfg.model.name}/{cfg.task.name} already recorded in {path}")
        return None
    record = new_record(config, overrides, cfg.mode)
    record["results_path"] = str(path)
    try:
        with offline_hub() if cfg.offline else contextlib.nullcontext():
            record.update(importlib.import_module(MODE_RUNNERS[cfg.mode]).run(cfg, record))
    except Exception as err:  # noqa: BLE001 - a failure is a recorded row, not a lost sweep
        record["error"] = f"{type(err).__name__}: {err}"
        if not isinstance(err, ChaiError):
            record["traceback"] = traceback.format_exc()
        append_jsonl(path, record)
        if in_sweep:
            print(f"failed (recorded): {record['error']}", file=sys.stderr)
            return record
        raise
    append_jsonl(path, record)
    mirror_to_wandb(record, config["logger"]["wandb"])
    summarize(record)
    return record


def summarize(record: dict) -> None:
    metrics = record.get("metrics", {})
    shown = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float))
    kv = record.get("kv_bytes_per_token", {}).get("measured", {})
    timing = record.get("timing", {})
    print(
        f"{record['method']} | {record['model']} | {record['task']} | n={record.get('n_examples')} | {shown} | "
        f"kv_bytes/token={kv.get('total', float('nan')):.0f} | wall={timing.get('wall_s', float('nan')):.1f}s | "
        f"-> {record['results_path']}"
    )

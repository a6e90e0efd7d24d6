"""Run records: one JSON line per run in results/<experiment>/runs.jsonl, the source of truth for every table and
figure. Appends never leave a half-written line that a later record could merge into, readers skip a torn tail,
and each record carries a `run_key` (hash of the settings that define the cell) so sweeps can resume.
"""

import hashlib
import json
import os
import platform
import subprocess
import time
import uuid
from importlib import metadata
from pathlib import Path

from chai.paths import ROOT

# Settings that do not change what a run measures: left out of the run key.
VOLATILE_KEYS = ("experiment_name", "results_dir", "logger", "data_dir", "hydra", "offline")
TIME_FORMAT = "%Y-%m-%dT%H:%M:%S%z"  # a record's `time`: sorts as text within one time zone
PACKAGES = ("torch", "transformers", "lm_eval", "accelerate", "hydra-core", "omegaconf", "scikit-learn")


def run_key(config: dict) -> str:
    stable = {k: v for k, v in config.items() if k not in VOLATILE_KEYS}
    return hashlib.sha1(json.dumps(stable, sort_keys=True, default=str).encode()).hexdigest()[:16]


def git_commit() -> dict:
    def git(*args):
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    return {"commit": commit, "dirty": bool(git("status", "--porcelain", "--untracked-files=no")) if commit else None}


def versions() -> dict:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def device_info() -> dict:
    import torch

    if torch.cuda.is_available():
        return {"type": "cuda", "name": torch.cuda.get_device_name(), "count": torch.cuda.device_count()}
    return {"type": "cpu", "name": platform.processor() or platform.machine(), "count": os.cpu_count()}


def new_record(config: dict, overrides: list[str], mode: str) -> dict:
    """The fields every record has, before the mode adds its measurements."""
    return {
        "run_id": uuid.uuid4().hex[:12],
        "run_key": run_key(config),
        "time": time.strftime(TIME_FORMAT),
        "mode": mode,
        "experiment": config.get("experiment_name"),
        "model": config["model"]["name"],
        "method": config["method"]["name"],
        "task": config["task"]["name"],
        "seed": config.get("seed"),
        "overrides": list(overrides),
        "config": config,
        "git": git_commit(),
        "versions": versions(),
        "device": device_info(),
    }


def append_jsonl(path: Path, record: dict) -> None:
    """Append one line with a single write on an O_APPEND descriptor, then fsync. If an earlier writer died
    mid-line, start on a fresh line so the torn fragment stays a line of its own (which readers skip)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, default=str) + "\n"
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = "\n" + line
        data = line.encode()
        while data:
            data = data[os.write(fd, data):]
        os.fsync(fd)
    finally:
        os.close(fd)


def read_jsonl(path: Path) -> list[dict]:
    """Every complete record of a runs.jsonl (a torn line from a killed writer is skipped)."""
    records = []
    if not Path(path).exists():
        return records
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def mirror_to_wandb(record: dict, wandb_cfg: dict) -> str | None:
    """Log the record to wandb (offline by default), silently: wandb's own ~30 lines repeat the record. Local JSONL
    stays the source of truth, so a wandb failure only warns. Returns one line saying where the run went (None when
    the mirror is disabled)."""
    mode = wandb_cfg.get("mode", "offline")
    if mode == "disabled":
        return None
    try:
        import wandb
    except ImportError:
        return "wandb: not installed, no mirror"
    folder = Path(wandb_cfg.get("dir") or ROOT / "outputs").resolve()
    try:
        folder.mkdir(parents=True, exist_ok=True)  # a missing one makes wandb warn even when silent
        run = wandb.init(
            settings=wandb.Settings(silent=True, console="off"),
            project=wandb_cfg.get("project", "chai"),
            mode=mode,
            dir=str(folder),
            name=f"{record['method']}-{record['model']}-{record['task']}-{record['run_id']}",
            group=record.get("experiment"),
            config=record["config"],
            reinit="finish_previous",
        )
        run.log(flatten({k: record[k] for k in ("metrics", "kv_bytes_per_token", "timing") if k in record}))
        run.summary.update({"run_id": record["run_id"], "run_key": record["run_key"]})
        where = run.url if mode == "online" else f"{Path(run.dir).parent} (upload: wandb sync <that folder>)"
        run.finish()
        return f"wandb {mode} run: {where}"
    except Exception as err:  # noqa: BLE001 - never lose a run to the mirror
        return f"warning: wandb mirror failed ({err}); the local record is complete"


def flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}/"))
        elif isinstance(value, (int, float)) and value is not None:
            flat[name] = value
    return flat

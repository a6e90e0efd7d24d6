"""Run records: one JSON line per run in results/<experiment>/runs.jsonl, the source of truth for every table and
figure. Appends never leave a half-written line that a later record could merge into, readers skip a torn tail,
and each record carries a `run_key` (hash of the settings that can change its result) so sweeps can resume.

A run's key holds exactly what can change its result, given its mode: never `resume`, the output and logging
settings (VOLATILE_KEYS) or another mode's settings group (OTHER_MODES), and of the method only the settings that
differ from its dataclass defaults (so a method config that lists more of its settings keys the same runs). Resume
compares keys recomputed from each stored record's `config` with the current function (`already_recorded`,
`records_by_key`): a record stored under an older key function is still found, and the `run_key` a record stores is
informational.
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

from chai.method_defaults import method_defaults, missing_means, moot_unless
from chai.paths import ROOT

# Settings that do not change what a run measures: left out of every run key.
VOLATILE_KEYS = ("experiment_name", "results_dir", "logger", "data_dir", "hydra", "offline", "resume")
# Settings groups a mode never reads: left out of its runs' keys. A mode not listed here keys every group.
OTHER_MODES = {
    "eval": ("bench", "membership", "capacity"),
    "bench": ("eval", "membership", "task", "capacity"),  # random token ids: no task; a cell's settings: under bench
    "calibrate": ("method", "task", "eval", "bench", "membership", "capacity"),
    "membership": ("task", "eval", "bench", "capacity"),  # the method stays: the one home of num_clusters
    "capacity": ("eval", "membership", "task"),  # random token ids; the bench settings it runs with stay
}
TIME_FORMAT = "%Y-%m-%dT%H:%M:%S%z"  # a record's `time`: sorts as text within one time zone
PACKAGES = ("torch", "transformers", "lm_eval", "accelerate", "hydra-core", "omegaconf", "scikit-learn")


def method_key(method: dict) -> dict:
    """A method config as a key: its name and the settings that differ from the method's dataclass defaults (an
    unknown method: every setting). A setting missing from an older record counts as what it ran with: the method's
    `missing_means` value, else the default. A setting moot under another (`moot_unless`: CHAI's `budget` under
    `count_rule=threshold`) is left out: runs that differ only there compute the same thing."""
    defaults = method_defaults(method.get("name")) or {}
    method = {**missing_means(method.get("name")), **method}
    moot = {k for k, (other, values) in moot_unless(method.get("name")).items()
            if method.get(other, defaults.get(other)) not in values}
    return {k: v for k, v in method.items()
            if k == "name" or (k not in moot and (k not in defaults or v != defaults[k]))}


# Settings since removed, with the value that means what today's config does without them: an old record holding
# exactly that value keys as if it never had the setting (so it keeps resuming); any other value keeps its own key.
RETIRED_SETTINGS = {("membership", "num_clusters"): None}  # one home now: method.num_clusters


def without_retired(config: dict) -> dict:
    config = dict(config)
    for (group, key), neutral in RETIRED_SETTINGS.items():
        node = config.get(group)
        if isinstance(node, dict) and key in node and node[key] == neutral:
            config[group] = {k: v for k, v in node.items() if k != key}
    return config


def key_settings(config: dict) -> dict:
    """The part of a run's config its key hashes (see the module docstring)."""
    left_out = {*VOLATILE_KEYS, *OTHER_MODES.get(config.get("mode"), ())}
    stable = {k: v for k, v in without_retired(config).items() if k not in left_out}
    if isinstance(stable.get("method"), dict):
        stable["method"] = method_key(stable["method"])
    return stable


def run_key(config: dict) -> str:
    return hashlib.sha1(json.dumps(key_settings(config), sort_keys=True, default=str).encode()).hexdigest()[:16]


def record_key(record: dict) -> str | None:
    """A stored record's key under the current function: from its `config`, or (a record without one) as stored."""
    config = record.get("config")
    return run_key(config) if isinstance(config, dict) else record.get("run_key")


def succeeded(record: dict) -> bool:
    return not record.get("error")


def records_by_key(path: Path, keep=succeeded) -> dict[str, dict]:
    """{key: the last record of `path` with that key} over the records `keep` accepts (default: no error)."""
    found = {}
    for record in read_jsonl(path):
        if isinstance(record, dict) and keep(record):
            found[record_key(record)] = record
    return found


def already_recorded(path: Path, config: dict) -> bool:
    """Whether `path` holds a finished run of `config`'s cell (the resume check)."""
    return run_key(config) in records_by_key(path)


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

"""lm-eval tasks from `conf/task/*.yaml`: exactly lm-eval's built-in task, optionally reading a local JSONL copy.

`source=local` writes a two-key delta YAML (`include:` the built-in task file + a `json` data source pointing at
the data directory) and loads it through `TaskManager(include_path=...)`, so prompts, choices and metrics are
lm-eval's own, byte for byte. `source=hub` uses the built-in task as is; `auto` prefers local when the file is
there.
"""

import hashlib
import os
from pathlib import Path

import lm_eval
import yaml

from chai.errors import ChaiError
from chai.paths import cache_dir, data_dir

SOURCES = ("auto", "hub", "local")
SPLIT_KEYS = {"train": "training_split", "validation": "validation_split", "test": "test_split"}


def builtin_yaml(relative: str) -> Path:
    return Path(lm_eval.__file__).parent / "tasks" / relative


def hub_dataset(relative: str) -> str | None:
    """The hub dataset a built-in task reads (`dataset_path`), following `include:` (arc_challenge -> arc_easy).
    Read line by line: lm-eval's YAML has `!function` tags a safe loader rejects."""
    include = None
    for line in builtin_yaml(relative).read_text().splitlines():
        key, _, value = line.partition(":")
        value = value.strip().strip("'\"")
        if key == "dataset_path":
            return value
        include = value if key == "include" else include
    return hub_dataset(str(Path(relative).parent / include)) if include else None


def local_path(task_cfg, configured_data_dir: str | None) -> Path:
    """The task's local JSONL copy, or a one-line error naming the missing folder or file and the settings."""
    folder = data_dir(configured_data_dir)
    path = folder / task_cfg.local_file
    if not path.exists():
        missing = f"data directory {folder} does not exist" if not folder.is_dir() else f"data file {path} not found"
        raise ChaiError(
            f"{missing} (task '{task_cfg.name}'): set data_dir=... or CHAI_DATA_DIR to a folder holding "
            f"{task_cfg.local_file}, or task.source=hub."
        )
    return path


def resolve_source(task_cfg, configured_data_dir: str | None) -> str:
    """`local` or `hub`: auto means local when the file is there. A local task without its file fails here."""
    if task_cfg.source not in SOURCES:
        raise ChaiError(f"task.source must be auto, hub or local, got '{task_cfg.source}'.")
    if task_cfg.source == "local":
        local_path(task_cfg, configured_data_dir)
    if task_cfg.source != "auto":
        return task_cfg.source
    return "local" if (data_dir(configured_data_dir) / task_cfg.local_file).exists() else "hub"


def local_task_yaml(task_cfg, configured_data_dir: str | None) -> dict:
    """The delta that turns the built-in task into one reading `local_file` as its evaluation split."""
    delta = {
        "include": str(builtin_yaml(task_cfg.builtin)),
        "task": task_cfg.name,
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {task_cfg.split: str(local_path(task_cfg, configured_data_dir))}},
    }
    # Only the evaluated split exists locally; zero-shot needs no other.
    delta.update({key: None for key in SPLIT_KEYS.values()})
    delta[SPLIT_KEYS[task_cfg.split]] = task_cfg.split
    delta.update(dict(task_cfg.get("overrides") or {}))
    return delta


def include_folder(task_cfg, configured_data_dir: str | None) -> Path:
    """A folder holding only this task's delta YAML (so the built-in task of the same name cannot shadow it), under
    the cache and named by its content: runs with the same settings reuse it, so nothing piles up in the temp dir
    and nothing needs removing after the run (lm-eval reads the file again when it builds the task)."""
    text = yaml.safe_dump(local_task_yaml(task_cfg, configured_data_dir))
    folder = cache_dir() / "tasks" / f"{task_cfg.name}-{hashlib.sha1(text.encode()).hexdigest()[:12]}"
    target = folder / f"{task_cfg.name}.yaml"
    if not target.exists() or target.read_text() != text:
        folder.mkdir(parents=True, exist_ok=True)
        partial = folder / f".{task_cfg.name}.{os.getpid()}.partial"
        partial.write_text(text)
        partial.replace(target)  # atomic: a concurrent run never reads half a file
    return folder


def task_manager(task_cfg, configured_data_dir: str | None):
    """(TaskManager, task name, source)."""
    from lm_eval.tasks import TaskManager

    source = resolve_source(task_cfg, configured_data_dir)
    if source == "hub":
        return TaskManager(), task_cfg.name, source
    folder = include_folder(task_cfg, configured_data_dir)
    return TaskManager(include_path=str(folder), include_defaults=False), task_cfg.name, source

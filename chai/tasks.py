"""lm-eval tasks from `conf/task/*.yaml`: exactly lm-eval's built-in task, optionally reading a local JSONL copy.

`source=local` writes a two-key delta YAML (`include:` the built-in task file + a `json` data source pointing at
the data directory) and loads it through `TaskManager(include_path=...)`, so prompts, choices and metrics are
lm-eval's own, byte for byte. `source=hub` uses the built-in task as is; `auto` prefers local when the file is
there.
"""

import tempfile
from pathlib import Path

import lm_eval
import yaml

from chai.errors import ChaiError
from chai.paths import data_dir

SPLIT_KEYS = {"train": "training_split", "validation": "validation_split", "test": "test_split"}


def builtin_yaml(relative: str) -> Path:
    return Path(lm_eval.__file__).parent / "tasks" / relative


def resolve_source(task_cfg, configured_data_dir: str | None) -> str:
    if task_cfg.source not in ("auto", "hub", "local"):
        raise ChaiError(f"task.source must be auto, hub or local, got '{task_cfg.source}'.")
    if task_cfg.source != "auto":
        return task_cfg.source
    return "local" if (data_dir(configured_data_dir) / task_cfg.local_file).exists() else "hub"


def local_task_yaml(task_cfg, configured_data_dir: str | None) -> dict:
    """The delta that turns the built-in task into one reading `local_file` as its evaluation split."""
    path = data_dir(configured_data_dir) / task_cfg.local_file
    if not path.exists():
        raise ChaiError(
            f"data file {path} for task '{task_cfg.name}' not found: set data_dir=... or CHAI_DATA_DIR "
            f"to a folder holding {task_cfg.local_file}, or task.source=hub."
        )
    delta = {
        "include": str(builtin_yaml(task_cfg.builtin)),
        "task": task_cfg.name,
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {task_cfg.split: str(path)}},
    }
    # Only the evaluated split exists locally; zero-shot needs no other.
    delta.update({key: None for key in SPLIT_KEYS.values()})
    delta[SPLIT_KEYS[task_cfg.split]] = task_cfg.split
    delta.update(dict(task_cfg.get("overrides") or {}))
    return delta


def task_manager(task_cfg, configured_data_dir: str | None):
    """(TaskManager, task name, source). Local tasks live in a temporary include folder of their own, so the
    built-in task of the same name cannot shadow them."""
    from lm_eval.tasks import TaskManager

    source = resolve_source(task_cfg, configured_data_dir)
    if source == "hub":
        return TaskManager(), task_cfg.name, source
    folder = Path(tempfile.mkdtemp(prefix=f"chai-task-{task_cfg.name}-"))
    (folder / f"{task_cfg.name}.yaml").write_text(yaml.safe_dump(local_task_yaml(task_cfg, configured_data_dir)))
    return TaskManager(include_path=str(folder), include_defaults=False), task_cfg.name, source

"""lm-eval tasks from `conf/task/*.yaml`, three kinds.

- `builtin` (the default): exactly lm-eval's built-in task, optionally reading a local copy. `source=local` writes
  a delta YAML (`include:` the built-in task file + a `json` data source pointing at the data directory) and loads
  it through `TaskManager(include_path=...)`, so prompts, choices and metrics are lm-eval's own, byte for byte.
  `source=hub` uses the built-in task as is; `auto` prefers local when the file is there. `derive:` names a
  function that turns the local file into the rows the built-in task reads (WikiText-2: the raw file cut into
  articles, `chai.perplexity.wikitext_pages`), kept under the cache with its sha256.
- `long_context`: a RULER-style synthetic task (`chai.long_context`), generated with the model's tokenizer into the
  cache (reused by its manifest) and written as a standalone `generate_until` task YAML whose `process_results`
  is `chai.long_context.process_results` (= `score`, RULER's string_match_all), imported through a one-line
  module beside the YAML (lm-eval resolves `!function` there). The prompt is fitted to `length - max_gen_toks`.
- `perplexity`: C4 validation cut into chunks of exactly `length` tokens (`chai.perplexity`), a standalone
  `loglikelihood_rolling` task with lm-eval's word/byte perplexity and bits per byte.

The generated kinds need the tokenizer, known only once the model's is loaded: `resolve_source` checks their
settings and files before any model loads (one line each), `prepare_task` makes the data afterwards. Their
`window` (length) must fit the model's window, or lm-eval would cut prompts from the left or split a chunk into
several windows without a word: `require_window` fails in one line instead.
"""

import hashlib
from dataclasses import dataclass
from pathlib import Path

import lm_eval
import yaml

from chai.errors import ChaiError, did_you_mean, require
from chai.long_context import METRIC, cached_task, check_inputs, source_path, tokenizer_fingerprint
from chai.long_context import VERSION as LONG_CONTEXT_VERSION
from chai.paths import cache_dir, data_dir, data_file, write_atomic
from chai.perplexity import C4_FILE, cached_c4_chunks, cached_wikitext_pages
from chai.perplexity import VERSION as PERPLEXITY_VERSION

SOURCES = ("auto", "hub", "local")
KINDS = ("builtin", "long_context", "perplexity")
SPLIT_KEYS = {"train": "training_split", "validation": "validation_split", "test": "test_split"}
DERIVED = {"wikitext_pages": cached_wikitext_pages}
GLUE = "chai_task_functions"  # the module beside a written task YAML that its `!function` values name
GLUE_TEXT = ('"""Written by chai.tasks: lm-eval imports a task YAML\'s `!function` targets from a file beside it."""\n'
             "from chai.long_context import process_results  # noqa: F401\n")
PERPLEXITY_METRICS = {"word_perplexity": "weighted_perplexity", "byte_perplexity": "weighted_perplexity",
                      "bits_per_byte": "bits_per_byte"}  # metric: lm-eval aggregation (lower is better)


class FunctionTag(str):
    """A YAML `!function module.name` value."""


class TaskDumper(yaml.SafeDumper):
    """safe_dump, plus `FunctionTag` written as lm-eval's `!function` tag."""


TaskDumper.add_representer(FunctionTag, lambda dumper, value: dumper.represent_scalar("!function", str(value)))


@dataclass
class PreparedTask:
    manager: object  # lm-eval TaskManager
    name: str
    source: str
    data: dict | None = None  # a generated or derived data file: its path, sha256 and the inputs that made it
    window: int | None = None  # tokens each request needs in one model window (prompt + answer, or one chunk)


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


def kind_of(task_cfg) -> str:
    kind = task_cfg.get("kind") or "builtin"
    if kind not in KINDS:
        raise did_you_mean("task kind", kind, KINDS)
    return kind


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
    """`local` or `hub`: auto means local when the file is there. A local task without its file fails here, and so
    does a generated task with a bad setting or without its source data."""
    if kind_of(task_cfg) != "builtin":
        check_generated(task_cfg, configured_data_dir)
        return "local"
    if task_cfg.source not in SOURCES:
        raise ChaiError(f"task.source must be auto, hub or local, got '{task_cfg.source}'.")
    if task_cfg.source == "local":
        local_path(task_cfg, configured_data_dir)
    if task_cfg.source != "auto":
        return task_cfg.source
    return "local" if (data_dir(configured_data_dir) / task_cfg.local_file).exists() else "hub"


def require_count(task_cfg, key: str) -> None:
    value = task_cfg.get(key)
    require(isinstance(value, int) and not isinstance(value, bool) and value > 0,
            f"task.{key} must be a positive integer, got {value!r}.")


def check_generated(task_cfg, configured_data_dir: str | None) -> None:
    """The settings of a long_context or perplexity task, and its source data file, without a tokenizer."""
    require(task_cfg.get("source", "local") in ("auto", "local"),
            f"task '{task_cfg.name}' is generated from the local data directory: task.source must be local, "
            f"got '{task_cfg.get('source')}'.")
    for key in ("length", "n"):
        require_count(task_cfg, key)
    if kind_of(task_cfg) == "perplexity":
        data_file(C4_FILE, configured_data_dir)
        return
    require_count(task_cfg, "max_gen_toks")
    require(task_cfg.max_gen_toks < task_cfg.length, f"task.max_gen_toks ({task_cfg.max_gen_toks}) must be smaller "
                                                     f"than task.length ({task_cfg.length}): the prompt gets the rest.")
    seed = task_cfg.get("seed")
    require(isinstance(seed, int) and not isinstance(seed, bool), f"task.seed must be an integer, got {seed!r}.")
    until = list(task_cfg.get("until") or [])
    require(all(isinstance(stop, str) and stop for stop in until),
            f"task.until must be a list of non-empty strings, got {until!r}.")
    check_inputs(task_cfg.name, task_cfg.length, task_cfg.n, task_cfg.max_gen_toks)
    source_path(task_cfg.haystack, configured_data_dir)


def window_of(task_cfg) -> int | None:
    """Tokens one request of the task must fit in one model window: a generated task's `length`, else None
    (built-in tasks are lm-eval's own business; WikiText's rolling windows take `eval.max_length` by design)."""
    return None if kind_of(task_cfg) == "builtin" else int(task_cfg.length)


def require_window(task_name: str, window: int | None, max_length: int | None, what: str = "eval.max_length"):
    require(window is None or max_length is None or max_length >= window,
            f"task '{task_name}' needs {window} tokens in one window (its prompt and answer, or one chunk), but "
            f"{what} is {max_length}: set eval.max_length={window} or more (within the model's positions), or a "
            f"smaller task.length.")


def local_data(task_cfg, configured_data_dir: str | None) -> tuple[Path, dict | None]:
    """(the file the built-in task reads locally, its manifest when derived from the local file)."""
    path = local_path(task_cfg, configured_data_dir)
    derive = task_cfg.get("derive")
    if not derive:
        return path, None
    if derive not in DERIVED:
        raise did_you_mean("task.derive", derive, DERIVED)
    derived, manifest = DERIVED[derive](path, cache_dir() / "task_data")
    return derived, {"path": str(derived), **manifest}


def local_task_yaml(task_cfg, data_path: Path) -> dict:
    """The delta that turns the built-in task into one reading `data_path` as its evaluation split."""
    delta = {
        "include": str(builtin_yaml(task_cfg.builtin)),
        "task": task_cfg.name,
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {task_cfg.split: str(data_path)}},
    }
    # Only the evaluated split exists locally; zero-shot needs no other.
    delta.update({key: None for key in SPLIT_KEYS.values()})
    delta[SPLIT_KEYS[task_cfg.split]] = task_cfg.split
    delta.update(dict(task_cfg.get("overrides") or {}))
    return delta


def standalone_yaml(name: str, data_path: Path, version: int) -> dict:
    """What every generated task YAML holds: its name and its one test split, read from the JSONL file."""
    return {"task": name, "dataset_path": "json", "dataset_name": None,
            "dataset_kwargs": {"data_files": {"test": str(data_path)}}, "test_split": "test",
            "metadata": {"version": version}}


def long_context_yaml(task_cfg, data_path: Path) -> dict:
    """A generate_until task: the prompt as is (no few-shot, no chat template), greedy, scored by chai's
    string_match_all."""
    return standalone_yaml(task_cfg.name, data_path, LONG_CONTEXT_VERSION) | {
        "output_type": "generate_until", "doc_to_text": "input", "doc_to_target": "target",
        "generation_kwargs": {"until": list(task_cfg.get("until") or []), "do_sample": False,
                              "max_gen_toks": int(task_cfg.max_gen_toks)},
        "process_results": FunctionTag(f"{GLUE}.process_results"),
        "metric_list": [{"metric": METRIC, "aggregation": "mean", "higher_is_better": True}],
    }


def perplexity_yaml(task_cfg, data_path: Path) -> dict:
    """A loglikelihood_rolling task over the chunks' text, with lm-eval's own perplexity metrics."""
    return standalone_yaml(task_cfg.name, data_path, PERPLEXITY_VERSION) | {
        "output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "text",
        "metric_list": [{"metric": metric, "aggregation": aggregation, "higher_is_better": False}
                        for metric, aggregation in PERPLEXITY_METRICS.items()],
    }


def task_folder(name: str, task_yaml: dict) -> Path:
    """A folder holding only this task's YAML (so a built-in task of the same name cannot shadow it) and, when it
    names `!function`s, the module they come from. Under the cache and named by its content: runs with the same
    settings reuse it, so nothing piles up in the temp dir and nothing needs removing after the run (lm-eval reads
    the file again when it builds the task)."""
    files = {f"{name}.yaml": yaml.dump(task_yaml, Dumper=TaskDumper)}
    if any(isinstance(value, FunctionTag) for value in task_yaml.values()):
        files[f"{GLUE}.py"] = GLUE_TEXT
    content = "".join(text for _, text in sorted(files.items()))
    folder = cache_dir() / "tasks" / f"{name}-{hashlib.sha1(content.encode()).hexdigest()[:12]}"
    folder.mkdir(parents=True, exist_ok=True)
    for filename, text in files.items():
        target = folder / filename
        if not target.exists() or target.read_text() != text:
            write_atomic(target, text.encode())
    return folder


def generated_data(task_cfg, configured_data_dir: str | None, tokenizer) -> tuple[Path, dict]:
    """(data file, manifest) of a long_context or perplexity task, made with `tokenizer` or reused from the cache."""
    require(tokenizer is not None, f"task '{task_cfg.name}' is generated with the model's tokenizer, and there is "
                                   "none: set model.tokenizer=smollm2 or a path.")
    out_dir = cache_dir() / "task_data" / tokenizer_fingerprint(tokenizer)[:12]
    if kind_of(task_cfg) == "perplexity":
        return cached_c4_chunks(task_cfg.length, task_cfg.n, tokenizer, configured_data_dir, out_dir)
    return cached_task(task_cfg.name, task_cfg.length, task_cfg.n, task_cfg.seed, tokenizer, configured_data_dir,
                       out_dir, task_cfg.haystack, task_cfg.max_gen_toks)


def prepare_task(task_cfg, configured_data_dir: str | None, tokenizer=None) -> PreparedTask:
    """The task's lm-eval TaskManager and name, where its data comes from and, for generated or derived data, the
    file's manifest (with its sha256) for the record. Generated tasks need `tokenizer`."""
    from lm_eval.tasks import TaskManager

    source, kind = resolve_source(task_cfg, configured_data_dir), kind_of(task_cfg)
    if source == "hub":
        return PreparedTask(TaskManager(), task_cfg.name, source)
    if kind == "builtin":
        path, data = local_data(task_cfg, configured_data_dir)
        task_yaml = local_task_yaml(task_cfg, path)
    else:
        path, manifest = generated_data(task_cfg, configured_data_dir, tokenizer)
        data = {"path": str(path), **manifest}
        task_yaml = (perplexity_yaml if kind == "perplexity" else long_context_yaml)(task_cfg, path)
    folder = task_folder(task_cfg.name, task_yaml)
    manager = TaskManager(include_path=str(folder), include_defaults=False)
    return PreparedTask(manager, task_cfg.name, source, data, window_of(task_cfg))


def task_manager(task_cfg, configured_data_dir: str | None, tokenizer=None):
    """(TaskManager, task name, source)."""
    task = prepare_task(task_cfg, configured_data_dir, tokenizer)
    return task.manager, task.name, task.source

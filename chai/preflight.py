"""Every bad input fails in one line, before any model loads, in seconds (`run.py` calls `preflight(cfg)` before
the resume check, so neither a finished record nor a missing file hides the other).

Cheapest first: values (no imports), then files (data, hub caches, the model's config: JSON or a GGUF header,
never weights), and last the method against the model's shape, which imports the methods (torch) the run needs
anyway. Which files a mode needs: eval the task's data (or a cached hub copy), calibrate and membership the C4
corpus, bench none (C4 for a text prompt); every mode a model and its tokenizer (bench only for a text prompt).
"""

import json
import mmap
import os
import re
import struct
from pathlib import Path
from types import SimpleNamespace

from chai.config import MODES, check_init, compose_model
from chai.errors import ChaiError, did_you_mean, missing_model, require
from chai.paths import cache_dir, chunk_module, data_dir, data_dir_is_explicit, data_file, gguf_from_package
from chai.paths import gguf_snapshot_dir

AUTO_BATCH = re.compile(r"auto(:[1-9][0-9]*)?")  # lm-eval HFLM: "auto" detects the batch size, "auto:N" N times
# GGUF metadata key (after "<arch>.") -> transformers config field; value types -> struct formats (GGUF spec).
GGUF_FIELDS = {"block_count": "num_hidden_layers", "attention.head_count": "num_attention_heads",
               "attention.head_count_kv": "num_key_value_heads", "embedding_length": "hidden_size",
               "attention.key_length": "head_dim"}
GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
GGUF_STRING, GGUF_ARRAY = 8, 9


def preflight(cfg) -> None:
    """Raise a one-line ChaiError for the first bad input of a composed run config."""
    if cfg.mode not in MODES:
        raise did_you_mean("mode", cfg.mode, MODES)
    if cfg.mode == "eval":
        check_eval(cfg)
    check_data(cfg)
    config = model_config(cfg.model, cfg.offline, needs_tokenizer=needs_tokenizer(cfg))
    if cfg.mode in ("eval", "bench", "capacity"):
        check_methods(cfg, config)


def needs_tokenizer(cfg) -> bool:
    """Every mode reads text but bench (unless its prompt is text) and capacity (random token ids)."""
    if cfg.mode == "bench":
        return cfg.bench.get("prompt") == "text"
    return cfg.mode != "capacity"


def is_count(value, low: int = 1) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def check_eval(cfg) -> None:
    """Values lm-eval would take and then fail on (a traceback) or run away with (batch size 0 grew to 22 GB)."""
    size, limit = cfg.eval.batch_size, cfg.task.limit
    require(is_count(size) or (isinstance(size, str) and AUTO_BATCH.fullmatch(size) is not None),
            f"eval.batch_size must be a positive integer or auto (lm-eval: auto:N re-detects N times), got {size!r}.")
    # lm-eval reads a limit below 1 as a fraction of the set and anything else as a count (int(limit)).
    require(limit is None or is_count(limit) or (isinstance(limit, float) and 0 < limit < 1),
            f"task.limit must be a positive integer (examples), a fraction in (0, 1) of the set, or null (the full "
            f"set), got {limit!r}.")
    require(is_count(cfg.task.num_fewshot, 0),
            f"task.num_fewshot must be an integer >= 0, got {cfg.task.num_fewshot!r}.")
    require(cfg.eval.max_length is None or is_count(cfg.eval.max_length),
            f"eval.max_length must be a positive integer or null, got {cfg.eval.max_length!r}.")
    require(is_count(cfg.eval.kv_probe_tokens),
            f"eval.kv_probe_tokens must be a positive integer, got {cfg.eval.kv_probe_tokens!r}.")


def check_data(cfg) -> None:
    """The files the mode reads. A named data directory that does not exist is a typo, never a reason to fall
    back to the hub; the default one may be absent when the hub (or its cache) has the task."""
    reads_data = cfg.mode in ("calibrate", "membership") or (cfg.mode == "eval" and cfg.task.source != "hub")
    folder = data_dir(cfg.data_dir)
    if reads_data and data_dir_is_explicit(cfg.data_dir) and not folder.is_dir():
        raise ChaiError(f"data directory {folder} does not exist: set data_dir=... or CHAI_DATA_DIR to the shared "
                        f"data folder (it holds piqa/, c4/, ...).")
    if cfg.mode == "eval":
        check_task_data(cfg)
    elif cfg.mode in ("calibrate", "membership"):
        corpus = cfg.mode == "membership" and cfg.membership.corpus  # null: the calibration corpus
        data_file(corpus or cfg.calibration.corpus, cfg.data_dir)
    elif cfg.mode == "bench" and cfg.bench.get("prompt") == "text":
        from chai.perplexity import C4_FILE  # the text prompt's source (chai/runners/bench_prompt.py)

        data_file(C4_FILE, cfg.data_dir)


def check_task_data(cfg) -> None:
    """A local task's file; offline, a hub task needs a cached copy (else lm-eval ends in a ConnectionError)."""
    from chai.tasks import hub_dataset, resolve_source

    task = cfg.task
    if resolve_source(task, cfg.data_dir) == "local" or not cfg.offline:  # a local task's file is checked there
        return
    dataset = hub_dataset(task.builtin)
    if dataset is None or hub_dataset_cached(dataset):
        return
    if task.source == "auto":
        raise ChaiError(
            f"no local copy of task '{task.name}' at {data_dir(cfg.data_dir) / task.local_file}, and the hub is "
            f"offline: set data_dir=... (or CHAI_DATA_DIR) to the folder holding {task.local_file}, or "
            f"task.source=hub offline=false with network."
        )
    raise ChaiError(f"task '{task.name}' reads '{dataset}' from the hub, which is offline and has no cached copy: "
                    f"set task.source=local with data_dir=..., or offline=false with network.")


def hub_dataset_cached(dataset: str) -> bool:
    """Whether the hub cache (`datasets--org--name`) or the datasets library's own cache (`org___name`, its name for
    a hub dataset it has prepared) holds a copy, which datasets can load offline."""
    from huggingface_hub import constants  # light: huggingface_hub imports its parts lazily

    datasets_cache = Path(os.environ.get("HF_DATASETS_CACHE") or Path(constants.HF_HOME) / "datasets")
    return ((datasets_cache / dataset.replace("/", "___")).is_dir()
            or (Path(constants.HF_HUB_CACHE) / f"datasets--{dataset.replace('/', '--')}").is_dir())


def model_config(model_cfg, offline: bool = True, needs_tokenizer: bool = True):
    """The model's architecture fields (num_hidden_layers, num_attention_heads, ...) as a namespace, read without
    weights; None when only the network could tell. A model (or tokenizer) missing offline fails here."""
    check_init(model_cfg)
    tokenizer = model_cfg.get("tokenizer", "self")
    if tokenizer not in ("self", "none"):
        model_config(compose_model(tokenizer), offline)  # the model lending its tokenizer must be there too
    if model_cfg.get("arch") and (model_cfg.init == "random" or model_cfg.source == "config"):
        fields = dict(model_cfg.arch)
        if needs_tokenizer and tokenizer == "self" and model_cfg.source == "hub":  # random weights, real tokenizer
            hub_config(model_cfg, offline, "model.init=random needs no weights, but this mode needs the tokenizer "
                                           "(or borrow one: ++model.tokenizer=smollm2)")
    elif model_cfg.source == "gguf_package":
        fields = gguf_config(model_cfg)
    else:
        fields = hub_config(model_cfg, offline)
    if fields is None:
        return None
    if model_cfg.get("expand_kv_heads"):
        fields["num_key_value_heads"] = fields["num_attention_heads"]
    return SimpleNamespace(**fields)


def hub_config(model_cfg, offline: bool, need: str = "") -> dict | None:
    """config.json of `model.path`, else of the hub cache's copy of `hf_id` (None: online, not cached yet)."""
    need = f"; {need}" if need else ""
    if model_cfg.get("path"):
        found = Path(str(model_cfg.path)).expanduser() / "config.json"
        if not found.exists():
            raise missing_model(model_cfg.hf_id, f"no config.json in model.path={model_cfg.path}{need}")
        return json.loads(found.read_text())
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(model_cfg.hf_id, "config.json")
    if isinstance(found, str):
        return json.loads(Path(found).read_text())
    if offline:
        raise missing_model(model_cfg.hf_id, f"not in the hub cache{need}")
    return None


def gguf_config(model_cfg) -> dict | None:
    """The de-quantized snapshot's config.json when it exists, else the GGUF header; None for a chunked GGUF not
    yet assembled (its shape is checked once the model loads)."""
    if model_cfg.get("assemble_module"):
        chunk_module(model_cfg.package, model_cfg.assemble_module, check_only=True)
        found = sorted(cache_dir().glob(f"{model_cfg.name}-*/config.json"))
        return json.loads(found[-1].read_text()) if found else None
    gguf = gguf_from_package(model_cfg.package, model_cfg.gguf_file)
    snapshot = gguf_snapshot_dir(model_cfg.name, gguf) / "config.json"
    return json.loads(snapshot.read_text()) if snapshot.exists() else gguf_architecture(gguf)


def gguf_architecture(path: Path) -> dict:
    """Attention-shape fields from a GGUF file's metadata, walking its header directly: the gguf package's reader
    decodes every tokenizer string into its own array and takes ~10 s on SmolLM2's 49k-token vocabulary."""
    meta = {}
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise ChaiError(f"{path} is not a GGUF file.")
        (count,), pos = struct.unpack_from("<Q", buf, 16), 24  # magic, version u32, tensor count u64, kv count u64
        for _ in range(count):
            key, pos = _gguf_string(buf, pos)
            (kind,) = struct.unpack_from("<I", buf, pos)
            meta[key], pos = _gguf_value(buf, pos + 4, kind)
    arch = meta["general.architecture"]
    return {field: meta[f"{arch}.{key}"] for key, field in GGUF_FIELDS.items() if f"{arch}.{key}" in meta}


def _gguf_string(buf, pos: int) -> tuple[str, int]:
    (size,) = struct.unpack_from("<Q", buf, pos)
    return bytes(buf[pos + 8 : pos + 8 + size]).decode("utf-8", "replace"), pos + 8 + size


def _gguf_value(buf, pos: int, kind: int) -> tuple[object, int]:
    """(value, position after it); arrays are skipped (None): only scalar shape fields are needed."""
    if kind == GGUF_STRING:
        return _gguf_string(buf, pos)
    if kind != GGUF_ARRAY:
        fmt = "<" + GGUF_SCALARS[kind]
        return struct.unpack_from(fmt, buf, pos)[0], pos + struct.calcsize(fmt)
    item, size = struct.unpack_from("<IQ", buf, pos)
    pos += 12
    if item in GGUF_SCALARS:
        return None, pos + size * struct.calcsize("<" + GGUF_SCALARS[item])
    for _ in range(size):  # strings (the vocabulary) or nested arrays: walk the lengths without decoding
        pos = pos + 8 + struct.unpack_from("<Q", buf, pos)[0] if item == GGUF_STRING else _gguf_value(buf, pos, item)[1]
    return None, pos


def check_methods(cfg, config) -> None:
    """Build the method (its settings are validated on construction) and check it against the model's shape;
    bench also runs its baseline method."""
    from chai.methods import build_method  # torch and transformers: only once the cheap checks have passed

    method_cfgs = [cfg.method] + ([{"name": cfg.bench.baseline_method}] if cfg.mode in ("bench", "capacity") else [])
    for method_cfg in method_cfgs:
        method = build_method(method_cfg)
        if config is not None:
            method.check_shape(config)

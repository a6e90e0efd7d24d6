"""mode=eval: score the model under the method zero-shot with lm-eval (chai.evaluate), measure the K,V bytes one
token of context costs under the method, and write the per-sample outputs beside runs.jsonl.

The record also keeps each item's outcome (`items`): the samples files stay on the machine that ran, and paired
statistics (chai/report/stats.py) need both runs' outcomes item by item. A task whose data chai made or derived
(long-context, C4 chunks, WikiText articles) also records that file's sha256 and the inputs that made it
(`task_data`)."""

from pathlib import Path

from chai.evaluate import evaluate, kv_record, write_samples
from chai.runners.record import method_facts
from chai.runners.setup import setup
from chai.tasks import prepare_task, require_window, resolve_source, window_of

ITEM_METRICS = ("acc", "acc_norm", "string_match_all")  # lm-eval's per-sample outcomes (acc: multiple choice)
FRACTION_METRICS = ("string_match_all",)  # may give partial credit (several targets): then one number per item


def outcomes(values: list, metric: str) -> str | list | None:
    """"0110..." when every value is 0 or 1 (the form paired statistics read); for a metric with partial credit,
    otherwise, the values in [0, 1] rounded to 4 digits; None when neither fits."""
    if all(isinstance(v, (bool, int, float)) and v in (0, 1) for v in values):
        return "".join("1" if v else "0" for v in values)
    if metric in FRACTION_METRICS and all(isinstance(v, (int, float)) and 0 <= v <= 1 for v in values):
        return [round(float(v), 4) for v in values]
    return None


def items_of(samples: list[dict]) -> dict | None:
    """{"doc_ids": "range" (0..n-1, as lm-eval numbers a full set or its first `limit` docs) or the ids,
    "<metric>": "0110..." one character per item in doc-id order} for each metric every sample scored 0 or 1 (a
    list of numbers for string_match_all with partial credit). About 1 byte per item and metric: HellaSwag's 10042
    items fit in ~20 KB. None without samples or with a doc id twice (repeats: no single outcome per item to
    pair)."""
    ordered = sorted(samples, key=lambda s: int(s["doc_id"]))
    ids = [int(s["doc_id"]) for s in ordered]
    if not ids or len(set(ids)) != len(ids):
        return None
    found = {"doc_ids": "range" if ids == list(range(len(ids))) else ids}
    for metric in ITEM_METRICS:
        values = [s.get(metric) for s in ordered]
        if (kept := outcomes(values, metric)) is not None:
            found[metric] = kept
    return found


def task_data(data: dict, window: int | None, max_length: int) -> dict:
    """The data file's manifest and how it met the model's window: a generated prompt plus its answer, or a C4
    chunk, fits `max_length` (checked before scoring), so lm-eval neither cut a prompt nor split a chunk."""
    return {**data, "max_length": max_length} | ({"window": window, "fits_one_window": True} if window else {})


def run(cfg, record: dict) -> dict:
    resolve_source(cfg.task, cfg.data_dir)  # a bad task fails before the model loads
    require_window(cfg.task.name, window_of(cfg.task), cfg.eval.max_length)
    ready = setup(cfg)
    model, method = ready.model, ready.method
    task = prepare_task(cfg.task, cfg.data_dir, ready.tokenizer)
    scored = evaluate(model, ready.tokenizer, method, task.manager, task.name, cfg, window=task.window)
    samples = scored.pop("samples")
    folder = Path(record["results_path"]).parent / "samples"
    scored["samples_path"] = str(write_samples(folder, record["run_id"], samples))
    scored["items"] = items_of(samples)
    scored["task_source"] = task.source
    if task.data is not None:
        scored["task_data"] = task_data(task.data, task.window, scored["max_length"])
    facts = method_facts(method)  # before the K,V probe: the facts and counters are the evaluation's alone
    scored["kv_bytes_per_token"] = kv_record(model, method, ready.tokenizer, cfg)
    scored.update(facts)
    scored["dtype"] = str(model.dtype).replace("torch.", "")
    return scored

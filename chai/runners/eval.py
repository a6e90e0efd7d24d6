"""mode=eval: score the model under the method zero-shot with lm-eval (chai.evaluate), measure the K,V bytes one
token of context costs under the method, and write the per-sample outputs beside runs.jsonl.

The record also keeps each item's outcome (`items`): the samples files stay on the machine that ran, and paired
statistics (chai/report/stats.py) need both runs' outcomes item by item."""

from pathlib import Path

from chai.evaluate import evaluate, kv_record, write_samples
from chai.runners.record import method_facts
from chai.runners.setup import setup
from chai.tasks import task_manager

ITEM_METRICS = ("acc", "acc_norm")  # lm-eval's per-sample multiple-choice outcomes, 0 or 1


def items_of(samples: list[dict]) -> dict | None:
    """{"doc_ids": "range" (0..n-1, as lm-eval numbers a full set or its first `limit` docs) or the ids,
    "<metric>": "0110..." one character per item in doc-id order} for each metric every sample scored 0 or 1.
    About 1 byte per item and metric: HellaSwag's 10042 items fit in ~20 KB. None without samples or with a
    doc id twice (repeats: no single outcome per item to pair)."""
    ordered = sorted(samples, key=lambda s: int(s["doc_id"]))
    ids = [int(s["doc_id"]) for s in ordered]
    if not ids or len(set(ids)) != len(ids):
        return None
    found = {"doc_ids": "range" if ids == list(range(len(ids))) else ids}
    for metric in ITEM_METRICS:
        values = [s.get(metric) for s in ordered]
        if all(isinstance(v, (bool, int, float)) and v in (0, 1) for v in values):
            found[metric] = "".join("1" if v else "0" for v in values)
    return found


def run(cfg, record: dict) -> dict:
    manager, task_name, source = task_manager(cfg.task, cfg.data_dir)  # a bad task fails before the model loads
    ready = setup(cfg)
    model, method = ready.model, ready.method
    scored = evaluate(model, ready.tokenizer, method, manager, task_name, cfg)
    samples = scored.pop("samples")
    folder = Path(record["results_path"]).parent / "samples"
    scored["samples_path"] = str(write_samples(folder, record["run_id"], samples))
    scored["items"] = items_of(samples)
    scored["task_source"] = source
    scored["kv_bytes_per_token"] = kv_record(model, method, ready.tokenizer, cfg)
    scored.update(method_facts(method))
    scored["dtype"] = str(model.dtype).replace("torch.", "")
    return scored

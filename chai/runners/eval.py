"""mode=eval: score the model under the method zero-shot with lm-eval (chai.evaluate), measure the K,V bytes one
token of context costs under the method, and write the per-sample outputs beside runs.jsonl."""

from pathlib import Path

from chai.evaluate import evaluate, kv_record, write_samples
from chai.runners.record import method_facts
from chai.runners.setup import setup
from chai.tasks import task_manager


def run(cfg, record: dict) -> dict:
    manager, task_name, source = task_manager(cfg.task, cfg.data_dir)  # a bad task fails before the model loads
    ready = setup(cfg)
    model, method = ready.model, ready.method
    scored = evaluate(model, ready.tokenizer, method, manager, task_name, cfg)
    samples = scored.pop("samples")
    folder = Path(record["results_path"]).parent / "samples"
    scored["samples_path"] = str(write_samples(folder, record["run_id"], samples))
    scored["task_source"] = source
    scored["kv_bytes_per_token"] = kv_record(model, method, ready.tokenizer, cfg)
    scored.update(method_facts(method))
    scored["dtype"] = str(model.dtype).replace("torch.", "")
    return scored

"""The eval runner end to end: real lm-eval scoring on real PIQA rows, the record, resume, the wandb mirror."""

import json

import pytest
import yaml
from lm_eval import simple_evaluate
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

from chai.cli import run_mode
from chai.config import compose_model
from chai.models import load_model
from chai.paths import data_dir
from chai.records import append_jsonl, read_jsonl
from chai.tasks import builtin_yaml
from tests.helpers import compose_cfg

pytestmark = pytest.mark.slow
RECORD_FIELDS = {
    "run_id", "run_key", "time", "mode", "experiment", "model", "method", "task", "seed", "overrides", "config",
    "git", "versions", "device", "metrics", "n_examples", "n_requests", "timing", "kv_bytes_per_token",
    "samples_path", "task_source", "method_info", "display", "run_stats", "dtype", "results_path",
}


def run_cfg(tmp_path, *overrides):
    return compose_cfg([f"results_dir={tmp_path}", "logger.wandb.mode=disabled", "device=cpu", *overrides])


def lm_eval_directly(model_name: str, seed: int, rows: int, tmp_path) -> dict:
    """What lm-eval alone gives: its own PIQA task definition, pointed at the same local rows."""
    model, tokenizer = load_model(compose_model(model_name), device="cpu", seed=seed)
    folder = tmp_path / "direct_task"
    folder.mkdir()
    task = {
        "include": str(builtin_yaml("piqa/piqa.yaml")), "task": "piqa", "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"validation": str(data_dir() / "piqa" / "piqa_validation.jsonl")}},
        "training_split": None,
    }
    (folder / "piqa.yaml").write_text(yaml.safe_dump(task))
    results = simple_evaluate(
        model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8), tasks=["piqa"], limit=rows,
        task_manager=TaskManager(include_path=str(folder), include_defaults=False), num_fewshot=0,
    )
    return results["results"]["piqa"]


@pytest.mark.parametrize("model_name", ["tiny_llama", "tiny_opt"])
def test_runner_accuracy_equals_lm_eval_called_directly(model_name, tmp_path, piqa_rows):
    record = run_mode(run_cfg(tmp_path, f"model={model_name}", "task.limit=20"), overrides=[])
    direct = lm_eval_directly(model_name, record["seed"], 20, tmp_path)
    assert record["n_examples"] == 20 and record["task_source"] == "local"
    assert record["metrics"]["acc"] == direct["acc,none"]
    assert record["metrics"]["acc_norm"] == direct["acc_norm,none"]
    assert record["metrics"]["acc_stderr"] == pytest.approx(direct["acc_stderr,none"])


def test_record_has_every_field_and_samples_beside_it(tmp_path):
    record = run_mode(run_cfg(tmp_path, "model=tiny_llama", "task.limit=4"), overrides=["task.limit=4"])
    stored = read_jsonl(tmp_path / "adhoc" / "runs.jsonl")
    assert len(stored) == 1 and stored[0]["run_id"] == record["run_id"]
    assert RECORD_FIELDS <= set(stored[0]), RECORD_FIELDS - set(stored[0])
    assert stored[0]["overrides"] == ["task.limit=4"]
    kv = stored[0]["kv_bytes_per_token"]
    # MHA on tiny_llama: 3 layers x 8 KV heads x head_dim 8 x 4 bytes, for K and for V.
    assert kv["analytic"]["k"] == kv["measured"]["k"] == 3 * 8 * 8 * 4
    samples = [json.loads(line) for line in open(stored[0]["samples_path"])]
    assert len(samples) == 4 and all("resps" in s for s in samples)


def test_finished_cells_are_skipped_and_failures_recorded(tmp_path):
    cfg = run_cfg(tmp_path, "model=tiny_llama", "task.limit=2")
    assert run_mode(cfg, overrides=[]) is not None
    assert run_mode(cfg, overrides=[]) is None  # same settings: resumed, not re-run
    bad = run_cfg(tmp_path, "model=tiny_llama", "task.limit=2", "task.source=local", f"data_dir={tmp_path}")
    failed = run_mode(bad, overrides=[], in_sweep=True)
    assert "piqa_validation.jsonl" in failed["error"]
    assert [bool(r.get("error")) for r in read_jsonl(tmp_path / "adhoc" / "runs.jsonl")] == [False, True]
    assert failed["display"]["label"] == "MHA"  # a failed cell is named like a finished one (no migration needed)


def test_wandb_disabled_writes_nothing(tmp_path):
    wandb_dir = tmp_path / "wandb_here"
    run_mode(run_cfg(tmp_path, "model=tiny_llama", "task.limit=2", f"logger.wandb.dir={wandb_dir}"), overrides=[])
    assert not wandb_dir.exists()


def test_a_torn_line_never_swallows_the_next_record(tmp_path):
    path = tmp_path / "runs.jsonl"
    append_jsonl(path, {"a": 1})
    with path.open("a") as f:
        f.write('{"half": ')  # a writer killed mid-line
    append_jsonl(path, {"b": 2})
    assert read_jsonl(path) == [{"a": 1}, {"b": 2}]


def test_a_run_prints_one_bar_its_summary_and_where_wandb_put_it(tmp_path, capfd, caplog, recwarn, monkeypatch):
    """Not lm-eval's log, not its tokenizing bar, not a FutureWarning, not wandb's ~30 lines."""
    monkeypatch.delenv("WANDB_MODE", raising=False)
    wandb_dir = tmp_path / "wandb_here"
    cfg = run_cfg(tmp_path, "model=tiny_llama", "task.limit=4", "logger.wandb.mode=offline",
                  f"logger.wandb.dir={wandb_dir}")
    record = run_mode(cfg, overrides=[])
    out, err = capfd.readouterr()
    assert err.count("Running loglikelihood requests: 100%") == 1 and "Tokenizing inputs" not in err
    assert not [r.getMessage() for r in caplog.records if r.name.startswith("lm_eval")]
    assert not [str(w.message) for w in recwarn if issubclass(w.category, FutureWarning)]
    assert "wandb:" not in out + err
    assert [line for line in out.splitlines() if "wandb" in line] == [
        f"wandb offline run: {next((wandb_dir / 'wandb').glob('offline-run-*'))} (upload: wandb sync <that folder>)"]
    assert f"mha | tiny_llama | piqa | n=4: acc {100 * record['metrics']['acc']:.1f} ± " in out

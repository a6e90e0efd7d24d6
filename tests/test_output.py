"""What a person reads: each mode's summary shows its own figures, a multirun ends with one table of its jobs read
back from their records (delta to MHA, standard errors, also when every job was skipped), and `make run` is the
quickstart sweep: MHA and CHAI on a PIQA subset."""

import json
import re
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from hydra.experimental.callback import Callback
from hydra.utils import instantiate
from omegaconf import OmegaConf

from chai.cli import SweepTable, eval_lines, job_records, summarize, sweep_table
from chai.paths import CONF_DIR, ROOT, data_dir
from chai.records import append_jsonl, run_key

PIQA_ROWS = 1838


def eval_record(method: str, acc: float, stderr: float, kv: float, task: str = "piqa", **extra) -> dict:
    config = {"method": {"name": method}, "model": {"name": "smollm2"}, "task": {"name": task, "limit": 200},
              "mode": "eval", "results_dir": "results", "experiment_name": "quickstart",
              "bench": {"baseline_method": "mha"}}
    return {"run_key": run_key(config), "config": config, "mode": "eval", "method": method, "model": "smollm2",
            "task": task, "time": "2020-01-01T00:00:00+0000", "results_path": "results/quickstart/runs.jsonl",
            "metrics": {"acc": acc, "acc_stderr": stderr}, "kv_bytes_per_token": {"measured": {"total": kv}},
            "timing": {"wall_s": 130.0}, "n_examples": 200, **extra}


def row(lines: list[str], *starts: str) -> str:
    return next(line for line in lines if line.split()[: len(starts)] == list(starts))


def test_sweep_table_gives_stderr_and_the_difference_from_mha_of_the_same_task():
    records = [eval_record("mha", 0.643, 0.0112, 46080), eval_record("chai", 0.567, 0.0116, 38912),
               eval_record("mha", 0.516, 0.0102, 46080, task="arc_easy"),
               eval_record("chai", 0.388, 0.01, 38912, task="arc_easy"),
               {**eval_record("sparq", 0.0, 0.0, 0.0), "error": "ChaiError: no such thing"}]
    lines = sweep_table(records)
    assert lines[0].split()[:3] == ["method", "task", "acc"]  # the task varies, so it gets a column
    assert row(lines, "mha", "piqa").split()[2:5] == ["64.3", "±", "1.1"]
    assert "46080 (100.0%)" in row(lines, "mha", "piqa") and "+" not in row(lines, "mha", "piqa")
    chai = row(lines, "chai", "piqa")
    assert chai.split()[2:6] == ["56.7", "±", "1.2", "-7.6"] and "38912 (84.4%)" in chai
    assert row(lines, "chai", "arc_easy").split()[5] == "-12.8"  # against MHA on arc_easy, not on piqa
    assert "failed: ChaiError: no such thing" in row(lines, "sparq")
    assert "2 min 10 s" in chai


def test_no_mha_row_means_no_delta():
    lines = sweep_table([eval_record("chai", 0.567, 0.0116, 38912)])
    assert lines[0].split()[:2] == ["method", "acc"]  # one task: no task column
    assert row(lines, "chai").split()[1:5] == ["56.7", "±", "1.2", "38912"]


def test_generation_and_perplexity_tasks_show_their_own_score_not_a_share_of_perplexity():
    needle = [{**eval_record(m, 0, 0, kv, task="niah_single"), "metrics": {"string_match_all": score}}
              for m, score, kv in (("mha", 0.9, 46080), ("chai", 0.75, 38912))]
    lines = sweep_table(needle)
    assert lines[0].split()[:2] == ["method", "string_match_all"]
    assert row(lines, "chai").split()[1:3] == ["75.0", "-15.0"]
    ppl = [{**eval_record(m, 0, 0, 46080, task="c4_ppl"), "metrics": {"token_perplexity": v, "bits_per_byte": 0.9}}
           for m, v in (("mha", 20.5), ("chai", 23.25))]
    lines = sweep_table(ppl)
    assert lines[0].split()[:3] == ["method", "token_perplexity", "vs"]
    assert row(lines, "chai").split()[1:3] == ["23.25", "+2.75"]  # perplexity as it is, not x 100 "%"
    line = eval_lines(ppl[1])[0]
    assert "token_perplexity 23.25, bits_per_byte 0.9 |" in line  # as they are: no x 100, no %
    assert "acc 56.7 ± 1.2 %" in eval_lines(eval_record("chai", 0.567, 0.0116, 38912))[0]


def test_other_swept_settings_get_a_column_and_a_failure_does_not_widen_the_table():
    ok = eval_record("mha", 0.5, 0.5, 1536, overrides=["experiment=grid", "model.dtype=float32"])
    bad = {**eval_record("mha", 0.0, 0.0, 0.0, overrides=["experiment=grid", "model.dtype=float5"]),
           "error": "ChaiError: unknown model.dtype 'float5'. Valid: auto, float32, float16, and a long tail " * 2}
    header, rule, first, second = sweep_table([ok, bad])
    assert header.split()[:3] == ["method", "settings", "acc"] and len(first) == len(rule)
    assert first.split()[:3] == ["mha", "model.dtype=float32", "50.0"]
    assert second.split()[:3] == ["mha", "model.dtype=float5", "failed:"] and len(second) > len(rule)


def write_job(sweep, name: str, config: dict) -> None:
    (sweep / name / ".hydra").mkdir(parents=True)
    (sweep / name / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(config))


def test_multirun_end_reads_each_jobs_latest_record(tmp_path, capsys):
    runs = tmp_path / "quickstart" / "runs.jsonl"
    mha, chai = eval_record("mha", 0.6, 0.01, 46080), eval_record("chai", 0.5, 0.01, 38912)
    for rec in (mha, chai):
        rec["config"]["results_dir"] = str(tmp_path)
        rec["run_key"] = run_key(rec["config"])
        rec["results_path"] = str(runs)
    append_jsonl(runs, {**chai, "metrics": {"acc": 0.1, "acc_stderr": 0.01}})  # superseded by the later record
    append_jsonl(runs, mha)
    append_jsonl(runs, chai)
    append_jsonl(runs, eval_record("sparq", 0.2, 0.01, 46080))  # not a job of this sweep
    sweep = tmp_path / "sweep"
    write_job(sweep, "10", chai["config"])  # job folders sort as numbers: 2 before 10
    write_job(sweep, "2", mha["config"])
    assert [r["method"] for r in job_records(sweep, ".hydra")] == ["mha", "chai"]
    callback = instantiate(OmegaConf.load(CONF_DIR / "config.yaml").hydra.callbacks.sweep_table)
    assert isinstance(callback, SweepTable) and isinstance(callback, Callback)
    callback.on_multirun_start(OmegaConf.create())
    callback.on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}, "output_subdir": ".hydra"}}))
    out = capsys.readouterr().out
    assert "2 jobs in" in out and "sparq" not in out
    assert row(out.splitlines(), "chai").split()[1:5] == ["50.0", "±", "1.0", "-10.0"]
    assert "2 of these rows were recorded by an earlier run" in out and f"records: {runs}" in out


def bench_run_record() -> dict:
    cells = [{"path": "sdpa", "batch": 1, "seq_len": 16, "ttft_ms": 3.25, "ttnt_ms": 1.5, "kv_bytes": 24576,
              "error": None, "oom": False},
             {"path": "method", "batch": 2, "seq_len": 32, "ttft_ms": None, "ttnt_ms": None, "kv_bytes": 98304,
              "error": "OutOfMemoryError: CUDA out of memory", "oom": True}]
    return {"mode": "bench", "method": "chai", "model": "tiny_llama", "task": "piqa", "n_examples": None,
            "results_path": "r/bench/runs.jsonl", "timing": {"wall_s": 3.0},
            "bench_summary": {"measured": 2, "reused": 0, "errors": 1, "oom": 1, "paths": ["sdpa", "method"],
                              "skipped_paths": ["method_static: no static_cache"], "cells_path": "r/bench/runs.jsonl",
                              "cells": cells}}


def test_summaries_show_each_modes_own_figures(capsys):
    summarize(bench_run_record())
    bench = capsys.readouterr().out
    assert "2 cells measured, 0 reused, 1 failed" in bench and "nan" not in bench.lower()
    assert row(bench.splitlines(), "sdpa").split() == ["sdpa", "1", "x", "16", "3.25", "1.500", "24.6", "kB"]
    assert row(bench.splitlines(), "method").split()[4:6] == ["OOM:", "OutOfMemoryError:"]
    assert "left out: method_static" in bench
    summarize({"mode": "calibrate", "model": "smollm2", "timing": {"wall_s": 61.2},
               "calibration": {"path": "results/calibration/smollm2.json", "chosen": [3, 4, 3], "n_docs": 1024}})
    calibrate = capsys.readouterr().out
    assert "1024 documents in 61.2 s -> results/calibration/smollm2.json" in calibrate
    assert "clusters per layer: [3, 4, 3]" in calibrate
    summarize({"mode": "membership", "model": "smollm2", "results_path": "r/runs.jsonl",
               "membership": {"tokens": [1, 2, 5, 20], "changed_fraction": [0.3, 0.2, 0.05, 0.0],
                              "reference_tokens": 20, "n_docs": 64}})
    assert "64 documents" in (m := capsys.readouterr().out) and "t=1 30%, t=2 20%, t=5 5%" in m
    summarize(eval_record("chai", 0.567, 0.0116, 38912))
    assert "acc 56.7 ± 1.2" in (e := capsys.readouterr().out) and "K,V 38912 bytes/token" in e


def test_make_run_is_the_quickstart_sweep_of_mha_and_chai_on_a_piqa_subset():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["experiment=quickstart"], return_hydra_config=True)
        mine = compose(config_name="config", overrides=["experiment=quickstart", "task=arc_easy", "task.limit=9"],
                       return_hydra_config=True)
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN" and cfg.hydra.sweeper.params == {"method": "mha,chai"}
    assert cfg.model.name == "smollm2" and cfg.task.name == "piqa" and cfg.mode == "eval"
    assert 0 < cfg.task.limit < PIQA_ROWS and cfg.experiment_name == "quickstart"
    assert cfg.results_dir == "results"  # where the committed SmolLM2 calibration artifact is
    assert (ROOT / "results" / "calibration" / "smollm2.json").exists()
    assert (mine.task.name, mine.task.limit) == ("arc_easy", 9)  # make run ARGS=... still wins
    recipe = re.search(r"^run:.*\n\t(.*)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert recipe == "$(PY) run.py experiment=quickstart $(ARGS)"


@pytest.mark.slow
def test_a_real_multirun_ends_with_the_table_also_when_resumed(tmp_path):
    """run.py itself, on tiny_llama: the callback is wired through conf/config.yaml and finds the jobs' records."""
    if not (data_dir() / "c4" / "c4_validation_2k.jsonl").exists():
        pytest.skip("no C4 calibration file in the data directory (CHAI on tiny_llama calibrates first)")
    args = [sys.executable, str(ROOT / "run.py"), "experiment=quickstart", "model=tiny_llama", "task.limit=2",
            f"results_dir={tmp_path}", "logger.wandb.mode=disabled", "eval.kv_probe_tokens=8", "device=cpu",
            "calibration.n_docs=4", "calibration.seq_len=24", "calibration.feature_tokens=8"]
    outs = []
    for sweep in ("first", "again"):
        done = subprocess.run([*args, f"hydra.sweep.dir={tmp_path / sweep}"], capture_output=True, text=True,
                              cwd=ROOT, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        outs.append(done.stdout)
    for out in outs:
        table = out[out.index("2 jobs in") :].splitlines()
        mha, chai = row(table, "mha").split(), row(table, "chai").split()
        assert mha[2] == chai[2] == "±" and re.fullmatch(r"[+-]\d+\.\d", chai[4])  # acc ± stderr, delta to MHA
        assert f"records: {tmp_path / 'quickstart' / 'runs.jsonl'}" in out
    assert "skip: chai/tiny_llama/piqa" in outs[1] and "2 of these rows were recorded by an earlier run" in outs[1]
    records = [json.loads(line) for line in (tmp_path / "quickstart" / "runs.jsonl").read_text().splitlines()]
    assert [r["method"] for r in records] == ["mha", "chai"]

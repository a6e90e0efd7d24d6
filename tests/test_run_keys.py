"""A run's key holds exactly the settings that can change its result: resume finds a finished cell again whatever
`resume` or another mode's settings say, re-runs it when a setting of its own changes, and still finds the records
written under the old key function (the committed ones included)."""

import copy
import hashlib
import json

import pytest
from omegaconf import OmegaConf

from chai.paths import ROOT
from chai.method_defaults import missing_means
from chai.records import already_recorded, append_jsonl, read_jsonl, record_key, records_by_key, run_key
from tests.helpers import compose_cfg

OLD_VOLATILE = ("experiment_name", "results_dir", "logger", "data_dir", "hydra", "offline")


def old_run_key(config: dict) -> str:
    """The key function every committed record was stored with: everything but the volatile keys."""
    stable = {k: v for k, v in config.items() if k not in OLD_VOLATILE}
    return hashlib.sha1(json.dumps(stable, sort_keys=True, default=str).encode()).hexdigest()[:16]


def config(*overrides: str) -> dict:
    """The resolved config `python run.py <overrides>` records."""
    return OmegaConf.to_container(compose_cfg(["model=tiny_llama", *overrides]), resolve=True)


def finished(path, cfg: dict, **fields) -> None:
    append_jsonl(path, {"run_key": run_key(cfg), "config": cfg, "mode": cfg["mode"], **fields})


@pytest.fixture
def eval_cell(tmp_path):
    path = tmp_path / "runs.jsonl"
    finished(path, config("method=chai", "task=piqa"))
    return path


@pytest.mark.parametrize("change", ["resume=false", "bench.new_tokens=8", "bench.batch_sizes=[4]",
                                    "membership.n_docs=8", "experiment_name=other", "logger.wandb.mode=disabled",
                                    "method.num_clusters=null"])  # null: CHAI's default, said out loud
def test_a_finished_eval_cell_is_found_again_whatever_other_modes_say(eval_cell, change):
    assert already_recorded(eval_cell, config("method=chai", "task=piqa", change))


@pytest.mark.parametrize("change", ["method.num_clusters=4", "method.membership_tokens=3", "method=chai_static",
                                    "task=arc_easy", "task.limit=50", "model=tiny_opt", "eval.batch_size=2",
                                    "calibration.n_docs=16", "seed=1", "mode=bench"])
def test_a_setting_that_can_change_the_result_is_another_cell(eval_cell, change):
    assert not already_recorded(eval_cell, config("method=chai", "task=piqa", change))


def test_a_failed_run_is_not_finished(tmp_path):
    path = tmp_path / "runs.jsonl"
    finished(path, config("method=chai"), error="RuntimeError: boom")
    assert not already_recorded(path, config("method=chai"))


def test_each_mode_keys_only_its_own_settings():
    bench, calibrate, membership = (config(f"mode={mode}") for mode in ("bench", "calibrate", "membership"))
    for cfg, ignored, kept in (
        (bench, ["task.limit=5", "eval.batch_size=2", "membership.n_docs=8"], ["bench.new_tokens=8", "method=chai"]),
        (calibrate, ["method=chai", "task=arc_easy", "bench.new_tokens=8", "membership.n_docs=8"],
         ["calibration.n_docs=16", "model=tiny_opt"]),
        (membership, ["task=arc_easy", "eval.batch_size=2", "bench.new_tokens=8"],
         ["membership.n_docs=8", "calibration.corpus=x.jsonl", "method=chai"]),
    ):
        mode = f"mode={cfg['mode']}"
        assert all(run_key(config(mode, o)) == run_key(cfg) for o in ignored), cfg["mode"]
        assert all(run_key(config(mode, o)) != run_key(cfg) for o in kept), cfg["mode"]


def test_bench_cells_key_their_cell_not_the_task():
    """A bench cell's config (chai.bench.cell_config: the run's config, the path's method, bench.cell) keeps its
    identity: batch, sequence, path and device count; task and eval settings never did anything to it."""
    cell = config("mode=bench", "method=chai")
    cell["bench"]["cell"] = {"batch": 1, "seq_len": 16, "path": "method", "device": "cpu"}
    other_task = copy.deepcopy(cell) | {"task": {"name": "arc_easy", "limit": 3}}
    assert run_key(other_task) == run_key(cell)
    bigger = copy.deepcopy(cell)
    bigger["bench"]["cell"]["batch"] = 2
    assert run_key(bigger) != run_key(cell)


def test_a_method_config_listing_more_of_its_settings_keys_the_same_cell(tmp_path):
    """CHAI-static's config used to list 4 settings, it now composes all of its dataclass's: a record with the
    short list and the old key is found by today's config, and a setting off its default is still told apart."""
    now = config("method=chai_static", "task=piqa", "method.count_rule=kneedle")  # the rule it ran (missing_means)
    then = copy.deepcopy(now)
    then["method"] = {k: now["method"][k] for k in ("name", "layer_clusters", "num_clusters",
                                                    "first_clustered_layer", "share_values")}
    path = tmp_path / "runs.jsonl"
    append_jsonl(path, {"run_key": old_run_key(then), "config": then, "mode": "eval"})
    assert already_recorded(path, now)
    assert not already_recorded(path, config("method=chai_static", "task=piqa", "method.count_rule=kneedle",
                                             "method.membership_tokens=3"))
    assert not already_recorded(path, config("method=chai_static", "task=piqa"))  # today's default rule: budget


def test_a_changed_default_is_not_mistaken_for_the_old_one(tmp_path, monkeypatch):
    """Keys leave out settings at their default, so a record is re-keyed against today's defaults: a record made at
    membership_tokens=5 is no longer "the default cell" once the default is 3."""
    from chai import records

    path = tmp_path / "runs.jsonl"
    finished(path, config("method=chai"))
    assert already_recorded(path, config("method=chai"))
    defaults = records.method_defaults
    monkeypatch.setattr(records, "method_defaults",
                        lambda name: {**defaults(name), "membership_tokens": 3} if name == "chai" else defaults(name))
    assert not already_recorded(path, config("method=chai", "method.membership_tokens=3"))
    assert already_recorded(path, config("method=chai", "method.membership_tokens=5"))


def test_a_record_without_a_config_is_found_by_its_stored_key(tmp_path):
    path = tmp_path / "runs.jsonl"
    append_jsonl(path, {"run_key": run_key(config("method=chai"))})
    assert already_recorded(path, config("method=chai"))


def test_every_committed_record_keeps_resuming():
    """Each committed record (stored with the old key function) is found by the config today's conf/ composes
    for its settings, with resume and other modes' settings changed; the records keep their cells apart exactly as
    the old keys did."""
    for path in sorted((ROOT / "results").glob("*/runs.jsonl")):
        records = [r for r in read_jsonl(path) if isinstance(r.get("config"), dict)]
        # the keys they were stored with (the old function's, or the function of the day they were made)
        old_cells = {r["run_key"] for r in records}
        assert len({record_key(r) for r in records}) == len(old_cells), path  # no cells merged or split
        done = records_by_key(path)
        for rec in records:
            if rec.get("error") or rec["config"].get("mode") != "eval":
                continue
            today = copy.deepcopy(rec["config"])
            current = OmegaConf.to_container(compose_cfg([f"method={rec['method']}"]).method)
            # every setting today's config lists; a setting the record predates at what it ran with (missing_means)
            today["method"] = {**current, **missing_means(rec["method"]), **rec["config"]["method"]}
            today.update(resume=False, bench={"new_tokens": 99}, membership={"n_docs": 1})
            assert run_key(today) in done, (path, rec["run_id"])


def test_a_record_of_a_retired_setting_at_its_neutral_value_keeps_resuming():
    """membership.num_clusters moved to method.num_clusters: the committed analysis record (null there) still counts
    as the cell today's config describes, while a record that set a count is another cell."""
    old = json.loads((ROOT / "results" / "analysis" / "runs.jsonl").read_text().splitlines()[0])
    # today's config for what the record ran: its calibration settings (the defaults moved on since)
    today = OmegaConf.to_container(compose_cfg(list(old["overrides"])), resolve=True)
    today["calibration"] = old["config"]["calibration"]
    assert "num_clusters" not in today["membership"] and old["config"]["membership"]["num_clusters"] is None
    assert record_key(old) == run_key(today)
    counted = {**old, "config": {**old["config"], "membership": {**old["config"]["membership"], "num_clusters": 3}}}
    assert record_key(counted) != run_key(today)


def test_a_knob_of_a_rule_not_in_use_does_not_split_a_cell():
    """CHAI's `budget` means nothing under `count_rule=threshold` (and `threshold` nothing under the budget rule):
    a record made while another default was in force is the same run; under its own rule the knob still counts."""
    threshold = config("method=chai", "task=piqa", "method.count_rule=threshold")
    assert run_key(threshold) == run_key(config("method=chai", "task=piqa", "method.count_rule=threshold",
                                                "method.budget=0.2", "method.budget_of=qk_work"))
    assert run_key(threshold) != run_key(config("method=chai", "task=piqa", "method.count_rule=threshold",
                                                "method.threshold=0.2"))
    budget = config("method=chai", "task=piqa", "method.count_rule=budget")
    assert run_key(budget) == run_key(config("method=chai", "task=piqa", "method.count_rule=budget",
                                             "method.threshold=0.3"))
    assert run_key(budget) != run_key(config("method=chai", "task=piqa", "method.count_rule=budget",
                                             "method.budget=0.2"))

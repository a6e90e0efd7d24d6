"""Experiments: every conf/experiment composes on tiny_llama with every value its sweep takes; a multirun through
hydra-submitit-launcher records every cell, resumes, and records a failing cell while the others finish; the
membership-change measurement behind paper Fig. 9."""

import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from chai.config import MODES
from chai.errors import ChaiError
from chai.membership import capturing_probs, cluster_counts, heads_moved, measure, pair_disagreement
from chai.methods import build_method
from chai.paths import CONF_DIR, ROOT
from chai.records import read_jsonl
from tests.conftest import random_ids

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


def compose_full(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=True)


def experiment_values(name: str):
    """An experiment's own top-level values, over those of the experiments its defaults list extends."""
    own = OmegaConf.load(CONF_DIR / "experiment" / f"{name}.yaml")
    bases = [d for d in own.get("defaults", []) if isinstance(d, str) and d != "_self_"]
    return OmegaConf.merge(*(experiment_values(base) for base in bases), own)


def sweep_cells(params: dict) -> list[list[str]]:
    """Each value of each swept key once, the other keys at their first value (a sum, not the product)."""
    axes = []
    for override in OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()]):
        key = override.get_key_element()
        values = list(override.sweep_string_iterator()) if override.is_sweep_override() else [
            override.get_value_element_as_str()]
        axes.append([f"{key}={v}" for v in values])
    return [[*(a[0] for a in axes[:i]), value, *(a[0] for a in axes[i + 1 :])]
            for i, axis in enumerate(axes) for value in axis]


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_on_tiny_llama_and_sweeps_by_itself(name):
    cfg = compose_full([f"experiment={name}", "model=tiny_llama"])
    assert cfg.model.name == "tiny_llama"  # the command line beats the experiment's model
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN" and cfg.hydra.sweeper.params
    own = experiment_values(name)
    # conf/config.yaml lists `_self_` before the `experiment` slot: an experiment's mode and name beat the defaults.
    assert cfg.experiment_name == own.experiment_name
    assert cfg.mode == own.get("mode", "eval")


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_sweep_value_composes_and_builds(name):
    """Each value a sweep takes composes on tiny_llama, names a real config, and builds a valid method."""
    params = dict(compose_full([f"experiment={name}"]).hydra.sweeper.params)
    for cell in sweep_cells(params):
        cfg = compose_full([f"experiment={name}", "model=tiny_llama", *cell])
        assert cfg.mode in MODES, cell
        build_method(cfg.method)


def test_slurm_gpu_launcher_is_one_override():
    cfg = compose_full(["experiment=table", "hydra/launcher=slurm_gpu", "hydra.launcher.partition=gpu"])
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher") and cfg.hydra.launcher.gpus_per_node == 1


def multirun(tmp_path, *overrides) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "run.py"), "-m", "hydra/launcher=submitit_local", "model=tiny_llama",
           "task.limit=2", "eval.kv_probe_tokens=8", "eval.batch_size=4", "logger.wandb.mode=disabled",
           f"results_dir={tmp_path}", "experiment_name=grid", f"hydra.sweep.dir={tmp_path}/sweep", *overrides]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_submitit_multirun_records_resumes_and_records_a_failed_cell(tmp_path):
    path = tmp_path / "grid" / "runs.jsonl"
    first = multirun(tmp_path, "task=piqa,arc_easy")
    assert first.returncode == 0, first.stderr[-3000:]
    done = read_jsonl(path)
    assert sorted(r["task"] for r in done) == ["arc_easy", "piqa"] and not any(r.get("error") for r in done)

    again = multirun(tmp_path, "task=piqa,arc_easy")  # the same sweep: both cells already recorded
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(read_jsonl(path)) == 2

    # piqa at float32 is the recorded cell (skipped); float5 is bad input: recorded as failed, the sweep goes on
    bad = multirun(tmp_path, "task=piqa", "model.dtype=float32,float5")
    assert bad.returncode == 0, bad.stderr[-3000:]
    records = read_jsonl(path)
    assert len(records) == 3 and "float5" in records[-1]["error"] and records[-1]["task"] == "piqa"


# ---------------------------------------------------------------------------------------- membership (Fig. 9)


def test_probe_captures_causal_probabilities_and_changes_nothing(tiny_llama):
    model, _ = tiny_llama
    ids = random_ids(2, 12)
    before, impl = model(ids).logits, model.config._attn_implementation
    with capturing_probs(model, tokens=6) as store:
        during = model(ids).logits
    assert model.config._attn_implementation == impl
    torch.testing.assert_close(during, before)
    assert sorted(store) == [0, 1, 2] and store[0].shape == (2, 8, 6, 6)
    torch.testing.assert_close(store[1].sum(-1), torch.ones(2, 8, 6))
    assert torch.all(store[2].triu(1) == 0)  # causal: no weight on later tokens


def test_heads_moved_ignores_label_names_and_counts_moves():
    import numpy as np

    ref = np.array([0, 0, 1, 1, 2, 2])
    assert heads_moved(np.array([2, 2, 0, 0, 1, 1]), ref) == 0  # same partition, other names
    assert heads_moved(np.array([0, 0, 1, 1, 2, 1]), ref) == 1  # one head changed cluster
    labels, refs = torch.tensor([[0, 0, 1, 1]]), torch.tensor([[1, 1, 0, 0]])
    assert pair_disagreement(labels, refs).item() == 0
    assert pair_disagreement(torch.tensor([[0, 0, 0, 0]]), refs).item() == pytest.approx(8 / 12)


def test_membership_curve_on_tiny_llama(tiny_llama):
    from chai.clustering import cluster_heads

    model, _ = tiny_llama
    settings = OmegaConf.create({"max_tokens": 6, "batch_size": 2, "algo": "kmeans"})
    found = measure(model, random_ids(3, 6, seed=1), [3, 3, 3], settings, cluster_heads)
    curve = found["changed_fraction"]
    assert found["tokens"] == [1, 2, 3, 4, 5, 6] and found["n_docs"] == 3 and len(curve) == 6
    assert curve[-1] == 0 and found["pair_disagreement"][-1] == 0  # t = T is the reference itself
    assert all(0 <= c <= 1 for c in curve) and max(curve) > 0
    assert len(found["changed_fraction_per_layer"]) == 3


def test_membership_needs_calibration_or_a_count(tmp_path):
    from chai.attention import AttnShape

    cfg = OmegaConf.create({"results_dir": str(tmp_path), "model": {"name": "tiny_llama"},
                            "method": {"name": "chai", "num_clusters": None}})
    with pytest.raises(ChaiError, match="mode=calibrate"):
        cluster_counts(cfg, AttnShape(3, 8, 8, 8))
    cfg.method.num_clusters = 9
    with pytest.raises(ChaiError, match="1..8"):
        cluster_counts(cfg, AttnShape(3, 8, 8, 8))


def test_membership_runner_end_to_end(tmp_path):
    from chai.runners.membership import run

    settings = ["method=chai", "method.num_clusters=3", "membership.n_docs=3", "membership.max_tokens=5"]
    cfg = compose_full(["model=tiny_llama", f"results_dir={tmp_path}", "device=cpu", *settings])
    found = run(cfg, {})
    assert found["n_examples"] == 3 and found["membership"]["num_clusters"] == [3, 3, 3]
    assert found["membership"]["corpus"] == cfg.calibration.corpus and found["membership"]["changed_fraction"][-1] == 0


def test_every_mode_is_wired_to_its_runner():
    """The registry chai.cli dispatches through: one runner module per mode of chai.config.MODES, nothing else."""
    import importlib

    from chai.runners import RESUMED_AS_A_WHOLE, RUNNERS

    assert set(RUNNERS) == set(MODES) and set(RESUMED_AS_A_WHOLE) <= set(MODES)
    for mode, run in RUNNERS.items():
        assert run is importlib.import_module(f"chai.runners.{mode}").run, mode


def gpu_frontier_settings() -> list[str]:
    """The settings array of scripts/gpu_frontier.sh, as bash expands it."""
    script = (ROOT / "scripts" / "gpu_frontier.sh").read_text()
    block = script[script.index("budget="):script.index("\n)\n", script.index("settings=(")) + 3]
    shown = subprocess.run(["bash", "-c", block + 'printf "%s\\n" "${settings[@]}"'], capture_output=True, text=True,
                           check=True)
    return shown.stdout.splitlines()


@pytest.mark.parametrize("setting", gpu_frontier_settings())
def test_every_gpu_frontier_stage_composes_as_one_run(setting):
    """Each stage of the GPU driver is one setting of the frontier experiment: it composes, and it sweeps nothing
    (a comma in a group choice is refused by Hydra outside --multirun, which cost a device call once)."""
    overrides = ["experiment=frontier", "model=tiny_llama", *setting.split()]
    assert not any("," in o for o in overrides)
    cfg = compose_full(overrides)
    assert cfg.experiment_name == "frontier" and cfg.method.name in setting.split()[0]

"""Every config composes; bad names and values fail with one clear line before any model loads."""

import dataclasses
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from chai.config import GROUPS, check_overrides, choices
from chai.errors import ChaiError
from chai.methods import build_method
from chai.paths import CONF_DIR, ROOT
from tests.helpers import compose_cfg


@pytest.mark.parametrize("group", GROUPS)
def test_every_config_in_a_group_composes(group):
    for name in choices(group):
        cfg = compose_cfg([f"{group}={name}"])
        # Method presets (sparq_8x) name the method they configure; models and tasks are named by their file.
        assert cfg[group].name == name or (group == "method" and name.startswith(cfg.method.name))


def test_every_method_config_builds_a_validated_method():
    for name in choices("method"):
        build_method(compose_cfg([f"method={name}"]).method)


def test_method_defaults_are_read_from_the_dataclasses_without_importing_them():
    """conf/method/ takes every default from the method's dataclass (one home), read from its source so that Hydra
    composes without torch: what is read equals `dataclasses.fields` of every registered class."""
    from chai.method_defaults import all_defaults
    from chai.methods import METHODS, _discover

    _discover()
    shipped = {name: cls for name, cls in METHODS.items() if cls.__module__.startswith("chai.methods.")}
    assert set(all_defaults()) == set(shipped)  # not the methods other test files define and register
    for name, cls in shipped.items():
        assert all_defaults()[name] == {f.name: f.default for f in dataclasses.fields(cls)}, name
    code = "import sys, chai.method_defaults as d; d.all_defaults(); assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_a_method_config_composes_every_setting_and_holds_only_its_deltas():
    """Every method config composes to its dataclass's settings (`--cfg job` shows them all, `method.x=` overrides
    one); a base config sets nothing but its name, a variant (sparq_2x) only its own settings."""
    from chai.method_defaults import method_defaults

    for name in choices("method"):
        method = OmegaConf.to_container(compose_cfg([f"method={name}"]).method)
        assert set(method) == {"name", *method_defaults(method["name"])}, name
        own = OmegaConf.load(CONF_DIR / "method" / f"{name}.yaml")
        bases = [d for d in own.defaults if d != "_self_"]
        if bases == [f"/method_defaults/{name}@_here_"]:
            assert set(own) == {"defaults", "name"}, name
        else:  # a variant: a delta on another method config
            assert [b for b in bases if not b.startswith("/")] and "name" not in own, name
    assert compose_cfg(["method=chai", "method.num_clusters=4"]).method.num_clusters == 4
    assert compose_cfg(["method=sparq_2x"]).method.compression == 2


def test_default_run_is_mha_on_the_embedded_model():
    cfg = compose_cfg([])
    assert (cfg.method.name, cfg.model.name, cfg.task.name, cfg.mode) == ("mha", "smollm2", "piqa", "eval")


@pytest.mark.parametrize(
    "override, expected",
    [("method=chia", "Did you mean 'chai'"), ("model=lama7b", "Did you mean 'llama7b'"),
     ("task=piqaa", "Did you mean 'piqa'"), ("mode=evl", "Did you mean 'eval'")],
)
def test_unknown_names_suggest_the_closest(override, expected):
    with pytest.raises(ChaiError, match=expected):
        check_overrides([override])


def test_multirun_lists_are_checked_item_by_item():
    with pytest.raises(ChaiError, match="unknown task 'nope'"):
        check_overrides(["task=piqa,nope"])
    check_overrides(["task=piqa,arc_easy", "method=glob(*)"])


def test_unknown_method_setting_is_rejected():
    with pytest.raises(ChaiError, match="has no setting"):
        build_method({"name": "mha", "clusters": 3})


def _run(*args):
    return subprocess.run([sys.executable, "run.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_cli_prints_one_line_and_exits_2_for_unknown_names():
    out = _run("task=piqaa")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == ["error: unknown task 'piqaa'. Did you mean 'piqa'? Valid: " +
                                               ", ".join(choices("task")) + "."]


def test_cli_prints_resolved_config():
    out = _run("method=mha", "model=llama7b", "task=piqa", "--cfg", "job")
    assert out.returncode == 0 and "huggyllama/llama-7b" in out.stdout


def test_missing_hub_weights_name_the_model(tmp_path):
    out = _run("model=llama7b", "task.limit=2", f"results_dir={tmp_path}", "logger.wandb.mode=disabled",
               "device=cpu")
    assert out.returncode == 2
    last = out.stderr.strip().splitlines()[-1]
    assert "huggyllama/llama-7b" in last and "model.path=" in last


def test_missing_data_file_names_the_file_and_the_setting(tmp_path):
    out = _run("model=tiny_llama", "task.source=local", f"data_dir={tmp_path}", f"results_dir={tmp_path}",
               "logger.wandb.mode=disabled")
    assert out.returncode == 2
    last = out.stderr.strip().splitlines()[-1]
    assert "piqa_validation.jsonl" in last and "CHAI_DATA_DIR" in last

"""The runner layer: chai.cli stays light, methods never import a runner, one setup for every mode (one model kept
for a multirun's bench jobs), failures recorded alike, and the GPU profiling script runs on the package's bench
functions (rehearsed on the CPU)."""

import ast
import subprocess
import sys

import pytest

from chai.errors import ChaiError
from chai.paths import ROOT
from chai.runners.record import failure
from chai.runners.setup import setup
from tests.helpers import compose_cfg

RUNNER_MODULES = ("chai.runners", "chai.cli", "chai.evaluate", "chai.membership")


def imported_modules(path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def test_cli_imports_no_torch():
    """Hydra instantiates chai.cli's callback before preflight: bad input must fail without torch's seconds."""
    code = "import sys, chai.cli; assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("path", sorted((ROOT / "chai" / "methods").glob("*.py")) + [ROOT / "chai" / "calibration.py"],
                         ids=lambda p: p.name)
def test_no_method_imports_a_runner(path):
    """Methods and the calibration artifact sit below the runners: no arrow runs back up."""
    found = imported_modules(path)
    assert not [m for m in found if m.startswith(RUNNER_MODULES)], found


def test_setup_keeps_one_model_for_bench_jobs_and_loads_afresh_otherwise(tmp_path):
    cfg = compose_cfg([f"results_dir={tmp_path}", "device=cpu", "model=tiny_llama", "mode=bench"])
    kept = setup(cfg, need_tokenizer=False, keep_model=True)
    again = setup(cfg, need_tokenizer=False, keep_model=True)
    assert again.model is kept.model and again.method is not kept.method and kept.tokenizer is not None
    fresh = setup(cfg, with_method=False)
    assert fresh.model is not kept.model and fresh.method is None
    assert kept.context.model_name == "tiny_llama" and kept.context.results_dir == str(tmp_path)


def test_a_runner_that_needs_a_tokenizer_says_so_in_one_line(tmp_path):
    cfg = compose_cfg([f"results_dir={tmp_path}", "device=cpu", "model=tiny_llama", "model.tokenizer=none"])
    with pytest.raises(ChaiError, match="has no tokenizer offline: set model.tokenizer=smollm2"):
        setup(cfg)
    assert setup(cfg, need_tokenizer=False).tokenizer is None


def test_failures_are_recorded_alike():
    try:
        raise ChaiError("bad input")
    except ChaiError as err:
        assert failure(err) == {"error": "ChaiError: bad input"}  # its message says all
    try:
        raise RuntimeError("deep down")
    except RuntimeError as err:
        found = failure(err)
    assert found["error"] == "RuntimeError: deep down" and "raise RuntimeError" in found["traceback"]


@pytest.mark.slow
def test_profile_script_rehearses_on_the_cpu():
    """scripts/gpu_profile_step.py sets paths up through the bench's own functions: it runs on a tiny model."""
    args = [sys.executable, "scripts/gpu_profile_step.py", "--model", "tiny_llama", "--batch", "1", "--seq", "8",
            "--steps", "2", "--run", "mha:", "--run", "chai:method=chai,method.num_clusters=3,device=cpu"]
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    heads = [line for line in done.stdout.splitlines() if line.startswith("== ")]
    assert [h.split(" B=")[0] for h in heads] == ["== mha [static_compiled, eager]", "== chai [method_static, eager]"]

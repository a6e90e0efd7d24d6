"""Where things live: the project root, the data directory, the results directory."""

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

"""What every table and figure shares: method and task names as the paper writes them, and how a figure is saved.

Matplotlib runs headless (Agg): reports are built on servers and in CI.
"""

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

TASKS = ("piqa", "hellaswag", "arc_challenge", "arc_easy", "boolq")
TASK_NAMES = {"piqa": "PIQA", "hellaswag": "HellaSwag", "arc_challenge": "ARC-C", "arc_easy": "ARC-E",
              "boolq": "BoolQ", "openbookqa": "OBQA", "winogrande": "WinoGrande"}
METHOD_NAMES = {"mha": "MHA", "chai": "CHAI", "chai_static": "CHAI-static", "chai_qkv": "CHAI-QKV",
                "random_groups": "Random groups", "dejavu_static": "DejaVu-static", "sparq": "SparQ"}


def method_label(method: str, settings: dict | None = None) -> str:
    """'CHAI', 'DejaVu-static 30%', 'SparQ 8x': the paper's name plus the setting that tells variants apart."""
    settings = settings or {}
    name = METHOD_NAMES.get(method, method)
    if method == "dejavu_static" and isinstance(settings.get("sparsity"), (int, float)):
        return f"{name} {settings['sparsity'] * 100:.0f}%"
    if method == "sparq" and settings.get("compression") is not None:
        return f"{name} {settings['compression']}x"
    preset = settings.get("layer_clusters")
    if method.startswith("chai") and isinstance(preset, str) and preset != "auto":
        return f"{name} {preset}"  # the released per-layer lists (llama7b_jul2024, ...) are different methods
    return name


def task_label(task: str) -> str:
    return TASK_NAMES.get(task, task)


def ordered_tasks(tasks) -> list[str]:
    """The paper's task order first, then any other task alphabetically."""
    present = set(tasks)
    return [t for t in TASKS if t in present] + sorted(present - set(TASKS))


def panels(n: int, width: float = 3.4, height: float = 2.8, max_cols: int = 5, layout: str | None = None):
    """A row-major grid of n axes (unused ones hidden): (figure, flat list of n axes)."""
    cols = min(n, max_cols)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False, layout=layout)
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


TITLE_SIZE = 10  # points
CHAR_WIDTH = 0.6  # a character's mean width as a share of the font size, generous for DejaVu Sans


def figure_title(fig, text: str, fontsize: float = TITLE_SIZE) -> None:
    """The figure's title, wrapped onto as many lines as the figure's width needs (a one-panel figure is narrow)."""
    width_points = fig.get_figwidth() * 72
    chars_per_line = max(20, int(width_points / (CHAR_WIDTH * fontsize)))
    fig.suptitle(textwrap.fill(text, chars_per_line, break_on_hyphens=False), fontsize=fontsize)


def save(fig, folder: Path, stem: str) -> list[Path]:
    """Write `stem`.png and `stem`.pdf into `folder`; returns both paths."""
    folder.mkdir(parents=True, exist_ok=True)
    if fig.get_layout_engine() is None:
        fig.tight_layout()
    paths = [folder / f"{stem}.png", folder / f"{stem}.pdf"]
    fig.savefig(paths[0], dpi=150)
    fig.savefig(paths[1], metadata={"CreationDate": None})  # no timestamp: unchanged figures, unchanged files
    plt.close(fig)
    return paths


def legend(axes, **kwargs) -> None:
    """A legend on the first panel that has labelled lines (a panel can be empty for a task nobody ran)."""
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(**kwargs)
            return

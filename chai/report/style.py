"""What every table and figure shares: task names as the paper writes them, a figure's colours and markers for the
methods it shows (from the records' display), and how a figure is saved.

Matplotlib runs headless (Agg): reports are built on servers and in CI.
"""

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import to_hex  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter, NullLocator  # noqa: E402

TASKS = ("piqa", "hellaswag", "arc_challenge", "arc_easy", "boolq")
TASK_NAMES = {"piqa": "PIQA", "hellaswag": "HellaSwag", "arc_challenge": "ARC-C", "arc_easy": "ARC-E",
              "boolq": "BoolQ", "openbookqa": "OBQA", "winogrande": "WinoGrande"}
MARKERS = "os^DvP*Xph"  # the i-th method of a figure (display order): a distinct shape, so coinciding lines stay apart


def method_styles(rows) -> dict[str, tuple[str, str]]:
    """{label: (colour, marker)} for the methods in `rows` (a frame with the records' display: label, order, color),
    in display order: each method its own colour, or (none given, or an earlier label of the figure has it, e.g. a
    second CHAI variant) the next colour of matplotlib's cycle that no label of the figure uses; markers in turn."""
    shown = rows[["label", "order", "color"]].drop_duplicates("label").sort_values(["order", "label"], kind="stable")
    wanted = [c if isinstance(c, str) else None for c in shown["color"]]
    taken = {to_hex(c) for c in wanted if c}
    free = (c for c in (f"C{i}" for i in range(100)) if to_hex(c) not in taken)
    styles, used = {}, set()
    for i, (label, colour) in enumerate(zip(shown["label"], wanted)):
        if not colour or to_hex(colour) in used:
            colour = next(free)
        used.add(to_hex(colour))
        styles[label] = (colour, MARKERS[i % len(MARKERS)])
    return styles


def task_label(task: str) -> str:
    return TASK_NAMES.get(task, task)


def ordered_tasks(tasks) -> list[str]:
    """The paper's task order first, then any other task alphabetically."""
    present = set(tasks)
    return [t for t in TASKS if t in present] + sorted(present - set(TASKS))


def panels(n: int, width: float = 3.4, height: float = 2.8, max_cols: int = 5, layout: str | None = None):
    """A row-major grid of n >= 1 axes (unused ones hidden): (figure, flat list of n axes)."""
    if n < 1:  # callers skip a figure with nothing to show; an empty grid is a bug, said plainly
        raise ValueError(f"panels: a figure needs at least one panel, got {n}")
    cols = min(n, max_cols)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False, layout=layout)
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


TITLE_SIZE = 10  # points
CHAR_WIDTH = 0.6  # a character's mean width as a share of the font size, generous for DejaVu Sans
NOTE_SIZE = 7  # points: a figure's caption


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


MAX_TICKS = 12  # more labelled integers than this crowd a 3-inch axis


def integer_axis(axis, values) -> None:
    """A count axis (clusters, layers, heads) on a linear scale: every recorded value labelled when they are few
    and spread enough for their labels not to touch, else whole numbers only; never a fractional or log tick."""
    values = sorted({int(v) for v in values})
    spread = len(values) < 2 or min(b - a for a, b in zip(values, values[1:])) * MAX_TICKS >= values[-1] - values[0]
    if 0 < len(values) <= MAX_TICKS and spread:
        axis.set_ticks(values, labels=[str(v) for v in values])
    else:
        axis.set_major_locator(MaxNLocator(integer=True))


def plain(value, _position=None) -> str:
    return f"{value:g}"


def log_axis(axis, ticks=None) -> None:
    """A log axis read in plain numbers: `ticks` (the recorded values) if given, else 1-2-5 steps per decade."""
    if ticks is not None:
        ticks = sorted(set(ticks))
        axis.set_ticks(ticks, labels=[plain(t) for t in ticks])
    else:
        axis.set_major_locator(LogLocator(base=10, subs=(1, 2, 5)))
        axis.set_major_formatter(FuncFormatter(plain))
    axis.set_minor_locator(NullLocator())
    axis.set_minor_formatter(NullFormatter())


LEGEND_ROWS = 3


def figure_legend(fig, *groups, note: str | None = None) -> None:
    """One legend for the whole figure, below the panels (the figure needs layout="constrained" to make room).
    groups: lists of (handle, label); each starts a new column, so methods and line styles never interleave.
    `note`: a caption above the entries (the one place below the panels that the layout keeps clear)."""
    rows = min(max(len(group) for group in groups), LEGEND_ROWS)
    blank = (Line2D([], [], linestyle="none"), "")
    entries = [e for group in groups for e in [*group, *[blank] * (-len(group) % rows)]]
    width = int(fig.get_figwidth() * 72 / (CHAR_WIDTH * NOTE_SIZE))
    fig.legend(*zip(*entries), loc="outside lower center", ncol=len(entries) // rows, fontsize=8, frameon=False,
               title=note and textwrap.fill(note, width), title_fontsize=NOTE_SIZE, alignment="left")


def legend(axes, **kwargs) -> None:
    """A legend on the first panel that has labelled lines (a panel can be empty for a task nobody ran)."""
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(**kwargs)
            return

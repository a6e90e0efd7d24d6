"""Serving capacity from mode=capacity cell records (`capacity_table.capacity_frame`): one figure per model and GPU,
two panels over the prompt lengths. Left: the largest batch that fits, per method (bars: measured; hollow circle:
predicted by the memory model, K,V + workspace; cross: the bound from K,V alone). Right: decode tokens/s at that
batch (bars: measured; black tick: the roofline's tokens/s at the same batch; text: the ratio over the baseline's
tokens/s at its own largest batch, and the roofline's ratio). A method keeps its records' colour.
"""

import math
import numbers
import re
from pathlib import Path

import pandas as pd
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from chai.report.capacity_table import BASELINE_PATH
from chai.report.style import figure_legend, figure_title, method_styles, panels, save

MARKS = {  # frame column -> how it is drawn over a bar, and what the legend says of it
    "predicted": ({"marker": "o", "markerfacecolor": "none", "color": "black"},
                  "predicted max batch (K,V + workspace)"),
    "kv_only": ({"marker": "x", "color": "dimgray"}, "bound from K,V alone"),
    "roofline_tokens_per_s": ({"marker": "_", "markersize": 14, "markeredgewidth": 2, "color": "black"},
                              "roofline tokens/s at that batch"),
}


def _number(x) -> float:
    return float(x) if isinstance(x, numbers.Real) and not isinstance(x, bool) else math.nan


def _bars(ax, rows: pd.DataFrame, styles: dict, value: str, marks: tuple[str, ...], ratios: bool = False) -> None:
    """Grouped bars of `value`: one group per prompt length, one bar per method (display order), `marks` on top."""
    seqs = sorted(rows["seq_len"].unique())
    labels = [label for label in styles if label in set(rows["label"])]
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        for j, seq in enumerate(seqs):
            cell = rows[(rows["label"] == label) & (rows["seq_len"] == seq)]
            if cell.empty:
                continue
            row, x = cell.iloc[-1], j + (i - (len(labels) - 1) / 2) * width
            ax.bar(x, _number(row[value]), width * 0.9, color=styles[label][0])
            for column in marks:
                ax.plot(x, _number(row[column]), linestyle="none", **MARKS[column][0])
            if ratios and row["path"] != BASELINE_PATH and not math.isnan(_number(row["speedup"])):
                heights = [_number(row[c]) for c in (value, *marks)]
                top = max(h for h in heights if not math.isnan(h))  # above the roofline mark, not through it
                ax.annotate(f"x{row['speedup']:.2f}\n(roof x{_number(row['roofline_speedup']):.2f})",
                            (x, top), textcoords="offset points", xytext=(0, 4), ha="center", fontsize=6)
    ax.set_xticks(range(len(seqs)), [str(s) for s in seqs])
    ax.set_xlabel("prompt tokens")
    ax.grid(alpha=0.3, axis="y")


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", str(text).lower()).strip("_")


def capacity_figures(frame: pd.DataFrame, out: Path) -> tuple[list, list]:
    """The capacity figure of every (model, GPU) in the frame: (written, skipped)."""
    if frame is None or frame.empty:
        return [], ["capacity figure: no capacity records (run `bash scripts/gpu_capacity.sh` on a GPU)"]
    written, skipped = [], []
    for (model, device), part in frame.groupby(["model", "device"], sort=True):
        ran = part[part["error"].isna() & (part["measured"] > 0)]
        if ran.empty:
            skipped.append(f"capacity figure {model} on {device}: no cell found a batch that fits")
            continue
        styles = method_styles(ran)
        fig, (batch_ax, rate_ax) = panels(2, width=4.6, height=3.4, layout="constrained")
        _bars(batch_ax, ran, styles, "measured", ("predicted", "kv_only"))
        batch_ax.set_ylabel("largest batch that fits")
        _bars(rate_ax, ran, styles, "tokens_per_s", ("roofline_tokens_per_s",), ratios=True)
        rate_ax.set_ylabel("decode tokens/s at that batch")
        new = ", ".join(str(n) for n in sorted(set(ran["new_tokens"])))
        methods = [(Patch(color=colour), label) for label, (colour, _) in styles.items()]
        marks = [(Line2D([], [], linestyle="none", **style), text) for style, text in MARKS.values()]
        figure_legend(fig, methods, marks)
        figure_title(fig, f"Serving capacity: {model} on {device} (cache of prompt + {new} new tokens per sequence)")
        written += save(fig, out, f"capacity_{model}_{_slug(device)}")
    return written, skipped

"""Accuracy figures from eval records: paper Fig. 1 (accuracy against the attention compute kept) and the sweeps
behind it (clusters per layer, first clustered layer), as chai/report/report.yaml `sweeps` defines them: one line per
method swept over the setting (its other settings at their defaults), in the method's display colour and order. One
figure per (model, K,V layout, task.limit), one panel per task, the baseline as a dashed line.
"""

from pathlib import Path

import pandas as pd

from chai.report.loading import baseline, matching, method_cell, report_config
from chai.report.style import figure_title, integer_axis, legend, method_styles, ordered_tasks, panels, save, task_label
from chai.report.tables import parts, stem_for


def _baseline_line(ax, part: pd.DataFrame, task: str, metric: str) -> None:
    rows = matching(part, baseline())
    rows = rows[rows["task"] == task]
    if not rows.empty:
        shown = rows.iloc[-1]
        ax.axhline(shown[metric] * 100, color=shown["color"] or "gray", linestyle="--", linewidth=1,
                   label=shown["label"])


def _swept_tasks(series) -> list[str]:
    """Tasks with at least two x values: a task with only the default cell is no sweep."""
    swept = pd.concat([s[-1] for s in series]).groupby("task")["x"].nunique()
    return ordered_tasks(swept[swept >= 2].index)


def _sweep_figure(part, tasks, series, x_label, title, metric, counts=False):
    """series: [(label, colour, marker, rows with an `x` column)] -> one panel per task; `counts`: x is a whole
    number."""
    fig, axes = panels(len(tasks))
    for ax, task in zip(axes, tasks):
        for label, colour, marker, rows in series:
            points = rows[rows["task"] == task].sort_values("x")
            if not points.empty:
                ax.plot(points["x"], points[metric] * 100, color=colour, marker=marker, label=label)
        _baseline_line(ax, part, task, metric)
        ax.set_title(task_label(task))
        ax.set_xlabel(x_label)
        ax.set_ylabel(f"{metric} (%)")
        if counts:
            integer_axis(ax.xaxis, pd.concat([rows[rows["task"] == task]["x"] for *_, rows in series]))
        ax.grid(alpha=0.3)
    legend(axes, fontsize=7)
    figure_title(fig, title)
    return fig


def _swept(part: pd.DataFrame, setting: str, x: str | None, moot: tuple = ()) -> list[pd.DataFrame]:
    """Per method but the baseline, its rows at its default settings apart from `setting`, with an `x` column (the
    setting's value, or the compute share when `x` is "compute"); only methods with two or more x values. `moot`:
    settings the swept one makes irrelevant (report.yaml `moot`), matched whatever their value."""
    found = []
    for name in part["method"].unique():
        if name == baseline()["name"]:
            continue
        rows = matching(part, method_cell(f"method={name}"), vary=(setting, *moot))
        if x == "compute":
            rows = rows[rows["compute"].notna()].assign(x=lambda r: r["compute"])
        else:
            numeric = rows["settings"].map(lambda s: isinstance(s.get(setting), (int, float))
                                           and not isinstance(s.get(setting), bool)).astype(bool)
            rows = rows[numeric].assign(x=lambda r: r["settings"].map(lambda s: s[setting]))
        if rows["x"].nunique() >= 2:
            found.append(rows)
    return found


def sweep_figures(name: str, frame: pd.DataFrame, out: Path, metric: str = "acc") -> tuple[list, list]:
    """The sweep figure `name` of report.yaml for every (model, task.limit) whose records sweep its setting."""
    spec = report_config()["sweeps"][name]
    run = f"(run `python run.py experiment={spec['experiment']}`)"
    if frame.empty:
        return [], [f"{name}: no eval records {run}"]
    x, what = spec.get("x"), "compute shares" if spec.get("x") == "compute" else f"values of method.{spec['setting']}"
    written, skipped = [], []
    for model, expanded, limit, part in parts(frame):
        where = f"K,V heads expanded, {limit}" if expanded else limit
        # one line per method: its points' labels name the swept value (CHAI k=3, ...), the family does not
        swept = _swept(part, spec["setting"], x, tuple(spec.get("moot", ())))
        found = [rows.assign(label=rows["family"]) for rows in swept]
        if not found:
            skipped.append(f"{name} {model} ({where}): fewer than two {what} recorded for any method {run}")
            continue
        styles = method_styles(pd.concat(found))
        series = [(rows["label"].iloc[-1], *styles[rows["label"].iloc[-1]], rows) for rows in found]
        series.sort(key=lambda item: list(styles).index(item[0]))
        tasks = _swept_tasks(series)
        if not tasks:
            skipped.append(f"{name} {model} ({where}): no task has two or more {what} recorded {run}")
            continue
        fig = _sweep_figure(part, tasks, series, spec["x_label"], f"{spec['title']}: {model}, {where}", metric,
                            counts=x != "compute")
        written += save(fig, out, stem_for(spec.get("stem", name), model, limit, expanded))
    return written, skipped

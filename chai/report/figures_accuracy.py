"""Accuracy figures from eval records: paper Fig. 1 (accuracy against attention compute for CHAI, static and random
grouping) and the two sweeps behind it (clusters per layer, first clustered layer). One figure per (model,
task.limit), one panel per task, MHA as a dashed line.
"""

from pathlib import Path

import pandas as pd

from chai.report.loading import matching
from chai.report.style import (figure_title, integer_axis, legend, method_label, ordered_tasks, panels, save,
                               task_label)
from chai.report.tables import limit_name

GROUPINGS = ("chai", "chai_static", "random_groups")
MARKERS = {"chai": "o", "chai_static": "s", "random_groups": "^"}


def _stem(name: str, model: str, limit: str) -> str:
    return f"{name}_{model}" + ("" if limit == "full sets" else f"_limit{limit.split()[-1]}")


def _mha_line(ax, part: pd.DataFrame, task: str, metric: str) -> None:
    mha = matching(part, "mha")
    mha = mha[mha["task"] == task]
    if not mha.empty:
        ax.axhline(mha[metric].iloc[-1] * 100, color="gray", linestyle="--", linewidth=1, label="MHA")


def _by_limit(frame: pd.DataFrame):
    return frame.assign(limit_key=frame["limit"].map(limit_name)).groupby(["model", "limit_key"], sort=True)


def _swept_tasks(series) -> list[str]:
    """Tasks with at least two x values: a task with only the default cell is no sweep."""
    swept = pd.concat([s[2] for s in series]).groupby("task")["x"].nunique()
    return ordered_tasks(swept[swept >= 2].index)


def _sweep_figure(part, tasks, series, x_label, title, metric, counts=False):
    """series: [(label, marker, rows with an `x` column)] -> one panel per task; `counts`: x is a whole number."""
    fig, axes = panels(len(tasks))
    for ax, task in zip(axes, tasks):
        for label, marker, rows in series:
            points = rows[rows["task"] == task].sort_values("x")
            if not points.empty:
                ax.plot(points["x"], points[metric] * 100, marker=marker, label=label)
        _mha_line(ax, part, task, metric)
        ax.set_title(task_label(task))
        ax.set_xlabel(x_label)
        ax.set_ylabel(f"{metric} (%)")
        if counts:
            integer_axis(ax.xaxis, pd.concat([rows[rows["task"] == task]["x"] for _, _, rows in series]))
        ax.grid(alpha=0.3)
    legend(axes, fontsize=7)
    figure_title(fig, title)
    return fig


def accuracy_vs_compute(frame: pd.DataFrame, out: Path, metric: str = "acc") -> tuple[list, list]:
    """Paper Fig. 1: accuracy against the attention-score compute kept (1.0 = MHA) for every grouping method."""
    if frame.empty:
        return [], ["fig01: no eval records (run `python run.py experiment=sweep_clusters`)"]
    written, skipped = [], []
    for (model, limit), part in _by_limit(frame):
        series = []
        for method in GROUPINGS:
            rows = matching(part, method, vary=("num_clusters",))
            rows = rows[rows["compute"].notna()].assign(x=lambda r: r["compute"])
            if not rows.empty:
                series.append((method_label(method), MARKERS[method], rows))
        if not series:
            skipped.append(f"fig01 {model} ({limit}): no CHAI/static/random records with a known compute share "
                           "(run `python run.py experiment=sweep_clusters`)")
            continue
        tasks = _swept_tasks(series)
        if not tasks:
            skipped.append(f"fig01 {model} ({limit}): no task has two or more compute shares recorded "
                           "(run `python run.py experiment=sweep_clusters`)")
            continue
        fig = _sweep_figure(part, tasks, series, "attention-score compute (share of MHA)",
                            f"Accuracy against attention compute: {model}, {limit}", metric)
        written += save(fig, out, _stem("fig01_accuracy_vs_compute", model, limit))
    return written, skipped


def _setting_sweep(frame, out, method_list, key, name, x_label, title, metric):
    if frame.empty:
        return [], [f"{name}: no eval records (run `python run.py experiment={name}`)"]
    written, skipped = [], []
    for (model, limit), part in _by_limit(frame):
        series = []
        for method in method_list:
            rows = matching(part, method, vary=(key,))
            rows = rows[rows["settings"].map(lambda s: isinstance(s.get(key), (int, float))).astype(bool)]
            rows = rows.assign(x=lambda r: r["settings"].map(lambda s: s[key]))
            if rows["x"].nunique() >= 2:
                series.append((method_label(method), MARKERS.get(method, "o"), rows))
        if not series:
            skipped.append(f"{name} {model} ({limit}): fewer than two values of method.{key} recorded "
                           f"(run `python run.py experiment={name}`)")
            continue
        tasks = _swept_tasks(series)
        if not tasks:
            skipped.append(f"{name} {model} ({limit}): no task has two or more values of method.{key} recorded "
                           f"(run `python run.py experiment={name}`)")
            continue
        fig = _sweep_figure(part, tasks, series, x_label, f"{title}: {model}, {limit}", metric, counts=True)
        written += save(fig, out, _stem(name, model, limit))
    return written, skipped


def clusters_sweep(frame: pd.DataFrame, out: Path, metric: str = "acc") -> tuple[list, list]:
    """Accuracy as the clusters per clustered layer go from 1 to H (experiment=sweep_clusters)."""
    return _setting_sweep(frame, out, GROUPINGS, "num_clusters", "sweep_clusters", "clusters per clustered layer",
                          "Accuracy against clusters per layer", metric)


def first_layer_sweep(frame: pd.DataFrame, out: Path, metric: str = "acc") -> tuple[list, list]:
    """CHAI accuracy as the first clustered layer moves (experiment=sweep_first_layer)."""
    return _setting_sweep(frame, out, ("chai",), "first_clustered_layer", "sweep_first_layer",
                          "first clustered layer", "CHAI accuracy against the first clustered layer", metric)

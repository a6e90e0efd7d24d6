"""Accuracy against K,V memory (report.yaml `frontier`): every method config recorded by one experiment, one figure
per model and K,V layout. A grouped-query model turned into its exact multi-head twin (`model.expand_kv_heads`)
stores (query heads / KV heads) times the K,V for the same accuracy: a different x axis, so a figure of its own.

Panels: each task, then the mean over the tasks with its 95% interval (chai/report/stats.py). Top row: K,V bytes
stored per token of context (measured in a real cache); bottom row: bytes a decode step reads per token of context
(stored x the share the method reads, `loading.read_fraction`). One line per method family (display family, colour,
order), its configs sorted by x; the baseline a star and a dashed line.

A cache that evicts tokens keeps whole tokens, each at the full per-token size: on each task it stores the baseline's
measured bytes per token (a cache that keeps every token, same model and K,V layout) x the share of the task's
tokens it kept (`loading.kept_fraction`). Its own probe cannot say this: the probe's random ids hold what the
eviction rule keeps of 256 random tokens, not of the task's prompts. Prompts of other lengths keep other shares,
so a task's panel places it at that task's bytes, and the mean panel (and the savings table) at the mean over the
mean's tasks of the per-task bytes.
"""

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.lines import Line2D

from chai.report import stats
from chai.report.loading import baseline, matching, report_config
from chai.report.style import figure_legend, figure_title, method_styles, ordered_tasks, plt, save, task_label
from chai.report.tables import parts, stem_for

KIB = 1024
AXES = (("stored", "K,V stored per token of context (KiB)"),
        ("read", "K,V read per decode step, per token of context (KiB)"))
KEPT_NOTE = ("A cache that evicts tokens: the baseline's bytes per token x the share of the task's tokens it kept; "
             "in the mean panel, the mean over the tasks of those bytes.")


@dataclass
class Config:
    """One method config of a frontier: its display, its latest row per task, and what it costs and scores."""

    cell: str
    label: str
    family: str
    order: int
    color: str | None
    rows: dict = field(default_factory=dict)  # task -> the record's frame row
    is_base: bool = False
    mean: stats.Estimate | None = None  # over the mean's tasks; None when one is not recorded
    diff: stats.Estimate | None = None  # mean over tasks of (this - baseline)
    tasks: list = field(default_factory=list)  # the mean's tasks (`configs`)
    full_bytes: float = math.nan  # the baseline's bytes per token: what an evicting cache's every kept token holds

    def x(self, axis: str, task: str | None = None) -> float:
        """Bytes per token stored or read, on one task or (None) the mean over the per-task bytes of the mean's tasks
        it has recorded (all it has when none: it still needs a place in the per-task table)."""
        chosen = [task] if task else [t for t in self.tasks if t in self.rows] or list(self.rows)
        stored = np.array([self.stored(t) for t in chosen], dtype=float)
        read = stored * np.array([self.rows[t]["read_fraction"] for t in chosen], dtype=float)
        return float(np.mean(stored if axis == "stored" else read))

    def stored(self, task: str) -> float:
        """Bytes per token stored on `task`: measured in a real cache, or for an evicting cache the baseline's bytes
        per token x the share of the task's tokens it kept (NaN without a baseline)."""
        row = self.rows[task]
        if not kept(row):
            return float(row["kv_measured"])
        return self.full_bytes * float(row["kept_fraction"])

    @property
    def evicts(self) -> bool:
        """Whether its stored bytes come from kept tokens (they differ by task), not a fixed size per token."""
        return any(kept(row) for row in self.rows.values())


def kept(row) -> bool:
    """Whether a frame row is an evicting cache's (frames built before the column existed have none)."""
    return pd.notna(row.get("kept_fraction", math.nan))



def spec() -> dict:
    return report_config()["frontier"]


def title_of(part: pd.DataFrame, expanded: bool, limit: str) -> str:
    """"<model>, 3 KV heads (as shipped)" or "<model>, 9 KV heads (expanded, exact MHA layout)"."""
    shown = part.iloc[-1]
    heads = shown.get("kv_heads")
    count = f", {int(heads)} KV heads" if heads is not None and pd.notna(heads) else ""
    layout = "expanded, exact MHA layout" if expanded else "as shipped"
    return f"{shown['model_name']}{count} ({layout})" + ("" if limit == "full sets" else f", {limit}")


def _estimate(config: Config, tasks: list[str], metric: str) -> stats.Estimate | None:
    """The mean over `tasks`: bootstrap interval where every task has items, else the recorded standard errors
    (normal approximation; older records)."""
    if not all(t in config.rows for t in tasks):
        return None
    rows = [config.rows[t] for t in tasks]
    found = stats.mean_accuracy([r["items"] for r in rows], metric, spec().get("resamples", stats.RESAMPLES))
    if found is not None:
        return found
    value = float(np.mean([r[metric] for r in rows]))
    spread = 1.96 * math.sqrt(sum(float(r[f"{metric}_stderr"]) ** 2 for r in rows)) / len(rows)
    return stats.Estimate(value, value - spread, value + spread)


def _difference(config: Config, base: Config, tasks: list[str], metric: str) -> stats.Estimate | None:
    if config.mean is None or base.mean is None:
        return None
    pairs = [(base.rows[t]["items"], config.rows[t]["items"]) for t in tasks]
    found = stats.mean_difference(pairs, metric, spec().get("resamples", stats.RESAMPLES))
    return found or stats.Estimate(config.mean.value - base.mean.value)


def equivalent_baseline(frame: pd.DataFrame) -> pd.DataFrame:
    """The expanded layout's baseline completed from the shipped one: dense attention on the exact multi-head twin
    (`model.expand_kv_heads`) computes what the shipped model does (tests/test_models.py; the two layouts' full PIQA,
    ARC-C, ARC-E and BoolQ runs agree item for item), so a task the baseline has not run expanded takes
    the shipped run's outcomes, with the expanded run's measured K,V size. Only where the expanded baseline has at
    least one record of its own (its bytes are measured, never inferred); the label says which tasks were borrowed."""
    if frame.empty or "expand_kv_heads" not in frame:
        return frame
    base = matching(frame, baseline())
    borrowed = []
    for (model, limit), rows in base.groupby(["model", base["limit"].fillna(-1)], sort=False):
        own, shipped = rows[rows["expand_kv_heads"]], rows[~rows["expand_kv_heads"]]
        missing = shipped[~shipped["task"].isin(own["task"])]
        if own.empty or missing.empty:
            continue
        first = own.iloc[0]
        names = ", ".join(task_label(t) for t in ordered_tasks(missing["task"]))
        label = f"{first['label']} ({names} from the as-shipped runs)"
        copies = missing.assign(**{k: first[k] for k in ("expand_kv_heads", "kv_heads", "cell", "kv_measured",
                                                          "kv_analytic")}, label=label)
        frame = frame.assign(label=frame["label"].mask(frame.index.isin(own.index), label))
        borrowed.append(copies)
    if not borrowed:
        return frame
    joined = pd.concat([frame, *borrowed], ignore_index=True)
    joined.attrs = frame.attrs
    return joined


def configs(part: pd.DataFrame, metric: str) -> tuple[list[Config], list[str]]:
    """([Config] with its mean and difference from the baseline, the mean's tasks: report.yaml's that are recorded).
    Configs without a measured K,V size have no place on the x axis and are left out."""
    base_cells = set(matching(part, baseline())["cell"])
    found = {}
    for _, row in part[part["kv_measured"].notna()].iterrows():
        config = found.setdefault(row["cell"], Config(row["cell"], row["label"], row["family"], row["order"],
                                                      row["color"], is_base=row["cell"] in base_cells))
        config.rows[row["task"]] = row
    tasks = ordered_tasks(set(spec()["tasks"]) & set(part["task"]))
    for config in found.values():
        config.tasks = tasks
        config.mean = _estimate(config, tasks, metric)
    base = next((c for c in found.values() if c.is_base), None)
    for config in found.values():
        config.full_bytes = math.nan if base is None else base.x("stored")  # the same on every task: one probe
        config.diff = None if base is None else _difference(config, base, tasks, metric)
    return sorted(found.values(), key=lambda c: (c.order, c.family, c.label)), tasks


def family_styles(found: list[Config]) -> dict[str, tuple[str, str]]:
    """{family: (colour, marker)}: the display colour of the family's first config, in display order."""
    rows = pd.DataFrame([{"label": c.family, "order": c.order, "color": c.color} for c in found])
    return method_styles(rows)


def _short(config: Config) -> str:
    """A point's label without its family's name ("8x" for "SparQ 8x")."""
    rest = config.label[len(config.family):].strip(" ,") if config.label.startswith(config.family) else ""
    return rest or config.label


def _draw_panel(ax, found: list[Config], styles: dict, axis: str, task: str | None, metric: str) -> None:
    """One panel: a task's accuracies (`task`) or the mean with its interval (None); endpoints labelled."""
    for family, (colour, marker) in styles.items():
        points = [c for c in found if c.family == family and not c.is_base
                  and (c.rows.get(task) is not None if task else c.mean is not None)]
        points.sort(key=lambda c: c.x(axis, task))
        if not points:
            continue
        xs = [c.x(axis, task) / KIB for c in points]
        ys = [100 * (float(c.rows[task][metric]) if task else c.mean.value) for c in points]
        line = "-" if len(set(xs)) > 1 else "none"  # settings that all cost the same: no line up the y axis
        if task:
            ax.plot(xs, ys, color=colour, marker=marker, markersize=4, linestyle=line)
        else:
            low = [100 * c.mean.value - 100 * c.mean.low if not math.isnan(c.mean.low) else 0 for c in points]
            high = [100 * c.mean.high - 100 * c.mean.value if not math.isnan(c.mean.high) else 0 for c in points]
            ax.errorbar(xs, ys, yerr=[low, high], color=colour, marker=marker, markersize=4, capsize=2,
                        linestyle=line)
            for i in {0, len(points) - 1}:  # sparse labels: a line's two ends say its range of settings
                ax.annotate(_short(points[i]), (xs[i], ys[i]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    _draw_baseline(ax, found, axis, task, metric)


def _draw_baseline(ax, found: list[Config], axis: str, task: str | None, metric: str) -> None:
    for base in (c for c in found if c.is_base and (c.rows.get(task) is not None if task else c.mean is not None)):
        y = 100 * (float(base.rows[task][metric]) if task else base.mean.value)
        colour = base.color or "gray"
        ax.axhline(y, color=colour, linestyle="--", linewidth=1)
        ax.plot([base.x(axis, task) / KIB], [y], color=colour, marker="*", markersize=10, linestyle="none")


def frontier_figure(found: list[Config], tasks: list[str], title: str, metric: str):
    """Two rows (stored, read) of panels: each task recorded, then the mean over `tasks`."""
    panel_tasks = ordered_tasks({t for c in found for t in c.rows}) + ([None] if tasks else [])
    styles = family_styles([c for c in found if not c.is_base])
    fig, axes = plt.subplots(2, len(panel_tasks), figsize=(3.2 * len(panel_tasks), 6.4), squeeze=False,
                             layout="constrained")
    for row, (axis, x_label) in enumerate(AXES):
        for ax, task in zip(axes[row], panel_tasks):
            _draw_panel(ax, found, styles, axis, task, metric)
            plural = "s" if len(tasks) > 1 else ""
            name = task_label(task) if task else f"mean of {len(tasks)} task{plural} (95% interval)"
            ax.set_title(name, fontsize=9)
            ax.set_xlabel(x_label, fontsize=7)
            ax.set_ylabel(f"{metric} (%)")
            ax.grid(alpha=0.3)
    handles = [(Line2D([], [], color=c, marker=m, markersize=4), family) for family, (c, m) in styles.items()]
    base = [(Line2D([], [], color=c.color or "gray", marker="*", linestyle="--"), c.label) for c in found
            if c.is_base][:1]
    figure_legend(fig, handles + base, note=KEPT_NOTE if any(c.evicts for c in found) else None)
    figure_title(fig, title)
    return fig


def per_layout(frame: pd.DataFrame, name: str, metric: str, make) -> tuple[list, list]:
    """(written, skipped) of `make(part, found, tasks, stem, title)` over every (model, K,V layout, limit) of the
    frontier experiment; `make` returns the paths it wrote, or the reason it wrote none."""
    run = f"(run `python run.py experiment={spec()['experiment']}`)"
    if frame.empty:
        return [], [f"{name}: no eval records of experiment {spec()['experiment']} {run}"]
    written, skipped = [], []
    for model, expanded, limit, part in parts(frame):
        found, tasks = configs(part, metric)
        title = title_of(part, expanded, limit)
        made = make(part, found, tasks, stem_for(name, model, limit, expanded), title)
        if isinstance(made, str):
            skipped.append(f"{name} {model} ({title}): {made} {run}")
        else:
            written += made
    return written, skipped


def frontier_figures(frame: pd.DataFrame, out: Path, metric: str = "acc") -> tuple[list, list]:
    """The frontier figure of every (model, K,V layout, limit) the frontier experiment recorded."""
    def make(part, found, tasks, stem, title):
        if sum(not c.is_base for c in found) < 1:
            return "no method besides the baseline with a measured K,V size"
        return save(frontier_figure(found, tasks, f"Accuracy against K,V memory: {title}", metric), out, stem)

    return per_layout(frame, spec().get("stem", "frontier"), metric, make)

"""The frontier's per-task table (report.yaml `frontier`): every config of one model and K,V layout, its K,V bytes
stored and read as shares of the baseline's, and its difference from the baseline on each task with the paired
bootstrap 95% interval. The last column answers the paper's bound: the worst task's difference, and whether every
task stays within `frontier.bound` points (the paper's 3.2; we hold 3). Same records as the frontier figure. A cache
that evicts tokens keeps a different share on each task: its task cells also give what it stored there, marked
"(kept)", and its K,V columns the mean over the tasks."""

from pathlib import Path

import pandas as pd

from chai.report import figures_frontier as frontier
from chai.report import stats
from chai.report.figures_frontier import Config
from chai.report.savings_table import KEPT_NOTE, ratio, share_cell
from chai.report.style import task_label

SAME_BYTES = 0.005  # two configs whose stored shares differ by no more than this store "the same bytes"


def _cell(config: Config, base: Config, task: str, metric: str) -> tuple[str, float | None]:
    """The cell text ("-1.7 [-3.1, -0.4]") and the difference in points; "—" where either run lacks the task."""
    if task not in config.rows or task not in base.rows:
        return "—", None
    found = stats.difference(base.rows[task]["items"], config.rows[task]["items"], metric,
                             frontier.spec().get("resamples", stats.RESAMPLES))
    if found is None:  # a record without items: the difference alone
        value = 100 * (float(config.rows[task][metric]) - float(base.rows[task][metric]))
        return f"{value:+.1f} [n/a]", value
    return _interval_text(found), 100 * found.value


def _verdict(diffs: list[float | None], bound: float) -> str:
    """The worst task's difference, and whether all are within the bound; "incomplete" when a task is missing."""
    known = [d for d in diffs if d is not None]
    if not known:
        return "—"
    worst = f"{min(known):+.1f}"
    if len(known) < len(diffs):
        return f"{worst} (incomplete)"
    return f"{worst} ({'yes' if min(known) >= -bound else 'no'})"


def _same_bytes_pairs(found: list[Config], base: Config, tasks: list[str], metric: str) -> list[str]:
    """Lines for each two configs of different families that store the same K,V bytes (within `SAME_BYTES`) and
    both have every task: their paired difference on each task and the mean over the tasks, with intervals."""
    whole = [c for c in found if not c.is_base and all(t in c.rows for t in tasks)]
    resamples = frontier.spec().get("resamples", stats.RESAMPLES)
    lines = []
    for i, first in enumerate(whole):
        for second in whole[i + 1:]:
            apart = abs(ratio(first, base, "stored") - ratio(second, base, "stored"))
            if first.family == second.family or apart > SAME_BYTES:
                continue
            pairs = [(second.rows[t]["items"], first.rows[t]["items"]) for t in tasks]
            found_diffs = [stats.difference(*pair, metric, resamples) for pair in pairs]
            mean = stats.mean_difference(pairs, metric, resamples)
            if mean is None or None in found_diffs:
                continue
            cells = [_interval_text(d) for d in [*found_diffs, mean]]
            lines.append("| " + " | ".join([first.label, second.label, share_cell(first, base, "stored"),
                                             *cells]) + " |")
    if not lines:
        return []
    head = ["Setting", "against", "K,V stored", *map(task_label, tasks), f"mean of {len(tasks)}"]
    return ["", "Same K,V bytes stored, different families (first minus second, points):", "",
            "| " + " | ".join(head) + " |", "|" + "---|" * len(head), *lines]


def _with_kept_share(text: str, config: Config, base: Config, task: str) -> str:
    """A task's cell of an evicting cache also gives what it stored on that task: its kept share differs by task,
    so the stored column's mean alone would misplace it."""
    if not config.evicts or task not in config.rows:
        return text
    return f"{text}; stored {share_cell(config, base, 'stored', task)}"


def _interval_text(found: stats.Estimate) -> str:
    return f"{100 * found.value:+.1f} [{100 * found.low:+.1f}, {100 * found.high:+.1f}]"


def to_markdown(title: str, found: list[Config], tasks: list[str], metric: str) -> str:
    base = next(c for c in found if c.is_base)
    bound = float(frontier.spec().get("bound", 3.0))
    head = ["Setting", "K,V stored", "K,V read", *map(task_label, tasks), f"worst (all within {bound:g})"]
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    accs = [f"{100 * float(base.rows[t][metric]):.1f}" if t in base.rows else "—" for t in tasks]
    lines.append("| " + " | ".join([f"{base.label} ({metric}, %)", "100.0%", "100.0%", *accs, ""]) + " |")
    for config in sorted((c for c in found if not c.is_base),
                         key=lambda c: (c.order, c.family, -ratio(c, base, "stored"), c.label)):
        cells = [_cell(config, base, t, metric) for t in tasks]
        shares = [share_cell(config, base, axis) for axis in ("stored", "read")]
        texts = [_with_kept_share(text, config, base, t) for (text, _), t in zip(cells, tasks)]
        verdict = _verdict([d for _, d in cells], bound)
        lines.append("| " + " | ".join([config.label, *shares, *texts, verdict]) + " |")
    lines += _same_bytes_pairs(found, base, tasks, metric)
    caption = (f"Difference from {base.family} in points of lm-eval `{metric}` on each task (full sets), with "
               f"its paired bootstrap 95% interval over the task's items; —: not recorded. K,V stored: measured cache "
               f"bytes per token as a share of {base.family}'s; read: per decode step. Worst: the lowest difference, "
               f"and whether every task stays within {bound:g} points of {base.family}. Same bytes: configs of two "
               f"families whose stored shares differ by at most {SAME_BYTES * 100:g} points, the mean difference "
               f"(first minus second) with items paired within each task.")
    caption += f" {KEPT_NOTE}" if any(c.evicts for c in found) else ""
    return "\n".join(lines + ["", caption, ""])


def write_task_tables(frame: pd.DataFrame, out: Path, metric: str = "acc") -> tuple[list, list]:
    """The per-task table of every (model, K,V layout, limit) of the frontier experiment -> markdown."""
    def make(part, found, _, stem, title):
        if not any(c.is_base for c in found) or len(found) < 2:
            return "no baseline and method recorded"
        tasks = [t for t in frontier.spec()["tasks"] if t in set(part["task"])]  # every task recorded, not just all
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{stem}.md"
        path.write_text(to_markdown(f"Each task against the baseline: {title}", found, tasks, metric))
        return [path]

    return frontier.per_layout(frame, "frontier_tasks", metric, make)

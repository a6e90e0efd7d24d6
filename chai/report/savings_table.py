"""The matched-savings table (report.yaml `frontier.savings`): for each saving level and method family, the most
accurate config (mean over the tasks) that saves at least that share of the baseline's K,V bytes, stored or read per
decode step. It answers "at 50% less K,V, which method keeps most accuracy, and with which setting", from the same
records as the frontier figure. A cache that evicts tokens keeps a different share of each task's tokens: it is
ranked by the mean over the tasks of its per-task bytes (figures_frontier.Config.x), marked "(kept, mean)"."""

from pathlib import Path

import pandas as pd

from chai.report import figures_frontier as frontier
from chai.report.figures_frontier import Config
from chai.report.style import task_label
from chai.report.tables import share_text

TOLERANCE = 1e-9  # a config measured at exactly the level counts as saving it
KEPT_NOTE = ("(kept): a cache that evicts tokens; its K,V stored is the baseline's bytes per token x the share of the "
             "tokens it kept, measured over the task's requests, not a fixed size per token; (kept, mean): the mean "
             "of those per-task shares over the tasks it was recorded on.")


def ratio(config: Config, base: Config, axis: str, task: str | None = None) -> float:
    """Bytes per token stored or read, on one task or (None) the mean over the tasks, as a share of what the baseline
    stores."""
    return config.x(axis, task) / base.x("stored")


def share_cell(config: Config, base: Config, axis: str, task: str | None = None) -> str:
    """`ratio` as table text; an evicting cache's marked, so that nobody reads it as a fixed size per token."""
    text = share_text(ratio(config, base, axis, task))
    return text if not config.evicts else f"{text} (kept)" if task else f"{text} (kept, mean)"


def pick(found: list[Config], family: str, base: Config, axis: str, level: float) -> Config | None:
    """The family's most accurate config with a saving of at least `level` (ties: the larger saving)."""
    able = [c for c in found if c.family == family and not c.is_base and c.mean is not None
            and 1 - ratio(c, base, axis) >= level - TOLERANCE]
    return max(able, key=lambda c: (c.mean.value, -ratio(c, base, axis)), default=None)


def _points(estimate, signed: bool = False) -> str:
    sign = "+" if signed else ""
    text = f"{estimate.value * 100:{sign}.1f}"
    known = estimate.low == estimate.low  # NaN: no interval (records without items)
    return text + (f" [{estimate.low * 100:{sign}.1f}, {estimate.high * 100:{sign}.1f}]" if known
                   else " [n/a]" if signed else "")


def _row(level: str, family: str, config: Config | None, base: Config) -> str:
    if config is None:
        return f"| {level} | {family} | none recorded saves this much | | | | |"
    diff = "" if config.is_base else _points(config.diff, signed=True)
    shares = [share_cell(config, base, axis) for axis in ("stored", "read")]
    return "| " + " | ".join([level, family, config.label, _points(config.mean), diff, *shares]) + " |"


def levels() -> list[tuple[str, float]]:
    """[(stored or read, level)] from report.yaml: a plain list means stored bytes."""
    found = frontier.spec().get("savings") or []
    found = {"stored": found} if isinstance(found, list) else found
    return [(axis, float(level)) for axis, values in found.items() for level in values]


def to_markdown(title: str, found: list[Config], tasks: list[str], metric: str) -> str:
    base = next(c for c in found if c.is_base)
    families = list(dict.fromkeys(c.family for c in found if not c.is_base))
    head = ["Saving ≥", "Family", "Setting", f"mean {metric} (%)", f"vs {base.family} (points)", "K,V stored",
            "K,V read"]
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head),
             _row("—", base.family, base, base)]
    for axis, level in levels():
        lines += [_row(f"{level * 100:g}% {axis}", family, pick(found, family, base, axis, level), base)
                  for family in families]
    return "\n".join(lines + ["", caption(found, tasks, metric, base), ""])


def caption(found: list[Config], tasks: list[str], metric: str, base: Config) -> str:
    left_out = sorted(c.label for c in found if c.mean is None)
    text = (f"Metric: lm-eval `{metric}`, mean over {', '.join(map(task_label, tasks))} (each task weighs the same). "
            f"Per saving level and family: the config with the highest mean among those that save at least that "
            f"share of {base.family}'s K,V bytes per token, stored (measured cache) or read per decode step. In "
            f"brackets: bootstrap 95% interval, items resampled within each task (paired with {base.family} for the "
            f"difference). n/a: a record without per-item outcomes; a mean's interval then comes from the recorded "
            f"standard errors. "
            f"K,V stored / read: share of {base.family}'s stored bytes.")
    text += f" {KEPT_NOTE}" if any(c.evicts for c in found) else ""
    return text + (f" Not recorded on every task, left out: {', '.join(left_out)}." if left_out else "")


def write_savings(frame: pd.DataFrame, out: Path, metric: str = "acc") -> tuple[list, list]:
    """The matched-savings table of every (model, K,V layout, limit) of the frontier experiment -> markdown."""
    def make(part, found, tasks, stem, title):
        if not any(c.is_base and c.mean is not None for c in found) or not tasks:
            return "no baseline recorded on every task"
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{stem}.md"
        path.write_text(to_markdown(f"Matched K,V savings: {title}", found, tasks, metric))
        return [path]

    return frontier.per_layout(frame, "frontier_savings", metric, make)

"""Accuracy (or perplexity) against context length (issue 17; report.yaml `long_context`): every eval record of the
long_context experiment (conf/experiment/long_context.yaml), one figure per model, K,V layout and task, and one
Markdown table of them all.

Figure `long_context_<task>` (a model or layout other than the first gets its name appended): left, the task's score
against its length (log2 axis), one line per method at its headline setting (display label, colour, order; the
baseline dashed); right, the K,V bytes one sequence of that length holds, per method. Table `long_context.md`: per
task, method x length, and the first length where the method "falls off" (report.yaml `falls_off`).

A record's length: its task file's (`task_data.length`), else its task's, else its window (`max_length`, WikiText's
rolling windows). K,V bytes per sequence: the record's measured bytes per token of context (`kv_bytes_per_token`, a
cache filled with a probe prompt) times the length, exact for a cache that grows linearly. A cache that evicts
tokens reports the share of the tokens it kept during the run (`kept_tokens.kept_fraction`, at the task's own
lengths): its bytes are that share times the length times the baseline's bytes per token (it keeps whole tokens),
marked "kept" in the table. Plotting only: no torch.
"""

import math
from pathlib import Path

import pandas as pd
from matplotlib.lines import Line2D

from chai.report.loading import (baseline, display_of, kept_fraction, latest, matching, report_config, settings_key,
                                 settings_of)
from chai.report.style import figure_legend, figure_title, method_styles, plt, save, task_label

MIB = 2**20


def spec() -> dict:
    return report_config()["long_context"]


def length_of(record: dict) -> int | None:
    """The context length a record scored: its task file's, its task's, else its window (WikiText)."""
    data = record.get("task_data") if isinstance(record.get("task_data"), dict) else {}
    task = record.get("config", {}).get("task", {}) or {}
    for value in (data.get("length"), task.get("length"), data.get("max_length"), record.get("max_length")):
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            return int(value)
    return None


def score_of(metrics: dict) -> tuple[str | None, float]:
    """(metric name, value) of the first of report.yaml's metrics the record has."""
    for name in spec()["metrics"]:
        value = metrics.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return name, float(value)
    return None, math.nan


def frame(records: list[dict]) -> pd.DataFrame:
    """One row per successful eval record of the experiment with a score and a length, the latest per cell."""
    rows = []
    for r in records:
        if r.get("experiment") != spec()["experiment"] or r.get("mode") != "eval" or r.get("error") or r.get("oom"):
            continue
        metric, value = score_of(r.get("metrics") if isinstance(r.get("metrics"), dict) else {})
        length = length_of(r)
        if metric is None or length is None:
            continue
        kv = r.get("kv_bytes_per_token") or {}
        per_token = (kv.get("measured") or {}).get("total", (kv.get("analytic") or {}).get("total", math.nan))
        settings = settings_of(r)
        rows.append({
            "model": r.get("model"), "expand_kv_heads": bool((r.get("config", {}).get("model") or {})
                                                             .get("expand_kv_heads")),
            "task": r.get("task"), "length": length, "method": r.get("method"), "settings": settings,
            "cell": settings_key({"name": r.get("method"), **settings}), **display_of(r),
            "metric": metric, "value": value, "kv_per_token": float(per_token), "kept": kept_fraction(r),
            "time": r.get("time"), "run_id": r.get("run_id"),
        })
    found = pd.DataFrame(rows)
    found.attrs["keys"] = ["model", "expand_kv_heads", "task", "length", "cell"]
    found = latest(found)
    return _with_sequence_bytes(found) if not found.empty else found


def _with_sequence_bytes(found: pd.DataFrame) -> pd.DataFrame:
    """`kv_sequence` (bytes one sequence of `length` tokens holds) and `kv_source` ("measured" or "kept")."""
    base = matching(found, baseline())
    dense = base.groupby(["model", "expand_kv_heads"])["kv_per_token"].median().to_dict()
    sequence, source = [], []
    for _, row in found.iterrows():
        per_token = dense.get((row["model"], row["expand_kv_heads"]), math.nan)
        if not math.isnan(row["kept"]) and not math.isnan(per_token):
            sequence.append(row["kept"] * row["length"] * per_token)
            source.append("kept")
        else:
            sequence.append(row["kv_per_token"] * row["length"])
            source.append("measured")
    return found.assign(kv_sequence=sequence, kv_source=source, is_base=found.index.isin(base.index))


def _shown(metric: str) -> dict:
    return spec()["metrics"][metric]


def points(row) -> float:
    """The row's score as shown: points for a score, the perplexity itself."""
    return row["value"] * _shown(row["metric"]).get("scale", 1)


def falls_off(rows: pd.DataFrame, base: pd.DataFrame) -> str:
    """The first length where `rows` (one method of one task) is worse than the baseline by more than report.yaml's
    `falls_off`; "N/A" when it never is; "—" when no length has both."""
    bound = spec()["falls_off"]
    ref = {row["length"]: row for _, row in base.iterrows()}
    compared = False
    for _, row in rows.sort_values("length").iterrows():
        if row["length"] not in ref:
            continue
        compared = True
        mine, theirs = points(row), points(ref[row["length"]])
        if _shown(row["metric"]).get("higher_is_better", True):
            worse = mine < theirs - float(bound["points"])
        else:
            worse = mine > theirs * float(bound["ratio"])
        if worse:
            return str(row["length"])
    return "N/A" if compared else "—"


def methods_in_order(part: pd.DataFrame) -> list[str]:
    """The cells of a part in display order (baseline first), then by label."""
    shown = part.drop_duplicates("cell").sort_values(["is_base", "order", "label"], ascending=[False, True, True],
                                                     kind="stable")
    return list(shown["cell"])


def parts(found: pd.DataFrame):
    """(stem suffix, model title, task, rows) per model, K,V layout and task; the first layout has no suffix."""
    layouts = sorted(found.groupby(["model", "expand_kv_heads"]).groups)
    for i, (model, expanded) in enumerate(layouts):
        rows = found[(found["model"] == model) & (found["expand_kv_heads"] == expanded)]
        suffix = "" if i == 0 else f"_{model}" + ("_expanded" if expanded else "")
        title = f"{model}" + (" (expanded KV heads)" if expanded else "")
        for task in sorted(rows["task"].unique()):
            yield suffix, title, task, rows[rows["task"] == task]


def table_text(title: str, rows: pd.DataFrame) -> list[str]:
    lengths = sorted(rows["length"].unique())
    metric = rows["metric"].iloc[0]
    digits = _shown(metric).get("digits", 1)
    base = rows[rows["is_base"]]
    head = ["Method", *map(str, lengths), "falls off at", f"K,V at {lengths[-1]} (MiB)"]
    lines = [f"### {title}: {_shown(metric).get('label', metric)} by length", "", "| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]
    for cell in methods_in_order(rows):
        mine = rows[rows["cell"] == cell]
        by_length = {row["length"]: row for _, row in mine.iterrows()}
        values = [f"{points(by_length[n]):.{digits}f}" if n in by_length else "—" for n in lengths]
        last = by_length.get(lengths[-1])
        kv = "—" if last is None else f"{last['kv_sequence'] / MIB:.1f}" + (" (kept)" if last["kv_source"] == "kept"
                                                                            else "")
        verdict = "—" if mine["is_base"].any() else falls_off(mine, base)
        lines.append("| " + " | ".join([mine["label"].iloc[0], *values, verdict, kv]) + " |")
    return lines + [""]


def write_table(found: pd.DataFrame, out: Path) -> tuple[list, list]:
    """results/tables/<stem>.md: every task's method x length table."""
    if found is None or found.empty:
        return [], []  # the figures' step says so, once
    bound = spec()["falls_off"]
    lines = ["# Long-context accuracy and perplexity against context length", ""]
    for _, title, task, rows in parts(found):
        lines += table_text(f"{task_label(task)}, {title}", rows)
    lines += [f"Scores in points (string_match_all x 100: the share of target strings in the greedy answer), "
              f"perplexities as they are; —: not recorded. Falls off at: the first length where the method is more "
              f"than {bound['points']:g} points below the baseline (a score) or its perplexity more than "
              f"{bound['ratio']:g} times the baseline's; N/A: at no recorded length. K,V: bytes one sequence of that "
              f"length holds, the measured bytes per token x the length; (kept): an evicting cache, the share of the "
              f"tokens it kept during the run x the length x the baseline's bytes per token.", ""]
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{spec()['stem']}.md"
    path.write_text("\n".join(lines))
    return [path], []


def figure(rows: pd.DataFrame, title: str):
    """Two panels: the score against length, the K,V bytes per sequence against length; one line per method."""
    styles = method_styles(rows.drop_duplicates("cell"))
    fig, (score_ax, kv_ax) = plt.subplots(1, 2, figsize=(9, 3.8), layout="constrained")
    handles = []
    for cell in methods_in_order(rows):
        mine = rows[rows["cell"] == cell].sort_values("length")
        label = mine["label"].iloc[0]
        colour, marker = styles[label]
        dashed = "--" if mine["is_base"].any() else "-"
        ys = [points(row) for _, row in mine.iterrows()]
        score_ax.plot(mine["length"], ys, color=colour, marker=marker, markersize=4, linestyle=dashed)
        kv_ax.plot(mine["length"], mine["kv_sequence"] / MIB, color=colour, marker=marker, markersize=4,
                   linestyle=dashed)
        handles.append((Line2D([], [], color=colour, marker=marker, markersize=4, linestyle=dashed), label))
    lengths = sorted(rows["length"].unique())
    metric = rows["metric"].iloc[0]
    for ax in (score_ax, kv_ax):
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, labels=[str(n) for n in lengths])
        ax.minorticks_off()
        ax.set_xlabel("context length (tokens)")
        ax.grid(alpha=0.3)
    score_ax.set_ylabel(_shown(metric).get("label", metric))
    kv_ax.set_yscale("log")
    kv_ax.set_ylabel("K,V per sequence (MiB)")
    note = ("K,V: measured bytes per token x length; an evicting cache: its kept share of the run's tokens x length x "
            "the baseline's bytes per token") if (rows["kv_source"] == "kept").any() else (
        "K,V: measured bytes per token x length")
    figure_legend(fig, handles, note=note)
    figure_title(fig, title)
    return fig


def figures(found: pd.DataFrame, out: Path) -> tuple[list, list]:
    """results/figures/<stem>_<task>.png (and .pdf) for every task recorded."""
    if found is None or found.empty:
        return [], [_missing()]
    written = []
    for suffix, title, task, rows in parts(found):
        fig = figure(rows, f"{task_label(task)} against context length: {title}")
        written += save(fig, out, f"{spec()['stem']}_{task}{suffix}")
    return written, []


def _missing() -> str:
    return (f"long_context: no eval records of experiment {spec()['experiment']} (run "
            f"`bash scripts/gpu_long_context.sh` on a GPU, or `python run.py experiment={spec()['experiment']}`)")

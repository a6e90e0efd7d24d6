"""Tables 1-3 as Markdown and LaTeX: the baseline's accuracy absolute, every other method as its difference from the
baseline in points, the paper's number beside ours where chai/report/paper.yaml has it.

Which cells each table shows is data (chai/report/report.yaml `tables`: a row is the overrides that record the cell,
e.g. `method=dejavu_static method.sparsity=0.1`); how a row is named and where it goes, the records' own `display`
(label, then rows in display order). Nothing here names a method.

One table per (model, task.limit) present: rows scored on different subsets never share a table. A row is the
records whose method settings are the ones Hydra composes for its overrides (`loading.matching`); rows without any
record are left out and named under the table. A last column gives the K,V bytes per token the method keeps,
measured in a real cache, as a share of the baseline's.
"""

import math
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml

from chai.report.loading import baseline, matching, method_cell, report_config
from chai.report.style import ordered_tasks, task_label

PAPER_FILE = Path(__file__).with_name("paper.yaml")


@dataclass(frozen=True)
class Row:
    id: str  # key into paper.yaml
    overrides: str  # what `python run.py` is given to record the row's cells
    label: str = "{label}"  # the row's name; {label}: the records' display label
    baseline: bool = False


def tables() -> dict[str, tuple[str, str, list[Row]]]:
    """{table name: (title, the experiment that records it, its rows, the baseline first)} from report.yaml."""
    config = report_config()
    first = Row(config["baseline"], f"method={config['baseline']}", baseline=True)
    found = {}
    for name, table in config["tables"].items():
        rows = [Row(row_id, **({"overrides": spec} if isinstance(spec, str) else
                               {"overrides": spec["cell"], "label": spec.get("label", "{label}")}))
                for row_id, spec in table["rows"].items()]
        found[name] = (table["title"], table["experiment"], [first, *rows])
    return found


def load_paper(path: Path = PAPER_FILE) -> dict:
    return yaml.safe_load(path.read_text()) if path.exists() else {}


def paper_model(paper: dict, model: str) -> str | None:
    """Whose paper numbers go beside `model`'s: its own where the paper has them, else the paper's reference model."""
    listed = {*(paper.get("delta") or {}), *(paper.get("absolute") or {})}
    return model if model in listed else paper.get("reference_model")


def limit_name(limit) -> str:
    return "full sets" if limit is None or (isinstance(limit, float) and math.isnan(limit)) else f"first {int(limit)}"


def _value(rows: pd.DataFrame, task: str, column: str) -> float:
    picked = rows[rows["task"] == task]
    return float(picked[column].iloc[-1]) if not picked.empty else math.nan


def table_cells(frame: pd.DataFrame, rows: list[Row], metric: str, paper: dict, source_model: str | None):
    """The grid of one table: (tasks, [(label, is baseline, [(ours, paper) per task + K,V column])], missing rows'
    overrides, n); the baseline first, then the rows in display order. `source_model`: the paper model whose
    numbers fill the (paper) half of the cells."""
    tasks = ordered_tasks(frame["task"].unique())
    base_rows = matching(frame, baseline())
    base = {t: _value(base_rows, t, metric) for t in tasks}
    base_kv = base_rows["kv_measured"].mean() if not base_rows.empty else math.nan
    deltas = (paper.get("delta") or {}).get(source_model) or {}
    absolutes = (paper.get("absolute") or {}).get(source_model) or {}
    grid, missing = [], []
    for place, row in enumerate(rows):
        found = matching(frame, method_cell(row.overrides))
        if found.empty:
            missing.append(row.overrides)
            continue
        cells = []
        for task in tasks:
            ours = _value(found, task, metric)
            if row.baseline:
                stderr = _value(found, task, f"{metric}_stderr")
                text = "—" if math.isnan(ours) else f"{ours * 100:.1f} ± {stderr * 100:.1f}"
                theirs = (absolutes.get(row.id) or {}).get(task)
            else:
                # without a baseline record for the task the difference is unknown: show the absolute value, marked
                text = ("—" if math.isnan(ours) else f"{ours * 100:.1f}*" if math.isnan(base[task])
                        else f"{(ours - base[task]) * 100:+.1f}")
                theirs = (deltas.get(row.id) or {}).get(task)
            paper_text = None if theirs is None else f"{theirs:.1f}" if row.baseline else f"{theirs:+.1f}"
            cells.append((text, paper_text))
        kv = found["kv_measured"].mean()
        share = kv / base_kv if base_kv and not math.isnan(base_kv) else math.nan
        cells.append(("—" if math.isnan(share) else f"{share * 100:.1f}%", None))
        shown = found.iloc[-1]  # its display: the row's label and place
        label = row.label.format(label=shown["label"])
        grid.append(((not row.baseline, shown["order"], place), (label, row.baseline, cells)))
    counts = frame.groupby("task")["n_examples"].max()
    n = [str(int(counts[t])) if t in counts and not math.isnan(counts[t]) else "—" for t in tasks]
    return tasks, [line for _, line in sorted(grid, key=lambda item: item[0])], missing, n


def to_markdown(title: str, caption: str, tasks, grid, n) -> str:
    head = ["Method", *(task_label(t) for t in tasks), "K,V/token"]
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, _, cells in grid:
        shown = [f"{ours} ({theirs})" if theirs else ours for ours, theirs in cells]
        lines.append("| " + " | ".join([label, *shown]) + " |")
    lines.append("| n | " + " | ".join(n) + " | |")
    return "\n".join(lines + ["", caption, ""])


def _tex(text: str) -> str:
    for char, escaped in (("\\", r"\textbackslash{}"), ("%", r"\%"), ("_", r"\_"), ("&", r"\&"), ("#", r"\#")):
        text = text.replace(char, escaped)
    text = re.sub(r"`([^`]*)`", r"\\texttt{\1}", text)
    return text.replace("±", r"$\pm$").replace("—", "--")


def to_latex(title: str, caption: str, tasks, grid, n, label: str) -> str:
    head = ["Method", *(task_label(t) for t in tasks), "K,V/token"]
    lines = [r"\begin{table}[t]", r"\centering", rf"\caption{{{_tex(title)}. {_tex(caption)}}}", rf"\label{{{label}}}",
             r"\begin{tabular}{l" + "r" * (len(head) - 1) + "}", r"\toprule", " & ".join(map(_tex, head)) + r" \\",
             r"\midrule"]
    for label, _, cells in grid:
        shown = [_tex(ours) + (rf"~{{\scriptsize({_tex(theirs)})}}" if theirs else "") for ours, theirs in cells]
        lines.append(" & ".join([_tex(label), *shown]) + r" \\")
    lines += [r"\midrule", " & ".join(["$n$", *n, ""]) + r" \\", r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
    return "\n".join(lines)


def paper_note(paper: dict, source_model: str, model: str) -> str:
    """Which paper numbers the parentheses hold, and where they come from."""
    whose = f"the paper's number for {source_model}"
    if source_model != model:
        whose += f" (the paper did not evaluate {model}: a reference point, not a target)"
    return f"In parentheses: {whose}. Source: {' '.join(str(paper.get('source', '')).split())}"


def caption_for(metric: str, missing: list[str], paper: dict, source_model: str | None, model: str,
                base: str) -> str:
    """`source_model`: the paper model whose numbers are in the table, None when there are none; `base`: the
    baseline's label."""
    parts = [
        f"Metric: lm-eval `{metric}`, zero-shot. {base} row: accuracy in percent ± standard error; other rows: "
        f"difference from {base} in points (* = absolute, no {base} record for that task). K,V/token: measured cache "
        f"bytes per token as a share of {base}'s."
    ]
    if source_model:
        parts.append(paper_note(paper, source_model, model))
    if missing:
        parts.append(f"Not recorded yet: {', '.join(missing)}.")
    return " ".join(parts)


def baseline_label(frame: pd.DataFrame) -> str:
    found = matching(frame, baseline())
    return found["label"].iloc[-1] if not found.empty else baseline()["name"]


def write_tables(frame: pd.DataFrame, out: Path, metric: str = "acc", paper: dict | None = None) -> tuple[list, list]:
    """Every table the records allow -> `out`/<table>_<model>[_limitN].{md,tex}. Returns (written, skipped)."""
    paper = load_paper() if paper is None else paper
    written, skipped = [], []
    if frame.empty:
        return written, ["tables: no eval records (run `python run.py experiment=table`)"]
    out.mkdir(parents=True, exist_ok=True)
    frame = frame.assign(limit_key=frame["limit"].map(limit_name))
    for (model, limit), part in frame.groupby(["model", "limit_key"], sort=True):
        source_model, base = paper_model(paper, model), baseline_label(part)
        for name, (title, experiment, rows) in tables().items():
            tasks, grid, missing, n = table_cells(part, rows, metric, paper, source_model)
            if not any(not is_base for _, is_base, _ in grid):
                skipped.append(f"{name} {model} ({limit}): no method besides {base} recorded "
                               f"(run `python run.py experiment={experiment}`)")
                continue
            has_paper = any(theirs for _, _, cells in grid for _, theirs in cells)
            caption = caption_for(metric, missing, paper, source_model if has_paper else None, model, base)
            full_title = f"{title}: {model}, {limit}"
            stem = f"{name}_{model}" + ("" if limit == "full sets" else f"_limit{limit.split()[-1]}")
            (out / f"{stem}.md").write_text(to_markdown(full_title, caption, tasks, grid, n))
            (out / f"{stem}.tex").write_text(to_latex(full_title, caption, tasks, grid, n, f"tab:{stem}"))
            written += [out / f"{stem}.md", out / f"{stem}.tex"]
    return written, skipped


def write_long_form(frame: pd.DataFrame, out: Path) -> list[Path]:
    """Every latest accuracy cell as one CSV row, for anyone who wants the numbers without the layout."""
    if frame.empty:
        return []
    out.mkdir(parents=True, exist_ok=True)
    path = out / "accuracy_cells.csv"
    columns = ["model", "method", "label", "settings_key", "task", "limit", "acc", "acc_stderr", "acc_norm",
               "acc_norm_stderr", "n_examples", "kv_measured", "kv_analytic", "compute", "time", "run_id"]
    frame[[c for c in columns if c in frame]].to_csv(path, index=False)
    return [path]

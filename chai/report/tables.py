"""Tables 1-3 as Markdown and LaTeX: MHA's accuracy absolute, every other method as its difference from MHA in
points, the paper's number beside ours where chai/report/paper.yaml has it.

- Table 1 (the paper's): MHA, CHAI, CHAI-static, DejaVu-static 10/30/50%, SparQ on the five paper tasks.
- Table 2 (ours): CHAI against its variants (clustering on Q,K,V outputs, offline-fixed groups, random groups).
- Table 3 (ours): CHAI with cluster membership decided after 1, 3, 5 or 10 tokens.

One table per (model, task.limit) present: rows scored on different subsets never share a table. A row is the
method at its default settings with the row's own settings applied (`loading.matching`); rows without any record
are left out and named under the table. A last column gives the K,V bytes per token the method keeps, measured in
a real cache, as a share of MHA's.
"""

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import yaml

from chai.report.loading import matching
from chai.report.style import ordered_tasks, task_label

PAPER_FILE = Path(__file__).with_name("paper.yaml")


@dataclass(frozen=True)
class Row:
    id: str  # key into paper.yaml
    label: str
    method: str
    fixed: dict = field(default_factory=dict)


TABLES = {
    "table1": (
        "Zero-shot accuracy of each method (paper Table 1)",
        [Row("mha", "MHA", "mha"), Row("chai", "CHAI", "chai"), Row("chai_static", "CHAI-static", "chai_static"),
         *(Row(f"dejavu_static_{p}", f"DejaVu-static {p}%", "dejavu_static", {"sparsity": p / 100})
           for p in (10, 30, 50)),
         *(Row(f"sparq_{x}x", f"SparQ {x}x", "sparq", {"compression": x}) for x in (2, 4, 8))],
    ),
    "table2": (
        "CHAI against its variants (ours)",
        [Row("mha", "MHA", "mha"), Row("chai", "CHAI", "chai"), Row("chai_qkv", "CHAI on Q,K,V outputs", "chai_qkv"),
         Row("chai_static", "CHAI-static", "chai_static"), Row("random_groups", "Random groups", "random_groups")],
    ),
    "table3": (
        "CHAI with cluster membership decided after n tokens (ours)",
        [Row("mha", "MHA", "mha"),
         *(Row(f"chai_tokens_{n}", f"CHAI, {n} token{'s' if n > 1 else ''}", "chai", {"membership_tokens": n})
           for n in (1, 3, 5, 10))],
    ),
}


SOURCES = {"table1": "table", "table2": "ablations", "table3": "membership_tokens"}  # experiment behind each


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
    """The grid of one table: (tasks, [(row, [(ours, paper) per task + K,V column])], missing row labels, n).
    `source_model`: the paper model whose numbers fill the (paper) half of the cells."""
    tasks = ordered_tasks(frame["task"].unique())
    mha = matching(frame, "mha")
    base = {t: _value(mha, t, metric) for t in tasks}
    base_kv = mha["kv_measured"].mean() if not mha.empty else math.nan
    deltas = (paper.get("delta") or {}).get(source_model) or {}
    absolutes = (paper.get("absolute") or {}).get(source_model) or {}
    grid, missing = [], []
    for row in rows:
        found = matching(frame, row.method, row.fixed)
        if found.empty:
            missing.append(row.label)
            continue
        cells = []
        for task in tasks:
            ours = _value(found, task, metric)
            if row.method == "mha":
                stderr = _value(found, task, f"{metric}_stderr")
                text = "—" if math.isnan(ours) else f"{ours * 100:.1f} ± {stderr * 100:.1f}"
                theirs = (absolutes.get(row.id) or {}).get(task)
            else:
                # without an MHA record for the task the difference is unknown: show the absolute value, marked
                text = ("—" if math.isnan(ours) else f"{ours * 100:.1f}*" if math.isnan(base[task])
                        else f"{(ours - base[task]) * 100:+.1f}")
                theirs = (deltas.get(row.id) or {}).get(task)
            paper_text = None if theirs is None else f"{theirs:.1f}" if row.method == "mha" else f"{theirs:+.1f}"
            cells.append((text, paper_text))
        kv = found["kv_measured"].mean()
        share = kv / base_kv if base_kv and not math.isnan(base_kv) else math.nan
        cells.append(("—" if math.isnan(share) else f"{share * 100:.1f}%", None))
        grid.append((row, cells))
    counts = frame.groupby("task")["n_examples"].max()
    n = [str(int(counts[t])) if t in counts and not math.isnan(counts[t]) else "—" for t in tasks]
    return tasks, grid, missing, n


def to_markdown(title: str, caption: str, tasks, grid, n) -> str:
    head = ["Method", *(task_label(t) for t in tasks), "K,V/token"]
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row, cells in grid:
        shown = [f"{ours} ({theirs})" if theirs else ours for ours, theirs in cells]
        lines.append("| " + " | ".join([row.label, *shown]) + " |")
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
    for row, cells in grid:
        shown = [_tex(ours) + (rf"~{{\scriptsize({_tex(theirs)})}}" if theirs else "") for ours, theirs in cells]
        lines.append(" & ".join([_tex(row.label), *shown]) + r" \\")
    lines += [r"\midrule", " & ".join(["$n$", *n, ""]) + r" \\", r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
    return "\n".join(lines)


def paper_note(paper: dict, source_model: str, model: str) -> str:
    """Which paper numbers the parentheses hold, and where they come from."""
    whose = f"the paper's number for {source_model}"
    if source_model != model:
        whose += f" (the paper did not evaluate {model}: a reference point, not a target)"
    return f"In parentheses: {whose}. Source: {' '.join(str(paper.get('source', '')).split())}"


def caption_for(metric: str, missing: list[str], paper: dict, source_model: str | None, model: str) -> str:
    """`source_model`: the paper model whose numbers are in the table, None when there are none."""
    parts = [
        f"Metric: lm-eval `{metric}`, zero-shot. MHA row: accuracy in percent ± standard error; other rows: "
        "difference from MHA in points (* = absolute, no MHA record for that task). K,V/token: measured cache bytes "
        "per token as a share of MHA's."
    ]
    if source_model:
        parts.append(paper_note(paper, source_model, model))
    if missing:
        parts.append(f"Not recorded yet: {', '.join(missing)}.")
    return " ".join(parts)


def write_tables(frame: pd.DataFrame, out: Path, metric: str = "acc", paper: dict | None = None) -> tuple[list, list]:
    """Every table the records allow -> `out`/<table>_<model>[_limitN].{md,tex}. Returns (written, skipped)."""
    paper = load_paper() if paper is None else paper
    written, skipped = [], []
    if frame.empty:
        return written, ["tables: no eval records (run `python run.py experiment=table`)"]
    out.mkdir(parents=True, exist_ok=True)
    frame = frame.assign(limit_key=frame["limit"].map(limit_name))
    for (model, limit), part in frame.groupby(["model", "limit_key"], sort=True):
        source_model = paper_model(paper, model)
        for name, (title, rows) in TABLES.items():
            tasks, grid, missing, n = table_cells(part, rows, metric, paper, source_model)
            if not any(row.method != "mha" for row, _ in grid):
                skipped.append(f"{name} {model} ({limit}): no method besides MHA recorded "
                               f"(run `python run.py experiment={SOURCES[name]}`)")
                continue
            has_paper = any(theirs for _, cells in grid for _, theirs in cells)
            caption = caption_for(metric, missing, paper, source_model if has_paper else None, model)
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
    columns = ["model", "method", "settings_key", "task", "limit", "acc", "acc_stderr", "acc_norm",
               "acc_norm_stderr", "n_examples", "kv_measured", "kv_analytic", "compute", "time", "run_id"]
    frame[[c for c in columns if c in frame]].to_csv(path, index=False)
    return [path]

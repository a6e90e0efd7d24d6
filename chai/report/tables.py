"""Tables 1-3 as Markdown and LaTeX: the baseline's accuracy absolute, every other method as its difference from the
baseline in points, the paper's number beside ours where chai/report/paper.yaml has it.

Which cells each table shows is data (chai/report/report.yaml `tables`: a row is the overrides that record the cell,
e.g. `method=dejavu_static method.sparsity=0.1`); how a row is named and where it goes, the records' own `display`
(label, then rows in display order). Nothing here names a method.

One table per (model, K,V layout, task.limit) present: rows scored on different subsets, or on the model turned into
its multi-head twin (`model.expand_kv_heads`), never share a table. A row is the
records whose method settings are the ones Hydra composes for its overrides (`loading.matching`); rows without any
record are left out and named under the table. A difference has its paired bootstrap 95% interval where both records
carry per-item outcomes (chai/report/stats.py). Two last columns: the K,V bytes per token the method keeps, measured
in a real cache, and what a decode step reads of them, both as a share of the baseline's.
"""

import math
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml

from chai.report import stats
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


def stem_for(name: str, model: str, limit: str, expanded: bool = False) -> str:
    """A file's stem: the model, `_expanded` for its multi-head twin (`model.expand_kv_heads`), the limit."""
    return (f"{name}_{model}" + ("_expanded" if expanded else "")
            + ("" if limit == "full sets" else f"_limit{limit.split()[-1]}"))


def parts(frame: pd.DataFrame):
    """(model, expanded, limit name, rows) per table or figure: a layout that stores more K,V or rows scored on other
    items never share one."""
    if "expand_kv_heads" not in frame:  # a frame built by hand (tests)
        frame = frame.assign(expand_kv_heads=False)
    frame = frame.assign(limit_key=frame["limit"].map(limit_name))
    for (model, expanded, limit), part in frame.groupby(["model", "expand_kv_heads", "limit_key"], sort=True):
        yield model, bool(expanded), limit, part


def limit_name(limit) -> str:
    return "full sets" if limit is None or (isinstance(limit, float) and math.isnan(limit)) else f"first {int(limit)}"


def _last(rows: pd.DataFrame, task: str):
    picked = rows[rows["task"] == task]
    return picked.iloc[-1] if not picked.empty else None


def _value(row, column: str) -> float:
    return math.nan if row is None else float(row[column])


def interval_text(base_row, row, metric: str, shown: bool) -> str:
    """" [low, high]": the paired bootstrap 95% interval of the difference in points, " [n/a]" where either record
    has no per-item outcomes (older records), nothing when no record of the table has them."""
    if not shown:
        return ""
    found = None if base_row is None else stats.difference(base_row["items"], row["items"], metric)
    return " [n/a]" if found is None else f" [{found.low * 100:+.1f}, {found.high * 100:+.1f}]"


def share_text(share: float) -> str:
    return "—" if math.isnan(share) else f"{share * 100:.1f}%"


def table_cells(frame: pd.DataFrame, rows: list[Row], metric: str, paper: dict, source_model: str | None):
    """The grid of one table: (tasks, [(label, is baseline, [(ours, paper) per task + K,V stored and read])],
    missing rows' overrides, n); the baseline first, then the rows in display order. `source_model`: the paper model
    whose numbers fill the (paper) half of the cells."""
    tasks = ordered_tasks(frame["task"].unique())
    base_rows = matching(frame, baseline())
    base = {t: _last(base_rows, t) for t in tasks}
    base_kv = base_rows["kv_measured"].mean() if not base_rows.empty else math.nan
    with_items = "items" in frame and frame["items"].notna().any()
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
            mine = _last(found, task)
            ours, theirs_base = _value(mine, metric), _value(base[task], metric)
            if row.baseline:
                stderr = _value(mine, f"{metric}_stderr")
                text = "—" if math.isnan(ours) else f"{ours * 100:.1f} ± {stderr * 100:.1f}"
                theirs = (absolutes.get(row.id) or {}).get(task)
            else:
                # without a baseline record for the task the difference is unknown: show the absolute value, marked
                text = ("—" if math.isnan(ours) else f"{ours * 100:.1f}*" if math.isnan(theirs_base)
                        else f"{(ours - theirs_base) * 100:+.1f}" + interval_text(base[task], mine, metric, with_items))
                theirs = (deltas.get(row.id) or {}).get(task)
            paper_text = None if theirs is None else f"{theirs:.1f}" if row.baseline else f"{theirs:+.1f}"
            cells.append((text, paper_text))
        kv = found["kv_measured"].mean()
        read = (found["kv_measured"] * found["read_fraction"]).mean()
        known = base_kv and not math.isnan(base_kv)
        cells += [(share_text(kv / base_kv if known else math.nan), None),
                  (share_text(read / base_kv if known else math.nan), None)]
        shown = found.iloc[-1]  # its display: the row's label and place
        label = row.label.format(label=shown["label"])
        grid.append(((not row.baseline, shown["order"], place), (label, row.baseline, cells)))
    counts = frame.groupby("task")["n_examples"].max()
    n = [str(int(counts[t])) if t in counts and not math.isnan(counts[t]) else "—" for t in tasks]
    return tasks, [line for _, line in sorted(grid, key=lambda item: item[0])], missing, n


KV_HEADS = ("K,V stored", "K,V read")


def to_markdown(title: str, caption: str, tasks, grid, n) -> str:
    head = ["Method", *(task_label(t) for t in tasks), *KV_HEADS]
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, _, cells in grid:
        shown = [f"{ours} ({theirs})" if theirs else ours for ours, theirs in cells]
        lines.append("| " + " | ".join([label, *shown]) + " |")
    lines.append("| n | " + " | ".join(n) + " | | |")
    return "\n".join(lines + ["", caption, ""])


def _tex(text: str) -> str:
    for char, escaped in (("\\", r"\textbackslash{}"), ("%", r"\%"), ("_", r"\_"), ("&", r"\&"), ("#", r"\#")):
        text = text.replace(char, escaped)
    text = re.sub(r"`([^`]*)`", r"\\texttt{\1}", text)
    return text.replace("±", r"$\pm$").replace("—", "--")


def to_latex(title: str, caption: str, tasks, grid, n, label: str) -> str:
    head = ["Method", *(task_label(t) for t in tasks), *KV_HEADS]
    lines = [r"\begin{table}[t]", r"\centering", rf"\caption{{{_tex(title)}. {_tex(caption)}}}", rf"\label{{{label}}}",
             r"\begin{tabular}{l" + "r" * (len(head) - 1) + "}", r"\toprule", " & ".join(map(_tex, head)) + r" \\",
             r"\midrule"]
    for label, _, cells in grid:
        shown = [_tex(ours) + (rf"~{{\scriptsize({_tex(theirs)})}}" if theirs else "") for ours, theirs in cells]
        lines.append(" & ".join([_tex(label), *shown]) + r" \\")
    lines += [r"\midrule", " & ".join(["$n$", *n, "", ""]) + r" \\", r"\bottomrule", r"\end{tabular}",
              r"\end{table}", ""]
    return "\n".join(lines)


def paper_note(paper: dict, source_model: str, model: str) -> str:
    """Which paper numbers the parentheses hold, and where they come from."""
    whose = f"the paper's number for {source_model}"
    if source_model != model:
        whose += f" (the paper did not evaluate {model}: a reference point, not a target)"
    return f"In parentheses: {whose}. Source: {' '.join(str(paper.get('source', '')).split())}"


def caption_for(metric: str, missing: list[str], paper: dict, source_model: str | None, model: str,
                base: str, intervals: bool = False) -> str:
    """`source_model`: the paper model whose numbers are in the table, None when there are none; `base`: the
    baseline's label; `intervals`: whether any record of the table has per-item outcomes."""
    paired = ("in brackets its paired bootstrap 95% interval over the items both runs scored (n/a: a record without "
              "per-item outcomes)" if intervals else "paired 95% intervals n/a (records without per-item outcomes)")
    sentences = [
        f"Metric: lm-eval `{metric}`, zero-shot. {base} row: accuracy in percent ± standard error; other rows: "
        f"difference from {base} in points (* = absolute, no {base} record for that task); {paired}. "
        f"K,V stored: measured cache bytes per token as a share of {base}'s; K,V read: what a decode step reads of "
        f"them, as a share of {base}'s stored bytes."
    ]
    if source_model:
        sentences.append(paper_note(paper, source_model, model))
    if missing:
        sentences.append(f"Not recorded yet: {', '.join(missing)}.")
    return " ".join(sentences)


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
    for model, expanded, limit, part in parts(frame):
        source_model, base = paper_model(paper, model), baseline_label(part)
        for name, (title, experiment, rows) in tables().items():
            tasks, grid, missing, n = table_cells(part, rows, metric, paper, source_model)
            if not any(not is_base for _, is_base, _ in grid):
                skipped.append(f"{name} {model} ({limit}): no method besides {base} recorded "
                               f"(run `python run.py experiment={experiment}`)")
                continue
            has_paper = any(theirs for _, _, cells in grid for _, theirs in cells)
            caption = caption_for(metric, missing, paper, source_model if has_paper else None, model, base,
                                  intervals="items" in part and part["items"].notna().any())
            full_title = f"{title}: {model}{', K,V heads expanded' if expanded else ''}, {limit}"
            stem = stem_for(name, model, limit, expanded)
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
    columns = ["model", "expand_kv_heads", "method", "label", "settings_key", "task", "limit", "acc", "acc_stderr",
               "acc_norm", "acc_norm_stderr", "n_examples", "kv_measured", "kv_analytic", "read_fraction", "compute",
               "time", "run_id"]
    frame[[c for c in columns if c in frame]].to_csv(path, index=False)
    return [path]

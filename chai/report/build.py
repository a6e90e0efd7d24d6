"""Build every table and figure the records allow; name what was skipped and the command that would fill it.

Everything is drawn into a temporary folder and copied into place only at the end, each file renamed over its
target, so a crash midway leaves the output folders as they were. Each step (a kind of table or figure) is drawn
for one model at a time: one that raises is reported in `failed` with its error, none of its files are kept, and
the rest is still built.
"""

import os
import shutil
import tempfile
import traceback
from pathlib import Path

import pandas as pd

from chai.report import (figures_accuracy, figures_analysis, figures_bench, figures_capacity, figures_frontier,
                         long_context)
from chai.report.bench_table import write_bench_table
from chai.report.capacity_table import capacity_frame, write_capacity_table
from chai.report.frontier_tasks import write_task_tables
from chai.report.loading import (ADHOC, bench_frame, eval_frame, latest, load_calibrations, load_records,
                                 membership_frame, report_config)
from chai.report.savings_table import write_savings
from chai.report.style import plt
from chai.report.tables import write_long_form, write_tables


def build(results: Path, figures_dir: Path | None = None, tables_dir: Path | None = None, metric: str = "acc",
          include_adhoc: bool = False) -> dict:
    """results/ -> figures_dir (PNG + PDF), tables_dir (Markdown + LaTeX + CSV) and the bench table. Returns
    {"written": [paths], "skipped": [reasons], "failed": [errors], "records": n}.

    By default the curated records only (every results/<experiment>/ but results/adhoc/), into results/figures,
    results/tables and results/bench. With `include_adhoc` the ad-hoc runs too, and every output defaults to
    results/adhoc/ (gitignored) instead: a scratch run never rewrites a committed file."""
    results = Path(results)
    home = results / ADHOC if include_adhoc else results
    targets = {"figures": Path(figures_dir or home / "figures"), "tables": Path(tables_dir or home / "tables")}
    targets["bench"] = targets["tables"] if include_adhoc else results / "bench"
    records = load_records(results, include_adhoc)
    report = {"written": [], "skipped": [], "failed": [], "records": len(records)}
    left_out = 0 if include_adhoc else len(load_records(results / ADHOC))
    if left_out:
        report["skipped"].append(f"adhoc: {left_out} ad-hoc records in {results / ADHOC} left out (they never touch "
                                 "the committed report; `--include-adhoc` builds them into that folder)")
    data = _frames(records, results, report["failed"])
    with tempfile.TemporaryDirectory(prefix="chai-report-") as tmp:
        staged = []  # (drawn file, the folder it belongs in)
        for name, target, draw, whole, split in _steps(data, results, metric):
            for model, part in _per_model(whole, split):
                label = name if model is None else f"{name} {model}"
                folder = Path(tempfile.mkdtemp(dir=tmp))  # its own folder: a failed step's files are never kept
                staged += [(path, targets[target]) for path in _run(label, draw, part, folder, report)]
        report["written"] = [str(_publish(path, folder / path.name)) for path, folder in staged]
    return report


def _steps(data: dict, results: Path, metric: str) -> list:
    """(name, target folder, draw(data, folder) -> (written, skipped), its data, drawn per model)."""
    accuracy, bench, frontier = data["accuracy"], data["bench"], data["frontier"]
    return [
        ("tables", "tables", lambda d, o: write_tables(d, o, metric), accuracy, True),
        ("accuracy_cells", "tables", lambda d, o: (write_long_form(d, o), []), accuracy, False),
        *((name, "figures", lambda d, o, name=name: figures_accuracy.sweep_figures(name, d, o, metric), accuracy,
           True) for name in report_config()["sweeps"]),
        ("frontier", "figures", lambda d, o: figures_frontier.frontier_figures(d, o, metric), frontier, True),
        ("frontier_savings", "tables", lambda d, o: write_savings(d, o, metric), frontier, True),
        ("frontier_tasks", "tables", lambda d, o: write_task_tables(d, o, metric), frontier, True),
        ("fig06/07/08/13", "figures", figures_analysis.calibration_figures, data["calibrations"], True),
        ("fig09", "figures", figures_analysis.membership_figure, data["membership"], True),
        ("fig11", "figures", figures_bench.latency_figures, bench, True),
        ("fig12", "figures", figures_bench.memory_figures, bench, True),
        ("bench_table", "bench", lambda d, o: write_bench_table(results, o), None, False),
        ("capacity_table", "tables", write_capacity_table, data["capacity"], False),
        ("capacity", "figures", figures_capacity.capacity_figures, data["capacity"], False),
        ("long_context", "figures", long_context.figures, data["long_context"], False),
        ("long_context_table", "tables", long_context.write_table, data["long_context"], False),
    ]


def _frames(records: list[dict], results: Path, failed: list) -> dict:
    """The tidy frames the steps read; one that cannot be built is reported and left empty (its steps skip)."""
    calibrations = load_calibrations(results)
    # the frontier's records: its experiment's own (and those run with its settings under another name, `also`),
    # before `latest` (a cell also recorded elsewhere must not hide it)
    spec = report_config()["frontier"]
    ours = [r for r in records if r.get("experiment") in {spec["experiment"], *spec.get("also", [])}]
    # the long-context records score other tasks at several lengths: their own figures and table, none of the above
    scored = [r for r in records if r.get("experiment") != long_context.spec()["experiment"]]
    makers = {"accuracy": lambda: latest(eval_frame(scored, calibrations)),
              "frontier": lambda: figures_frontier.equivalent_baseline(latest(eval_frame(ours, calibrations))),
              "bench": lambda: latest(bench_frame(records)),
              "membership": lambda: latest(membership_frame(records)),
              "capacity": lambda: capacity_frame(records),
              "long_context": lambda: long_context.frame(records)}
    data = {"calibrations": calibrations}
    for name, make in makers.items():
        try:
            data[name] = make()
        except Exception as error:  # a record of a shape nobody foresaw: say which frame, build the rest
            failed.append(f"{name} records: {_describe(error)}; their tables and figures are skipped")
            data[name] = pd.DataFrame()
    return data


def _per_model(data, split: bool) -> list:
    """[(model, its part)], or [(None, everything)] when not split or empty (so the step can say what is missing)."""
    if split and isinstance(data, dict) and data:
        return [(model, {model: artifact}) for model, artifact in sorted(data.items())]
    if split and isinstance(data, pd.DataFrame) and not data.empty:
        return list(data.groupby("model", dropna=False, sort=True))
    return [(None, data)]


def _run(label: str, draw, part, folder: Path, report: dict) -> list[Path]:
    """One step on one part: its files, or none and a line in report["failed"] when it raises."""
    try:
        written, skipped = draw(part, folder)
    except Exception as error:  # one broken figure must not cost the others; it is reported, never hidden
        plt.close("all")
        report["failed"].append(f"{label}: {_describe(error)}; nothing of it written")
        return []
    report["skipped"] += skipped
    return [Path(path) for path in written]


def _describe(error: Exception) -> str:
    where = traceback.extract_tb(error.__traceback__)[-1] if error.__traceback__ else None
    at = f" (at {Path(where.filename).name}:{where.lineno})" if where else ""
    return f"{type(error).__name__}: {error}{at}"


def _publish(staged: Path, target: Path) -> Path:
    """Copy beside the target, then rename over it: nobody (and no crash) ever sees a half-written file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(f".{target.name}.part")
    shutil.copyfile(staged, part)
    os.replace(part, target)
    return target

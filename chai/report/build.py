"""Build every table and figure the records allow; name what was skipped and the command that would fill it."""

from pathlib import Path

from chai.report import figures_accuracy, figures_analysis, figures_bench
from chai.report.bench_table import write_bench_table
from chai.report.loading import (bench_frame, eval_frame, latest, load_calibrations, load_records,
                                 membership_frame)
from chai.report.tables import write_long_form, write_tables


def build(results: Path, figures_dir: Path | None = None, tables_dir: Path | None = None,
          metric: str = "acc") -> dict:
    """results/ -> figures_dir (PNG + PDF) and tables_dir (Markdown + LaTeX). Returns {"written": [...],
    "skipped": [reasons]}."""
    results = Path(results)
    figures_dir = Path(figures_dir or results / "figures")
    tables_dir = Path(tables_dir or results / "tables")
    records = load_records(results)
    calibrations = load_calibrations(results)
    accuracy = latest(eval_frame(records, calibrations))
    bench = latest(bench_frame(records))
    membership = latest(membership_frame(records))

    written, skipped = [], []
    steps = [
        lambda: write_tables(accuracy, tables_dir, metric),
        lambda: (write_long_form(accuracy, tables_dir), []),
        lambda: figures_accuracy.accuracy_vs_compute(accuracy, figures_dir, metric),
        lambda: figures_accuracy.clusters_sweep(accuracy, figures_dir, metric),
        lambda: figures_accuracy.first_layer_sweep(accuracy, figures_dir, metric),
        lambda: figures_analysis.calibration_figures(calibrations, figures_dir),
        lambda: figures_analysis.membership_figure(membership, figures_dir),
        lambda: figures_bench.latency_figures(bench, figures_dir),
        lambda: figures_bench.memory_figures(bench, figures_dir),
        lambda: write_bench_table(results),
    ]
    for step in steps:
        done, why = step()
        written += done
        skipped += why
    return {"written": [str(p) for p in written], "skipped": skipped, "records": len(records)}

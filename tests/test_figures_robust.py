"""`make figures` on whatever records exist: it never raises, says what it skipped, never rewrites the committed
report from ad-hoc runs, and never leaves an output folder half-written. And the bench and sweep figures read well:
log time axis, one legend per figure, integer cluster counts."""

import importlib.util

import pandas as pd
import pytest
from matplotlib.colors import to_hex

from chai.paths import ROOT
from chai.records import append_jsonl
from chai.report import build, figures_accuracy, figures_bench
from chai.report.style import panels
from tests.test_report import bench_cell, display, record, settings


def results_with(root, **folders):
    """root/<folder>/runs.jsonl holding the given records; returns root."""
    root.mkdir(parents=True, exist_ok=True)
    for folder, records in folders.items():
        for rec in records:
            append_jsonl(root / folder / "runs.jsonl", rec)
    return root


def outputs(root) -> dict[str, bytes]:
    """Every file the report may write (anything but the records), by path: to compare folders byte for byte."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "runs.jsonl"}


def chai_with_compute(task, acc, limit=None, share=0.4, **changes):
    rec = record("chai", task, acc, limit=limit, **changes)
    rec["method_info"] = {"attention_compute_fraction": share}  # as a calibrated CHAI run reports it
    return rec


def curated():
    return [record("mha", "piqa", 0.7), chai_with_compute("piqa", 0.68),
            *(chai_with_compute("piqa", 0.6 + k / 100, num_clusters=k, share=k / 32) for k in (2, 4))]


def test_an_adhoc_run_never_touches_the_committed_report(tmp_path):
    root = results_with(tmp_path / "results", accuracy=curated())
    build(root)
    committed = outputs(root)
    assert "tables/table1_llama7b.md" in committed and "figures/sweep_clusters_llama7b.png" in committed
    # the observed bug: `python run.py method=chai task.limit=50`, a lone CHAI cell, then `make figures`
    results_with(root, adhoc=[chai_with_compute("piqa", 0.5, limit=50) | {"experiment": "adhoc"}])
    report = build(root)
    assert report["failed"] == [] and outputs(root) == committed  # byte for byte: nothing rewritten or added
    assert any("1 ad-hoc records" in why and "--include-adhoc" in why for why in report["skipped"])

    report = build(root, include_adhoc=True)
    assert report["failed"] == []
    assert (root / "adhoc" / "tables" / "table1_llama7b_limit50.md").exists()
    assert all("/adhoc/" in path for path in report["written"])
    assert any(why.startswith("fig01 llama7b (first 50): fewer than two compute shares") for why in report["skipped"])
    assert {k: v for k, v in outputs(root).items() if not k.startswith("adhoc/")} == committed


EDGE_CASES = {  # records by folder -> reasons the report must give (substrings of its skip lines)
    "single CHAI eval with a limit": (
        {"accuracy": [chai_with_compute("piqa", 0.6, limit=50)]},
        ["fig01 llama7b (first 50): fewer than two compute shares recorded for any method",
         "sweep_clusters llama7b (first 50): fewer than two values"]),
    "one point per task": (
        {"accuracy": [chai_with_compute(t, 0.6, share=share) for t, share in (("piqa", 0.4), ("arc_easy", 0.6))]},
        ["fig01 llama7b (full sets): no task has two or more compute shares", "fig11: no bench records"]),
    "MHA only": (
        {"accuracy": [record("mha", t, 0.7) for t in ("piqa", "arc_easy")]},
        ["table1 llama7b (full sets): no method besides MHA", "fig01 llama7b (full sets): fewer than two"]),
    "empty results folder": ({}, ["tables: no eval records", "fig11: no bench records", "fig06/07/08/13: no"]),
    "bench records missing": (
        {"accuracy": curated()},
        ["fig11: no bench records", "fig12: no bench records", "bench_table: no bench records"]),
    "records with an error": (
        {"accuracy": [record("chai", "piqa", 0.0, error="RuntimeError: boom")],
         "bench": [bench_cell("mha", "sdpa", 1, 128, oom=True), bench_cell("chai", "method", 1, 128, oom=True)]},
        ["tables: no eval records", "fig11 llama7b: every bench cell failed",
         "fig12 llama7b: every bench cell failed"]),
}


@pytest.mark.parametrize("case", EDGE_CASES)
def test_the_report_builds_what_the_records_support_and_says_why_not_the_rest(tmp_path, case):
    folders, reasons = EDGE_CASES[case]
    report = build(results_with(tmp_path / "results", **folders))
    assert report["failed"] == []
    for reason in reasons:
        assert any(reason in why for why in report["skipped"]), (reason, report["skipped"])
    assert all((tmp_path / path).exists() for path in report["written"])


def broken(frame, out):
    """A figure that writes half a file, then raises."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "fig11_latency_llama7b.png").write_bytes(b"half")
    raise RuntimeError("drawing failed")


def test_a_failing_figure_is_reported_and_the_rest_still_built(tmp_path, monkeypatch, capsys):
    root = results_with(tmp_path / "results", bench=[bench_cell(m, p, 1, s) for s in (128, 256)
                                                      for m, p in (("mha", "sdpa"), ("chai", "method"))])
    (root / "figures").mkdir()
    (root / "figures" / "fig11_latency_llama7b.png").write_bytes(b"committed")
    monkeypatch.setattr(figures_bench, "latency_figures", broken)
    report = build(root)
    (failure,) = report["failed"]  # with the error and where it was raised
    assert failure.startswith("fig11 llama7b: RuntimeError: drawing failed (at test_figures_robust.py:")
    assert failure.endswith("nothing of it written")
    assert (root / "figures" / "fig11_latency_llama7b.png").read_bytes() == b"committed"
    assert (root / "figures" / "fig12_memory_llama7b.png").exists() and (root / "bench" / "bench_table.md").exists()
    assert not list(root.rglob("*.part"))

    spec = importlib.util.spec_from_file_location("figures_script", ROOT / "scripts" / "figures.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--results", str(root)]) == 1  # a failure is never silent: said, and the exit status
    assert "FAILED fig11 llama7b: RuntimeError: drawing failed" in capsys.readouterr().out


def test_a_crash_midway_leaves_the_output_folders_untouched(tmp_path, monkeypatch):
    root = results_with(tmp_path / "results", accuracy=curated(), bench=[bench_cell("mha", "sdpa", 1, 128)])
    build(root)
    before = outputs(root)
    results_with(root, accuracy=[record("mha", "piqa", 0.75)])  # newer: a finished build would change table1

    def interrupted(frame, out):  # Ctrl-C late in the build, after the tables were drawn
        raise KeyboardInterrupt

    monkeypatch.setattr(figures_bench, "memory_figures", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build(root)
    assert outputs(root) == before
    monkeypatch.undo()
    build(root)
    assert outputs(root)["tables/table1_llama7b.md"] != before["tables/table1_llama7b.md"]  # the test can fail


def test_panels_refuses_an_empty_grid():
    with pytest.raises(ValueError, match="at least one panel"):
        panels(0)


@pytest.fixture
def drawn(monkeypatch):
    """The figures a figure function would save, kept open for inspection instead."""
    figures = []
    for module in (figures_accuracy, figures_bench):
        monkeypatch.setattr(module, "save", lambda fig, folder, stem: figures.append(fig) or [])
    yield figures
    from chai.report.style import plt

    plt.close("all")


def test_cluster_counts_are_integers_on_a_linear_axis(tmp_path, drawn):
    from chai.report.loading import eval_frame, latest

    counts = range(1, 10)
    frame = latest(eval_frame([record("mha", "piqa", 0.7),
                               *(record("chai", "piqa", 0.6 + k / 100, num_clusters=k) for k in counts)]))
    written, skipped = figures_accuracy.sweep_figures("sweep_clusters", frame, tmp_path)
    (ax,) = [ax for ax in drawn[0].axes if ax.get_visible()]
    assert ax.get_xscale() == "linear"
    assert [t.get_text() for t in ax.get_xticklabels()] == [str(k) for k in counts]  # 9 included


def memory_and_latency_cells():
    cells = [bench_cell(m, p, b, s) for b in (1, 4) for s in (512, 1024)
             for m, p in (("mha", "sdpa"), ("mha", "static_compiled"), ("chai", "method"), ("sparq", "method"))]
    for cell in cells:
        if cell["method"] == "sparq":  # slow dynamic path: 10x MHA's time per token, the same K,V bytes
            cell["bench"]["ttnt_ms"] = {k: 10 * v for k, v in cell["bench"]["ttnt_ms"].items()}
    return cells


LABELS = [display(settings(m))["label"] for m in ("mha", "chai", "sparq")]  # as the methods' display names them


def bench(cells):
    from chai.report.loading import bench_frame, latest

    return latest(bench_frame(cells))


def test_latency_has_a_log_time_axis_and_one_legend_for_the_figure(tmp_path, drawn):
    figures_bench.latency_figures(bench(memory_and_latency_cells()), tmp_path)
    (fig,) = drawn
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert len(axes) == 4 and all(ax.get_yscale() == "log" for ax in axes)
    assert all(ax.get_legend() is None for ax in axes) and len(fig.legends) == 1
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert [label for label in labels if label in LABELS] == LABELS  # display order
    assert any("static cache" in label for label in labels)  # the path is the line style, named once


def test_memory_has_one_entry_per_method_and_coinciding_lines_stay_visible(tmp_path, drawn):
    figures_bench.memory_figures(bench(memory_and_latency_cells()), tmp_path)
    (fig,) = drawn
    labels = [t.get_text() for t in fig.legends[0].get_texts() if t.get_text()]  # blanks only end a column
    assert labels[:3] == LABELS and len(labels) == 5  # + what a line and a hollow marker mean
    assert not any(ax.get_legend() for ax in fig.axes)
    cache_ax = fig.axes[0]
    mha, sparq = (display(settings(m))["color"] for m in ("mha", "sparq"))  # equal K,V bytes: they coincide
    lines = {(line.get_color(), line.get_linestyle()): line for line in cache_ax.get_lines()}
    assert lines[(mha, "-")].get_linewidth() > lines[(sparq, "-")].get_linewidth()  # MHA's shows around SparQ's
    assert lines[(mha, "None")].get_markersize() > lines[(sparq, "None")].get_markersize()
    caption = fig.legends[0].get_title().get_text()
    assert "allocator" in caption and "workspace" in caption and "nested" in caption


def test_each_gpu_gets_its_own_figures_and_the_newest_the_plain_name(tmp_path, monkeypatch):
    """Records of one model on two GPUs: one latency and one memory figure per GPU, no line drawn from both; the
    GPU of the newest record keeps the plain file name."""
    saved = {}
    monkeypatch.setattr(figures_bench, "save", lambda fig, folder, stem: saved.setdefault(stem, fig) and [stem])
    old = memory_and_latency_cells()
    new = memory_and_latency_cells()  # made later: newer times
    for cell in new:
        cell["device"] = {"name": "NVIDIA H200"}
        cell["bench"]["ttnt_ms"] = {k: v / 2 for k, v in cell["bench"]["ttnt_ms"].items()}
    frame = bench(old + new)
    figures_bench.latency_figures(frame, tmp_path)
    figures_bench.memory_figures(frame, tmp_path)
    assert sorted(saved) == ["fig11_latency_llama7b", "fig11_latency_llama7b_h100",
                             "fig12_memory_llama7b", "fig12_memory_llama7b_h100"]
    assert "H200" in saved["fig11_latency_llama7b"]._suptitle.get_text()
    h100_ttnt = {tuple(line.get_ydata()) for line in saved["fig11_latency_llama7b_h100"].axes[1].get_lines()}
    h200_ttnt = {tuple(line.get_ydata()) for line in saved["fig11_latency_llama7b"].axes[1].get_lines()}
    assert h100_ttnt and h200_ttnt and not h100_ttnt & h200_ttnt
    from chai.report.style import plt

    plt.close("all")


def test_each_method_keeps_its_display_colour_and_a_second_variant_gets_a_free_one():
    from chai.report.style import method_styles

    rows = pd.DataFrame([{"label": "CHAI a", "order": 10, "color": "tab:blue"},
                         {"label": "MHA", "order": 0, "color": "tab:red"},
                         {"label": "CHAI b", "order": 10, "color": "tab:blue"},
                         {"label": "New method", "order": 40, "color": None}])
    styles = method_styles(rows)
    assert list(styles) == ["MHA", "CHAI a", "CHAI b", "New method"]  # display order, then label
    assert styles["MHA"] == ("tab:red", "o") and styles["CHAI a"] == ("tab:blue", "s")
    colours = [to_hex(c) for c, _ in styles.values()]
    assert len(set(colours)) == 4  # the second CHAI and the colourless method: cycle colours nobody uses

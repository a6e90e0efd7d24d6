"""Tables and figures from synthetic records (the schemas of eval, bench, membership records and the calibration
artifact): every file is produced, the numbers in the tables are the records' numbers, the newest record of a cell
wins, failures are left out, and the report never imports torch."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from chai.paths import ROOT
from chai.records import append_jsonl
from chai.report import build
from chai.report.loading import eval_frame, latest, method_defaults
from chai.report.tables import write_tables

LAYERS, HEADS = 32, 32  # llama7b's arch, so the paper's numbers apply and the compute share is known
TASKS = ("piqa", "arc_easy")
MHA_ACC = {"piqa": 0.78, "arc_easy": 0.75}
_clock = iter(range(10_000))


def settings(method: str, **changes) -> dict:
    """The method config `python run.py method=<method>` composes, with `changes` applied."""
    found = method_defaults(method)
    assert found is not None, f"conf/method/{method}.yaml"
    return {"name": method, **found, **changes}


def display(method_cfg: dict) -> dict:
    """The `display` a runner writes into the record: the method class's own (the test imports torch; the report
    never does)."""
    from chai.methods import METHODS, _discover

    _discover()
    return METHODS[method_cfg["name"]].display({k: v for k, v in method_cfg.items() if k != "name"})


def label(method: str, **changes) -> str:
    """The row name a method's records give it (their display label: settings may be part of it)."""
    return display(settings(method, **changes))["label"]


def clusters(rec: dict, count: int, first: int = 0) -> dict:
    """`rec` with the per-layer cluster counts a CHAI-family method reports (`first` layers left dense)."""
    rec["method_info"] = {"clusters_per_layer": ["dense"] * first + [count] * (LAYERS - first)}
    return rec


def record(method: str, task: str, acc: float, limit=None, model="llama7b", error=None, kv=1.0, **changes) -> dict:
    """An eval record as chai.cli + chai.evaluate write it (only the fields the report reads, plus a few)."""
    second = next(_clock)
    method_cfg = settings(method, **changes)
    rec = {
        "run_id": f"r{second}",
        "time": f"2026-01-01T{second // 3600:02d}:{second // 60 % 60:02d}:{second % 60:02d}+0000",
        "mode": "eval", "experiment": "accuracy", "model": model, "method": method, "task": task,
        "config": {"method": method_cfg, "task": {"name": task, "limit": limit},
                   "model": {"name": model, "arch": {"num_hidden_layers": LAYERS, "num_attention_heads": HEADS}}},
        "metrics": {"acc": acc, "acc_stderr": 0.01, "acc_norm": acc - 0.01, "acc_norm_stderr": 0.01},
        "n_examples": limit or 1000,
        "kv_bytes_per_token": {"analytic": {"total": 1000 * kv}, "measured": {"total": 1000 * kv}},
        "method_info": {},
        "display": display(method_cfg),
    }
    if error:
        rec["error"] = error
    return rec


def swept(key: str, values: tuple) -> list:
    return [v for v in values if v != settings("chai").get(key)]


def eval_records() -> list[dict]:
    recs = []
    for task in TASKS:
        base = MHA_ACC[task]
        recs.append(record("mha", task, base - 0.05))  # older: replaced by the next line
        recs.append(record("mha", task, base))
        recs.append(record("chai", task, base - 0.02, kv=0.8))
        recs.append(record("chai", task, 0.0, error="OutOfMemoryError: CUDA out of memory"))  # never shown
        recs.append(record("chai_static", task, base - 0.04, kv=0.8))
        recs.append(record("chai_qkv", task, base - 0.03, kv=0.8))
        recs.append(record("sparq", task, base - 0.01) | {"run_stats": {"kv_read_fraction": 0.125}})
        for sparsity in (0.1, 0.3, 0.5):
            recs.append(record("dejavu_static", task, base - sparsity / 5, kv=1 - sparsity, sparsity=sparsity))
        # sweep points; a value equal to CHAI's default would be the default cell itself, so it is left out
        for k in swept("num_clusters", (1, 4, 16, 32)):
            for method, drop in (("chai", 0.0), ("chai_static", 0.01), ("random_groups", 0.03)):
                recs.append(clusters(record(method, task, base - (drop + 0.1) / k, num_clusters=k), k))
        for layer in swept("first_clustered_layer", (0, 4, 16)):
            recs.append(clusters(record("chai", task, base - 0.02 / (layer + 1), first_clustered_layer=layer), 4,
                                 layer))
        for n in (1, 3, 5, 10):  # experiment=membership_tokens: the kneedle counts (conf/experiment/)
            recs.append(record("chai", task, base - 0.05 / n, membership_tokens=n, count_rule="kneedle"))
        recs.append(record("mha", task, 0.5, limit=5))  # a smoke run: its own table, never mixed in
        recs.append(record("chai", task, 0.4, limit=5))
    return recs


def bench_cell(method: str, path: str, batch: int, seq_len: int, oom=False) -> dict:
    second = next(_clock)
    speed = 0.7 if method == "chai" else 1.0
    stats = lambda ms: {"median": ms, "p10": 0.9 * ms, "p90": 1.1 * ms, "n": 8}  # noqa: E731
    kv = 2 * LAYERS * HEADS * 128 * 2 * batch * seq_len * (0.8 if method == "chai" else 1.0)
    return {
        "run_id": f"b{second}", "mode": "bench",
        # hours and minutes too: cells made later are newer, however many the tests made before
        "time": f"2026-01-02T{second // 3600:02d}:{second // 60 % 60:02d}:{second % 60:02d}+0000",
        "kind": "bench_cell", "model": "llama7b", "method": method, "config": {"method": settings(method)},
        "display": display(settings(method)),
        "device": {"name": "H100"}, "oom": oom, "error": "OutOfMemoryError" if oom else None,
        "bench": {"batch": batch, "seq_len": seq_len, "new_tokens": 8, "path": path, "dtype": "float16",
                  "ttft_ms": stats(seq_len * 0.05 * speed), "ttnt_ms": stats(20 * speed),
                  "clustering_ms": stats(seq_len * 0.05 * (1 - speed)),
                  "kv_bytes": {"analytic": kv, "measured_cache": kv, "allocator_delta": kv, "allocator_peak": 1.2 * kv},
                  "oom": oom, "error": None},
    }


def bench_records() -> list[dict]:
    recs = [bench_cell(m, p, b, s) for b in (1, 4) for s in (128, 256, 512)
            for m, p in (("mha", "sdpa"), ("mha", "eager"), ("chai", "method"))]
    return recs + [bench_cell("chai", "method", 4, 1024, oom=True)]


def membership_record() -> dict:
    tokens = list(range(1, 21))
    curve = [max(0.0, 0.5 - 0.03 * t) if t < 20 else 0.0 for t in tokens]
    return {"run_id": "m1", "time": "2026-01-03T00:00:00+0000", "mode": "membership", "model": "llama7b",
            "method": "mha", "config": {"membership": {"n_docs": 4}},
            "membership": {"tokens": tokens, "reference_tokens": 20, "changed_fraction": curve,
                           "pair_disagreement": [c * 1.5 for c in curve],
                           "changed_fraction_per_layer": [curve] * LAYERS, "num_clusters": [4] * LAYERS,
                           "clustered_layers": list(range(LAYERS)), "n_docs": 4}}


def calibration_artifact() -> dict:
    rng = np.random.default_rng(0)
    corr = np.clip(rng.normal(0.5, 0.3, (LAYERS, HEADS, HEADS)), -1, 1)
    inertia = [[100.0 / k for k in range(1, HEADS + 1)] for _ in range(LAYERS)]
    chosen = [4 + layer % 3 for layer in range(LAYERS)]
    sizes = np.zeros((LAYERS, HEADS + 1))  # clusters of each size (summed over documents) at the chosen k
    sizes[:, 1], sizes[:, 4], sizes[:, 11] = 40, 30, 10
    return {"model": "llama7b", "shape": {"layers": LAYERS, "heads": HEADS, "kv_heads": HEADS, "head_dim": 128},
            "elbow": {"inertia": inertia, "chosen": chosen, "rule": "kneedle: ..."},
            "correlation": corr.tolist(), "correlation_example": corr[::-1].tolist(),
            "static_groups": [[list(range(i, i + 8)) for i in range(0, HEADS, 8)]] * LAYERS,
            "cluster_sizes": sizes.tolist(), "head_importance": np.ones((LAYERS, HEADS)).tolist()}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("results")
    for rec in eval_records():
        append_jsonl(root / "accuracy" / "runs.jsonl", rec)
    for rec in bench_records():
        append_jsonl(root / "bench" / "runs.jsonl", rec)
    append_jsonl(root / "analysis" / "runs.jsonl", membership_record())
    (root / "calibration").mkdir()
    (root / "calibration" / "llama7b.json").write_text(json.dumps(calibration_artifact()))
    with (root / "accuracy" / "runs.jsonl").open("a") as f:
        f.write('{"torn": ')  # a killed writer's half line: skipped
    return root


@pytest.fixture(scope="module")
def report(results):
    return build(results)


EXPECTED_FIGURES = ["fig01_accuracy_vs_compute_llama7b", "sweep_clusters_llama7b", "sweep_first_layer_llama7b",
                    "fig06_correlation_mean_llama7b", "fig07_correlation_example_llama7b", "fig08_elbow_llama7b",
                    "fig09_membership_changes_llama7b", "fig11_latency_llama7b", "fig12_memory_llama7b",
                    "fig13_cluster_sizes_llama7b"]
EXPECTED_TABLES = ["table1_llama7b", "table2_llama7b", "table3_llama7b", "table1_llama7b_limit5"]


@pytest.mark.parametrize("stem", EXPECTED_FIGURES)
def test_every_figure_is_written_as_png_and_pdf(report, results, stem):
    for suffix in (".png", ".pdf"):
        path = results / "figures" / f"{stem}{suffix}"
        assert str(path) in report["written"] and path.stat().st_size > 1000


@pytest.mark.parametrize("stem", EXPECTED_TABLES)
def test_every_table_is_written_as_markdown_and_latex(report, results, stem):
    md = (results / "tables" / f"{stem}.md").read_text()
    tex = (results / "tables" / f"{stem}.tex").read_text()
    assert md.startswith("### ") and "| Method |" in md
    assert r"\begin{tabular}" in tex and r"\bottomrule" in tex


def table_rows(path) -> dict[str, list[str]]:
    lines = [line for line in path.read_text().splitlines() if line.startswith("| ") and "---" not in line]
    return {cells[0]: cells[1:] for cells in (line.strip("| ").split(" | ") for line in lines)}


def test_table1_mha_absolute_others_as_deltas_with_the_paper_beside(report, results):
    rows = table_rows(results / "tables" / "table1_llama7b.md")
    assert rows["Method"] == ["PIQA", "ARC-E", "K,V stored", "K,V read"]
    assert rows["MHA"][:2] == ["78.0 ± 1.0", "75.0 ± 1.0"]  # the newest MHA record, not the older 73.0
    assert rows[label("chai")] == ["-2.0 (-2.0)", "-2.0 (+0.3)", "80.0%", "80.0%"]  # the failed record is ignored
    assert rows[label("dejavu_static", sparsity=0.3)][:2] == ["-6.0", "-6.0"]
    sparq = display(settings("sparq"))["label"]
    assert rows[sparq] == ["-1.0", "-1.0", "100.0%", "12.5%"]  # stores all, reads an eighth
    assert label("sparq", compression=2) not in rows  # only 8x recorded
    assert "paired 95% intervals n/a" in (results / "tables" / "table1_llama7b.md").read_text()  # no items
    assert rows["n"][:2] == ["1000", "1000"]


def test_smoke_runs_get_their_own_table(report, results):
    rows = table_rows(results / "tables" / "table1_llama7b_limit5.md")
    assert rows["MHA"][0] == "50.0 ± 1.0" and rows[label("chai")][0] == "-10.0 (-2.0)" and rows["n"][0] == "5"


def test_table3_rows_are_the_membership_sweep(report, results):
    rows = table_rows(results / "tables" / "table3_llama7b.md")
    for n in (1, 3, 5, 10):
        name = f"{label('chai', membership_tokens=n, count_rule='kneedle')}, {n} token{'s' if n > 1 else ''}"
        assert rows[name][0] == f"{-5 / n:+.1f}"


def test_latest_record_per_cell_and_compute_share(results):
    from chai.report.loading import load_records

    frame = latest(eval_frame(load_records(results)))
    mha = frame[(frame["method"] == "mha") & (frame["task"] == "piqa") & frame["limit"].isna()]
    assert len(mha) == 1 and mha["acc"].iloc[0] == pytest.approx(0.78)
    four = frame[(frame["method"] == "chai") & frame["settings"].map(lambda s: s.get("num_clusters") == 4)]
    assert four["compute"].iloc[0] == pytest.approx(4 / HEADS)  # from the counts CHAI reported per layer
    assert (mha["compute"] == 1.0).all()  # the baseline


def test_compute_share_is_what_the_method_reports():
    from chai.report.loading import attention_compute

    rec = clusters(record("chai", "piqa", 0.7), 8, first=2)
    assert attention_compute(rec, {}) == pytest.approx((2 * 32 + 30 * 8) / (32 * 32))
    rec["method_info"]["attention_compute_fraction"] = 0.5  # a method's own figure wins
    assert attention_compute(rec, {}) == 0.5
    unreported = record("chai", "piqa", 0.7, num_clusters=4)  # the settings are never re-derived into a share
    assert math.isnan(attention_compute(unreported, {}))


def test_rows_are_named_and_ordered_by_the_records_display(tmp_path):
    """A row's name and place are its records' display: relabel and reorder CHAI-static in its records and the
    table follows (no list of methods in the report)."""
    recs = [record("mha", "piqa", 0.7), record("chai", "piqa", 0.6), record("chai_static", "piqa", 0.65)]
    for rec in recs:  # a relabelled, reordered CHAI-static: before CHAI now
        if rec["method"] == "chai_static":
            rec["display"] = {**rec["display"], "label": "Fixed groups", "order": 5}
    write_tables(latest(eval_frame(recs)), tmp_path, paper={})
    names = list(table_rows(tmp_path / "table1_llama7b.md"))
    assert names == ["Method", "MHA", "Fixed groups", label("chai"), "n"]


def test_an_older_record_without_a_newer_setting_still_fills_its_row(tmp_path):
    """Records written before a method config listed all of its dataclass's settings (CHAI-static before it had
    membership_tokens, ...) still make "the" CHAI-static row: a missing setting counts as its default."""
    old = record("chai_static", "piqa", 0.65)
    for key in ("membership_tokens", "cluster_algo", "representative", "first_tokens", "causal_features"):
        del old["config"]["method"][key]
    write_tables(latest(eval_frame([record("mha", "piqa", 0.7), old])), tmp_path, paper={})
    assert table_rows(tmp_path / "table1_llama7b.md")[label("chai_static")][0] == "-5.0"


def test_empty_results_skip_everything_with_a_reason(tmp_path):
    report = build(tmp_path)
    assert report["written"] == [] and report["records"] == 0
    assert any("experiment=table" in why for why in report["skipped"])
    assert any("experiment=latency" in why for why in report["skipped"])


def test_a_model_the_paper_did_not_evaluate_gets_the_reference_models_numbers_named(tmp_path):
    paper = {"source": "CHAI", "reference_model": "llama7b", "delta": {"llama7b": {"chai": {"piqa": -2.0}}}}
    frame = latest(eval_frame([record("mha", "piqa", 0.7, model="tiny"), record("chai", "piqa", 0.6, model="tiny")]))
    write_tables(frame, tmp_path, paper=paper)
    text = (tmp_path / "table1_tiny.md").read_text()
    assert table_rows(tmp_path / "table1_tiny.md")[label("chai")][0] == "-10.0 (-2.0)"
    assert "the paper's number for llama7b (the paper did not evaluate tiny" in text
    write_tables(frame, tmp_path, paper={k: v for k, v in paper.items() if k != "reference_model"})
    assert table_rows(tmp_path / "table1_tiny.md")[label("chai")][0] == "-10.0"  # no reference model: no parentheses


def test_tables_skip_when_only_mha_is_recorded(tmp_path):
    frame = latest(eval_frame([record("mha", "piqa", 0.7)]))
    written, skipped = write_tables(frame, tmp_path)
    assert written == [] and all("no method besides MHA" in why for why in skipped)


def test_the_report_code_names_no_method():
    """Which cells the tables show is data (chai/report/report.yaml), how a method is shown is its records': no
    string in chai/report/*.py is a method's name."""
    import ast

    from chai.method_defaults import all_defaults

    for path in sorted((ROOT / "chai" / "report").glob("*.py")):
        strings = {node.value for node in ast.walk(ast.parse(path.read_text()))
                   if isinstance(node, ast.Constant) and isinstance(node.value, str)}
        assert not strings & set(all_defaults()), path.name


def test_the_report_never_imports_torch():
    code = "import sys; import chai.report; assert 'torch' not in sys.modules, 'chai.report imported torch'"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
    # drawing Fig. 8 reads every rule's counts, the budget rule's too: still no torch
    code = ("import json, sys; from chai.report.figures_analysis import rule_counts; "
            "found = rule_counts(json.load(open('results/calibration/smollm2.json'))); "
            "assert 'budget 10% K,V' in found and 'torch' not in sys.modules, 'Fig. 8 imported torch'")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_figures_script_runs_with_defaults_on_a_results_folder(results, tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "figures.py"), "--results", str(results),
                          "--figures", str(tmp_path / "f"), "--tables", str(tmp_path / "t")],
                         capture_output=True, text=True, check=True)
    assert "wrote" in out.stdout and (tmp_path / "f" / "fig08_elbow_llama7b.png").exists()


def test_a_long_title_fits_a_one_panel_figure():
    from chai.report.style import figure_title, panels, plt

    fig, _ = panels(1)
    figure_title(fig, "CHAI accuracy against the first clustered layer: smollm2-135m-instruct, first 200")
    fig.tight_layout()
    box = fig._suptitle.get_window_extent(fig.canvas.get_renderer())
    plt.close(fig)
    assert "\n" in fig._suptitle.get_text() and box.x0 >= 0 and box.x1 <= fig.bbox.width


def test_bench_table_has_one_block_per_model_and_gpu(report, results):
    text = (results / "bench" / "bench_table.md").read_text()
    assert text.count("### llama7b on H100") == 1
    assert "| 4 | 1024 |" in text and "| OOM |" in text  # the out-of-memory cell is shown as such


def test_bench_table_reads_records_kept_in_several_files(report, results, tmp_path):
    """The committed bench records are kept one runs.jsonl per GPU under results/bench/ (each file stays small): the
    table of the records split over two files is the table of them in one."""
    from chai.report.bench_table import write_bench_table

    lines = (results / "bench" / "runs.jsonl").read_text().splitlines(keepends=True)
    for name, part in (("a", lines[::2]), ("b", lines[1::2])):
        (tmp_path / "bench" / name).mkdir(parents=True)
        (tmp_path / "bench" / name / "runs.jsonl").write_text("".join(part))
    write_bench_table(tmp_path, tmp_path / "out")
    assert (tmp_path / "out" / "bench_table.md").read_text() == (results / "bench" / "bench_table.md").read_text()


# --- per-item outcomes: paired intervals in the tables; the accuracy-against-memory figure and savings table ---

def with_items(rec: dict, values) -> dict:
    """`rec` with per-item outcomes as chai/runners/eval.py writes them, its acc their mean."""
    rec["items"] = {"doc_ids": "range", "acc": "".join(str(int(v)) for v in values)}
    rec["metrics"]["acc"], rec["n_examples"] = float(np.mean(values)), len(values)
    return rec


def test_differences_carry_their_paired_interval_and_old_records_say_n_a(tmp_path):
    from chai.report import stats

    rng = np.random.default_rng(0)
    base = rng.integers(0, 2, 400)
    better = np.where(rng.random(400) < 0.3, 1, base)
    recs = [with_items(record("mha", "piqa", 0), base), with_items(record("chai", "piqa", 0), better),
            record("chai_static", "piqa", 0.4)]  # written before records had items
    write_tables(latest(eval_frame(recs)), tmp_path, paper={})
    rows = table_rows(tmp_path / "table1_llama7b.md")
    found = stats.difference({"doc_ids": "range", "acc": "".join(map(str, base))},
                             {"doc_ids": "range", "acc": "".join(map(str, better))})
    assert 0 < found.low < found.value < found.high
    chai, static = label("chai"), label("chai_static")
    assert rows[chai][0] == f"{found.value * 100:+.1f} [{found.low * 100:+.1f}, {found.high * 100:+.1f}]"
    assert rows[static][0] == f"{(0.4 - base.mean()) * 100:+.1f} [n/a]"
    assert "paired bootstrap 95% interval" in (tmp_path / "table1_llama7b.md").read_text()


def test_the_share_a_decode_step_reads():
    from chai.report.loading import read_fraction

    rec = record("sparq", "piqa", 0.7)
    assert read_fraction(rec) == 1.0  # nothing said: it reads all it stores
    rec["method_info"] = {"measured": {"compression": 4.0}}  # records before run_stats had the share
    assert read_fraction(rec) == 0.25
    rec["run_stats"] = {"kv_read_fraction": 0.3}
    assert read_fraction(rec) == 0.3
    rec["run_stats"] = {"kv_read_fraction": None}  # null: the method does not say; the measured compression does
    assert read_fraction(rec) == 0.25


SMOLLM2 = {"name": "smollm2", "hf_id": "HuggingFaceTB/SmolLM2-135M-Instruct",
           "arch": {"num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3}}
FRONTIER_TASKS = ("piqa", "arc_easy")
# (method, its settings, K,V stored and read as shares of MHA's, mean accuracy): three families and the baseline
FRONTIER = [("mha", {}, 1.0, None, 0.70),
            ("chai", {"num_clusters": 6}, 0.8, None, 0.68), ("chai", {"num_clusters": 4}, 0.6, None, 0.66),
            ("chai", {"num_clusters": 2}, 0.4, None, 0.60),
            ("dejavu_static", {"sparsity": 0.1}, 0.9, None, 0.69),
            ("dejavu_static", {"sparsity": 0.3}, 0.7, None, 0.62),
            ("dejavu_static", {"sparsity": 0.5}, 0.5, None, 0.65),  # saves more and scores higher than 30%
            ("sparq", {"compression": 2}, 1.0, 0.5, 0.67), ("sparq", {"compression": 4}, 1.0, 0.25, 0.64),
            ("sparq", {"compression": 8}, 1.0, 0.125, 0.50)]
SAVINGS = {"experiment": "frontier", "stem": "frontier", "tasks": ["piqa", "hellaswag", "arc_easy"],
           "savings": {"stored": [0.25, 0.5], "read": [0.5, 0.75]}, "resamples": 2000}


def frontier_records(expanded: bool = False, items: bool = True, n: int = 200) -> list[dict]:
    """A frontier experiment on one layout: each config on each task, `acc` +- 0.02 between the tasks."""
    recs = []
    for method, changes, stored, read, acc in FRONTIER:
        for task, shift in zip(FRONTIER_TASKS, (0.02, -0.02)):
            rec = record(method, task, acc + shift, model="smollm2", kv=stored * (3 if expanded else 1), **changes)
            rec["experiment"], rec["run_stats"] = "frontier", {"kv_read_fraction": read}
            rec["config"]["model"] = {**SMOLLM2, "expand_kv_heads": expanded}
            hits = round((acc + shift) * n)  # the first `hits` items solved: nested, so pairs are realistic
            recs.append(with_items(rec, [1] * hits + [0] * (n - hits)) if items else rec)
    return recs


@pytest.fixture
def frontier_spec(monkeypatch):
    from chai.report import figures_frontier

    monkeypatch.setattr(figures_frontier, "spec", lambda: SAVINGS)


def frontier_frame(recs):
    return latest(eval_frame(recs))


def test_the_frontier_has_a_figure_per_layout_and_a_line_per_family(tmp_path, monkeypatch, frontier_spec):
    from chai.report import figures_frontier

    drawn = []
    monkeypatch.setattr(figures_frontier, "save", lambda fig, folder, stem: drawn.append((stem, fig)) or [stem])
    frame = frontier_frame(frontier_records() + frontier_records(expanded=True))
    written, skipped = figures_frontier.frontier_figures(frame, tmp_path)
    assert written == ["frontier_smollm2", "frontier_smollm2_expanded"] and skipped == []
    titles = [fig._suptitle.get_text().replace("\n", " ") for _, fig in drawn]
    assert "SmolLM2-135M-Instruct, 3 KV heads (as shipped)" in titles[0]
    assert "SmolLM2-135M-Instruct, 9 KV heads (expanded, exact MHA layout)" in titles[1]
    fig = drawn[0][1]
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert len(axes) == 2 * (len(FRONTIER_TASKS) + 1)  # stored and read rows: each task, then the mean
    families = {display(settings(m, **c))["color"] for m, c, *_ in FRONTIER if m != "mha"}
    piqa_read = axes[len(FRONTIER_TASKS) + 1]
    lines = [line for line in piqa_read.get_lines() if line.get_linestyle() == "-"]
    assert {line.get_color() for line in lines} == families  # one line per family, in its display colour
    chai = next(line for line in lines if line.get_color() == display(settings("chai"))["color"])
    sparq_stored = [line for line in axes[0].get_lines() if line.get_color() == display(settings("sparq"))["color"]]
    assert [line.get_linestyle() for line in sparq_stored] == ["None"]  # all store the same: markers, no line
    assert list(chai.get_xdata()) == sorted(chai.get_xdata())  # points sorted by x
    assert list(chai.get_xdata()) == pytest.approx([0.4 * 1000 / 1024, 0.6 * 1000 / 1024, 0.8 * 1000 / 1024])
    sparq_read = next(line for line in axes[len(FRONTIER_TASKS) + 1].get_lines()
                      if line.get_color() == display(settings("sparq"))["color"] and line.get_linestyle() == "-")
    assert list(sparq_read.get_xdata()) == pytest.approx([r * 1000 / 1024 for r in (0.125, 0.25, 0.5)])
    mean_panel = axes[len(FRONTIER_TASKS)]
    assert "95% interval" in mean_panel.get_title() and mean_panel.containers  # error bars on the mean


def savings_rows(path) -> list[list[str]]:
    lines = [line for line in path.read_text().splitlines() if line.startswith("| ") and "---" not in line]
    return [line.strip("| ").split(" | ") for line in lines[1:]]


def test_the_matched_savings_table_picks_the_most_accurate_config_that_saves_enough(tmp_path, frontier_spec):
    from chai.report import stats
    from chai.report.savings_table import write_savings

    written, _ = write_savings(frontier_frame(frontier_records()), tmp_path)
    assert [p.name for p in written] == ["frontier_savings_smollm2.md"]
    picked = {(row[0], row[1]): row for row in savings_rows(written[0])}
    chai, dejavu, sparq = (display(settings(m))["family"] for m in ("chai", "dejavu_static", "sparq"))
    assert picked[("25% stored", chai)][2] == label("chai", num_clusters=4)  # 0.8 saves too little
    assert picked[("25% stored", dejavu)][2] == label("dejavu_static", sparsity=0.5)  # beats 30%, saves more
    assert picked[("50% stored", dejavu)][2] == label("dejavu_static", sparsity=0.5)  # exactly at the level
    assert picked[("50% stored", chai)][2] == label("chai", num_clusters=2)
    assert "none recorded" in picked[("25% stored", sparq)][2]  # SparQ stores everything
    assert picked[("50% read", sparq)][2] == label("sparq", compression=2)
    assert picked[("75% read", sparq)][2] == label("sparq", compression=4)
    assert "none recorded" in picked[("75% read", chai)][2]
    row = picked[("25% stored", chai)]
    assert row[3].startswith("66.0 [") and row[5:] == ["60.0%", "60.0%"]
    n = 200  # the paired difference over both tasks: nested items, so exactly -4 points, its interval around it
    expected = stats.mean_difference(
        [({"doc_ids": "range", "acc": "1" * round(b * n) + "0" * (n - round(b * n))},
          {"doc_ids": "range", "acc": "1" * round(a * n) + "0" * (n - round(a * n))})
         for a, b in ((0.68, 0.72), (0.64, 0.68))], resamples=2000)
    assert row[4] == f"{expected.value * 100:+.1f} [{expected.low * 100:+.1f}, {expected.high * 100:+.1f}]"
    assert expected.value == pytest.approx(-0.04) and expected.high < 0
    assert picked[("—", display(settings("mha"))["family"])][5:] == ["100.0%", "100.0%"]


def test_the_frontier_renders_from_old_records_without_items(tmp_path, frontier_spec):
    from chai.report.savings_table import write_savings

    recs = frontier_records(items=False)
    lone = record("chai", "piqa", 0.5, model="smollm2", kv=0.3, num_clusters=1)
    recs.append(lone | {"experiment": "frontier", "config": {**recs[0]["config"], "method": lone["config"]["method"]}})
    written, _ = write_savings(frontier_frame(recs), tmp_path)
    text = written[0].read_text()
    row = {(r[0], r[1]): r for r in savings_rows(written[0])}[("25% stored", display(settings("chai"))["family"])]
    assert row[3] == "66.0 [64.6, 67.4]"  # the recorded standard errors (0.01 per task), normal approximation
    assert row[4] == "-4.0 [n/a]"
    assert f"left out: {display(settings('chai', num_clusters=1))['label']}" in text  # recorded on one task only


def test_the_report_builds_the_frontier_from_its_experiment_only(tmp_path, frontier_spec):
    root = tmp_path / "results"
    for rec in frontier_records() + frontier_records(expanded=True):
        append_jsonl(root / "frontier" / "runs.jsonl", rec)
    for rec in eval_records()[:6]:  # another experiment's records: its own tables, never on the frontier
        append_jsonl(root / "accuracy" / "runs.jsonl", rec)
    report = build(root)
    assert report["failed"] == []
    for stem in ("frontier_smollm2", "frontier_smollm2_expanded"):
        assert (root / "figures" / f"{stem}.png").stat().st_size > 1000
    assert (root / "tables" / "frontier_savings_smollm2_expanded.md").exists()
    assert (root / "tables" / "table1_smollm2_expanded.md").exists()  # the layouts never share a table either
    assert not (root / "figures" / "frontier_llama7b.png").exists()


def test_the_per_task_table_says_whether_every_task_stays_within_the_bound(tmp_path, frontier_spec):
    from chai.report import stats
    from chai.report.frontier_tasks import write_task_tables

    recs = frontier_records()
    twin = []  # a DejaVu config storing what CHAI with 6 clusters stores (80%), one point better on each task
    for task, acc in (("piqa", 0.71), ("arc_easy", 0.67)):
        rec = record("dejavu_static", task, acc, model="smollm2", kv=0.8, sparsity=0.2)
        rec["experiment"], rec["config"]["model"] = "frontier", {**SMOLLM2, "expand_kv_heads": False}
        twin.append(with_items(rec, [1] * round(acc * 200) + [0] * (200 - round(acc * 200))))
    written, skipped = write_task_tables(frontier_frame(recs + twin), tmp_path)
    assert [p.name for p in written] == ["frontier_tasks_smollm2.md"] and skipped == []
    main, same = written[0].read_text().split("Same K,V bytes stored, different families")
    cells = [[line.strip("| ").split(" | ") for line in part.splitlines()
              if line.startswith("| ") and "---" not in line][1:] for part in (main, same)]
    rows = {row[0]: row for row in cells[0]}
    (pair,) = cells[1]  # CHAI with 6 clusters against the DejaVu config storing as much: one point lower
    assert pair[:3] == [label("chai", num_clusters=6), label("dejavu_static", sparsity=0.2), "80.0%"]
    assert [cell.split(" [")[0] for cell in pair[3:]] == ["-1.0", "-1.0", "-1.0"]  # PIQA, ARC-E, their mean
    assert rows[f"{label('mha')} (acc, %)"][3:5] == ["72.0", "68.0"]
    near, far = rows[label("chai", num_clusters=6)], rows[label("chai", num_clusters=2)]
    n = 200  # nested items (see frontier_records): PIQA 0.72 -> 0.70, exactly -2 points
    found = stats.difference({"doc_ids": "range", "acc": "1" * 144 + "0" * (n - 144)},
                             {"doc_ids": "range", "acc": "1" * 140 + "0" * (n - 140)}, resamples=2000)
    assert near[1:3] == ["80.0%", "80.0%"]
    assert near[3] == f"{found.value * 100:+.1f} [{found.low * 100:+.1f}, {found.high * 100:+.1f}]"
    assert near[-1] == "-2.0 (yes)" and far[-1] == "-10.0 (no)"  # 3 points is the bound
    assert rows[label("sparq", compression=8)][1:3] == ["100.0%", "12.5%"]


def test_the_expanded_baseline_borrows_only_the_tasks_it_has_not_run(frontier_spec):
    from chai.report.figures_frontier import configs, equivalent_baseline

    mha_label = label("mha")
    expanded = [r for r in frontier_records(expanded=True) if r["method"] != "mha" or r["task"] == "piqa"]
    shipped = frontier_records()
    frame = equivalent_baseline(frontier_frame(shipped + expanded))
    part = frame[frame["expand_kv_heads"]]
    found, _ = configs(part, "acc")
    base = next(c for c in found if c.is_base)
    assert set(base.rows) == {"piqa", "arc_easy"} and base.label == f"{mha_label} (ARC-E from the as-shipped runs)"
    assert base.rows["arc_easy"]["kv_measured"] == base.rows["piqa"]["kv_measured"] == 3000  # the expanded size
    shipped_arc = next(r for r in shipped if r["method"] == "mha" and r["task"] == "arc_easy")
    assert base.rows["arc_easy"]["items"] == shipped_arc["items"]
    assert not frame[~frame["expand_kv_heads"]]["label"].str.contains("as-shipped").any()  # shipped rows untouched
    # no expanded baseline record at all: nothing is borrowed (its K,V size would be a guess)
    alone = [r for r in expanded if r["method"] != "mha"]
    assert len(equivalent_baseline(frontier_frame(shipped + alone))) == len(frontier_frame(shipped + alone))

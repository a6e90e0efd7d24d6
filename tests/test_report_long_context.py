"""The long-context report (chai/report/long_context.py) from synthetic records of the long_context experiment: the
table's numbers and its "falls off at" column, one figure per task, methods in their display order, missing lengths,
the K,V bytes per sequence, and the records kept out of the accuracy tables."""

import pytest

from chai.records import append_jsonl
from chai.report import build
from chai.report.long_context import frame, write_table
from tests.test_report import display, record, settings, table_rows

_clock = iter(range(10_000))
PER_TOKEN = 46080.0  # SmolLM2 in float32: 30 layers x 3 KV heads x 64 x (K and V) x 4 bytes
MIB = 2**20


def lc_record(method: str, task: str, length: int, value: float, metric: str = "string_match_all", kept=None,
              model: str = "smollm2", **changes) -> dict:
    """An eval record of experiment=long_context as chai.runners.eval writes it (the fields the report reads)."""
    second = next(_clock)
    method_cfg = settings(method, **changes)
    rec = {
        "run_id": f"lc{second}",
        "time": f"2026-12-03T{second // 3600:02d}:{second // 60 % 60:02d}:{second % 60:02d}+0000",
        "mode": "eval", "experiment": "long_context", "model": model, "method": method, "task": task,
        "config": {"method": method_cfg, "task": {"name": task, "length": length, "n": 64},
                   "model": {"name": model, "expand_kv_heads": False}},
        "metrics": {metric: value}, "max_length": 8192,
        "task_data": {"length": length, "n": 64, "sha256": "0" * 64, "max_length": 8192},
        "kv_bytes_per_token": {"measured": {"total": PER_TOKEN * (0.5 if method == "kv_compress" else 1.0)},
                               "probe_tokens": 256},
        "method_info": {}, "display": display(method_cfg),
    }
    if kept is not None:  # an evicting cache: the share of the tokens it kept over the run
        rec["run_stats"] = {"extra": {"kept_tokens": {"mean": kept * length, "kept_fraction": kept}}}
    return rec


SCORES = {  # method: string_match_all at 1024, 2048, 4096 (None: not recorded)
    "mha": (0.90, 0.90, 0.80),
    "chai": (0.88, 0.84, 0.70),  # -2, then -6 points: falls off at 2048
    "sparq": (0.90, 0.89, 0.79),  # never more than 5 points below: N/A
    "kv_compress": (0.86, None, 0.60),  # 4 points below; 2048 not recorded; 20 below at 4096: falls off there
}
PERPLEXITY = {"mha": (20.0, 19.0), "chai": (20.5, 21.0)}  # at 2048, 4096: +2.5% then +10.5%: falls off at 4096


def lc_records() -> list[dict]:
    recs = []
    for method, values in SCORES.items():
        for length, value in zip((1024, 2048, 4096), values):
            if value is not None:
                recs.append(lc_record(method, "niah_single", length, value))
    recs.append(lc_record("chai", "niah_single", 1024, 0.1) | {"error": "RuntimeError: boom"})  # failed: never shown
    for length, value in zip((1024, 2048, 4096), (0.5, 0.3, 0.2)):
        recs.append(lc_record("streamingllm", "niah_single", length, value, kept=260 / length))
    for method, values in PERPLEXITY.items():
        for length, value in zip((2048, 4096), values):
            recs.append(lc_record(method, "c4_ppl", length, value, metric="token_perplexity"))
    return recs


def label(method: str) -> str:
    return display(settings(method))["label"]


@pytest.fixture
def results(tmp_path):
    for rec in lc_records():
        append_jsonl(tmp_path / "long_context" / "runs.jsonl", rec)
    for method, acc in (("mha", 0.78), ("chai", 0.76)):  # a paper table's records beside them
        append_jsonl(tmp_path / "accuracy" / "runs.jsonl", record(method, "piqa", acc))
    return tmp_path


def sections(path) -> dict[str, dict[str, list[str]]]:
    """{section title: table_rows of it} of the long-context Markdown."""
    found, title, lines = {}, None, []
    for line in path.read_text().splitlines() + ["### end"]:
        if line.startswith("### "):
            if title:
                found[title] = {c[0]: c[1:] for c in (row.strip("| ").split(" | ") for row in lines if "---" not in row)}
            title, lines = line[4:], []
        elif line.startswith("| "):
            lines.append(line)
    return found


def test_table_values_and_where_each_method_falls_off(results):
    report = build(results)
    assert not report["failed"], report["failed"]
    tables = sections(results / "tables" / "long_context.md")
    niah = tables["niah_single, smollm2: string_match_all (%) by length"]
    assert niah["Method"] == ["1024", "2048", "4096", "falls off at", "K,V at 4096 (MiB)"]
    assert niah[label("mha")][:4] == ["90.0", "90.0", "80.0", "—"]
    assert niah[label("chai")][:4] == ["88.0", "84.0", "70.0", "2048"]
    assert niah[label("sparq")][:4] == ["90.0", "89.0", "79.0", "N/A"]
    assert niah[label("kv_compress")][:4] == ["86.0", "—", "60.0", "4096"]  # the missing length is a dash
    assert niah[label("streamingllm")][3] == "1024"
    ppl = tables["c4_ppl, smollm2: token perplexity by length"]
    assert ppl[label("mha")][:2] == ["20.00", "19.00"]
    assert ppl[label("chai")][:3] == ["20.50", "21.00", "4096"]


def test_kv_bytes_per_sequence_measured_or_kept(results):
    from chai.report.loading import load_records

    found = frame(load_records(results))
    at = lambda method, length: found[(found["method"] == method) & (found["length"] == length)  # noqa: E731
                                      & (found["task"] == "niah_single")].iloc[0]
    assert at("mha", 4096)["kv_sequence"] == pytest.approx(PER_TOKEN * 4096)
    assert at("kv_compress", 4096)["kv_sequence"] == pytest.approx(PER_TOKEN * 4096 / 2)
    for length in (1024, 2048, 4096):  # an evicting cache: the 260 tokens it kept, at every length
        row = at("streamingllm", length)
        assert row["kv_source"] == "kept" and row["kv_sequence"] == pytest.approx(260 * PER_TOKEN)
    written, _ = write_table(found, results / "t")
    rows = sections(written[0])["niah_single, smollm2: string_match_all (%) by length"]
    assert rows[label("mha")][-1] == f"{PER_TOKEN * 4096 / MIB:.1f}"
    assert rows[label("streamingllm")][-1] == f"{260 * PER_TOKEN / MIB:.1f} (kept)"


def test_one_figure_per_task(results):
    report = build(results)
    for task in ("niah_single", "c4_ppl"):
        for suffix in (".png", ".pdf"):
            path = results / "figures" / f"long_context_{task}{suffix}"
            assert str(path) in report["written"] and path.stat().st_size > 1000
    assert not list((results / "figures").glob("long_context_piqa*"))


def test_methods_follow_the_records_display_order(tmp_path):
    """Rows (and lines) are in display order, the baseline first: reorder a method in its records and it moves."""
    recs = [r for r in lc_records() if r["task"] == "niah_single"]
    for rec in recs:
        if rec["method"] == "sparq":
            rec["display"] = {**rec["display"], "label": "Sparse first", "order": -5}
    written, _ = write_table(frame(recs), tmp_path)
    names = list(sections(written[0])["niah_single, smollm2: string_match_all (%) by length"])
    expected = sorted((label(m) for m in ("chai", "kv_compress", "streamingllm")),
                      key=lambda shown: next(r["display"]["order"] for r in recs if r["display"]["label"] == shown))
    assert names == ["Method", label("mha"), "Sparse first", *expected]


def test_a_missing_length_draws_and_tabulates(tmp_path):
    """A method without the baseline's lengths (and a length only one method has) neither crashes nor invents."""
    recs = [lc_record("mha", "variable_tracking", 1024, 0.7), lc_record("chai", "variable_tracking", 8192, 0.2)]
    for rec in recs:
        append_jsonl(tmp_path / "long_context" / "runs.jsonl", rec)
    report = build(tmp_path)
    assert not report["failed"], report["failed"]
    assert (tmp_path / "figures" / "long_context_variable_tracking.png").exists()
    tables = sections(tmp_path / "tables" / "long_context.md")
    rows = tables["variable_tracking, smollm2: string_match_all (%) by length"]
    assert rows[label("mha")][:3] == ["70.0", "—", "—"]
    assert rows[label("chai")][:3] == ["—", "20.0", "—"]  # no length to compare with the baseline


def test_no_records_skip_in_one_line(tmp_path):
    report = build(tmp_path)
    said = [why for why in report["skipped"] if why.startswith("long_context")]
    assert len(said) == 1 and "experiment=long_context" in said[0] and "gpu_long_context.sh" in said[0]
    assert not (tmp_path / "tables" / "long_context.md").exists()


def test_long_context_records_stay_out_of_the_accuracy_tables(results):
    report = build(results)
    assert not report["failed"], report["failed"]
    header = table_rows(results / "tables" / "table1_llama7b.md")["Method"]
    assert "PIQA" in header and not any("niah" in cell or "c4" in cell for cell in header)

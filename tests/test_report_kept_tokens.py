"""The frontier report (chai/report/figures_frontier.py, frontier_tasks.py, savings_table.py) for caches that evict
tokens: each kept token holds the baseline's bytes per token, so the bytes they store on a task are those x the share
of the task's tokens they kept (`kept_tokens.kept_fraction`), whatever their own random-id probe measured; the mean
over the tasks places them on the mean panel and in the savings table. Caches that keep every token are placed as before."""

import math

import pytest

from chai.report import loading, long_context
from chai.report.figures_frontier import configs, frontier_figure
from chai.report.frontier_tasks import write_task_tables
from chai.report.savings_table import write_savings
from chai.report.style import task_label
from tests.test_report import (SAVINGS, SMOLLM2, display, frontier_frame, label, record, savings_rows, settings,
                               with_items)

N = 200  # items per task


def frontier_record(method: str, task: str, acc: float, kv: float = 1.0, kept: float | None = None,
                    **changes) -> dict:
    """An eval record of the frontier experiment; `kept`: an evicting cache's kept share, where the token methods
    write it (run_stats.extra and method_info)."""
    rec = record(method, task, acc, model="smollm2", kv=kv, **changes)
    rec["experiment"], rec["config"]["model"] = "frontier", {**SMOLLM2, "expand_kv_heads": False}
    if kept is not None:
        facts = {"requests": 8, "mean": 45.5, "min": 39, "median": 40.0, "max": 54, "kept_fraction": kept}
        rec["run_stats"] = {"clustering_s": 0.0, "kv_read_fraction": None, "extra": {"kept_tokens": facts}}
        rec["method_info"] = {"kept_tokens": facts}
    hits = round(acc * N)  # nested items: the first `hits` solved
    return with_items(rec, [1] * hits + [0] * (N - hits))


def records() -> list[dict]:
    """MHA; CHAI at 60% of MHA's bytes; the anchors keeping 25% of PIQA's tokens, 50% of ARC-E's (and 90% of BoolQ's,
    a task outside the mean's); StreamingLLM on PIQA only, keeping 10%. The evicting caches' probes measured 30% of
    MHA's bytes (what their rule keeps of 256 random ids): a number the report must not use."""
    return [frontier_record("mha", "piqa", 0.72), frontier_record("mha", "arc_easy", 0.68),
            frontier_record("chai", "piqa", 0.68, kv=0.6), frontier_record("chai", "arc_easy", 0.64, kv=0.6),
            frontier_record("anchor", "piqa", 0.70, kv=0.3, kept=0.25),
            frontier_record("anchor", "arc_easy", 0.66, kv=0.3, kept=0.5),
            frontier_record("anchor", "boolq", 0.80, kv=0.3, kept=0.9),
            frontier_record("streamingllm", "piqa", 0.60, kv=0.3, kept=0.1)]


@pytest.fixture
def spec(monkeypatch):
    from chai.report import figures_frontier

    monkeypatch.setattr(figures_frontier, "spec", lambda: SAVINGS)  # mean's tasks: PIQA, HellaSwag, ARC-E


def by_method(found) -> dict:
    return {config.rows[next(iter(config.rows))]["method"]: config for config in found}


def table_rows(path) -> dict[str, list[str]]:
    """The per-task table's rows by setting (no two configs here store the same bytes: no pairs section)."""
    return {row[0]: row for row in savings_rows(path)}


def test_the_kept_share_is_read_once_for_the_report():
    rec = frontier_record("anchor", "piqa", 0.7, kept=0.25)
    assert loading.kept_fraction(rec) == 0.25
    del rec["run_stats"]  # method_info alone still says it
    assert loading.kept_fraction(rec) == 0.25
    assert math.isnan(loading.kept_fraction(frontier_record("chai", "piqa", 0.7)))  # keeps every token
    assert long_context.kept_fraction is loading.kept_fraction  # one definition, both reports
    frame = loading.eval_frame([rec, frontier_record("mha", "piqa", 0.7)])
    assert frame["kept_fraction"].iloc[0] == 0.25 and math.isnan(frame["kept_fraction"].iloc[1])


def test_an_evicting_cache_stores_its_kept_share_per_task_and_their_mean_over_the_tasks(spec):
    found, tasks = configs(frontier_frame(records()), "acc")
    assert tasks == ["piqa", "arc_easy"]
    configs_of = by_method(found)
    anchors, chai, mha, window = (configs_of[m] for m in ("anchor", "chai", "mha", "streamingllm"))
    assert [anchors.x("stored", t) for t in ("piqa", "arc_easy", "boolq")] == pytest.approx([250, 500, 900])
    assert anchors.x("stored") == pytest.approx(375)  # the mean over the mean's tasks: BoolQ is not one
    assert anchors.x("read") == pytest.approx(375)  # it reads all it keeps
    assert anchors.evicts and not chai.evicts and not mha.evicts
    assert [chai.x(a, t) for a in ("stored", "read") for t in (None, "piqa", "arc_easy")] == pytest.approx([600] * 6)
    assert mha.x("stored") == 1000
    assert window.mean is None and window.x("stored") == pytest.approx(100)  # left off the mean panel, as before


def test_the_figure_places_an_evicting_cache_at_its_kept_bytes(spec):
    found, tasks = configs(frontier_frame(records()), "acc")
    fig = frontier_figure(found, tasks, "title", "acc")
    axes = {ax.get_title(): ax for ax in fig.axes[:len(fig.axes) // 2]}  # the stored row
    colour = display(settings("anchor"))["color"]

    def xs(title):  # bytes at every x the config's lines (the mean's error bars too) are drawn at
        lines = [line for line in axes[title].get_lines() if line.get_color() == colour]
        return sorted({round(float(x) * 1024, 6) for line in lines for x in line.get_xdata()})

    assert xs(task_label("piqa")) == [250] and xs(task_label("arc_easy")) == [500]
    assert xs(next(title for title in axes if title.startswith("mean of"))) == [375]
    assert "kept" in fig.legends[0].get_title().get_text()


def test_the_per_task_table_gives_each_tasks_kept_share_and_marks_it(tmp_path, spec):
    (path,), _ = write_task_tables(frontier_frame(records()), tmp_path)
    rows = table_rows(path)
    anchors = rows[label("anchor")]
    assert anchors[1:3] == ["37.5% (kept, mean)", "37.5% (kept, mean)"]
    assert anchors[3].startswith("-2.0 [") and anchors[3].endswith("]; stored 25.0% (kept)")
    assert anchors[4].startswith("-2.0 [") and anchors[4].endswith("]; stored 50.0% (kept)")
    window = rows[label("streamingllm")]  # recorded on PIQA only: its share is PIQA's, ARC-E not recorded
    assert window[1] == "10.0% (kept, mean)" and window[3].endswith("; stored 10.0% (kept)") and window[4] == "—"
    chai = rows[label("chai")]  # a cache that keeps every token: as before
    assert chai[1:3] == ["60.0%", "60.0%"] and "stored" not in chai[3] + chai[4]
    assert "measured over the task's requests, not a fixed size per token" in path.read_text()


def test_the_savings_table_ranks_an_evicting_cache_by_its_mean_kept_share(tmp_path, spec):
    (path,), _ = write_savings(frontier_frame(records()), tmp_path)
    picked = {(row[0], row[1]): row for row in savings_rows(path)}
    anllm, chai, sepllm = (display(settings(m))["family"] for m in ("anchor", "chai", "streamingllm"))
    assert picked[("50% stored", anllm)][2] == label("anchor")  # 37.5% stored: saves 62.5%
    assert picked[("50% stored", anllm)][5:] == ["37.5% (kept, mean)", "37.5% (kept, mean)"]
    assert "none recorded" in picked[("75% read", anllm)][2]
    assert picked[("25% stored", chai)][5:] == ["60.0%", "60.0%"]
    assert "none recorded" in picked[("25% stored", sepllm)][2]  # not on every task: left out, as before
    text = path.read_text()
    assert f"left out: {label('streamingllm')}" in text and "(kept, mean): the mean of those per-task shares" in text


def test_without_an_evicting_cache_nothing_says_kept(tmp_path, spec):
    recs = [r for r in records() if r["method"] in ("mha", "chai")]
    (tasks_path,), _ = write_task_tables(frontier_frame(recs), tmp_path)
    (savings_path,), _ = write_savings(frontier_frame(recs), tmp_path)
    assert "kept" not in tasks_path.read_text() + savings_path.read_text()

"""Per-item outcomes in eval records (chai/runners/eval.py) and the paired statistics on them (chai/report/stats.py),
checked against independent computations: scipy's exact binomial test, a bootstrap over item indices, coverage of the
true difference in simulation."""

import json
from pathlib import Path

import numpy as np
import pytest

from chai.report import stats


def encoded(values) -> dict:
    return {"doc_ids": "range", "acc": "".join(str(int(v)) for v in values)}


def test_items_are_one_character_per_item_in_doc_id_order():
    from chai.runners.eval import items_of

    samples = [{"doc_id": i, "acc": float(i % 2), "acc_norm": 1.0} for i in (2, 0, 1, 3)]
    assert items_of(samples) == {"doc_ids": "range", "acc": "0101", "acc_norm": "1111"}
    gaps = [{"doc_id": i, "acc": 1.0} for i in (7, 3)]  # not 0..n-1: the ids are kept, sorted
    assert items_of(gaps) == {"doc_ids": [3, 7], "acc": "11"}
    ids, values = stats.outcomes(items_of(gaps), "acc")
    assert ids.tolist() == [3, 7] and values.tolist() == [1, 1]
    assert items_of([{"doc_id": 0, "acc": 1.0}, {"doc_id": 0, "acc": 0.0}]) is None  # repeats: nothing to pair
    assert "acc_norm" not in items_of([{"doc_id": 0, "acc": 1.0}])  # a metric lm-eval did not score per sample


@pytest.mark.slow
def test_the_eval_runner_writes_items_that_match_its_samples(tmp_path):
    from chai.cli import run_mode
    from tests.helpers import compose_cfg

    cfg = compose_cfg([f"results_dir={tmp_path}", "logger.wandb.mode=disabled", "device=cpu", "model=tiny_llama",
                       "task.limit=6"])
    record = run_mode(cfg, overrides=[])
    lines = Path(record["samples_path"]).read_text().splitlines()
    samples = sorted((json.loads(line) for line in lines), key=lambda s: s["doc_id"])
    assert record["items"]["doc_ids"] == "range" and len(record["items"]["acc"]) == 6
    for metric in ("acc", "acc_norm"):
        assert record["items"][metric] == "".join(str(int(s[metric])) for s in samples)
        assert stats.outcomes(record["items"], metric)[1].mean() == pytest.approx(record["metrics"][metric])


def test_mcnemar_is_scipys_exact_binomial_test_on_the_discordant_pairs():
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(1)
    for n, flips in ((30, 0.2), (500, 0.05), (4000, 0.3)):
        base = rng.integers(0, 2, n)
        other = np.where(rng.random(n) < flips, 1 - base, base)
        wins, losses = int(((other == 1) & (base == 0)).sum()), int(((other == 0) & (base == 1)).sum())
        expected = scipy_stats.binomtest(wins, wins + losses, 0.5).pvalue
        assert stats.mcnemar_p(base, other) == pytest.approx(expected, rel=1e-9)


def test_mcnemar_by_hand():
    base, other = np.array([1, 1, 1, 0]), np.array([0, 0, 0, 0])  # 3 losses, 0 wins: 2 * (1/2)^3
    assert stats.mcnemar_p(base, other) == pytest.approx(0.25)


def test_identical_records_differ_by_zero_with_p_one():
    items = encoded(np.random.default_rng(2).integers(0, 2, 300))
    found = stats.difference(items, items)
    assert (found.value, found.low, found.high, found.p, found.n) == (0.0, 0.0, 0.0, 1.0, 300)


def test_only_common_items_are_paired_and_old_records_give_none():
    base = {"doc_ids": [0, 1, 2, 5], "acc": "1100"}
    other = {"doc_ids": [1, 2, 5, 9], "acc": "1111"}
    found = stats.difference(base, other)
    assert found.n == 3 and found.value == pytest.approx(2 / 3)  # items 1, 2, 5: 1->1, 0->1, 0->1
    assert stats.difference(None, other) is None and stats.difference(base, {"doc_ids": "range"}) is None


def test_the_count_bootstrap_equals_resampling_item_indices():
    """Drawing counts of each outcome (multinomial) is the same distribution as drawing items: the two intervals
    agree within Monte Carlo error."""
    rng = np.random.default_rng(3)
    diff = rng.choice([-1, 0, 1], size=400, p=[0.15, 0.7, 0.15])
    fast = np.percentile(stats.bootstrap_means(diff, np.random.default_rng(4), 20_000), [2.5, 97.5])
    slow = np.percentile(diff[rng.integers(0, len(diff), (20_000, len(diff)))].mean(axis=1), [2.5, 97.5])
    assert fast == pytest.approx(slow, abs=0.006)


def test_the_paired_interval_covers_the_true_difference_about_95_percent_of_the_time():
    """Runs that share item difficulty (p_i ~ U[0.3, 0.7], mean 0.5); the method solves a missed item with
    probability 0.15 and loses a solved one with 0.05: E[other - base] = 0.5 * 0.15 - 0.5 * 0.05 = 0.05."""
    rng = np.random.default_rng(5)
    truth, covered, trials, n = 0.05, 0, 300, 500
    for trial in range(trials):
        base = (rng.random(n) < 0.3 + 0.4 * rng.random(n)).astype(int)
        flip = rng.random(n) < np.where(base == 0, 0.15, 0.05)
        other = np.where(flip, 1 - base, base)
        found = stats.difference(encoded(base), encoded(other), resamples=2000, seed=trial)
        covered += found.low <= truth <= found.high
    assert 0.91 <= covered / trials <= 0.98


def test_the_mean_over_tasks_is_the_mean_of_task_means_with_an_interval_from_each_task():
    rng = np.random.default_rng(6)
    small, large = rng.integers(0, 2, 100), rng.integers(0, 2, 5000)
    found = stats.mean_over_tasks([small, large])
    assert found.value == pytest.approx((small.mean() + large.mean()) / 2)  # each task weighs the same
    assert found.low < found.value < found.high
    se = np.sqrt(small.var() / 100 + large.var() / 5000) / 2  # independent tasks: variances add
    assert found.high - found.low == pytest.approx(2 * 1.96 * se, rel=0.1)
    assert stats.mean_over_tasks([small, large]) == found  # fixed seed: the same numbers on every build


def test_mean_difference_needs_items_on_every_task():
    a, b = encoded([1, 0, 1, 1]), encoded([1, 1, 1, 1])
    assert stats.mean_difference([(a, b), (b, b)]).value == pytest.approx(0.125)
    assert stats.mean_difference([(a, b), (None, b)]) is None
    assert stats.mean_accuracy([a, b]).value == pytest.approx(0.875) and stats.mean_accuracy([a, None]) is None

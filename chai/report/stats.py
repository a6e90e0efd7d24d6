"""Paired statistics on per-item outcomes (a record's `items`, written by chai/runners/eval.py): the accuracy
difference of two runs on the same items with a paired bootstrap 95% interval, the exact McNemar p-value, and the
mean over tasks with its interval. Pure numpy, fixed seeds: the same records give the same numbers on every build.

`items`: {"doc_ids": "range" (0..n-1) or [doc ids], "<metric>": "0110..."}, one character per item in doc-id order.
"""

import math
from dataclasses import dataclass

import numpy as np

RESAMPLES = 10_000
SEED = 0
LEVEL = 0.95


@dataclass(frozen=True)
class Estimate:
    """A mean with its 95% interval; `p`: the McNemar p-value (a single task's paired difference only)."""

    value: float
    low: float = math.nan
    high: float = math.nan
    n: int = 0
    p: float = math.nan


def outcomes(items, metric: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(doc ids, 0/1 outcomes) of one metric, or None when the record has no items for it (older records)."""
    if not isinstance(items, dict) or not isinstance(items.get(metric), str):
        return None
    values = np.frombuffer(items[metric].encode(), dtype=np.uint8) - ord("0")
    ids = items.get("doc_ids")
    ids = np.arange(len(values)) if ids == "range" else np.asarray(ids, dtype=np.int64)
    return (ids, values.astype(np.int64)) if len(ids) == len(values) else None


def paired(base_items, other_items, metric: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Both runs' outcomes on the items both scored, aligned by doc id; None without items or common items."""
    a, b = outcomes(base_items, metric), outcomes(other_items, metric)
    if a is None or b is None:
        return None
    common, ia, ib = np.intersect1d(a[0], b[0], return_indices=True)
    return (a[1][ia], b[1][ib]) if len(common) else None


def mcnemar_p(base: np.ndarray, other: np.ndarray) -> float:
    """Exact two-sided McNemar test: under no difference, the discordant pairs split Binomial(n, 1/2)."""
    wins, losses = int(np.sum((other == 1) & (base == 0))), int(np.sum((other == 0) & (base == 1)))
    n = wins + losses
    if n == 0:
        return 1.0
    term = tail = 1  # C(n, 0); exact integers, each term from the last: no underflow, fast at n = 10^4
    for k in range(min(wins, losses)):
        term = term * (n - k) // (k + 1)
        tail += term
    return min(1.0, 2 * tail / 2**n)


def bootstrap_means(values: np.ndarray, rng: np.random.Generator, resamples: int = RESAMPLES) -> np.ndarray:
    """`resamples` means of `values` resampled with replacement. Outcomes take few distinct values (0/1, or -1/0/1
    for a difference), so a resample is a multinomial draw of their counts: the same distribution as drawing item
    indices, without 10^4 x 10^4 indices for HellaSwag."""
    distinct, counts = np.unique(values, return_counts=True)
    drawn = rng.multinomial(len(values), counts / len(values), size=resamples)
    return drawn @ distinct / len(values)


def _interval(draws: np.ndarray) -> tuple[float, float]:
    tail = (1 - LEVEL) / 2 * 100
    low, high = np.percentile(draws, [tail, 100 - tail])
    return float(low), float(high)


def difference(base_items, other_items, metric: str = "acc", resamples: int = RESAMPLES,
               seed: int = SEED) -> Estimate | None:
    """other - base on their common items: mean, paired bootstrap 95% interval, exact McNemar p; None without
    items on both sides."""
    pair = paired(base_items, other_items, metric)
    if pair is None:
        return None
    base, other = pair
    diff = other - base
    low, high = _interval(bootstrap_means(diff, np.random.default_rng(seed), resamples))
    return Estimate(float(diff.mean()), low, high, len(diff), mcnemar_p(base, other))


def mean_over_tasks(per_task: list[np.ndarray], resamples: int = RESAMPLES, seed: int = SEED) -> Estimate:
    """The mean of the task means (each task weighs the same, as the paper averages), its interval from
    bootstrapping items within each task independently."""
    rng = np.random.default_rng(seed)
    draws = np.mean([bootstrap_means(values, rng, resamples) for values in per_task], axis=0)
    low, high = _interval(draws)
    return Estimate(float(np.mean([values.mean() for values in per_task])), low, high,
                    sum(len(values) for values in per_task))


def mean_difference(pairs: list[tuple], metric: str = "acc", resamples: int = RESAMPLES,
                    seed: int = SEED) -> Estimate | None:
    """Mean over tasks of other - base, `pairs`: [(base items, other items)] one per task; None when a task lacks
    items on either side (a mean over some tasks only would not be the mean the table names)."""
    aligned = [paired(base, other, metric) for base, other in pairs]
    if not aligned or any(pair is None for pair in aligned):
        return None
    return mean_over_tasks([other - base for base, other in aligned], resamples, seed)


def mean_accuracy(items_per_task: list, metric: str = "acc", resamples: int = RESAMPLES,
                  seed: int = SEED) -> Estimate | None:
    """Mean accuracy over tasks with its interval; None when a task has no items."""
    found = [outcomes(items, metric) for items in items_per_task]
    if not found or any(f is None for f in found):
        return None
    return mean_over_tasks([values for _, values in found], resamples, seed)

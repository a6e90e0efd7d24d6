"""mode=membership: how often CHAI's cluster membership changes with the number of tokens it is decided from
(paper Fig. 9; the measurement: chai.membership)."""

import time

from chai.attention import AttnShape
from chai.clustering import cluster_heads
from chai.errors import require
from chai.membership import cluster_counts, corpus_ids, measure
from chai.runners.setup import setup


def run(cfg, record: dict) -> dict:
    """Check the settings, load the model, measure, record."""
    settings = cfg.membership
    require(settings.max_tokens >= 2, "membership.max_tokens must be at least 2.")
    ready = setup(cfg, with_method=False)
    counts = cluster_counts(cfg, AttnShape.of(ready.model.config))
    started = time.perf_counter()
    ids = corpus_ids(ready.tokenizer, settings, cfg)
    found = measure(ready.model, ids, counts, settings, cluster_heads)
    found["corpus"] = settings.corpus or cfg.calibration.corpus
    return {
        "membership": found,
        "n_examples": found["n_docs"],
        "timing": {"wall_s": time.perf_counter() - started},
        "dtype": str(ready.model.dtype).replace("torch.", ""),
    }

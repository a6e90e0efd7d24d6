"""The measurement behind mode=membership (its runner: chai/runners/membership.py): how often CHAI's cluster
membership changes when it is decided after t = 1, 2, ... T tokens (paper Fig. 9, T = 20).

CHAI (Agarwal et al., ICML 2024, Sec. 4.3) decides each request's head clusters from the attention scores of its
first few tokens and keeps them for the rest of the request; the paper picks 5 tokens because later tokens rarely
move a head. This measures that claim: on `n_docs` documents of the calibration corpus it captures every
layer's causal attention probabilities over the first T tokens (with its own attention function registered through
transformers' `AttentionInterface`, no module patching), clusters each layer's heads from the first t tokens with
`chai.clustering.cluster_heads` (features: the flattened lower triangle of P[:t, :t], what CHAI clusters), and
compares every membership with the one decided at t = T.

Recorded per t (means over documents and over the layers that are really clustered, 1 < k < H):
- `changed_fraction`: heads whose cluster differs from the t = T one after the best one-to-one matching of cluster
  labels (Hungarian on the contingency table), i.e. the fewest heads that must move.
- `pair_disagreement`: head pairs that are together at t and apart at T or vice versa (1 - Rand index).
Per-layer curves are kept too. Cluster counts are the calibrated per-layer ones unless `method.num_clusters`.
"""

import contextlib
import json

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from chai.attention import AttnShape, attention_probs, dense, repeat_heads
from chai.clustering import causal_features
from chai.errors import require
from chai.methods.base import Method
from chai.calibration import artifact_path
from chai.paths import data_file

PROBE = "chai_membership_probe"


class _ProbsProbe(Method):
    """Dense SDPA attention that also stores each layer's attention probabilities over the first `tokens`
    positions: {layer_idx: [B, H, tokens, tokens]}. Registered (and removed) through `Method.applied`."""

    name = PROBE

    def __init__(self, tokens: int):
        self.tokens = tokens
        self.store: dict[int, torch.Tensor] = {}

    def attention(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        # query [B, H, T, D]; key [B, Hkv, T, D]: repeat KV heads so each query head sees its own scores
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        probs = attention_probs(query, repeat_heads(key, query.shape[1] // key.shape[1]), attention_mask, scale)
        self.store[module.layer_idx] = probs[:, :, : self.tokens, : self.tokens].cpu()
        return dense(module, query, key, value, attention_mask, scaling, dropout, **kwargs)


@contextlib.contextmanager
def capturing_probs(model, tokens: int):
    """While active, every layer's forward stores its attention probabilities over the first `tokens` positions
    in the yielded dict {layer_idx: [B, H, tokens, tokens]} and returns exactly what SDPA returns."""
    probe = _ProbsProbe(tokens)
    with probe.applied(model):
        yield probe.store


def features_at(probs: torch.Tensor, t: int) -> torch.Tensor:
    """probs [B, H, T, T] -> [B, H, t(t+1)/2]: each head's causal attention rows of the first t tokens."""
    return causal_features(probs, t)


def heads_moved(labels: np.ndarray, reference: np.ndarray) -> int:
    """Fewest heads that must change cluster to turn partition `labels` [H] into `reference` [H]."""
    table = np.zeros((labels.max() + 1, reference.max() + 1), dtype=np.int64)
    np.add.at(table, (labels, reference), 1)
    rows, cols = linear_sum_assignment(table, maximize=True)
    return int(len(labels) - table[rows, cols].sum())


def pair_disagreement(labels: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """[B, H] x [B, H] -> [B]: fraction of head pairs whose together/apart status differs (1 - Rand index)."""
    same = labels[:, :, None] == labels[:, None, :]
    same_ref = reference[:, :, None] == reference[:, None, :]
    heads = labels.shape[1]
    return (same != same_ref).sum((1, 2)).double() / max(heads * (heads - 1), 1)


def layer_changes(probs: torch.Tensor, k: int, tokens: list[int], algo: str, cluster_fn) -> tuple[list, list]:
    """One layer, one batch of documents: summed changed-head fractions and pair disagreements per t."""
    reference = cluster_fn(features_at(probs, tokens[-1]), k, algo)  # [B, H]
    ref_np = reference.cpu().numpy()
    moved, pairs = [], []
    for t in tokens:
        labels = reference if t == tokens[-1] else cluster_fn(features_at(probs, t), k, algo)
        lab_np = labels.cpu().numpy()
        moved.append(sum(heads_moved(a, b) for a, b in zip(lab_np, ref_np)) / labels.shape[1])
        pairs.append(float(pair_disagreement(labels, reference).sum()))
    return moved, pairs


def cluster_counts(cfg, shape: AttnShape) -> list[int]:
    """Clusters per layer: the method's uniform `num_clusters` when set (its one home: `method=chai
    method.num_clusters=K`), else the counts calibration chose for this model."""
    count = cfg.method.get("num_clusters") if "method" in cfg else None
    if count is not None:
        k = int(count)
        require(1 <= k <= shape.heads, f"method.num_clusters={k}: use 1..{shape.heads} ({cfg.model.name}).")
        return [k] * shape.layers
    path = artifact_path(cfg.results_dir, cfg.model.name)
    require(
        path.exists(),
        f"no calibration at {path}: run `python run.py mode=calibrate model={cfg.model.name}` first, "
        "or set method=chai method.num_clusters=K.",
    )
    chosen = json.loads(path.read_text())["elbow"]["chosen"]
    require(len(chosen) == shape.layers, f"{path} has {len(chosen)} layers, the model {shape.layers}.")
    return [int(k) for k in chosen]


def corpus_ids(tokenizer, settings, cfg) -> torch.Tensor:
    """[N, T] ids: the first T tokens of the first `n_docs` corpus documents that have T tokens."""
    path = data_file(settings.corpus or cfg.calibration.corpus, cfg.data_dir)
    rows = []
    with path.open() as f:
        for line in f:
            ids = tokenizer(json.loads(line)["text"], return_tensors="pt").input_ids[0]
            if len(ids) >= settings.max_tokens:
                rows.append(ids[: settings.max_tokens])
            if len(rows) == settings.n_docs:
                break
    require(len(rows) > 0, f"no document of {path} has {settings.max_tokens} tokens.")
    return torch.stack(rows)


@torch.no_grad()
def measure(model, ids: torch.Tensor, counts: list[int], settings, cluster_fn) -> dict:
    """Membership-change curves for documents `ids` [N, T] under per-layer cluster counts `counts` [L]."""
    tokens = list(range(1, settings.max_tokens + 1))
    heads = AttnShape.of(model.config).heads
    moved = np.zeros((len(counts), len(tokens)))
    pairs = np.zeros((len(counts), len(tokens)))
    for start in range(0, len(ids), settings.batch_size):
        batch = ids[start : start + settings.batch_size].to(model.device)
        with capturing_probs(model, settings.max_tokens) as store:
            model(batch, use_cache=False)
        for layer, k in enumerate(counts):
            m, p = layer_changes(store[layer], k, tokens, settings.algo, cluster_fn)
            moved[layer] += m
            pairs[layer] += p
    moved, pairs = moved / len(ids), pairs / len(ids)
    clustered = [layer for layer, k in enumerate(counts) if 1 < k < heads] or list(range(len(counts)))
    return {
        "tokens": tokens,
        "reference_tokens": tokens[-1],
        "changed_fraction": moved[clustered].mean(0).tolist(),
        "pair_disagreement": pairs[clustered].mean(0).tolist(),
        "changed_fraction_per_layer": moved.tolist(),
        "num_clusters": counts,
        "clustered_layers": clustered,
        "n_docs": len(ids),
        "algo": settings.algo,
        "features": "causal attention probabilities of the first t tokens, flattened",
    }


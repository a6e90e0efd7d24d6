"""The calibration artifact: CHAI's offline phase, once per model (Agarwal et al., ICML 2024).

Run the model over calibration text (the paper: 1024 C4 documents) and take, per layer and document, each head's
feature: its causal attention probabilities over the first `feature_tokens` tokens (lower triangle flattened), the
same feature the online phase clusters (`feature_tokens` = CHAI's `membership_tokens`, 5). For every document the
heads of each layer are clustered by K-Means for k = 1..H, best of `kmeans_restarts` starts; the mean inertia over
documents is the layer's curve. Beside it the artifact stores the curve of structureless points of the same size
(Dirichlet causal rows, `noise`), so a reader sees what a rule would pick on noise, and a per-layer sensitivity
table (chai.sensitivity: the loss increase when only that layer is clustered at k), which the `budget` rule reads.
chai/cluster_counts.py turns them into counts (kneedle = the paper's elbow, threshold, budget); the artifact's own
`elbow.chosen` uses `rule` (kneedle | threshold) and fixes the figures' and CHAI-static's default grouping.
`calibration.counts=[...]` overrides the rule. The artifact results/calibration/<model>.json also holds the
head-correlation matrices (the paper's redundancy evidence), the grouping CHAI-static uses at every count,
cluster-size histograms and DejaVu-style head importance.

This module is the artifact: compute it (`calibrate`), check it against a model's shape (`check_shape`), `save` it
at `artifact_path`, and `load_or_calibrate` (what methods call in `prepare`). The mode runner that makes it on
request is chai/runners/calibrate.py; methods and runners both import this module, never each other.
"""

import json
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from chai import cluster_counts
from chai.attention import AttnShape, attention_probs, repeat_heads, to_output
from chai.clustering import causal_features, kmeans, labels_from_groups
from chai.errors import ChaiError
from chai.methods.base import Method, RunContext
from chai.paths import CONF_DIR, data_file, results_dir

RULES = ("kneedle", "threshold")  # the artifact's own choice; CHAI also reads `budget` (chai.cluster_counts)


def settings_of(calibration=None) -> dict:
    """conf/calibration/default.yaml updated with `calibration` (a config node or dict), as a plain dict."""
    settings = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "calibration" / "default.yaml"))
    if calibration is not None:
        given = calibration if isinstance(calibration, dict) else OmegaConf.to_container(calibration, resolve=True)
        for key, value in given.items():
            settings[key] = {**settings[key], **value} if isinstance(value, dict) and key in settings else value
    if settings["rule"] not in RULES:
        raise ChaiError(f"unknown calibration.rule '{settings['rule']}'. Valid: {', '.join(RULES)}.")
    if not 0 < settings["threshold"] < 1:
        raise ChaiError(f"calibration.threshold must be in (0, 1), got {settings['threshold']}.")
    if int(settings["kmeans_restarts"]) < 1:
        raise ChaiError("calibration.kmeans_restarts must be >= 1.")
    if settings["feature_tokens"] > settings["seq_len"] or settings["feature_tokens"] < 2:
        raise ChaiError("calibration.feature_tokens must be in 2..calibration.seq_len.")
    return settings


def artifact_path(results: str | None, model_name: str) -> Path:
    return results_dir(results) / "calibration" / f"{model_name}.json"


def documents(tokenizer, settings: dict, configured_data_dir=None, count: int | None = None) -> list[torch.Tensor]:
    """The first `count` (default `n_docs`) corpus documents with more than `feature_tokens` tokens, each cut to
    `seq_len` ids."""
    path = data_file(settings["corpus"], configured_data_dir)
    count = settings["n_docs"] if count is None else count
    docs = []
    with path.open() as f:
        for line in f:
            ids = tokenizer(json.loads(line)["text"], return_tensors="pt").input_ids[0, : settings["seq_len"]]
            if ids.numel() > settings["feature_tokens"]:
                docs.append(ids)
            if len(docs) == count:
                break
    if not docs:
        raise ChaiError(f"{path} has no document with {settings['feature_tokens']} tokens: lower feature_tokens.")
    return docs


def noise_curve(heads: int, tokens: int, draws: int, restarts: int, seed: int = 0) -> list[float]:
    """Mean K-Means inertia for k = 1..heads over `draws` sets of structureless heads of the calibration's size:
    each head's causal rows over `tokens` tokens drawn independently from a flat Dirichlet."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for t in range(1, tokens + 1):
        gamma = torch.empty(draws, heads, t, dtype=torch.float64).exponential_(generator=generator)  # Gamma(1)
        rows.append(gamma / gamma.sum(-1, keepdim=True))  # a flat Dirichlet row
    features = torch.cat(rows, dim=-1)  # [draws, heads, tokens(tokens+1)/2]
    return [float(kmeans(features, k, restarts=restarts)[1].mean()) for k in range(1, heads + 1)]


class _Capture(Method):
    """Dense attention that also keeps, per layer, each head's score features [B, H, F] and the L2 norm of its
    output before the output projection [B, H, T]. Registered under its own name only while applied."""

    name = "chai_capture"

    def __init__(self, feature_tokens: int):
        self.feature_tokens = feature_tokens
        self.seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def attention(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        groups = query.shape[1] // key.shape[1]
        probs = attention_probs(query, repeat_heads(key, groups), attention_mask, scaling)  # [B, H, T, T]
        out = probs.to(value.dtype) @ repeat_heads(value, groups)  # [B, H, T, D]
        f = self.feature_tokens
        self.seen[module.layer_idx] = (causal_features(probs, f), out.float().norm(dim=-1))
        return to_output(out), None


def consensus_groups(coassociation: torch.Tensor, k: int) -> list[list[int]]:
    """CHAI-static's fixed grouping: average-linkage cut into k groups of the co-association matrix (fraction of
    calibration documents in which two heads share a K-Means cluster), i.e. the grouping most consistent with how
    often heads are grouped together. coassociation [H, H] -> k lists of head indices, by lowest member."""
    from sklearn.cluster import AgglomerativeClustering

    heads = coassociation.shape[0]
    if k >= heads:
        return [[h] for h in range(heads)]
    dist = (1 - coassociation.double()).clamp(min=0).fill_diagonal_(0).numpy()
    labels = AgglomerativeClustering(n_clusters=k, metric="precomputed", linkage="average").fit(dist).labels_
    groups: dict[int, list[int]] = {}
    for head, cluster in enumerate(labels.tolist()):
        groups.setdefault(cluster, []).append(head)
    return sorted(groups.values())


class _Totals:
    """Running sums over calibration documents, per layer."""

    def __init__(self, shape: AttnShape):
        layers, heads = shape.layers, shape.heads
        self.inertia = torch.zeros(layers, heads, dtype=torch.float64)  # [L, k-1]
        self.coassoc = torch.zeros(layers, heads, heads, heads, dtype=torch.float64)  # [L, k-1, H, H]
        self.sizes = torch.zeros(layers, heads, heads + 1, dtype=torch.float64)  # [L, k-1, size]
        self.correlation = torch.zeros(layers, heads, heads, dtype=torch.float64)
        self.example = torch.zeros(layers, heads, heads, dtype=torch.float64)
        self.importance = torch.zeros(layers, heads, dtype=torch.float64)
        self.tokens = 0
        self.docs = 0

    def add(self, seen: dict, lengths: torch.Tensor, restarts: int) -> None:
        valid = torch.arange(int(lengths.max()))[None] < lengths[:, None]  # [B, T] real (unpadded) tokens
        layers = sorted(seen)
        # every layer's documents at once: K-Means for k = 1..H on [L * B, H, F], on the model's device
        features = torch.stack([seen[layer][0] for layer in layers])  # [L, B, H, F]
        n_layers, batch, heads, _ = features.shape
        centered = features.double() - features.double().mean(-1, keepdim=True)
        unit = torch.nn.functional.normalize(centered, dim=-1)
        corr = (unit @ unit.transpose(-1, -2)).cpu()  # [L, B, H, H]
        self.correlation[layers] += corr.sum(1)
        if self.docs == 0:
            self.example[layers] = corr[:, 0]
        norms = torch.stack([seen[layer][1] for layer in layers]).double().cpu()  # [L, B, H, T]
        self.importance[layers] += (norms * valid[None, :, None]).sum((1, 3))
        flat = features.reshape(n_layers * batch, heads, -1)
        for k in range(1, heads + 1):
            labels, inertia = kmeans(flat, k, restarts=restarts, seed=self.docs * heads + k)
            labels = labels.reshape(n_layers, batch, heads)
            self.inertia[layers, k - 1] += inertia.reshape(n_layers, batch).sum(1).double().cpu()
            self.coassoc[layers, k - 1] += (labels[..., :, None] == labels[..., None, :]).double().sum(1).cpu()
            sizes = torch.nn.functional.one_hot(labels, k).sum(2).cpu()  # [L, B, k] members of each cluster
            self.sizes[layers, k - 1] += torch.nn.functional.one_hot(sizes, heads + 1).sum((1, 2)).double()
        self.tokens += int(valid.sum())
        self.docs += len(lengths)


@torch.no_grad()
def calibrate(model, tokenizer, settings: dict, configured_data_dir=None, model_name="model", hf_id=None) -> dict:
    """Run the offline phase; returns the artifact (a JSON-able dict, see the module doc)."""
    from chai.sensitivity import layer_sensitivity, padded_batches

    started = time.perf_counter()
    shape = AttnShape.of(model.config)
    held_out = settings["sensitivity"]["n_docs"]
    docs = documents(tokenizer, settings, configured_data_dir, settings["n_docs"] + held_out)
    docs, held = docs[: settings["n_docs"]], docs[settings["n_docs"] :]
    capture = _Capture(settings["feature_tokens"])
    totals = _Totals(shape)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    with capture.applied(model):
        for ids, lengths in padded_batches(docs, settings["batch_size"], pad):
            capture.seen.clear()
            model.base_model(ids.to(model.device), use_cache=False)  # no LM head: only attention is needed
            totals.add(capture.seen, lengths, settings["kmeans_restarts"])
    artifact = _artifact(totals, shape, settings, model_name, hf_id, len(docs))
    artifact["noise"] = _noise(shape, settings)
    if held_out and held:
        artifact["sensitivity"] = layer_sensitivity(model, held, settings["sensitivity"]["batch_size"], pad,
                                                    settings["feature_tokens"])
    artifact["time_s"] = time.perf_counter() - started
    return artifact


def _noise(shape: AttnShape, settings: dict) -> dict:
    """The curve of structureless heads of the same size, and what each rule picks on it."""
    curve = noise_curve(shape.heads, settings["feature_tokens"], settings["noise_draws"], settings["kmeans_restarts"])
    return {"inertia": curve, "kneedle": cluster_counts.kneedle(curve),
            "threshold": cluster_counts.threshold(curve, settings["threshold"]),
            "what": f"{shape.heads} heads whose causal rows over {settings['feature_tokens']} tokens are independent "
            f"flat-Dirichlet draws; mean K-Means inertia over {settings['noise_draws']} draws"}


def _rule_counts(curves: list, tau: float) -> dict[str, list[int]]:
    """Each stored rule's counts per layer (the budget rule needs a target: CHAI reads it from the sensitivity table)."""
    return {"kneedle": [cluster_counts.kneedle(c) for c in curves],
            "threshold": [cluster_counts.threshold(c, tau) for c in curves]}


def _chosen(rules: dict, shape: AttnShape, settings: dict) -> tuple[list[int], str]:
    """The artifact's own counts: the calibration.counts override, else its rule's (`rules`: `_rule_counts`)."""
    if settings.get("counts") is not None:
        chosen = [int(c) for c in settings["counts"]]
        if len(chosen) != shape.layers or not all(1 <= c <= shape.heads for c in chosen):
            raise ChaiError(f"calibration.counts needs {shape.layers} counts in 1..{shape.heads}, got {chosen}.")
        return chosen, "override: calibration.counts"
    if settings["rule"] == "kneedle":
        return rules["kneedle"], (
            "kneedle (the paper's elbow): argmax_k of (1 - x_k) - y_k with x = (k-1)/(H-1), "
            "y = (I_k - I_H)/(I_1 - I_H), I = mean K-Means inertia over documents")
    return rules["threshold"], (
        f"threshold: smallest k with I_k <= {settings['threshold']} * I_1, I = mean K-Means inertia over documents")


def _artifact(totals: _Totals, shape: AttnShape, settings, model_name, hf_id, n_docs) -> dict:
    curves = (totals.inertia / totals.docs).tolist()
    rules = _rule_counts(curves, settings["threshold"])
    chosen, rule = _chosen(rules, shape, settings)
    coassoc = totals.coassoc / totals.docs  # [L, k-1, H, H]
    counts = range(1, shape.heads + 1)
    by_count = [[consensus_groups(coassoc[layer, k - 1], k) for k in counts] for layer in range(shape.layers)]
    return {
        "model": model_name,
        "hf_id": hf_id,
        "shape": {"layers": shape.layers, "heads": shape.heads, "kv_heads": shape.kv_heads, "head_dim": shape.head_dim},
        "settings": settings,
        "n_docs": n_docs,
        "elbow": {"inertia": curves, "chosen": chosen, "rule": rule},
        "rules": rules,
        "correlation": (totals.correlation / totals.docs).tolist(),
        "correlation_example": totals.example.tolist(),
        "static_groups": [by_count[layer][k - 1] for layer, k in enumerate(chosen)],
        "static_groups_by_count": by_count,
        "static_rule": "average-linkage cut into k groups of the co-association matrix at k (share of documents in "
        "which two heads fall in one K-Means cluster when clustered into k)",
        "coassociation": [coassoc[layer, k - 1].tolist() for layer, k in enumerate(chosen)],
        "cluster_sizes": [totals.sizes[layer, k - 1].tolist() for layer, k in enumerate(chosen)],
        "cluster_sizes_by_count": totals.sizes.tolist(),
        "head_importance": (totals.importance / max(totals.tokens, 1)).tolist(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def save(artifact: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.partial")
    partial.write_text(json.dumps(artifact))
    partial.rename(path)  # atomic: a reader never sees half an artifact
    return path


def check_shape(artifact: dict, model, path) -> dict:
    shape = AttnShape.of(model.config)
    have = artifact["shape"]
    if (have["layers"], have["heads"]) != (shape.layers, shape.heads):
        raise ChaiError(
            f"{path} was made for {have['layers']} layers x {have['heads']} heads, not this model's "
            f"{shape.layers} x {shape.heads}: rerun `python run.py mode=calibrate model=...` or delete the file."
        )
    for groups in artifact["static_groups"]:
        labels_from_groups(groups, shape.heads)  # a hand-edited artifact fails here, with one line
    return artifact


def load_or_calibrate(model, context: RunContext | None = None) -> dict:
    """results/calibration/<model_name>.json for the model of `context`, computed and saved when missing (unless
    calibration.auto=false, then a one-line error says how to make it)."""
    context = context or RunContext()
    cfg = context.cfg
    settings = settings_of(cfg.get("calibration") if cfg is not None else None)
    path = artifact_path(context.results_dir, context.model_name)
    if path.exists():
        return check_shape(json.loads(path.read_text()), model, path)
    make = f"python run.py mode=calibrate model={context.model_name}"
    if context.results_dir not in (None, "results"):
        make += f" results_dir={context.results_dir}"
    if not settings["auto"]:
        raise ChaiError(f"no calibration artifact {path}: make it with `{make}`.")
    if context.tokenizer is None:
        raise ChaiError(f"no calibration artifact {path}, and model '{context.model_name}' has no tokenizer offline "
                        f"to make one: add model.tokenizer=smollm2 (or a path), or run `{make} model.tokenizer=...`.")
    hf_id = cfg.model.get("hf_id") if cfg is not None else None
    artifact = calibrate(model, context.tokenizer, settings, context.data_dir, context.model_name, hf_id)
    save(artifact, path)
    return artifact

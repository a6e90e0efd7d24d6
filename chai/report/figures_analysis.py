"""Figures of the offline analysis: per-layer head correlations averaged over calibration text and for one example
(paper Figs. 6 and 7), elbow curves with the chosen counts (Fig. 8) and cluster sizes (Fig. 13), all from
results/calibration/<model>.json; how often cluster membership changes with the tokens it is decided on (Fig. 9),
from mode=membership records.
"""

from pathlib import Path
from types import SimpleNamespace

import matplotlib
import numpy as np
import pandas as pd

from chai.errors import ChaiError
from chai.report.style import figure_title, integer_axis, panels, save

MAX_LAYERS = 8  # panels per figure: evenly spaced layers, first and last included
BUDGET_SHOWN = 0.1  # Fig. 8 shows the budget rule's counts at this K,V saving (CHAI's default)


def shown_layers(n: int, most: int = MAX_LAYERS) -> list[int]:
    return sorted({round(i * (n - 1) / max(most - 1, 1)) for i in range(min(n, most))})


def correlation_figure(artifact: dict, key: str, title: str):
    """Heads x heads correlation of attention scores for a few layers, one shared colour scale in [-1, 1]."""
    matrices = artifact[key]
    layers = shown_layers(len(matrices))
    fig, axes = panels(len(layers), width=2.6, height=2.5, max_cols=4, layout="constrained")
    for ax, layer in zip(axes, layers):
        image = ax.imshow(np.asarray(matrices[layer], dtype=float), cmap="RdBu_r", vmin=-1, vmax=1)
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.set_xlabel("head", fontsize=8)
        ax.set_ylabel("head", fontsize=8)
        ax.tick_params(labelsize=6)
    fig.colorbar(image, ax=axes, shrink=0.8, label="correlation")
    figure_title(fig, title)
    return fig


def rule_counts(artifact: dict) -> dict[str, list[int]]:
    """{rule label: counts per layer}: the artifact's own choice, each stored rule's, and the budget rule's at
    BUDGET_SHOWN of the K,V bytes on the calibrated layout (when the artifact has the sensitivity table)."""
    from chai import cluster_counts  # torch-free: the report never imports torch

    found = {str(artifact["elbow"].get("rule", "chosen")).split(":")[0]: artifact["elbow"]["chosen"]}
    for rule, counts in artifact.get("rules", {}).items():
        found.setdefault(rule, counts)
    if "sensitivity" in artifact:
        shape = SimpleNamespace(**artifact["shape"])  # layers, heads, kv_heads: all `allocate` reads of a shape
        try:
            found[f"budget {BUDGET_SHOWN:.0%} K,V"] = cluster_counts.allocate(
                artifact["sensitivity"]["delta_loss"], shape, BUDGET_SHOWN, "kv_bytes")
        except ChaiError:  # out of reach on this layout: nothing to show
            pass
    return found


def elbow_figure(artifact: dict, model: str):
    """Each shown layer's mean K-Means inertia over k = 1..H (normalised to k=1) with every rule's choice marked and
    the curve of structureless heads of the same size (what a rule picks on noise); a last panel with each rule's
    count in every layer."""
    inertia = artifact["elbow"]["inertia"]
    rules = rule_counts(artifact)
    noise = artifact.get("noise")
    layers = shown_layers(len(inertia))
    fig, axes = panels(len(layers) + 1, width=2.8, height=2.4, max_cols=3)
    markers = dict(zip(rules, "oXsD^v"))
    for ax, layer in zip(axes, layers):
        curve = np.asarray(inertia[layer], dtype=float)
        curve = curve / curve[0] if curve[0] else curve
        ks = np.arange(1, len(curve) + 1)
        ax.plot(ks, curve, marker=".", markersize=3, color="tab:blue")
        if noise:
            flat = np.asarray(noise["inertia"], dtype=float)
            ax.plot(ks, flat / flat[0], linestyle="--", color="gray", linewidth=1, label="noise")
        for i, (rule, counts) in enumerate(rules.items()):
            k = counts[layer]
            ax.plot([k], [curve[k - 1]], markers[rule], color=f"C{i + 1}", markersize=5, label=f"{rule}: {k}")
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.set_xlabel("clusters k", fontsize=8)
        integer_axis(ax.xaxis, ks)
        ax.set_ylabel("inertia / inertia(k=1)", fontsize=8)
        ax.legend(fontsize=6)
        ax.grid(alpha=0.3)
    last = axes[-1]
    for i, (rule, counts) in enumerate(rules.items()):
        last.step(range(len(counts)), counts, where="mid", color=f"C{i + 1}", label=rule)
    last.set_xlabel("layer", fontsize=8)
    last.set_ylabel("clusters", fontsize=8)
    integer_axis(last.yaxis, range(1, max(max(c) for c in rules.values()) + 1))
    last.legend(fontsize=6)
    last.set_title("counts per layer", fontsize=8)
    picks = f" (on noise: kneedle {noise['kneedle']}, threshold {noise['threshold']})" if noise else ""
    figure_title(fig, f"Inertia curves and each rule's cluster counts: {model}{picks}")
    return fig


def size_histograms(artifact: dict) -> np.ndarray | None:
    """[L, H + 1]: share of clusters of each size s per layer, from `cluster_sizes` (counts of clusters by size,
    at the chosen k) or else from the static groups."""
    heads = artifact.get("shape", {}).get("heads")
    sizes = artifact.get("cluster_sizes")
    if isinstance(sizes, list) and sizes and isinstance(sizes[0], list):
        table = np.asarray(sizes, dtype=float)
    elif isinstance(artifact.get("static_groups"), list) and heads:
        table = np.zeros((len(artifact["static_groups"]), heads + 1))
        for layer, groups in enumerate(artifact["static_groups"]):
            for group in groups:
                table[layer, len(group)] += 1
    else:
        return None
    totals = table.sum(1, keepdims=True)
    return np.divide(table, totals, out=np.zeros_like(table), where=totals > 0)


def cluster_size_figure(shares: np.ndarray, model: str):
    """Left: the share of clusters of each size over all layers; right: per layer, stacked by size."""
    fig, axes = panels(2, width=4.6, height=3.2)
    pooled, per_layer = axes
    sizes = np.arange(shares.shape[1])
    mean = shares.mean(0)
    used = sizes[mean > 0]
    pooled.bar(used, mean[used] * 100)
    pooled.set_xlim(0.5, max(used.max(), 1) + 0.5)
    pooled.set_xlabel("heads in the cluster")
    integer_axis(pooled.xaxis, used)
    pooled.set_ylabel("share of clusters (%)")
    pooled.set_title("all layers")
    bottom = np.zeros(shares.shape[0])
    cmap = matplotlib.colormaps["viridis"]
    for size in used:
        per_layer.bar(range(shares.shape[0]), shares[:, size] * 100, bottom=bottom,
                      color=cmap(size / max(used.max(), 1)), label=str(size))
        bottom += shares[:, size] * 100
    per_layer.set_xlabel("layer")
    per_layer.set_ylabel("share of clusters (%)")
    per_layer.set_title("per layer (colour: cluster size)")
    if len(used) <= 12:
        per_layer.legend(fontsize=6, ncol=2, title="size", title_fontsize=7)
    figure_title(fig, f"Cluster sizes at the artifact's counts: {model}")
    return fig


def calibration_figures(calibrations: dict[str, dict], out: Path) -> tuple[list, list]:
    """Figs. 6, 7, 8 and 13 for every calibrated model."""
    written, skipped = [], []
    if not calibrations:
        return written, ["fig06/07/08/13: no results/calibration/*.json (run `python run.py experiment=analysis`)"]
    for model, artifact in sorted(calibrations.items()):
        for key, stem, title in (
            ("correlation", "fig06_correlation_mean", "Head correlation, mean over calibration documents"),
            ("correlation_example", "fig07_correlation_example", "Head correlation, one document"),
        ):
            if artifact.get(key):
                written += save(correlation_figure(artifact, key, f"{title}: {model}"), out, f"{stem}_{model}")
            else:
                skipped.append(f"{stem} {model}: the artifact has no '{key}'")
        written += save(elbow_figure(artifact, model), out, f"fig08_elbow_{model}")
        shares = size_histograms(artifact)
        if shares is None:
            skipped.append(f"fig13 {model}: the artifact has neither 'cluster_sizes' nor 'static_groups'")
        else:
            written += save(cluster_size_figure(shares, model), out, f"fig13_cluster_sizes_{model}")
    return written, skipped


def membership_figure(frame: pd.DataFrame, out: Path) -> tuple[list, list]:
    """Fig. 9: share of heads whose cluster changes when membership is decided after t tokens instead of T, the
    mean over clustered layers (solid), each layer (faint) and head-pair disagreement (dashed); one per model."""
    if frame.empty:
        return [], ["fig09: no mode=membership records (run `python run.py experiment=analysis`)"]
    written = []
    for model, rows in frame.groupby("model", sort=True):
        row = rows.iloc[-1]
        fig, (ax,) = panels(1, width=5.5, height=3.6)
        tokens = row["tokens"]
        for layer in row["clustered_layers"]:
            ax.plot(tokens, np.asarray(row["changed_fraction_per_layer"][layer]) * 100, color="tab:blue",
                    alpha=0.15, linewidth=0.8)
        ax.plot(tokens, np.asarray(row["changed_fraction"]) * 100, color="tab:blue", marker="o", markersize=3,
                label="heads that change cluster (mean over layers)")
        ax.plot(tokens, np.asarray(row["pair_disagreement"]) * 100, color="tab:orange", linestyle="--",
                label="head pairs that change together/apart")
        ax.axvline(5, color="gray", linestyle=":", linewidth=1, label="CHAI's choice: 5 tokens")
        ax.set_xlabel("tokens membership is decided on")
        ax.set_ylabel(f"differs from t = {row['reference_tokens']} (%)")
        figure_title(fig, f"Cluster membership changes: {model} ({row['n_docs']} documents)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        written += save(fig, out, f"fig09_membership_changes_{model}")
    return written, []

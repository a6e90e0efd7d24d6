"""Bench figures from mode=bench cell records: latency over sequence length (paper Fig. 11: time to first token and
time per next token, median with the p10-p90 band) and K,V memory (Fig. 12: bytes held by the cache, measured and
analytic, and the allocator's peak). One figure per model, one row of panels per batch size; a line per method and
bench path (MHA's eager / SDPA / static+compiled baselines, a method's own path); OOM cells are listed in the panel.
"""

from pathlib import Path

import pandas as pd

from chai.report.style import figure_title, legend, method_label, panels, save

MEMORY_PATHS = ("sdpa", "method")  # one dynamic-cache line per method: the static paths hold the same K,V


def _line_label(row) -> str:
    return f"{method_label(row['method'], row['settings'])} ({row['path']})"


def _lines(rows: pd.DataFrame):
    for label, line in rows.assign(label=rows.apply(_line_label, axis=1)).groupby("label", sort=True):
        yield label, line.sort_values("seq_len")


def _oom_note(ax, rows: pd.DataFrame) -> None:
    oom = rows[rows["oom"]]
    if not oom.empty:
        text = "; ".join(f"{_line_label(r)} S={r['seq_len']}" for _, r in oom.iterrows())
        ax.text(0.01, 0.99, f"OOM: {text}", transform=ax.transAxes, fontsize=6, va="top", color="crimson")


def latency_figures(frame: pd.DataFrame, out: Path) -> tuple[list, list]:
    """Fig. 11 for every benchmarked model."""
    if frame.empty:
        return [], ["fig11: no bench records (run `python run.py experiment=latency`)"]
    written = []
    for model, part in frame.groupby("model", sort=True):
        batches = sorted(part["batch"].unique())
        fig, axes = panels(2 * len(batches), width=4.4, height=3.2, max_cols=2)
        for b, batch in enumerate(batches):
            rows = part[part["batch"] == batch]
            done = rows[~rows["failed"]]
            for ax, metric, name in ((axes[2 * b], "ttft_ms", "time to first token"),
                                     (axes[2 * b + 1], "ttnt_ms", "time per next token")):
                for label, line in _lines(done):
                    drawn = ax.plot(line["seq_len"], line[f"{metric}_median"], marker="o", markersize=3, label=label)
                    ax.fill_between(line["seq_len"], line[f"{metric}_p10"], line[f"{metric}_p90"], alpha=0.2,
                                    color=drawn[0].get_color())
                ax.set_xscale("log", base=2)
                ax.set_xlabel("prompt tokens")
                ax.set_ylabel(f"{name} (ms)")
                ax.set_title(f"{name}, batch {batch}", fontsize=9)
                ax.grid(alpha=0.3)
                _oom_note(ax, rows)
        legend(axes, fontsize=6)
        figure_title(fig, f"Latency: {model}")
        written += save(fig, out, f"fig11_latency_{model}")
    return written, []


def memory_figures(frame: pd.DataFrame, out: Path) -> tuple[list, list]:
    """Fig. 12 for every benchmarked model."""
    if frame.empty:
        return [], ["fig12: no bench records (run `python run.py experiment=memory`)"]
    written = []
    for model, part in frame.groupby("model", sort=True):
        part = part[part["path"].isin(MEMORY_PATHS)]
        if part.empty:
            continue
        batches = sorted(part["batch"].unique())
        fig, axes = panels(2 * len(batches), width=4.4, height=3.2, max_cols=2)
        for b, batch in enumerate(batches):
            rows = part[part["batch"] == batch]
            done = rows[~rows["failed"]]
            cache_ax, peak_ax = axes[2 * b], axes[2 * b + 1]
            for label, line in _lines(done):
                drawn = cache_ax.plot(line["seq_len"], line["kv_measured_cache"] / 2**20, marker="o", markersize=3,
                                      label=f"{label} measured")
                cache_ax.plot(line["seq_len"], line["kv_analytic"] / 2**20, linestyle=":", color=drawn[0].get_color(),
                              label=f"{label} analytic")
                peak_ax.plot(line["seq_len"], line["kv_allocator_peak"] / 2**20, marker="o", markersize=3, label=label)
            for ax, name in ((cache_ax, "K,V cache (MiB)"), (peak_ax, "allocator peak (MiB)")):
                ax.set_xscale("log", base=2)
                ax.set_xlabel("prompt tokens")
                ax.set_ylabel(name)
                ax.set_title(f"{name}, batch {batch}", fontsize=9)
                ax.grid(alpha=0.3)
                _oom_note(ax, rows)
            legend([cache_ax], fontsize=6)
        figure_title(fig, f"K,V memory: {model}")
        written += save(fig, out, f"fig12_memory_{model}")
    return written, [] if written else ["fig12: no bench cells on the sdpa or method path"]

"""Bench figures from mode=bench cell records: latency over sequence length (paper Fig. 11: time to first token and
time per next token, median with the p10-p90 band) and K,V memory (Fig. 12: bytes held by the cache, analytic and
measured, and the allocator's peak). One figure per model and GPU, one row of panels per batch size, one legend per
figure; the GPU of a model's newest record gets the plain name (fig11_latency_<model>), any other GPU's records a
figure of their own, suffixed with the GPU (fig11_latency_<model>_h100), never lines mixed across GPUs.
A method keeps its colour (the records' display) in both figures; the bench path (MHA's eager / SDPA /
static+compiled baselines, a method's own dynamic or static path) is the line style. OOM cells are listed in the
panel.
"""

from pathlib import Path

import pandas as pd
from matplotlib.lines import Line2D

from chai.report.style import figure_legend, figure_title, log_axis, method_styles, panels, save

MEMORY_PATHS = ("sdpa", "method")  # one dynamic-cache line per method: the static paths hold the same K,V
PATH_STYLES = {  # bench path -> (line style, legend text); chai/bench.py compares method to sdpa, static to static
    "sdpa": ("-", "dynamic cache (SDPA, or the method's own attention)"),
    "method": ("-", "dynamic cache (SDPA, or the method's own attention)"),
    "eager": (":", "eager attention, dynamic cache"),
    "static_compiled": ("--", "static cache, compiled / captured decode step"),
    "method_static": ("--", "static cache, compiled / captured decode step"),
}


def _lines(rows: pd.DataFrame):
    """(method label, path, rows sorted by prompt length) per line."""
    for (label, path), line in rows.groupby(["label", "path"], sort=True):
        yield label, path, line.sort_values("seq_len")


def _oom_note(ax, rows: pd.DataFrame) -> None:
    oom = rows[rows["oom"]]
    if not oom.empty:
        text = "; ".join(f"{r['label']} ({r['path']}) S={r['seq_len']}" for _, r in oom.iterrows())
        ax.text(0.01, 0.99, f"OOM: {text}", transform=ax.transAxes, fontsize=6, va="top", color="crimson")


def _prompt_axis(ax, rows: pd.DataFrame, name: str, batch) -> None:
    ax.set_xscale("log", base=2)
    log_axis(ax.xaxis, rows["seq_len"].astype(int))  # the recorded lengths, written out (2048, not 2^11)
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel(name)
    ax.set_title(f"{name}, batch {batch}", fontsize=9)
    ax.grid(alpha=0.3)
    _oom_note(ax, rows)


def _by_gpu(done: pd.DataFrame):
    """(model, GPU name, file suffix, rows) per model and GPU: the suffix is empty for the GPU that ran the model's
    newest record, else "_" and the GPU's short name (NVIDIA H100 80GB HBM3 -> h100)."""
    for model, ran in done.groupby("model", sort=True):
        devices = ran["device"].fillna("unknown GPU")
        newest = devices.loc[pd.to_datetime(ran["time"], utc=True, errors="coerce", format="ISO8601").idxmax()]
        for device, rows in ran.groupby(devices, sort=True):
            words = [w for w in device.split() if w.upper() != "NVIDIA"] or ["gpu"]
            yield model, device, "" if device == newest else "_" + words[0].lower(), rows


def _failed_models(frame: pd.DataFrame, name: str) -> tuple[pd.DataFrame, list[str]]:
    """The cells that ran, and one skip line per model whose every cell failed."""
    done = frame[~frame["failed"]]
    gone = sorted(set(frame["model"]) - set(done["model"]))
    return done, [f"{name} {model}: every bench cell failed or ran out of memory" for model in gone]


def latency_figures(frame: pd.DataFrame, out: Path) -> tuple[list, list]:
    """Fig. 11 for every benchmarked model. Log time axis: dynamic-path simulations (100+ ms per token) and the
    static paths (a few ms) share a panel and both stay readable."""
    if frame.empty:
        return [], ["fig11: no bench records (run `python run.py experiment=latency`)"]
    done, skipped = _failed_models(frame, "fig11")
    written = []
    for model, device, suffix, ran in _by_gpu(done):
        part = frame[(frame["model"] == model) & (frame["device"].fillna("unknown GPU") == device)]
        styles = method_styles(ran)
        batches = sorted(ran["batch"].unique())
        fig, axes = panels(2 * len(batches), width=4.4, height=3.2, max_cols=2, layout="constrained")
        for b, batch in enumerate(batches):
            for ax, metric, name in ((axes[2 * b], "ttft_ms", "time to first token (ms)"),
                                     (axes[2 * b + 1], "ttnt_ms", "time per next token (ms)")):
                for label, path, line in _lines(ran[ran["batch"] == batch]):
                    style = PATH_STYLES.get(path, ("-.", path))[0]
                    ax.plot(line["seq_len"], line[f"{metric}_median"], color=styles[label][0], linestyle=style,
                            marker="o", markersize=3)
                    ax.fill_between(line["seq_len"], line[f"{metric}_p10"], line[f"{metric}_p90"], alpha=0.15,
                                    color=styles[label][0], linewidth=0)
                ax.set_yscale("log")
                log_axis(ax.yaxis)
                _prompt_axis(ax, part[part["batch"] == batch], name, batch)
        _latency_legend(fig, styles, sorted(set(ran["path"])))
        figure_title(fig, f"Latency: {model} on {device} (median, band p10-p90; log time axis)")
        written += save(fig, out, f"fig11_latency_{model}{suffix}")
    return written, skipped


def _latency_legend(fig, styles: dict[str, tuple[str, str]], paths: list[str]) -> None:
    """Methods by colour (in display order), then bench paths by line style (grey)."""
    methods = [(Line2D([], [], color=c, marker="o", markersize=4), label) for label, (c, _) in styles.items()]
    styles = {}
    for path in paths:
        style, text = PATH_STYLES.get(path, ("-.", path))
        styles.setdefault(text, Line2D([], [], color="dimgray", linestyle=style))
    figure_legend(fig, methods, [(handle, text) for text, handle in styles.items()])

MEMORY_NOTE = (
    "Left: K,V bytes the cache holds after the prompt; lines: analytic (the method's bytes per token x batch x "
    "tokens), hollow markers: measured from the cache tensors. Methods with equal bytes are drawn nested (the first "
    "in the legend wider and larger) so that each stays visible. Right: the CUDA allocator's peak over the whole cell "
    "(torch.cuda.max_memory_allocated from cache allocation through prefill, decode-step capture, warm-up and timed "
    "rounds, less what was allocated before: the weights): the cache plus transient workspace, not the cache alone. "
    "CHAI can peak above MHA with a smaller cache: in prefill each layer keeps every K head until its clusters are "
    "known, then copies the kept heads into the compact cache, and its clustered attention scores rows in float32 "
    "blocks where MHA's SDPA uses a fused kernel."
)


def _same_curve(a: pd.Series, b: pd.Series) -> bool:
    """Whether two curves (indexed by prompt length) lie on each other where both have points."""
    common = a.index.intersection(b.index)
    return len(common) > 0 and bool(((a[common] - b[common]).abs() <= 1e-3 * b[common].abs()).all())


def _draw_nested(ax, lines: list, column: str, styles: dict, measured: bool) -> None:
    """`column` in MiB, one curve per method: a line (analytic, peak) or hollow markers (measured). A curve that a
    later one lies on is drawn wider and beneath it, so coinciding methods (equal bytes) both stay visible."""
    curves = [(label, line.groupby("seq_len")[column].mean() / 2**20) for label, _, line in lines]
    curves.sort(key=lambda curve: list(styles).index(curve[0]))  # display order: the baseline widest, beneath
    for i, (label, y) in enumerate(curves):
        under = sum(_same_curve(y, other) for _, other in curves[i + 1:])
        colour, marker = styles[label]
        if measured:
            ax.plot(y.index, y.values, linestyle="none", marker=marker, markersize=4 + 3 * under,
                    markerfacecolor="none", color=colour, zorder=3 + i)
        else:
            ax.plot(y.index, y.values, color=colour, linewidth=1.2 + 3 * under, alpha=0.5 if under else 1,
                    zorder=2 + i)


def memory_figures(frame: pd.DataFrame, out: Path) -> tuple[list, list]:
    """Fig. 12 for every benchmarked model: the dynamic-cache path of each method (MEMORY_PATHS)."""
    if frame.empty:
        return [], ["fig12: no bench records (run `python run.py experiment=memory`)"]
    done, skipped = _failed_models(frame, "fig12")
    written = []
    for model, device, suffix, ran in _by_gpu(done):
        styles = method_styles(ran)  # before the path filter: the same colours as the model's latency figure
        ran = ran[ran["path"].isin(MEMORY_PATHS)]
        on_gpu = (frame["model"] == model) & (frame["device"].fillna("unknown GPU") == device)
        part = frame[on_gpu & frame["path"].isin(MEMORY_PATHS)]
        if ran.empty:
            skipped.append(f"fig12 {model} on {device}: no bench cell on the {' or '.join(MEMORY_PATHS)} path")
            continue
        batches = sorted(ran["batch"].unique())
        fig, axes = panels(2 * len(batches), width=4.4, height=3.2, max_cols=2, layout="constrained")
        for b, batch in enumerate(batches):
            lines = list(_lines(ran[ran["batch"] == batch]))
            cache_ax, peak_ax = axes[2 * b], axes[2 * b + 1]
            _draw_nested(cache_ax, lines, "kv_analytic", styles, measured=False)
            _draw_nested(cache_ax, lines, "kv_measured_cache", styles, measured=True)
            _draw_nested(peak_ax, lines, "kv_allocator_peak", styles, measured=False)
            _prompt_axis(cache_ax, part[part["batch"] == batch], "K,V cache (MiB)", batch)
            _prompt_axis(peak_ax, part[part["batch"] == batch], "allocator peak (MiB)", batch)
            peak_ax.set_title(f"allocator peak: cache + transient workspace, batch {batch}", fontsize=9)
        _memory_legend(fig, styles, set(ran["label"]))
        figure_title(fig, f"K,V memory: {model} on {device}")
        written += save(fig, out, f"fig12_memory_{model}{suffix}")
    return written, skipped


def _memory_legend(fig, styles: dict[str, tuple[str, str]], shown: set[str]) -> None:
    """The methods drawn, by colour and marker, then what a line and a hollow marker mean (grey)."""
    methods = [(Line2D([], [], color=c, marker=marker, markerfacecolor="none"), label)
               for label, (c, marker) in styles.items() if label in shown]
    styles = [(Line2D([], [], color="dimgray"), "line: analytic K,V (left), allocator peak (right)"),
              (Line2D([], [], color="dimgray", linestyle="none", marker="o", markerfacecolor="none"),
               "hollow marker: measured K,V in the cache")]
    figure_legend(fig, methods, styles, note=MEMORY_NOTE)

"""The bench's key ratios as Markdown, one table per (model, GPU): the latest record of every cell of a bench
runs.jsonl. Written by `make figures` beside the records, and by scripts/gpu_bench.sh on the GPU machine:

    python -m chai.report.bench_table results/bench/*/runs.jsonl > results/bench/bench_table.md
"""

import json
import sys
from pathlib import Path

from chai.report.loading import display_of

HEADER = ("| batch | seq | method | path | TTFT ms | of which clustering ms | TTFT of matmul rate | TTFT x sdpa "
          "| TTNT ms | x eager | x sdpa | x static | roofline ms | of roofline | K,V of bytes | predicted x "
          "| of predicted | K,V MB | K,V saved |")


def _f(x, fmt=".2f"):
    return "-" if x is None else format(x, fmt)


def _latest_cells(paths: list[Path]) -> tuple[dict, dict]:
    """{(model, gpu, batch, seq, display order, label, path): (label, bench, error)} and {(model, gpu): note}; a
    method is named and ordered by its record's display."""
    latest, notes = {}, {}
    for line in (line for path in paths for line in path.read_text().splitlines()):
        try:
            r = json.loads(line)
        except json.JSONDecodeError:  # a torn last line of an interrupted run
            continue
        if r.get("kind") != "bench_cell":
            continue
        b, shown, where = r["bench"], display_of(r), (r["model"], r["device"]["name"])
        latest[(*where, b["batch"], b["seq_len"], shown["order"], shown["label"], b["path"])] = (
            shown["label"], b, r.get("error"))
        bandwidth = (b.get("bandwidth") or {}).get("bandwidth_GBps")
        notes[where] = (f"copy bandwidth {_f(bandwidth, '.0f')} GB/s; new_tokens={b['new_tokens']}, "
                        f"dtype={b['dtype']}. Speedups: baseline time / this time.")
    return latest, notes


def _row(batch, seq, label, b, error) -> str:
    static = b["path"] in ("static_compiled", "method_static")
    path = b["path"] + (f" ({b['step']})" if static and b.get("step") else "")  # how a static path was stepped
    path += " (no K,V cache; not a baseline)" if b.get("recomputation") else ""
    if error:
        return f"| {batch} | {seq} | {label} | {path} | {'OOM' if b.get('oom') else 'failed'} |" + " |" * 14
    # .get: cells recorded before a field existed (or without their baselines) show "-" there
    s, roof, kv = b.get("speedup_vs") or {}, b.get("roofline") or {}, b["kv_bytes"]
    ttft_x = (b.get("ttft_speedup_vs") or {}).get("mha_sdpa")
    saved = kv["saved_analytic"] / kv["dense_analytic"] if kv.get("dense_analytic") else None
    clustering = (b.get("clustering_ms") or {}).get("median")
    of_matmul = (b.get("prefill") or {}).get("fraction_of_matmul_rate")  # recorded since the prefill's FLOP are
    return (f"| {batch} | {seq} | {label} | {path} | {_f(b['ttft_ms']['median'], '.1f')} "
            f"| {_f(clustering, '.1f')} | {_f(of_matmul)} | {_f(ttft_x)} "
            f"| {_f(b['ttnt_ms']['median'])} | {_f(s.get('mha_eager'))} | {_f(s.get('mha_sdpa'))} "
            f"| {_f(s.get('mha_static_compiled'))} | {_f(roof.get('time_ms'))} "
            f"| {_f(roof.get('fraction_of_roofline'))} | {_f(roof.get('kv_fraction_of_bytes'))} "
            f"| {_f(b.get('roofline_predicted_speedup_vs_mha'))} | {_f(b.get('fraction_of_predicted_speedup'))} "
            f"| {kv['analytic'] / 1e6:.1f} | {_f(saved, '.1%')} |")


RECOMPUTE_HEADER = ("Against recomputation (no K,V cache, every step re-runs the whole sequence: the baseline of "
                    "AnLLM's \"3.5x\"), labelled apart and never the headline:", "",
                    "| batch | seq | method | path | TTNT x recompute | end to end x recompute |", "|---|---|---|---|---|---|")


def _recompute_rows(cells: list) -> list[str]:
    """The cells measured beside a `recompute` path, with their speedups over it (none: no section)."""
    rows = [f"| {batch} | {seq} | {label} | {b['path']} | {_f(b['vs_recompute'].get('ttnt_speedup'))} "
            f"| {_f(b['vs_recompute'].get('e2e_speedup'))} |"
            for batch, seq, (label, b, error) in cells if not error and b.get("vs_recompute")]
    return ["", *RECOMPUTE_HEADER, *rows] if rows else []


def render(*paths: Path) -> str:
    """The tables of the bench cells in `paths` (runs.jsonl files, read in order: a later record of a cell wins)."""
    latest, notes = _latest_cells([Path(p) for p in paths])
    if not latest:
        return "No bench cells recorded.\n"
    out = []
    for where, note in sorted(notes.items()):
        cells = [(batch, seq, cell) for (*w, batch, seq, _, _, _), cell in sorted(latest.items()) if tuple(w) == where]
        out += [f"### {where[0]} on {where[1]}", "", note, "", HEADER, "|" + "---|" * 19]
        out += [_row(batch, seq, *cell) for batch, seq, cell in cells]
        out += _recompute_rows(cells)
        out.append("")
    return "\n".join(out) + "\n"


def write_bench_table(results: Path, out: Path) -> tuple[list, list]:
    """results/bench/**/runs.jsonl (a run's own file, and the committed ones kept per GPU so each stays small) ->
    `out`/bench_table.md (a build step: (written, skipped))."""
    records = sorted((Path(results) / "bench").glob("**/runs.jsonl"))
    if not records:
        return [], ["bench_table: no bench records (run `bash scripts/gpu_bench.sh` on a GPU)"]
    out.mkdir(parents=True, exist_ok=True)
    target = out / "bench_table.md"
    target.write_text(render(*records))
    return [target], []


if __name__ == "__main__":
    sys.stdout.write(render(*sys.argv[1:]))

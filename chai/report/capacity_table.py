"""Serving capacity as Markdown, one table per (model, GPU): per prompt length and method, the largest batch predicted
and measured (mode=capacity), the decode tokens/s there against the roofline's at that batch, the time to generate
the cell's new tokens, and each method's throughput over the baseline's (MHA's static path at its own largest batch)
against the ratio the roofline predicts for the same two batches. Written by the report build, and by
scripts/gpu_capacity.sh on the GPU machine:

    python -m chai.report.capacity_table results/capacity/runs.jsonl > results/capacity/capacity_table.md
"""

import math
import numbers
import sys
from pathlib import Path

import pandas as pd

from chai.records import method_key, read_jsonl
from chai.report.loading import display_of, latest, settings_key, settings_of

BASELINE_PATH = "static_compiled"  # the baseline method's static path: what every ratio divides by
PAIR = ["model", "device", "seq_len", "new_tokens"]  # a method's row and the baseline row it is compared with
HEADER = ("| prompt | method (path) | predicted max batch | K,V-only bound | measured max batch | tokens/s "
          "| roofline tokens/s | of roofline | new tokens in s | x baseline tokens/s | roofline x | of predicted x |")


def capacity_frame(records: list[dict]) -> pd.DataFrame:
    """One row per capacity cell (the latest record of each), with its throughput ratios against the baseline."""
    rows = []
    for r in records:
        if not isinstance(r, dict) or r.get("kind") != "capacity_cell" or not isinstance(r.get("capacity"), dict):
            continue
        c = r["capacity"]
        roof, prediction = c.get("roofline") or {}, c.get("prediction") or {}
        rows.append({
            "model": r.get("model"), "device": (r.get("device") or {}).get("name"), "method": r.get("method"),
            "cell": settings_key(method_key({"name": r.get("method"), **settings_of(r)})), **display_of(r),
            "seq_len": c.get("seq_len"), "new_tokens": c.get("new_tokens"), "path": c.get("path"),
            "dtype": c.get("dtype"), "budget": (c.get("budget") or {}).get("budget_bytes"),
            "budget_source": (c.get("budget") or {}).get("source"),
            "bandwidth": (c.get("bandwidth") or {}).get("bandwidth_GBps"),
            "predicted": c.get("predicted_max_batch"), "kv_only": prediction.get("kv_only_max_batch"),
            "kv_per_seq": prediction.get("kv_per_seq_bytes"),
            "workspace_per_seq": prediction.get("workspace_per_seq_bytes"),
            "measured": c.get("measured_max_batch"), "resolved": c.get("resolved"), "trials": c.get("n_trials"),
            "tokens_per_s": c.get("tokens_per_s"), "roofline_tokens_per_s": roof.get("tokens_per_s"),
            "fraction": roof.get("fraction_of_roofline"), "e2e_s": c.get("e2e_s"),
            "error": r.get("error"), "time": r.get("time"), "run_id": r.get("run_id"),
        })
    frame = pd.DataFrame(rows)
    frame.attrs["keys"] = ["model", "device", "method", "cell", "seq_len", "new_tokens", "path"]
    return with_ratios(latest(frame))


def _number(x) -> float:
    return float(x) if isinstance(x, numbers.Real) and not isinstance(x, bool) and not math.isnan(x) else math.nan


def with_ratios(frame: pd.DataFrame) -> pd.DataFrame:
    """x baseline: a row's tokens/s over the baseline row's (same model, GPU, prompt, new tokens), each at its own
    largest batch; roofline x: the same ratio of their roofline tokens/s; of predicted x: the first over the second."""
    if frame.empty:
        return frame
    keys = frame.attrs["keys"]
    base = frame[(frame["path"] == BASELINE_PATH) & frame["error"].isna()]
    base = base.drop_duplicates(PAIR, keep="last").set_index(PAIR)
    out = frame.copy()
    for column, mine in (("speedup", "tokens_per_s"), ("roofline_speedup", "roofline_tokens_per_s")):
        theirs = [base[mine].get(tuple(row[k] for k in PAIR), math.nan) for _, row in out.iterrows()]
        out[column] = [_number(a) / _number(b) if _number(b) else math.nan for a, b in zip(out[mine], theirs)]
    out["of_predicted"] = out["speedup"] / out["roofline_speedup"]
    out.attrs["keys"] = keys
    return out


def _bytes(n: float) -> str:
    unit, scale = next(((u, s) for u, s in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)) if abs(n) >= s), ("B", 1))
    return f"{n / scale:.4g} {unit}"


def _f(x, fmt=".2f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _row(r) -> str:
    label = f"{r['label']} ({r['path']})"
    if isinstance(r["error"], str) and r["error"]:
        return f"| {r['seq_len']} | {label} | {_f(r['predicted'], 'd')} | failed: {r['error'][:80]} |" + " |" * 8
    measured = f"{r['measured']}" + ("" if r["resolved"] else " (unresolved)")
    return (f"| {r['seq_len']} | {label} | {r['predicted']} | {_f(r['kv_only'], 'd')} | {measured} "
            f"| {_f(r['tokens_per_s'], '.0f')} | {_f(r['roofline_tokens_per_s'], '.0f')} | {_f(r['fraction'])} "
            f"| {_f(r['e2e_s'])} | {_f(r['speedup'])} | {_f(r['roofline_speedup'])} | {_f(r['of_predicted'])} |")


def render(frame: pd.DataFrame) -> str:
    if frame.empty:
        return "No capacity cells recorded.\n"
    out = []
    for (model, device), part in frame.groupby(["model", "device"], sort=True):
        budgets = ", ".join(sorted({f"{_bytes(b)} ({s})" for b, s in zip(part["budget"], part["budget_source"])
                                    if _number(b) == _number(b)}))
        out += [f"### {model} on {device}", "",
                f"Budget for K,V + workspace: {budgets}; copy bandwidth {_f(part['bandwidth'].median(), '.4g')} GB/s; "
                f"new tokens {', '.join(str(n) for n in sorted(set(part['new_tokens'])))}, dtype "
                f"{', '.join(sorted(set(part['dtype'].astype(str))))}. Ratios: over {BASELINE_PATH} of the baseline "
                f"at its own largest batch.", "", HEADER, "|" + "---|" * 12]
        out += [_row(r) for _, r in part.sort_values(["seq_len", "order", "label"], kind="stable").iterrows()]
        out.append("")
    return "\n".join(out) + "\n"


def write_capacity_table(frame: pd.DataFrame, out: Path) -> tuple[list, list]:
    """A build step: the capacity frame -> `out`/capacity_table.md, (written, skipped)."""
    if frame is None or frame.empty:
        return [], ["capacity_table: no capacity records (run `bash scripts/gpu_capacity.sh` on a GPU)"]
    out.mkdir(parents=True, exist_ok=True)
    target = out / "capacity_table.md"
    target.write_text(render(frame))
    return [target], []


if __name__ == "__main__":
    sys.stdout.write(render(capacity_frame(read_jsonl(Path(sys.argv[1])))))

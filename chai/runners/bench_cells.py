"""A bench cell's record: the settings that key it (resume), its measurement or failure, K,V bytes and roofline, the
speedups against the MHA baselines of the same (batch, seq_len), and the one line printed as it is measured.

Every path is compared with every baseline path and with its comparable one: `method` (the method's own attention
and dynamic cache) with `sdpa`, `method_static` (its static cache, the same captured step) with `static_compiled`.
`recompute` (MHA with no cache: every step re-runs the whole sequence) is the baseline some papers report speedups
against (AnLLM's 3.5x); it is labelled apart (`recomputation`, and `vs_recompute` on the other cells) and is never a
baseline path: no `speedup_vs`, no fastest MHA, no headline.
"""

import copy
import os

from chai.attention import AttnShape
from chai.records import records_by_key, succeeded
from chai.roofline import kv_cache_bytes, percentiles, prefill_flops, step_roofline
from chai.runners.record import method_facts

BASELINE_PATHS = ("eager", "sdpa", "static_compiled")
METHOD_PATHS = ("method", "method_static")
RECOMPUTE = "recompute"
COMPARABLE = {"eager": "eager", "sdpa": "sdpa", "static_compiled": "static_compiled", "method": "sdpa",
              "method_static": "static_compiled", RECOMPUTE: "sdpa"}
RECOMPUTE_NOTE = ("recomputation: MHA without a K,V cache, every step re-runs the whole sequence (the baseline of "
                  "AnLLM's speedups); labelled apart, never the headline (that is the full-cache sdpa / "
                  "static_compiled)")
GRID_KEYS = ("batch_sizes", "seq_lens", "paths")  # not part of a cell's identity: a cell resumes across grids
# On a GPU a time below its floor is refused. The floors use rates measured in the same run (a large GEMM, a large
# copy), which a real prefill or step cannot beat by more than noise; 5% leaves room for that noise and nothing else.
# On the CPU the rates are not floors (a shared, loaded machine; a tiny model that lives in cache), so nothing is
# refused there.
FLOOR_TOLERANCE = 0.95


ALLOC_ENV = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")  # the caching allocator's settings (both names read)


def allocator_env() -> dict[str, str]:
    """The allocator settings this process runs under ({} for PyTorch's defaults): expandable segments, for one,
    change what fits (no fragmentation between prefill tensors of different sizes)."""
    return {name: os.environ[name] for name in ALLOC_ENV if name in os.environ}


def finished_cells(path) -> dict[str, dict]:
    """{key: record} of the cells `path` holds that a run reuses (resume): measured, or out of memory (which the
    same settings on the same device would be again). A cell that failed otherwise is measured again."""
    return records_by_key(path, lambda r: r.get("kind") == "bench_cell" and (succeeded(r) or bool(r.get("oom"))))


def cell_config(config: dict, path, batch: int, seq_len: int, device_name: str, step: str) -> dict:
    """The settings that define one cell (its run key): the run's config with the path's method, without the grid
    lists, plus batch, seq_len, path, the device it ran on, a static path's step as resolved (`auto` has meant
    different steps on different devices and versions), the method's kernel launch settings, if it reports any, and
    the caching allocator's settings when the environment sets them (expandable segments change what fits)."""
    cell = {k: copy.deepcopy(v) for k, v in config.items() if k != "resume"}
    cell["method"] = path.method_cfg
    cell["bench"] = {k: v for k, v in cell["bench"].items() if k not in GRID_KEYS}
    if path.static:
        cell["bench"]["static_step"] = step
    if cell["bench"].get("prompt") == "random":  # the default: cells measured before prompts had kinds keep their keys
        del cell["bench"]["prompt"]
    cell["bench"]["cell"] = {"batch": batch, "seq_len": seq_len, "path": path.name, "device": device_name}
    kernel = path.method.run_stats().decode_kernel
    if kernel:
        cell["bench"]["decode_kernel"] = kernel
    allocator = allocator_env()
    if allocator:  # only when set: the cells measured under PyTorch's defaults keep their keys
        cell["bench"]["allocator_env"] = allocator
    return cell


def ratio(num, den):
    return num / den if num is not None and den else None


def cell_record(rec: dict, path, model, result: dict, batch: int, seq_len: int, bcfg, rates: dict, weights: int,
                params: dict, baseline) -> dict:
    """Fill a cell record from a measurement (or a failure): timings, K,V bytes, roofline, the prefill's FLOP and
    compute floor, the method's facts. `rates`: {"bandwidth": copy_bandwidth, "matmul": matmul_rate, "weight_read":
    weight_read_bandwidth} of this run;
    `weights`, `params`: the path's bytes read per step and matrix parameters (with its method applied)."""
    n = int(bcfg.new_tokens)
    after_prompt, at_end = kv_tokens(path, seq_len, n)
    kv = kv_cache_bytes(path.method, model, batch, after_prompt, result.pop("kv_measured", None))
    kv["end"] = kv_cache_bytes(path.method, model, batch, at_end, result.pop("kv_measured_end", None))
    trace = result.pop("traceback", None)
    empty = percentiles([])
    bandwidth = rates["bandwidth"]
    bench = {"batch": batch, "seq_len": seq_len, "new_tokens": n, "path": path.name,
             "dtype": str(model.dtype).replace("torch.", ""), "bandwidth": bandwidth, "ttft_ms": empty,
             "clustering_ms": empty, "ttnt_ms": empty, **result, "kv_bytes": kv,
             "prefill": prefill_record(params, model, batch, seq_len, rates["matmul"]),
             **step_roofline(path.method, model, bandwidth["bandwidth_GBps"], weights, batch, seq_len, n, baseline,
                             rates["weight_read"]["weight_read_GBps"])}
    refused = below_floor(bench) if model.device.type == "cuda" else None
    if refused:
        bench["refused"] = {"ttft_ms": bench["ttft_ms"], "ttnt_ms": bench["ttnt_ms"]}
        bench.update(ttft_ms=empty, ttnt_ms=empty, error=refused)
    median, ttft = bench["ttnt_ms"]["median"], bench["ttft_ms"]["median"]
    bench["roofline"]["fraction_of_roofline"] = ratio(bench["roofline"]["time_ms"], median)
    bench["prefill"]["fraction_of_matmul_rate"] = ratio(bench["prefill"]["time_at_matmul_rate_ms"], ttft)
    bench["clustering_fraction_of_ttft"] = ratio(bench["clustering_ms"]["median"], ttft)
    bench["tokens_per_s"] = ratio(batch * 1e3, median)
    bench["recomputation"] = path.recompute
    if path.recompute:
        bench["note"] = RECOMPUTE_NOTE
        # The roofline is a cached step's (still a floor: a recomputation reads the weights too), not its prediction.
        bench["roofline"]["fraction_of_roofline"] = bench["roofline_predicted_speedup_vs_mha"] = None
    rec.update(kind="bench_cell", bench=bench, oom=bench["oom"], error=bench["error"], **method_facts(path.method))
    if trace:
        rec["traceback"] = trace
    return rec


def kv_tokens(path, seq_len: int, n: int) -> tuple[int, int]:
    """Tokens the path's cache holds after the prompt and at the end of its `n` decode steps: a static cache its
    full length throughout, a dynamic one the prompt, then the prompt and the tokens fed back (a cache that evicts
    holds fewer: its method's `kv_bytes` counts them), no cache none."""
    if path.recompute:
        return 0, 0
    return (seq_len + n, seq_len + n) if path.static else (seq_len, seq_len + n)


def prefill_record(params: dict, model, batch: int, seq_len: int, matmul: dict) -> dict:
    """The prefill's FLOP, the time they take at the measured matrix rate, and the compute floor: its weights'
    FLOP alone at that rate (attention FLOP depend on the method; the weights' do not)."""
    flops = prefill_flops(params, AttnShape.of(model.config), batch, seq_len)
    per_ms = matmul["tflops"] * 1e9  # FLOP per ms
    return {"flops": flops, "matmul": matmul, "time_at_matmul_rate_ms": flops["total"] / per_ms,
            "compute_floor_ms": flops["linear"] / per_ms}


def below_floor(bench: dict) -> str | None:
    """Why a cell's times cannot be measurements, or None: its fastest TTFT (p10) below the prefill's compute
    floor, or its fastest decode step below the roofline (bytes at the copy bandwidth)."""
    checks = (("TTFT", bench["ttft_ms"]["p10"], bench["prefill"]["compute_floor_ms"],
               f"its weights' FLOP at the measured {bench['prefill']['matmul']['tflops']:.1f} TFLOP/s"),
              ("TTNT", bench["ttnt_ms"]["p10"], bench["roofline"]["time_ms"],
               f"its bytes at the measured {bench['bandwidth']['bandwidth_GBps']:.0f} GB/s"))
    for name, fastest, floor, why in checks:
        if fastest is not None and fastest < FLOOR_TOLERANCE * floor:
            return (f"{name} p10 {fastest:.3f} ms is below its floor {floor:.3f} ms ({why}): not a measurement, "
                    f"times not recorded (they stay under bench.refused)")
    return None


def annotate(group: dict[str, dict]) -> None:
    """Speedups of every cell of one (batch, seq_len) against each baseline path and the fastest of them."""
    ttnt = {p: r["bench"]["ttnt_ms"]["median"] for p, r in group.items()}
    ttft = {p: r["bench"]["ttft_ms"]["median"] for p, r in group.items()}
    e2e = {p: (r["bench"].get("e2e_ms") or {}).get("median") for p, r in group.items()}
    base = {p: ttnt.get(p) for p in BASELINE_PATHS if ttnt.get(p) is not None}
    fastest = min(base, key=base.get) if base else None
    for name, rec in group.items():
        b, mine = rec["bench"], ttnt[name]
        b["speedup_vs"] = {f"mha_{p}": ratio(ttnt.get(p), mine) for p in BASELINE_PATHS}
        b["ttft_speedup_vs"] = {f"mha_{p}": ratio(ttft.get(p), ttft[name]) for p in BASELINE_PATHS}
        b["comparable_baseline"] = f"mha_{COMPARABLE[name]}"
        b["speedup_vs_comparable"] = b["speedup_vs"][b["comparable_baseline"]]
        b["fastest_mha_path"] = fastest and f"mha_{fastest}"
        b["speedup_vs_fastest_mha"] = ratio(base.get(fastest), mine)
        b["fraction_of_predicted_speedup"] = ratio(b["speedup_vs_fastest_mha"],
                                                   b["roofline_predicted_speedup_vs_mha"])
        if RECOMPUTE in group and name != RECOMPUTE:  # apart from speedup_vs: a reference, not a baseline path
            b["vs_recompute"] = {"note": "against recomputation (no K,V cache), not the headline",
                                 "ttnt_speedup": ratio(ttnt[RECOMPUTE], mine),
                                 "e2e_speedup": ratio(e2e[RECOMPUTE], e2e[name])}


def cell_line(rec: dict) -> str:
    b = rec["bench"]
    head = f"{rec['method']:>14} {b['path']:<15} B={b['batch']:<3} S={b['seq_len']:<5}"
    if rec["error"]:
        return f"{head} {'OOM' if b['oom'] else 'FAILED'}: {rec['error'][:120]}"
    ttnt, roof = b["ttnt_ms"]["median"], b["roofline"]
    return (f"{head} TTFT {b['ttft_ms']['median']:9.2f} ms  TTNT {ttnt:8.3f} ms  "
            f"{b['batch'] * 1e3 / ttnt:9.1f} tok/s  {roof['bytes_per_step'] / ttnt / 1e6:8.1f} GB/s  "
            f"{roof['time_ms'] / ttnt:5.2f} of roofline  K,V {b['kv_bytes']['analytic'] / 1e6:9.2f} MB")


def cell_summary(rec: dict) -> dict:
    """What the run's summary shows of a cell (medians; the cell's own record holds the rest)."""
    b = rec["bench"]
    return {"path": b["path"], "batch": b["batch"], "seq_len": b["seq_len"], "ttft_ms": b["ttft_ms"]["median"],
            "ttnt_ms": b["ttnt_ms"]["median"], "kv_bytes": b["kv_bytes"]["analytic"], "error": rec["error"],
            "oom": rec["oom"]}

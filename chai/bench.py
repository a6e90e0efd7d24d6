"""mode=bench: time to first token (TTFT), time to next token (TTNT) and K,V-cache bytes of a method, against MHA
baselines measured in the same run, and against the roofline of the GPU it runs on.

Written the way gpt-fast writes generate.py: a small `prefill`, `decode_one_token` and `decode_n_tokens`; the
cache of a static path is allocated once at its full size and only the per-token step is captured (CUDA graph)
or compiled; every timed region is synchronised; warm-up is reported apart from the timed repeats.

Paths (`bench.paths`), each one cell record per (batch, seq_len):
- `eager`, `sdpa`: the baseline (`bench.baseline_method`, MHA) with the model's eager / SDPA attention and its
  dynamic cache: the paper-style baseline and the stock one.
- `static_compiled`: the baseline with a static cache and the decode step compiled (inductor, reduce-overhead: fused
  norms and rotary, replayed as a CUDA graph; `bench.static_step=cudagraph` captures the eager step instead): the
  fastest MHA decode this stack allows (H100, LLaMA-7B, 8 x 2048: 9.0 ms compiled, 11.5 ms as an eager graph).
- `method`: the method under test with its own attention and cache (comparable to `sdpa`).
- `method_static`: the method's static cache with the same captured step (comparable to `static_compiled`).
A cell already recorded with the same settings is reused (resume); a cell that fails or runs out of memory is a
record with `error` (and `oom`), and the grid goes on. Cell records go to the run's runs.jsonl; the run record gets
a summary.

Method hooks the bench uses (chai/methods/base.py; runners never name a method):
- `static_cache(model, batch_size, max_cache_len)`: enables `method_static` when a method overrides it. Tensors
  allocated once and written in place; a decode step (query length 1) must be capturable: no host sync, no new
  allocations that outlive the step, and nothing that changes between steps kept in Python (positions live in
  device tensors). `reset()` empties it in place. K in `layer.keys`, V in `layer.values` (the measured bytes).
- `run_stats().clustering_s`: cumulative clustering seconds; its growth over a prefill is the part of TTFT
  reported apart (`ttft_no_cluster_ms`). `run_stats().decode_kernel`: launch settings, part of a cell's identity.
- `kv_bytes(...)`, `kv_bytes_read(...)`: K,V bytes held and read per decode step (`chai.roofline`).
"""

import copy
import gc
import inspect
import itertools
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf
from transformers import LlamaForCausalLM

from chai.attention import kv_bytes
from chai.errors import ChaiError
from chai.records import append_jsonl, new_record, read_jsonl, run_key
from chai.roofline import Allocator, Clock, copy_bandwidth, kv_cache_bytes, percentiles
from chai.roofline import step_roofline, weight_bytes_per_step

BASELINE_PATHS = ("eager", "sdpa", "static_compiled")
METHOD_PATHS = ("method", "method_static")
COMPARABLE = {"eager": "eager", "sdpa": "sdpa", "static_compiled": "static_compiled", "method": "sdpa",
              "method_static": "static_compiled"}
GRID_KEYS = ("batch_sizes", "seq_lens", "paths")  # not part of a cell's identity: a cell resumes across grids
OOM = (torch.OutOfMemoryError,)
# transformers 5.24 renamed every model's forward argument `past_key_values` to `cache` (the old name warns on each
# call until its removal in 5.40); older releases know only the old name.
CACHE_ARG = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


# ---------------------------------------------------------------------------------------------- generation
def greedy(logits: torch.Tensor) -> torch.Tensor:
    """logits [B, T, V] -> next token [B, 1] (argmax on the device: no host sync)."""
    return logits[:, -1].argmax(dim=-1, keepdim=True)


def prefill(model, input_ids: torch.Tensor, cache) -> torch.Tensor:
    """Run the prompt [B, S] through the model into `cache`; only the last position's logits are computed."""
    return greedy(model(input_ids=input_ids, **{CACHE_ARG: cache}, use_cache=True, logits_to_keep=1).logits)


def decode_one_token(model, token: torch.Tensor, position: torch.Tensor, cache) -> torch.Tensor:
    """token [B, 1] at position [B, 1] -> next token [B, 1]."""
    return greedy(model(input_ids=token, position_ids=position, **{CACHE_ARG: cache}, use_cache=True).logits)


def decode_n_tokens(step, token, position, n: int, clock: Clock) -> list[float]:
    """`n` greedy steps; per-step ms on the device timeline (one event per step, one sync at the end)."""
    clock.sync()
    marks = [clock.mark()]
    for _ in range(n):
        token, position = step(token, position)
        marks.append(clock.mark())
    clock.sync()
    return [clock.ms(a, b) for a, b in itertools.pairwise(marks)]


class EagerStep:
    def __init__(self, model, cache, compiled=None):
        self.model, self.cache, self.fn = model, cache, compiled

    def __call__(self, token, position):
        if self.fn is None:
            return decode_one_token(self.model, token, position, self.cache), position + 1
        # The compiled step's output lives in its CUDA-graph pool and is overwritten by the next replay.
        return self.fn(token, position).clone(), position + 1


def capture_graph(fn, warmup: int):
    """Run `fn` `warmup` times on a side stream (lazy cuBLAS / allocator state), then capture it as a CUDA graph
    (capture records, it does not run); returns the graph's replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


class GraphStep:
    """decode_one_token captured once as a CUDA graph over static token/position buffers; a replay decodes the
    next token and advances both buffers in place, so the decode loop launches one graph per token."""

    def __init__(self, model, cache, token, position, warmup: int = 2):
        self.token, self.position = token.clone(), position.clone()
        self.model, self.cache = model, cache
        self.replay = capture_graph(self._step, warmup)

    def _step(self):
        self.token.copy_(decode_one_token(self.model, self.token, self.position, self.cache))
        self.position.add_(1)

    def __call__(self, token, position):
        if token is not self.token:  # first step of a round: load the prompt's next token and position
            self.token.copy_(token)
            self.position.copy_(position)
        self.replay()
        return self.token, self.position


def static_step_kind(bcfg, device: torch.device) -> str:
    kind = bcfg.static_step
    if kind == "auto":  # compiled (inductor fuses the norms and rotary; reduce-overhead replays a CUDA graph)
        return "compile" if device.type == "cuda" else "eager"
    if kind == "cudagraph" and device.type != "cuda":
        raise ChaiError("bench.static_step=cudagraph needs a CUDA device; use auto, compile or eager.")
    return kind


def make_step(kind: str, model, cache, token, position, bcfg):
    """The per-token step of a path: eager, compiled (`torch.compile` of the step only) or a CUDA graph. Capture
    and compilation happen here, on a cache the caller resets afterwards (they run up to 2 real steps)."""
    warm = min(2, int(bcfg.new_tokens))  # the static cache has room for new_tokens steps after the prompt
    if kind == "cudagraph":
        return GraphStep(model, cache, token, position, warm)
    if kind == "compile":
        torch._dynamo.reset()  # every cell has new shapes: start clean instead of hitting the recompile limit
        mode = bcfg.compile_mode if bcfg.compile_backend == "inductor" else None  # modes are inductor's
        fn = torch.compile(lambda t, p: decode_one_token(model, t, p, cache), mode=mode,
                           backend=bcfg.compile_backend, fullgraph=True, dynamic=False)
        step = EagerStep(model, cache, fn)
        for _ in range(warm):  # compile (and record the CUDA graph of reduce-overhead) now, not in a timed round
            token, position = step(token, position)
        return step
    return EagerStep(model, cache)


# ---------------------------------------------------------------------------------------------- one cell
@dataclass
class BenchPath:
    name: str  # eager | sdpa | static_compiled | method | method_static
    method: object  # the Method instance that runs
    method_cfg: dict  # its config, as recorded
    attn: str  # the model's attention implementation for the path (a custom method overrides it when applied)
    static: bool

    def new_cache(self, model, batch: int, max_len: int):
        if self.static:
            return self.method.static_cache(model, batch, max_len)
        return self.method.make_cache(model)


def set_attn(model, name: str) -> None:
    if model.config._attn_implementation != name:
        model.set_attn_implementation(name)


def clustering_s(method) -> float:
    """Seconds the method has spent clustering so far (`run_stats()`, cumulative, measured with a device sync): the
    bench takes its growth over a prefill."""
    return float(method.run_stats().clustering_s)


def run_round(path, model, cache, ids, step, n, clock) -> tuple[float, float, list[float]]:
    """One timed round on an empty cache: prefill (TTFT, of which clustering) then `n` decode steps (TTNT)."""
    ttft, before = [], clustering_s(path.method)
    with clock.region(ttft):
        token = prefill(model, ids, cache)
    cluster_ms = (clustering_s(path.method) - before) * 1e3
    position = torch.full_like(token, ids.shape[1])
    return ttft[0], cluster_ms, decode_n_tokens(step, token, position, n, clock)


def measure(path: BenchPath, model, ids: torch.Tensor, bcfg, device: torch.device) -> dict:
    """Setup (cache, first prefill, memory, step capture), `warmup` untimed rounds, `repeats` timed rounds."""
    clock, alloc = Clock(device), Allocator(device)
    batch, seq_len = ids.shape
    n, max_len = int(bcfg.new_tokens), ids.shape[1] + int(bcfg.new_tokens)
    kind = static_step_kind(bcfg, device) if path.static else "eager"
    alloc.start()
    cache = path.new_cache(model, batch, max_len)
    token = prefill(model, ids, cache)
    held, delta = kv_bytes(cache), alloc.delta()  # K,V as allocated after the prompt, before any decode
    started = time.perf_counter()
    step = make_step(kind, model, cache, token, torch.full_like(token, seq_len), bcfg)
    setup_ms = (time.perf_counter() - started) * 1e3

    def fresh(cache):
        if path.static:
            cache.reset()  # in place: a captured graph keeps pointing at the same tensors
            return cache
        return path.new_cache(model, batch, max_len)

    rounds = {"warmup": ([], [], []), "timed": ([], [], [])}  # TTFT, clustering, decode steps (ms)
    for name, count in (("warmup", bcfg.warmup), ("timed", bcfg.repeats)):
        for _ in range(int(count)):
            cache = step.cache = fresh(cache)
            t, c, s = run_round(path, model, cache, ids, step, n, clock)
            rounds[name][0].append(t), rounds[name][1].append(c), rounds[name][2].extend(s)
    (warm_ttft, _, warm_steps), (ttft, cluster, steps) = rounds["warmup"], rounds["timed"]
    tokens = max_len if path.static else seq_len
    return {
        "step": kind, "cache": type(cache).__name__, "cache_tokens": tokens,
        "ttft_ms": percentiles(ttft),
        "ttft_no_cluster_ms": percentiles([t - c for t, c in zip(ttft, cluster)]),
        "clustering_ms": percentiles(cluster),
        "ttnt_ms": percentiles(steps),
        "warmup": {"setup_ms": setup_ms, "ttft_ms": percentiles(warm_ttft), "ttnt_ms": percentiles(warm_steps)},
        "kv_measured": {"measured_cache": held["k"] + held["v"], "measured_k": held["k"], "measured_v": held["v"],
                        "allocator_delta": delta, "allocator_peak": alloc.peak()},
    }


def free_memory(device: torch.device, collect: bool = False) -> None:
    """Return a cell's memory before the next: `collect` after a failure, whose traceback cycles may hold tensors
    (a full gc pass costs ~0.5 s with transformers loaded, too much for every cell)."""
    if collect:
        gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_safely(path, model, ids, bcfg, device, default_attn: str) -> dict:
    """`measure` under the path's attention and method; a failure (OOM included) becomes the cell's result."""
    result = None
    try:
        set_attn(model, path.attn)
        with torch.no_grad(), path.method.applied(model):
            result = measure(path, model, ids, bcfg, device)
        result.update(oom=False, error=None)
    except OOM as err:
        result = {"oom": True, "error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"}
    except Exception as err:  # noqa: BLE001 - a failed cell is a recorded row, the grid goes on
        result = {"oom": False, "error": f"{type(err).__name__}: {err}"}
    finally:
        set_attn(model, default_attn)
    free_memory(device, collect=bool(result["error"]))
    return result


# ---------------------------------------------------------------------------------------------- records
def ratio(num, den):
    return num / den if num is not None and den else None


def annotate(group: dict[str, dict]) -> None:
    """Speedups of every cell of one (batch, seq_len) against each baseline path and the fastest of them."""
    ttnt = {p: r["bench"]["ttnt_ms"]["median"] for p, r in group.items()}
    ttft = {p: r["bench"]["ttft_ms"]["median"] for p, r in group.items()}
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


def cell_config(config: dict, path: BenchPath, batch: int, seq_len: int, device_name: str, step: str) -> dict:
    """The settings that define one cell (its run key): the run's config with the path's method, without the grid
    lists, plus batch, seq_len, path, the device it ran on, a static path's step as resolved (`auto` has meant
    different steps on different devices and versions) and the method's kernel launch settings, if it reports any."""
    cell = {k: copy.deepcopy(v) for k, v in config.items() if k != "resume"}
    cell["method"] = path.method_cfg
    cell["bench"] = {k: v for k, v in cell["bench"].items() if k not in GRID_KEYS}
    if path.static:
        cell["bench"]["static_step"] = step
    cell["bench"]["cell"] = {"batch": batch, "seq_len": seq_len, "path": path.name, "device": device_name}
    kernel = path.method.run_stats().decode_kernel
    if kernel:
        cell["bench"]["decode_kernel"] = kernel
    return cell


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


# ---------------------------------------------------------------------------------------------- runner
_LOADED: dict = {}  # one model per process, reused by the jobs of a Hydra multirun (methods undo themselves)


def load(cfg):
    """The model of `cfg.model` (no tokenizer: the bench feeds random token ids)."""
    from chai.models import load_model

    model_cfg = OmegaConf.create(OmegaConf.to_container(cfg.model, resolve=True))
    model_cfg.tokenizer = "none"
    key = json.dumps([OmegaConf.to_container(model_cfg), cfg.device, cfg.seed], sort_keys=True)
    if key not in _LOADED:
        _LOADED.clear()
        free_memory(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        _LOADED[key] = load_model(model_cfg, cfg.device, cfg.seed)[0]
    return _LOADED[key]


def check(bcfg) -> None:
    """Bad bench settings fail before any model loads."""
    from chai.errors import did_you_mean

    for name in bcfg.paths:
        if name not in BASELINE_PATHS + METHOD_PATHS:
            raise did_you_mean("bench path", name, BASELINE_PATHS + METHOD_PATHS)
    if bcfg.static_step not in ("auto", "cudagraph", "compile", "eager"):
        raise did_you_mean("bench.static_step", bcfg.static_step, ("auto", "cudagraph", "compile", "eager"))
    for key in ("new_tokens", "repeats"):
        if int(bcfg[key]) < 1:
            raise ChaiError(f"bench.{key} must be >= 1, got {bcfg[key]}.")
    if not bcfg.batch_sizes or not bcfg.seq_lens or min(bcfg.batch_sizes) < 1 or min(bcfg.seq_lens) < 1:
        raise ChaiError("bench.batch_sizes and bench.seq_lens must be non-empty lists of positive integers.")


def plan(cfg, method, baseline, default_attn: str) -> tuple[list[BenchPath], list[str]]:
    """The paths this run measures, and why any asked-for path is left out."""
    method_cfg = OmegaConf.to_container(cfg.method, resolve=True)
    baseline_cfg = {"name": cfg.bench.baseline_method}
    is_baseline = method_cfg == baseline_cfg  # its own paths would repeat the baseline cells
    paths, skipped = [], []
    for name in cfg.bench.paths:
        mine = name in METHOD_PATHS
        if mine and is_baseline:
            skipped.append(f"{name}: the method is the baseline, see {COMPARABLE[name]}")
            continue
        runner = method if mine else baseline
        static = name in ("static_compiled", "method_static")
        if static and not runner.has_static_cache():
            skipped.append(f"{name}: method '{runner.name}' has no static cache (static_cache hook)")
            continue
        attn = "eager" if name == "eager" else default_attn
        paths.append(BenchPath(name, runner, method_cfg if mine else baseline_cfg, attn, static))
    return paths, skipped


def cell_record(rec: dict, path: BenchPath, model, result: dict, batch: int, seq_len: int, bcfg, bandwidth: dict,
                weights: int, baseline) -> dict:
    """Fill a cell record from a measurement (or a failure): timings, K,V bytes, roofline."""
    n = int(bcfg.new_tokens)
    kv = kv_cache_bytes(path.method, model, batch, seq_len + n if path.static else seq_len,
                        result.pop("kv_measured", None))
    empty = percentiles([])
    bench = {"batch": batch, "seq_len": seq_len, "new_tokens": n, "path": path.name,
             "dtype": str(model.dtype).replace("torch.", ""), "bandwidth": bandwidth, "ttft_ms": empty,
             "ttft_no_cluster_ms": empty, "ttnt_ms": empty, **result, "kv_bytes": kv,
             **step_roofline(path.method, model, bandwidth["bandwidth_GBps"], weights, batch, seq_len, n, baseline)}
    median = bench["ttnt_ms"]["median"]
    bench["roofline"]["fraction_of_roofline"] = ratio(bench["roofline"]["time_ms"], median)
    bench["tokens_per_s"] = ratio(batch * 1e3, median)
    rec.update(kind="bench_cell", bench=bench, oom=bench["oom"], error=bench["error"],
               method_info=path.method.describe())
    return rec


def run(cfg, record: dict) -> dict:
    """mode=bench entry: measure every (batch, seq_len, path) cell not yet recorded; write one record per cell."""
    from chai.methods import RunContext, build_method
    from chai.models import load_tokenizer

    bcfg = cfg.bench
    check(bcfg)
    method, baseline = build_method(cfg.method), build_method({"name": bcfg.baseline_method})
    started = time.perf_counter()
    model = load(cfg)
    device, default_attn = model.device, model.config._attn_implementation
    # The tokenizer lets a method make a missing offline artifact (CHAI's calibration) exactly as mode=eval does.
    context = RunContext(cfg, load_tokenizer(cfg.model), cfg.model.name, cfg.data_dir, cfg.results_dir)
    method.prepare(model, context)
    baseline.prepare(model, context)
    paths, skipped = plan(cfg, method, baseline, default_attn)
    bandwidth = copy_bandwidth(device, bcfg.bandwidth_bytes)
    weights = {}
    for path in paths:
        with path.method.applied(model):  # e.g. pruned projections change the bytes a step reads
            weights[path.name] = weight_bytes_per_step(model)
    config, out_path = OmegaConf.to_container(cfg, resolve=True), Path(record["results_path"])
    done = {r["run_key"]: r for r in read_jsonl(out_path)
            if r.get("kind") == "bench_cell" and (not r.get("error") or r.get("oom"))}
    counts, shown = {"measured": 0, "reused": 0, "errors": 0, "oom": 0}, []
    for batch in bcfg.batch_sizes:
        for seq_len in bcfg.seq_lens:
            generator = torch.Generator().manual_seed(int(bcfg.input_seed))
            ids = torch.randint(0, model.config.vocab_size, (batch, seq_len), generator=generator).to(device)
            group, fresh = {}, []
            for path in paths:
                cell = cell_config(config, path, batch, seq_len, record["device"]["name"],
                                   static_step_kind(bcfg, device))
                if cfg.resume and run_key(cell) in done:
                    group[path.name] = done[run_key(cell)]
                    counts["reused"] += 1
                    continue
                rec = new_record(cell, record["overrides"], "bench")
                result = measure_safely(path, model, ids, bcfg, device, default_attn)
                group[path.name] = cell_record(rec, path, model, result, batch, seq_len, bcfg, bandwidth,
                                               weights[path.name], baseline)
                fresh.append(rec)
                counts.update(measured=counts["measured"] + 1, errors=counts["errors"] + bool(rec["error"]),
                              oom=counts["oom"] + bool(rec["oom"]))
            annotate(group)
            shown += [cell_summary(rec) for rec in group.values()]
            for rec in fresh:
                append_jsonl(out_path, rec)
                print(cell_line(rec), flush=True)
    return {
        "kind": "bench_run",
        "bench_summary": {**counts, "paths": [p.name for p in paths], "skipped_paths": skipped,
                          "bandwidth": bandwidth, "cells_path": str(out_path), "cells": shown},
        "timing": {"wall_s": time.perf_counter() - started},
        "method_info": method.describe(),
        "dtype": str(model.dtype).replace("torch.", ""),
    }

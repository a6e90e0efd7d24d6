"""mode=bench: time to first token (TTFT), time to next token (TTNT) and K,V-cache bytes of a method, against MHA
baselines measured in the same run, and against the roofline of the GPU it runs on.

Paths (`bench.paths`), each one cell record per (batch, seq_len):
- `eager`, `sdpa`: the baseline (`bench.baseline_method`, MHA) with the model's eager / SDPA attention and its
  dynamic cache: the paper-style baseline and the stock one.
- `static_compiled`: the baseline with a static cache and the decode step compiled (inductor, reduce-overhead: fused
  norms and rotary, replayed as a CUDA graph; `bench.static_step=cudagraph` captures the eager step instead): the
  fastest MHA decode this stack allows (H100, LLaMA-7B, 8 x 2048: 9.0 ms compiled, 11.5 ms as an eager graph).
- `method`: the method under test with its own attention and cache (comparable to `sdpa`).
- `method_static`: the method's static cache with the same captured step (comparable to `static_compiled`), when the
  method has one (`has_static_cache()`).
- `recompute`: the baseline with no cache at all, every step re-running the whole sequence (chai.bench's
  `RecomputeStep`): the reference some papers' speedups are against (AnLLM's), recorded and compared apart from
  the baseline paths (bench_cells.py), never the headline.
The prompt is random token ids or real text (`bench.prompt`, bench_prompt.py): a method that keeps tokens by what
they are (separators, sentence ends) evicts as on real text only on text.
Each cell is a result of its own on the record path every mode uses (chai/runners/record.py): a cell already
recorded with the same settings is reused (resume), a cell that fails or runs out of memory is a record with `error`
(and `oom`) and the grid goes on. The parts: the decode loop (chai/bench.py), one cell's measurement
(bench_measure.py), its record (bench_cells.py); K,V bytes held and read per step come from the method's `kv_bytes`
and `kv_bytes_read` (chai/roofline.py).
"""

import time
from pathlib import Path

from omegaconf import OmegaConf

from chai import bench
from chai.errors import ChaiError, did_you_mean
from chai.methods import build_method
from chai.records import append_jsonl, run_key
from chai.roofline import copy_bandwidth, matmul_rate, matrix_params, weight_bytes_per_step, weight_read_bandwidth
from chai.runners.bench_cells import (BASELINE_PATHS, COMPARABLE, METHOD_PATHS, RECOMPUTE, annotate, cell_config,
                                      cell_line, cell_record, cell_summary, finished_cells)
from chai.runners.bench_measure import BenchPath, measure_safely
from chai.runners.bench_prompt import PROMPTS, Prompts
from chai.runners.record import method_facts, start
from chai.runners.setup import setup

STEPS = ("auto", "cudagraph", "compile", "eager")
PATHS = (*BASELINE_PATHS, RECOMPUTE, *METHOD_PATHS)


def check(bcfg) -> None:
    """Bad bench settings fail before any model loads."""
    for name in bcfg.paths:
        if name not in PATHS:
            raise did_you_mean("bench path", name, PATHS)
    if bcfg.static_step not in STEPS:
        raise did_you_mean("bench.static_step", bcfg.static_step, STEPS)
    if bcfg.prompt not in PROMPTS:
        raise did_you_mean("bench.prompt", bcfg.prompt, PROMPTS)
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
        paths.append(BenchPath(name, runner, method_cfg if mine else baseline_cfg, attn, static, name == RECOMPUTE))
    return paths, skipped


def recorded_baselines(cfg, method, baseline, default_attn: str, paths: list[BenchPath]) -> list[BenchPath]:
    """The baseline paths this run leaves out: their cells, when recorded earlier (same settings, same GPU), join
    the comparison as if they had been asked for and reused, so a run of a method's paths alone is still compared."""
    asked = {path.name for path in paths}
    every, _ = plan(OmegaConf.merge(cfg, {"bench": {"paths": [*BASELINE_PATHS, RECOMPUTE]}}), method, baseline,
                    default_attn)
    return [path for path in every if path.name not in asked]


def tokenizer_name(model_cfg) -> str:
    """The model whose tokenizer the run uses: its own, or the one it borrows (`model.tokenizer`)."""
    name = model_cfg.get("tokenizer", "self")
    return model_cfg.name if name == "self" else name


def run(cfg, record: dict) -> dict:
    """Measure every (batch, seq_len, path) cell not yet recorded; write one record per cell, return the summary."""
    bcfg = cfg.bench
    check(bcfg)
    baseline = build_method({"name": bcfg.baseline_method})
    started = time.perf_counter()
    # A tokenizer only for a text prompt (Prompts says so in one line); the model is kept for a multirun's next job.
    ready = setup(cfg, need_tokenizer=False, keep_model=True)
    model, method = ready.model, ready.method
    prompts = Prompts(bcfg, model, ready.tokenizer, tokenizer_name(cfg.model), cfg.data_dir)
    baseline.prepare(model, ready.context)
    device, default_attn = model.device, model.config._attn_implementation
    paths, skipped = plan(cfg, method, baseline, default_attn)
    bandwidth = copy_bandwidth(device, bcfg.bandwidth_bytes)
    rates = {"bandwidth": bandwidth, "matmul": matmul_rate(device, model.dtype),
             "weight_read": weight_read_bandwidth(model, device)}
    weights, params = {}, {}
    for path in paths:
        with path.method.applied(model):  # e.g. pruned projections change the bytes a step reads
            weights[path.name], params[path.name] = weight_bytes_per_step(model), matrix_params(model)
    config, out_path = OmegaConf.to_container(cfg, resolve=True), Path(record["results_path"])
    done = finished_cells(out_path) if cfg.resume else {}
    recorded = recorded_baselines(cfg, method, baseline, default_attn, paths) if done else []
    step_kind = bench.static_step_kind(bcfg, device)
    counts, shown = {"measured": 0, "reused": 0, "errors": 0, "oom": 0}, []
    for batch in bcfg.batch_sizes:
        for seq_len in bcfg.seq_lens:
            ids, prompt = prompts.batch(batch, seq_len)
            group, fresh = {}, []
            cell_of = lambda path: cell_config(config, path, batch, seq_len, record["device"]["name"],  # noqa: E731
                                               step_kind)
            for path in paths:
                cell = cell_of(path)
                if run_key(cell) in done:
                    group[path.name] = done[run_key(cell)]
                    counts["reused"] += 1
                    continue
                rec = start(cell, record["overrides"], "bench", out_path)
                result = measure_safely(path, model, ids, bcfg, device, default_attn)
                result["prompt"] = {**prompt, **path.method.prompt_facts(ids)}  # e.g. the share of separators
                group[path.name] = cell_record(rec, path, model, result, batch, seq_len, bcfg, rates,
                                               weights[path.name], params[path.name], baseline)
                fresh.append(rec)
                counts.update(measured=counts["measured"] + 1, errors=counts["errors"] + bool(rec["error"]),
                              oom=counts["oom"] + bool(rec["oom"]))
            keys = {path.name: run_key(cell_of(path)) for path in recorded}
            compared = {**{name: done[key] for name, key in keys.items() if key in done}, **group}
            annotate(compared)  # against the baselines of this (batch, seq_len), reused and recorded ones included
            shown += [cell_summary(rec) for rec in group.values()]
            for rec in fresh:
                append_jsonl(out_path, rec)
                print(cell_line(rec), flush=True)
    return {
        "kind": "bench_run",
        "bench_summary": {**counts, "paths": [p.name for p in paths], "skipped_paths": skipped,
                          "bandwidth": bandwidth, "matmul": rates["matmul"], "weight_read": rates["weight_read"],
                          "cells_path": str(out_path), "cells": shown},
        "timing": {"wall_s": time.perf_counter() - started},
        **method_facts(method),
        "dtype": str(model.dtype).replace("torch.", ""),
    }

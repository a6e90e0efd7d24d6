"""mode=capacity: the throughput a smaller K,V cache buys. Per (seq_len, path) cell, the largest batch whose K,V
cache and workspace fit in the memory left after the model loads, and, at that batch, the decode tokens per second
and the end-to-end time to generate `new_tokens` tokens, against the roofline (issue 14, item 5).

Paths (`capacity.paths`) are the bench's static ones (chai/runners/bench.py `plan`): the baseline's
`static_compiled` (MHA, a static cache, the compiled step) and the method's `method_static`. Per cell:
1. the budget (`capacity_measure.memory_budget`), K,V bytes per sequence of seq_len + new_tokens tokens (the method's
   `kv_bytes`) and the workspace (probe runs on CUDA, or configured: `capacity_search` says how it is modelled) give
   the predicted largest batch;
2. the search (`capacity_search.search`) starts there and brackets the largest batch that fits: on CUDA each trial
   sets the real cell up (the cache for seq_len + new_tokens, a prefill) and decodes `capacity.trial_steps` steps;
   out of memory means too large (`fits_by=device`); on the CPU the analytic need against `capacity.memory_bytes`
   decides (`fits_by=budget`);
3. at the largest batch the cell is measured with the bench's static step (`bench.static_step`) and all new_tokens
   steps. Trials decode with `capacity.search_step`, eager by default: the compiled step cannot share a compilation
   between trials (`bench.make_step` resets dynamo and compiles a step closed over each trial's cache, with static
   shapes), and one compilation of the 7B step is ~29 s on an H200. The compiled step needs more memory than the
   eager one (its CUDA-graph pool, outside the main pool): if it runs out, the batch steps down by the search's
   tolerance, doubled at each further miss. The record keeps the searched and the measured batch apart.
One record per cell (chai/runners/record.py), resumed by its run key like a bench cell.
"""

import time
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from chai import bench
from chai.errors import ChaiError, did_you_mean
from chai.methods import build_method
from chai.models import resolve_device
from chai.records import append_jsonl, run_key
from chai.roofline import copy_bandwidth, weight_bytes_per_step
from chai.runners.bench import STEPS, plan
from chai.runners.bench_prompt import random_ids
from chai.runners.capacity_cells import cell_config, cell_line, cell_record, cell_summary, finished_cells
from chai.runners.capacity_measure import (BudgetJudge, CellFailed, DeviceJudge, measure_released,
                                           memory_budget, oom_message, readable, trial_runner)
from chai.runners.capacity_search import (Logged, Trial, Workspace, fit_workspace, predict, resolved, search,
                                          tolerance)
from chai.runners.record import method_facts, start
from chai.runners.setup import setup

PATHS = ("static_compiled", "method_static")
FITS_BY = ("auto", "device", "budget")
SEARCH_STEPS = ("eager", "same")
FINAL_TRIES = 4  # measurements at the largest batch, each a (doubling) step down after the one before did not fit


def check(cfg) -> None:
    """Bad capacity settings fail before any model loads."""
    c = cfg.capacity
    for name in c.paths:
        if name not in PATHS:
            raise did_you_mean("capacity path", name, PATHS)
    for key, choices in (("fits_by", FITS_BY), ("search_step", SEARCH_STEPS)):
        if c[key] not in choices:
            raise did_you_mean(f"capacity.{key}", c[key], choices)
    if cfg.bench.static_step not in STEPS:
        raise did_you_mean("bench.static_step", cfg.bench.static_step, STEPS)
    for key in ("new_tokens", "repeats", "max_trials", "max_batch", "trial_steps"):
        if not isinstance(c[key], int) or c[key] < 1:
            raise ChaiError(f"capacity.{key} must be an integer >= 1, got {c[key]!r}.")
    if c.trial_steps > c.new_tokens:  # the cache has room for new_tokens steps after the prompt
        raise ChaiError(f"capacity.trial_steps must be <= capacity.new_tokens ({c.new_tokens}), got {c.trial_steps}.")
    for key in ("seq_lens", "probe_batches"):
        if not c[key] or any(not isinstance(v, int) or v < 1 for v in c[key]):
            raise ChaiError(f"capacity.{key} must be a non-empty list of positive integers, got {c[key]!r}.")
    if not isinstance(c.warmup, int) or c.warmup < 0:
        raise ChaiError(f"capacity.warmup must be an integer >= 0, got {c.warmup!r}.")
    if not 0 <= c.resolution < 0.5:
        raise ChaiError(f"capacity.resolution must be in [0, 0.5) (a share of the batch), got {c.resolution!r}.")
    for key in ("memory_bytes", "reserve_bytes", "workspace_bytes", "workspace_per_seq_bytes"):
        if c[key] is not None and (not isinstance(c[key], int) or c[key] < 0):
            raise ChaiError(f"capacity.{key} must be a number of bytes >= 0 or null, got {c[key]!r}.")
    if (c.workspace_bytes is None) != (c.workspace_per_seq_bytes is None):
        raise ChaiError("set both capacity.workspace_bytes and capacity.workspace_per_seq_bytes, or neither "
                        "(measured).")
    if resolve_device(cfg.device).type != "cuda":
        if c.memory_bytes is None:
            raise ChaiError("capacity.memory_bytes is required on the CPU (no device memory to measure): set the "
                            "bytes the K,V cache and workspace may take, e.g. capacity.memory_bytes=1000000.")
        if c.fits_by == "device":
            raise ChaiError("capacity.fits_by=device needs a CUDA device (the CPU cannot run out of a budget); "
                            "use auto or budget.")


@dataclass
class Setting:
    """What every cell of a run shares."""

    cfg: object
    model: object
    baseline: object
    default_attn: str
    budget: dict
    bandwidth: dict
    fits_by: str
    trial: object  # bench settings of a trial (the search step; its new_tokens size the cache)
    final: object  # bench settings of the measurement at the largest batch


def bench_settings(cfg, step: str, warmup: int, repeats: int):
    return OmegaConf.merge(cfg.bench, {"new_tokens": int(cfg.capacity.new_tokens), "warmup": warmup,
                                       "repeats": repeats, "static_step": step})


def run(cfg, record: dict) -> dict:
    """Find and measure every (seq_len, path) cell not yet recorded; one record per cell; return the summary."""
    c = cfg.capacity
    check(cfg)
    baseline = build_method({"name": cfg.bench.baseline_method})
    started = time.perf_counter()
    ready = setup(cfg, need_tokenizer=False, keep_model=True)  # random token ids: no tokenizer
    model, method = ready.model, ready.method
    baseline.prepare(model, ready.context)
    device, default_attn = model.device, model.config._attn_implementation
    paths, skipped = plan(OmegaConf.merge(cfg, {"bench": {"paths": list(c.paths)}}), method, baseline, default_attn)
    bandwidth = copy_bandwidth(device, cfg.bench.bandwidth_bytes)
    fits_by = c.fits_by if c.fits_by != "auto" else ("device" if device.type == "cuda" else "budget")
    step = cfg.bench.static_step if c.search_step == "same" else "eager"
    s = Setting(cfg, model, baseline, default_attn, memory_budget(device, c.memory_bytes), bandwidth, fits_by,
                bench_settings(cfg, step, 0, 1), bench_settings(cfg, cfg.bench.static_step, c.warmup, c.repeats))
    config, out_path = OmegaConf.to_container(cfg, resolve=True), Path(record["results_path"])
    done = finished_cells(out_path) if cfg.resume else {}
    counts, shown = {"measured": 0, "reused": 0, "errors": 0}, []
    for seq_len in c.seq_lens:
        for path in paths:
            cell = cell_config(config, path, seq_len, record["device"]["name"], bench.static_step_kind(s.final, device))
            if run_key(cell) in done:
                shown.append(cell_summary(done[run_key(cell)]))
                counts["reused"] += 1
                continue
            rec = start(cell, record["overrides"], "capacity", out_path)
            with path.method.applied(model):  # e.g. pruned projections change the bytes a step reads
                rates = {"bandwidth": bandwidth, "bandwidth_GBps": bandwidth["bandwidth_GBps"],
                         "weights": weight_bytes_per_step(model)}
            rec = cell_record(rec, path, model, find(path, seq_len, s), seq_len, c, rates, baseline)
            append_jsonl(out_path, rec)
            print(cell_line(rec), flush=True)
            shown.append(cell_summary(rec))
            counts.update(measured=counts["measured"] + 1, errors=counts["errors"] + bool(rec["error"]))
    return {"kind": "capacity_run",
            "capacity_summary": {**counts, "paths": [p.name for p in paths], "skipped_paths": skipped,
                                 "fits_by": fits_by, "budget": s.budget, "bandwidth": bandwidth,
                                 "cells_path": str(out_path), "cells": shown},
            "timing": {"wall_s": time.perf_counter() - started}, **method_facts(method),
            "dtype": str(model.dtype).replace("torch.", "")}


def find(path, seq_len: int, s: Setting) -> dict:
    """One cell: prediction, search, measurement at the largest batch that fits ({"error"} when a run failed for
    another reason than memory)."""
    c, model = s.cfg.capacity, s.model
    tokens, dtype_bytes = seq_len + int(c.new_tokens), model.dtype.itemsize
    kv = lambda batch: sum(path.method.kv_bytes(model.config, batch, tokens, dtype_bytes).values())  # noqa: E731
    prompts = lambda batch: random_ids(model, batch, seq_len, int(s.cfg.bench.input_seed))  # noqa: E731
    limit = s.budget["budget_bytes"] if c.memory_bytes is not None else None  # a budget below the device's
    runner = trial_runner(path, model, prompts, s.trial, model.device, s.default_attn, int(c.trial_steps))
    found = {"fits_by": s.fits_by, "budget": s.budget, "trials": [], "final": None, "lo": 0, "hi": None}
    try:
        probes = Logged(DeviceJudge(runner, limit, "workspace probe"), found["trials"])
        workspace = measure_workspace(c, model.device, probes)
        found["prediction"] = predict(s.budget["budget_bytes"], int(c.reserve_bytes), kv(1), workspace,
                                      int(c.max_batch))
        judge = DeviceJudge(runner, limit) if s.fits_by == "device" else BudgetJudge(
            lambda batch: kv(batch) + workspace.at(batch) + int(c.reserve_bytes), s.budget["budget_bytes"])
        lo, hi, _ = search(Logged(judge, found["trials"]), max(1, found["prediction"]["max_batch"]),
                           int(c.max_batch), c.resolution, max(1, int(c.max_trials) - len(found["trials"])),
                           known=list(found["trials"]))
        found["searched"] = lo
        measure_largest(path, lo, hi, prompts, limit, s, found)
    except CellFailed as failed:
        found.update(error=failed.result["error"], traceback=failed.result.get("traceback"))
    found.setdefault("prediction", predict(s.budget["budget_bytes"], int(c.reserve_bytes), kv(1),
                                           Workspace(0, 0, "not measured: the cell failed"), int(c.max_batch)))
    found["batch"] = found["lo"] if found["final"] and not found["final"]["error"] else 0
    found["resolved"] = resolved(found["lo"], found["hi"], int(c.max_batch), c.resolution)
    return found


def measure_workspace(c, device, probe) -> Workspace:
    """The workspace model of a cell: configured numbers; none on the CPU (no allocator: 0 unless configured); else
    `probe(batch)` runs at `probe_batches`, each one's allocator peak (its reserved peak when larger: memory the
    allocator holds but cannot hand out counts against the budget too) minus the K,V its cache held."""
    if c.workspace_bytes is not None:
        return Workspace(int(c.workspace_bytes), int(c.workspace_per_seq_bytes), "configured")
    if device.type != "cuda":
        return Workspace(0, 0, "none: the CPU has no allocator to measure it (capacity.workspace_bytes sets it)")
    probes = [probe(batch) for batch in c.probe_batches]
    points = [(t.batch, max(t.peak_bytes, t.reserved_bytes or 0) - t.kv_bytes) for t in probes
              if t.peak_bytes is not None and t.kv_bytes]
    return fit_workspace(points) if points else Workspace(0, 0, "none: no probe batch ran")


def measure_largest(path, lo: int, hi: int | None, prompts, limit: int | None, s: Setting, found: dict) -> None:
    """Measure the cell at `lo` with the bench's static step; out of memory there (a compiled step holds more than
    the eager search step did) counts as not fitting: step down by the search's tolerance, doubled at each further
    miss (each miss costs a compilation, ~30 s for the 7B step), at most FINAL_TRIES times. Sets found["lo"], ["hi"],
    ["final"]; raises CellFailed on another failure."""
    c, step = s.cfg.capacity, bench.static_step_kind(s.final, s.model.device)
    down = tolerance(lo, c.resolution)
    for _ in range(FINAL_TRIES):
        if lo < 1:  # nothing fits
            break
        started = time.perf_counter()
        result = measure_released(path, s.model, prompts(lo), s.final, s.model.device, s.default_attn)
        peak = (result.get("kv_measured") or {}).get("allocator_peak")
        over = limit is not None and peak is not None and peak > limit
        if result["error"] and not result["oom"]:
            raise CellFailed(result)
        if not result["oom"] and not over:
            found["final"] = result
            break
        why = oom_message(result["error"]) if result["oom"] else (f"allocator peak {readable(peak)} > budget "
                                                                   f"{readable(limit)}")
        found["trials"].append(Trial(lo, False, f"measurement at the largest batch ({step} step): {why}",
                                     seconds=time.perf_counter() - started))
        hi, lo, down = lo, lo - down, 2 * down
    else:
        found["error"] = (f"no measurement at the largest batch: the {step} step did not fit at any of the "
                          f"{FINAL_TRIES} batches tried, down to {hi}")
    found.update(lo=max(lo, 0), hi=hi)

"""A capacity cell's record: the settings that key it (resume), the search (prediction, trials, the largest batch that
fits) and the measurement at that batch against the roofline, and the one line printed as it is measured."""

import copy

from chai.records import records_by_key, succeeded
from chai.roofline import kv_cache_bytes, percentiles, step_roofline
from chai.runners.bench_cells import allocator_env, ratio
from chai.runners.record import method_facts

GRID_KEYS = ("seq_lens", "paths")  # not part of a cell's identity: a cell resumes across grids
# The bench settings a capacity cell runs with (its own group holds new_tokens, warmup, repeats; the static step is
# keyed as resolved).
BENCH_KEYS = ("baseline_method", "compile_mode", "compile_backend", "input_seed")


def finished_cells(path) -> dict[str, dict]:
    """{key: record} of the capacity cells `path` holds that a run reuses: every one without an error (a cell where
    no batch fits is a result, not a failure)."""
    return records_by_key(path, lambda r: r.get("kind") == "capacity_cell" and succeeded(r))


def cell_config(config: dict, path, seq_len: int, device_name: str, step: str) -> dict:
    """The settings that define one cell (its run key): the run's config with the path's method, the capacity
    settings without the grid lists, the bench settings it uses with the static step as resolved, the device and
    the allocator's settings, and the method's kernel launch settings if it reports any (the groups it never reads:
    chai.records.OTHER_MODES)."""
    cell = {k: copy.deepcopy(v) for k, v in config.items() if k != "resume"}
    cell["method"] = path.method_cfg
    cell["bench"] = {k: v for k, v in cell["bench"].items() if k in BENCH_KEYS}
    cell["bench"]["static_step"] = step
    cell["capacity"] = {k: v for k, v in cell["capacity"].items() if k not in GRID_KEYS}
    cell["capacity"]["cell"] = {"seq_len": seq_len, "path": path.name, "device": device_name,
                                "allocator_env": allocator_env()}
    kernel = path.method.run_stats().decode_kernel
    if kernel:
        cell["bench"]["decode_kernel"] = kernel
    return cell


def throughput(method, model, found: dict, seq_len: int, n: int, rates: dict, baseline) -> dict:
    """Decode tokens per second at the largest batch (batch x 1000 / median TTNT), the roofline's tokens per
    second at that batch and at the predicted one (bytes per step at the measured copy bandwidth)."""
    batch, result = found["batch"], found["final"] or {}
    median = (result.get("ttnt_ms") or {}).get("median")
    out = {"tokens_per_s": ratio(batch * 1e3, median) if batch else None}
    for name, at in (("roofline", batch), ("roofline_at_predicted", found["prediction"]["max_batch"])):
        if not at:
            out[name] = None
            continue
        step = step_roofline(method, model, rates["bandwidth_GBps"], rates["weights"], at, seq_len, n, baseline)
        roof = {**step["roofline"], "batch": at, "tokens_per_s": at * 1e3 / step["roofline"]["time_ms"],
                "predicted_speedup_vs_mha": step["roofline_predicted_speedup_vs_mha"]}
        out[name] = roof
    if out["roofline"]:
        out["roofline"]["fraction_of_roofline"] = ratio(out["tokens_per_s"], out["roofline"]["tokens_per_s"])
    return out


def cell_record(rec: dict, path, model, found: dict, seq_len: int, ccfg, rates: dict, baseline) -> dict:
    """Fill a capacity cell record from the search (`found`: prediction, trials, batch, final measurement)."""
    n, batch, result = int(ccfg.new_tokens), found["batch"], dict(found["final"] or {})
    measured = result.pop("kv_measured", None)
    trace = result.pop("traceback", None)
    empty = percentiles([])
    cap = {"seq_len": seq_len, "new_tokens": n, "cache_tokens": seq_len + n, "path": path.name,
           "dtype": str(model.dtype).replace("torch.", ""), "fits_by": found["fits_by"],
           "search_step": ccfg.search_step, "trial_steps": int(ccfg.trial_steps), "allocator_env": allocator_env(),
           "budget": found["budget"], "bandwidth": rates["bandwidth"], "prediction": found["prediction"],
           "predicted_max_batch": found["prediction"]["max_batch"],
           # the search's largest (search_step) and the largest measured with the bench's static step
           "searched_max_batch": found.get("searched"), "measured_max_batch": batch,
           "bracket": [found["lo"], found["hi"]], "resolved": found["resolved"],
           "capped": found["hi"] is None and batch == int(ccfg.max_batch),
           "trials": [t.as_record() for t in found["trials"]], "n_trials": len(found["trials"]),
           "ttft_ms": empty, "ttnt_ms": empty, "e2e_ms": empty, **result,
           "kv_bytes": kv_cache_bytes(path.method, model, batch, seq_len + n, measured) if batch else None,
           **throughput(path.method, model, found, seq_len, n, rates, baseline)}
    cap["e2e_s"] = None if cap["e2e_ms"]["median"] is None else cap["e2e_ms"]["median"] / 1e3
    error = found.get("error") or result.get("error")
    rec.update(kind="capacity_cell", capacity=cap, oom=False, error=error, **method_facts(path.method))
    if trace or found.get("traceback"):
        rec["traceback"] = trace or found["traceback"]
    return rec


def cell_line(rec: dict) -> str:
    c = rec["capacity"]
    head = (f"{rec['method']:>14} {c['path']:<15} S={c['seq_len']:<5} predicted B={c['predicted_max_batch']:<4} "
            f"searched B={c.get('searched_max_batch')} measured B={c['measured_max_batch']:<4} "
            f"({c['n_trials']} trials)")
    if rec["error"]:
        return f"{head} FAILED: {rec['error'][:120]}"
    if not c["measured_max_batch"]:
        return f"{head} no batch fits"
    roof = c["roofline"]
    return (f"{head} {c['tokens_per_s']:9.1f} tok/s  {roof['fraction_of_roofline']:5.2f} of roofline "
            f"({roof['tokens_per_s']:.1f})  {c['new_tokens']} tokens in {c['e2e_s']:.2f} s")


def cell_summary(rec: dict) -> dict:
    """What the run's summary shows of a cell (the cell's own record holds the rest)."""
    c = rec["capacity"]
    return {"path": c["path"], "seq_len": c["seq_len"], "predicted": c["predicted_max_batch"],
            "measured": c["measured_max_batch"], "tokens_per_s": c.get("tokens_per_s"),
            "e2e_s": c.get("e2e_s"), "error": rec["error"]}

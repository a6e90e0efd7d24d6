"""The device side of mode=capacity: the memory budget, whether a batch fits (run the cell, or compare the analytic
need with the budget: the same search calls either), and the measurement at the largest batch that fits.

A trial (`trial_measure`, under `bench_measure.measure_safely`: an out-of-memory error is caught there and means too
large) sets the bench's cell up (static cache allocated at seq_len + new_tokens, a prefill, the step) and decodes
`capacity.trial_steps` steps, not new_tokens: the cache is allocated whole at the start, so later steps hold nothing
new, and 256 eager steps were ~7 s of each ~20 s trial on an H200. The final measurement is the bench's cell
(`bench_measure.measure`) with its static step, warm-up, repeats and all new_tokens steps; its end-to-end time is
`measure`'s `e2e_ms` (each round's TTFT plus the sum of its decode steps, device events of the same round).
"""

import time
from functools import partial

import torch

from chai import bench
from chai.roofline import Allocator, Clock, cuda_devices, percentiles
from chai.runners.bench_measure import Decoder, free_memory, measure_safely
from chai.runners.capacity_search import Trial

ADVICE = " If reserved but unallocated memory is large"  # where PyTorch's OOM message turns from numbers to advice


class CellFailed(Exception):
    """A trial that failed for another reason than memory: the cell is recorded with its error."""

    def __init__(self, result: dict):
        super().__init__(result["error"])
        self.result = result


def readable(nbytes: int | None) -> str:
    """Bytes as a person reads them: 4 significant digits in GB, MB, kB or B."""
    if nbytes is None:
        return "?"
    unit, scale = next(((u, s) for u, s in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)) if abs(nbytes) >= s), ("B", 1))
    return f"{nbytes / scale:.4g} {unit}"


def memory_budget(device: torch.device, configured: int | None) -> dict:
    """Bytes the K,V cache and the workspace may take: `capacity.memory_bytes` when set, else (CUDA) the device
    memory free now, after the model loaded: what the driver reports free plus what the caching allocator holds
    unused, summed over the visible GPUs."""
    found = {"weights_allocated_bytes": None, "device_total_bytes": None}
    if device.type == "cuda":
        free_memory(device, collect=True)
        found["weights_allocated_bytes"] = sum(torch.cuda.memory_allocated(i) for i in cuda_devices(device))
        found["device_total_bytes"] = sum(torch.cuda.mem_get_info(i)[1] for i in cuda_devices(device))
    if configured is not None:
        return {"budget_bytes": int(configured), "source": "capacity.memory_bytes", **found}
    free = sum(torch.cuda.mem_get_info(i)[0] + torch.cuda.memory_reserved(i) - torch.cuda.memory_allocated(i)
               for i in cuda_devices(device))
    return {"budget_bytes": int(free), "source": "free device memory after the model loaded", **found}


class BudgetJudge:
    """fits(batch): the analytic need (`need(batch)`: K,V + workspace + reserve) against the budget; runs nothing.
    The CPU has no allocator to run out of, so there the budget decides."""

    def __init__(self, need, budget: int):
        self.need, self.budget = need, budget

    def __call__(self, batch: int) -> Trial:
        need = self.need(batch)
        fits = need <= self.budget
        sign = "<=" if fits else ">"
        return Trial(batch, fits, f"analytic need {readable(need)} {sign} budget {readable(self.budget)}")


class DeviceJudge:
    """fits(batch): run the cell at `batch` (`run(batch)` -> a `measure_safely` result). Out of memory: too large;
    an allocator peak above `limit` (a configured budget below the device's): too large; another failure raises
    CellFailed."""

    def __init__(self, run, limit: int | None, label: str = "trial"):
        self.run, self.limit, self.label = run, limit, label

    def __call__(self, batch: int) -> Trial:
        started = time.perf_counter()
        result = self.run(batch)
        seconds = time.perf_counter() - started
        if result["error"] and not result["oom"]:
            raise CellFailed(result)
        if result["oom"]:
            return Trial(batch, False, f"{self.label}: {oom_message(result['error'])}", seconds=seconds)
        held = result["kv_measured"]
        peak, kv, reserved = held["allocator_peak"], held["measured_cache"], held.get("reserved_peak")
        over = self.limit is not None and peak is not None and peak > self.limit
        why = f"ran, allocator peak {readable(peak)}"
        if reserved is not None:
            why += f" (reserved {readable(reserved)})"
        if self.limit is not None:
            why += f" {'>' if over else '<='} budget {readable(self.limit)}"
        return Trial(batch, not over, f"{self.label}: {why}", peak, kv, seconds, reserved)


def oom_message(error: str) -> str:
    """An out-of-memory result's message with all its numbers (requested, free, allocated, held in private pools,
    reserved but unallocated: they say whether fragmentation decided), without PyTorch's advice after them."""
    return f"out of memory ({error.split(ADVICE)[0].strip()})"


def trial_measure(path, model, ids: torch.Tensor, bcfg, device: torch.device, steps: int) -> dict:
    """The memory of the bench cell at ids.shape[0] sequences, in `steps` decode steps: `bench_measure.Decoder` sets
    the cell up as the bench does (the static cache for seq_len + bcfg.new_tokens tokens, a prefill, the step), then,
    for a step that holds memory of its own between calls (a compiled step's graph pool, a captured graph), the
    round's prefill beside it; an eager step holds none, so that prefill would repeat the setup's (~5 s at 80 x 2048
    tokens on an H200) for nothing. Then `steps` steps (the step's own buffers). Same result keys as
    `bench_measure.measure` that the search reads, plus the reserved peak."""
    clock, alloc = Clock(device), Allocator(device)
    alloc.start()  # resets the peak statistics, the reserved one too
    base = reserved(device, torch.cuda.memory_reserved)
    decoder = Decoder(path, model, ids, bcfg, device, alloc)
    token = ids[:, -1:]  # any token: only the memory counts
    if decoder.kind != "eager":
        token = decoder.prompt(clock)[0]
    ms = bench.decode_n_tokens(decoder.step, token, torch.full_like(token, ids.shape[1]), steps, clock)
    peak = reserved(device, torch.cuda.max_memory_reserved)
    return {"step": decoder.kind, "cache_tokens": decoder.max_len, "decode_steps": steps, "ttnt_ms": percentiles(ms),
            "kv_measured": {"measured_cache": decoder.held["k"] + decoder.held["v"], "allocator_peak": alloc.peak(),
                            "reserved_peak": None if peak is None else peak - base}}


def reserved(device: torch.device, reading) -> int | None:
    """`reading` (a torch.cuda reserved-memory statistic) summed over the visible GPUs; None on the CPU."""
    return sum(reading(i) for i in cuda_devices(device)) if device.type == "cuda" else None


def trial_runner(path, model, prompts, bcfg, device, default_attn: str, steps: int):
    """run(batch) for a DeviceJudge: `trial_measure` at `batch` (prompts(batch) -> ids [batch, seq_len]) with
    `steps` decode steps, and all its memory back afterwards (the next trial may need every byte)."""

    def run(batch: int) -> dict:
        trial = partial(trial_measure, steps=steps)
        return measure_released(path, model, prompts(batch), bcfg, device, default_attn, trial)

    return run


def measure_released(path, model, ids: torch.Tensor, bcfg, device: torch.device, default_attn: str,
                     measure_fn=None) -> dict:
    """The bench cell at ids.shape[0] sequences (`bench_measure.measure`, or `measure_fn`, under `measure_safely`'s
    guards: a failure, OOM included, becomes the result), then everything it held released: the next run may need
    every byte."""
    result = measure_safely(path, model, ids, bcfg, device, default_attn, measure_fn)
    release(device)
    return result


def release(device: torch.device) -> None:
    """Everything a measurement held, back before the next (CUDA): a compiled step's graph pool lives as long as
    dynamo's cache, which only the next compilation would reset, and a traceback's cycles may hold tensors (a full gc
    pass, ~0.5-1 s, is nothing beside a trial on a GPU; on the CPU nothing waits for the memory)."""
    torch._dynamo.reset()
    free_memory(device, collect=device.type == "cuda")

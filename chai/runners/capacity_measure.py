"""The device side of mode=capacity: the memory budget, whether a batch fits (run the cell, or compare the analytic
need with the budget: the same search calls either), and the measurement at the largest batch that fits.

A trial runs the bench's real cell through `bench_measure.measure_safely` (static cache allocated at seq_len +
new_tokens, a prefill, new_tokens decode steps; an out-of-memory error is caught there and means too large). The
final measurement is the same cell with the bench's static step and its warm-up and repeats; its end-to-end time is
`measure`'s `e2e_ms` (each round's TTFT plus the sum of its decode steps, device events of the same round).
"""

import time

import torch

from chai.roofline import cuda_devices
from chai.runners.bench_measure import free_memory, measure_safely
from chai.runners.capacity_search import Trial


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
            return Trial(batch, False, f"{self.label}: out of memory ({result['error'][:160]})", seconds=seconds)
        held = result["kv_measured"]
        peak, kv = held["allocator_peak"], held["measured_cache"]
        over = self.limit is not None and peak is not None and peak > self.limit
        why = f"ran, allocator peak {readable(peak)}"
        if self.limit is not None:
            why += f" {'>' if over else '<='} budget {readable(self.limit)}"
        return Trial(batch, not over, f"{self.label}: {why}", peak, kv, seconds)


def trial_runner(path, model, prompts, bcfg, device, default_attn: str):
    """run(batch) for a DeviceJudge: the bench cell at `batch` (prompts(batch) -> ids [batch, seq_len]), and all its
    memory back afterwards (the next trial may need every byte)."""

    def run(batch: int) -> dict:
        return measure_released(path, model, prompts(batch), bcfg, device, default_attn)

    return run


def measure_released(path, model, ids: torch.Tensor, bcfg, device: torch.device, default_attn: str) -> dict:
    """The bench cell at ids.shape[0] sequences (`bench_measure.measure` under `measure_safely`'s guards: a
    failure, OOM included, becomes the result), then everything it held released: the next run may need every byte."""
    result = measure_safely(path, model, ids, bcfg, device, default_attn)
    release(device)
    return result


def release(device: torch.device) -> None:
    """Everything a measurement held, back before the next (CUDA): a compiled step's graph pool lives as long as
    dynamo's cache, which only the next compilation would reset, and a traceback's cycles may hold tensors (a full gc
    pass, ~0.5-1 s, is nothing beside a trial on a GPU; on the CPU nothing waits for the memory)."""
    torch._dynamo.reset()
    free_memory(device, collect=device.type == "cuda")

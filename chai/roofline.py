"""What the hardware allows for one decode step, and how to time a region on the device honestly.

A decode step of a memory-bound LLM reads every weight once and every K and V it attends to once, so its best
possible time is (weight bytes + K,V bytes read) / copy bandwidth. The bandwidth is measured in the same run (one
large device-to-device copy: bytes read + bytes written over the time), never taken from a datasheet.

Timing: CUDA events on the GPU, synchronised before and after every timed region; `perf_counter` on the CPU.
Allocator statistics come from the CUDA caching allocator and are None on the CPU.
"""

import statistics
import time
from contextlib import contextmanager

import torch

from chai.attention import AttnShape


def percentiles(samples_ms: list[float]) -> dict:
    """{"median", "p10", "p90", "n"} of a list of times in ms (None when empty)."""
    if not samples_ms:
        return {"median": None, "p10": None, "p90": None, "n": 0}
    ordered = sorted(samples_ms)

    def at(q: float) -> float:  # linear interpolation, as numpy.percentile does
        pos = q * (len(ordered) - 1)
        low = int(pos)
        high = min(low + 1, len(ordered) - 1)
        return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)

    return {"median": statistics.median(ordered), "p10": at(0.1), "p90": at(0.9), "n": len(ordered)}


def cuda_devices(device: torch.device) -> range:
    """The GPUs a run may use: every visible one (a model spread by a device map runs on all of them)."""
    return range(torch.cuda.device_count()) if device.type == "cuda" else range(0)


def synchronize(device: torch.device) -> None:
    for index in cuda_devices(device):
        torch.cuda.synchronize(index)


class Clock:
    """Marks on the device timeline: `mark()` returns an opaque mark, `ms(a, b)` the time between two marks.

    On CUDA a mark is a recorded event (asynchronous: no host sync inside a timed loop), resolved after `sync()`;
    on the CPU it is `perf_counter`, after the work itself (CPU ops are synchronous).
    """

    def __init__(self, device: torch.device):
        self.device = device

    def mark(self):
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def sync(self) -> None:
        synchronize(self.device)

    def ms(self, start, end) -> float:
        if self.device.type == "cuda":
            return start.elapsed_time(end)
        return (end - start) * 1e3

    @contextmanager
    def region(self, out: list):
        """Time the body (synchronised on both sides) and append its ms to `out`."""
        self.sync()
        start = self.mark()
        yield
        end = self.mark()
        self.sync()
        out.append(self.ms(start, end))


def copy_bandwidth(device: torch.device, nbytes: int | None = None, repeats: int = 10) -> dict:
    """Device copy bandwidth in GB/s (1e9 bytes/s): median over `repeats` copies of an `nbytes` buffer, counting
    the bytes read plus the bytes written. 1 GiB on CUDA (far beyond L2), 64 MiB on the CPU."""
    nbytes = nbytes or (1 << 30 if device.type == "cuda" else 1 << 26)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    clock, times = Clock(device), []
    dst.copy_(src)  # warm-up: first touch of the pages / lazy CUDA init
    for _ in range(repeats):
        with clock.region(times):
            dst.copy_(src)
    median_ms = statistics.median(times)
    del src, dst
    return {"bandwidth_GBps": 2 * nbytes / (median_ms * 1e-3) / 1e9, "copy_bytes": nbytes, "copy_ms": median_ms}


def weight_bytes_per_step(model) -> int:
    """Bytes of parameters one decode step reads: every parameter once, except an input embedding that is not
    tied to the output head (a step gathers only B rows of it)."""
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == embedding.data_ptr()
    seen, total = set(), 0
    for param in model.parameters():
        if param.data_ptr() in seen or (param is embedding and not tied):
            continue
        seen.add(param.data_ptr())
        total += param.numel() * param.element_size()
    return total


def roofline(bandwidth_gbps: float, weight_bytes: int, kv_read: dict) -> dict:
    """The roofline of one decode step: bytes moved (weights + `kv_read`, the method's `kv_bytes_read` for the
    whole batch) and the time they take at the measured bandwidth."""
    kv = kv_read["k"] + kv_read["v"]
    moved = weight_bytes + kv
    return {
        "bandwidth_GBps": bandwidth_gbps,
        "weight_bytes": weight_bytes,
        "kv_bytes_read_per_step": kv,
        "bytes_per_step": moved,
        "kv_fraction_of_bytes": kv / moved,
        "time_ms": moved / (bandwidth_gbps * 1e9) * 1e3,
    }


class Allocator:
    """CUDA caching-allocator readings relative to a baseline taken at `start()`, summed over the visible GPUs (the
    peak: the sum of each GPU's own peak); every reading is None on the CPU, where there is no allocator to ask."""

    def __init__(self, device: torch.device):
        self.device, self.cuda = device, device.type == "cuda"
        self.base = 0

    def _sum(self, reading) -> int:
        synchronize(self.device)
        return sum(reading(index) for index in cuda_devices(self.device))

    def start(self) -> None:
        if self.cuda:
            for index in cuda_devices(self.device):
                torch.cuda.reset_peak_memory_stats(index)
            self.base = self._sum(torch.cuda.memory_allocated)

    def delta(self) -> int | None:
        return self._sum(torch.cuda.memory_allocated) - self.base if self.cuda else None

    def peak(self) -> int | None:
        return self._sum(torch.cuda.max_memory_allocated) - self.base if self.cuda else None


def kv_cache_bytes(method, model, batch: int, tokens: int, measured: dict | None) -> dict:
    """K,V bytes of the cache: analytic (the method's `kv_bytes` for batch x tokens), measured from the cache
    tensors and the allocator, and what the method saves against dense MHA."""
    dtype_bytes = model.dtype.itemsize
    expected = method.kv_bytes(model.config, batch, tokens, dtype_bytes)
    dense = AttnShape.of(model.config).dense_kv_bytes_per_token(dtype_bytes)
    analytic = expected["k"] + expected["v"]
    dense_total = batch * tokens * (dense["k"] + dense["v"])
    measured = measured or {"measured_cache": None, "allocator_delta": None, "allocator_peak": None}
    held = measured["measured_cache"]
    return {
        "tokens": tokens, "analytic": analytic, "analytic_k": expected["k"], "analytic_v": expected["v"], **measured,
        "dense_analytic": dense_total, "saved_analytic": dense_total - analytic,
        "saved_measured": None if held is None else dense_total - held,
    }


def step_roofline(method, model, bandwidth: float, weights: int, batch: int, seq_len: int, n: int, baseline) -> dict:
    """Roofline of a decode step of `method` (weights: its `weight_bytes_per_step`) at the mean context of `n`
    decode steps after a `seq_len` prompt, and the speedup over the `baseline` (MHA) roofline it predicts."""
    dtype_bytes = model.dtype.itemsize
    context = seq_len + (n + 1) / 2  # step i (0-based) attends to seq_len + i + 1 tokens
    mine = roofline(bandwidth, weights, method.kv_bytes_read(model.config, batch, context, dtype_bytes))
    mha = roofline(bandwidth, weight_bytes_per_step(model), baseline.kv_bytes_read(model.config, batch, context,
                                                                                   dtype_bytes))
    mine["context_tokens"] = context
    return {"roofline": mine, "roofline_predicted_speedup_vs_mha": mha["time_ms"] / mine["time_ms"]}

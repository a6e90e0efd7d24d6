"""What the hardware allows for one decode step, and how to time a region on the device honestly.

A decode step of a memory-bound LLM reads every weight once and every K and V it attends to once, so its best
possible time is (weight bytes + K,V bytes read) / copy bandwidth. The bandwidth is measured in the same run (one
large device-to-device copy: bytes read + bytes written over the time), never taken from a datasheet.

The same run measures the dense matrix-multiply rate, the ceiling of a prefill: its FLOP over that rate is a floor no
honest TTFT goes below.

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


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int | None = None, repeats: int = 10) -> dict:
    """Dense matrix-multiply rate in TFLOP/s (1e12 FLOP/s): median over `repeats` products of two n x n matrices in
    the model's dtype, 2 n^3 FLOP each. n = 8192 on CUDA (a shape cuBLAS runs near its peak), 512 on the CPU. The
    prefill's compute floor divides its FLOP by this rate."""
    n = n or (8192 if device.type == "cuda" else 512)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    clock, times = Clock(device), []
    a @ b  # warm-up: cuBLAS picks its kernel, the CPU pool starts
    for _ in range(repeats):
        with clock.region(times):
            a @ b
    median_ms = statistics.median(times)
    del a, b
    return {"tflops": 2 * n**3 / (median_ms * 1e-3) / 1e12, "matmul_n": n, "matmul_ms": median_ms,
            "dtype": str(dtype).replace("torch.", "")}


def weight_read_bandwidth(model, device: torch.device, batch: int = 1, repeats: int = 10) -> dict:
    """How fast the stack's matmuls read the model's weights, in GB/s: every linear layer (the LM head included)
    applied to a [batch, in] input, one after another, replayed as one CUDA graph on the GPU (no launch gaps), timed
    with events; weight bytes over the median time. A decode step dominated by weight reads cannot beat this rate
    with stock matmuls, so the roofline is reported at it as well as at the copy bandwidth."""
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = [torch.randn(batch, m.in_features, device=device, dtype=m.weight.dtype) for m in layers]
    nbytes = sum(m.weight.numel() * m.weight.element_size() for m in layers)

    def read_all():
        for layer, x in zip(layers, inputs):
            torch.nn.functional.linear(x, layer.weight)

    with torch.no_grad():
        run = read_all
        if device.type == "cuda":
            read_all()  # cuBLAS chooses its kernels before the capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                read_all()
            run = graph.replay
        run()
        clock, times = Clock(device), []
        for _ in range(repeats):
            with clock.region(times):
                run()
    median_ms = statistics.median(times)
    return {"weight_read_GBps": nbytes / (median_ms * 1e-3) / 1e9, "weight_read_bytes": nbytes,
            "weight_read_ms": median_ms, "linear_layers": len(layers), "batch": batch}


def matrix_params(model) -> dict:
    """Weights a prefill multiplies by, counted with the method applied (pruned projections count less): every
    matrix of the decoder ("linear"), and the LM head apart (only the last position goes through it)."""
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    skip = {embedding.data_ptr(), head.weight.data_ptr() if head is not None else None}
    seen, linear = set(), 0
    for param in model.parameters():
        if param.dim() < 2 or param.data_ptr() in skip or param.data_ptr() in seen:
            continue
        seen.add(param.data_ptr())
        linear += param.numel()
    return {"linear": linear, "lm_head": head.weight.numel() if head is not None else 0}


def prefill_flops(params: dict, shape: AttnShape, batch: int, seq_len: int) -> dict:
    """FLOP of one prefill of `batch` x `seq_len` tokens (multiply-add = 2): every decoder matrix (`matrix_params`)
    once per token, the largest part and a certain lower bound; causal attention as dense MHA computes it (QK^T and
    PV over the lower triangle, 2 x 2 x B x H x T^2 x D / 2 per layer); the LM head for the last position only
    (`bench.prefill` keeps one logit row)."""
    out = {"linear": 2 * params["linear"] * batch * seq_len,
           "attention": 2 * shape.layers * batch * shape.heads * seq_len**2 * shape.head_dim,
           "lm_head": 2 * batch * params["lm_head"]}
    out["total"] = sum(out.values())
    return out


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


def roofline(bandwidth_gbps: float, weight_bytes: int, kv_read: dict, weight_read_gbps: float | None = None) -> dict:
    """The roofline of one decode step: bytes moved (weights + `kv_read`, the method's `kv_bytes_read` for the
    whole batch) and the time they take at the measured copy bandwidth; with `weight_read_gbps` also the time when
    the weights are read at the rate the stack's matmuls reach (`weight_read_bandwidth`) and K,V at the copy rate."""
    kv = kv_read["k"] + kv_read["v"]
    moved = weight_bytes + kv
    out = {
        "bandwidth_GBps": bandwidth_gbps,
        "weight_bytes": weight_bytes,
        "kv_bytes_read_per_step": kv,
        "bytes_per_step": moved,
        "kv_fraction_of_bytes": kv / moved,
        "time_ms": moved / (bandwidth_gbps * 1e9) * 1e3,
    }
    if weight_read_gbps:
        out["weight_read_GBps"] = weight_read_gbps
        out["time_at_weight_read_ms"] = (weight_bytes / (weight_read_gbps * 1e9) + kv / (bandwidth_gbps * 1e9)) * 1e3
    return out


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
    tensors and the allocator, what the method saves against dense MHA, and the share of dense bytes it holds
    (`held_fraction`, measured: a method that evicts tokens keeps this share of them)."""
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
        "held_fraction": None if held is None or not dense_total else held / dense_total,
    }


def step_roofline(method, model, bandwidth: float, weights: int, batch: int, seq_len: int, n: int, baseline,
                  weight_read_gbps: float | None = None) -> dict:
    """Roofline of a decode step of `method` (weights: its `weight_bytes_per_step`) at the mean context of `n`
    decode steps after a `seq_len` prompt, and the speedup over the `baseline` (MHA) roofline it predicts;
    `weight_read_gbps`: see `roofline`."""
    dtype_bytes = model.dtype.itemsize
    context = seq_len + (n + 1) / 2  # step i (0-based) attends to seq_len + i + 1 tokens
    mine = roofline(bandwidth, weights, method.kv_bytes_read(model.config, batch, context, dtype_bytes),
                    weight_read_gbps)
    mha = roofline(bandwidth, weight_bytes_per_step(model), baseline.kv_bytes_read(model.config, batch, context,
                                                                                   dtype_bytes))
    mine["context_tokens"] = context
    return {"roofline": mine, "roofline_predicted_speedup_vs_mha": mha["time_ms"] / mine["time_ms"]}

"""One bench cell measured: a path's cache and decode step set up for one prompt batch, `warmup` untimed rounds and
`repeats` timed rounds (a prefill for TTFT, then `new_tokens` decode steps for TTNT), every timed region
synchronised; a failure, out of memory included, becomes the cell's result.

Method hooks used (chai/methods/base.py): `make_cache` / `static_cache` (a static cache is allocated once, written
in place, `reset()` empties it in place: K in `layer.keys`, V in `layer.values`, the measured bytes), and
`run_stats().clustering_s`, whose growth over a prefill is the time the method spent clustering inside it, measured
on its own (CHAI brackets each clustering with device events). TTFT is the whole prefill, clustering included;
nothing is subtracted from it. K,V bytes held are read off the cache tensors twice: after the first prefill and at
the end of the last round's decode (a cache that evicts holds different amounts then). A path without a cache
(`recompute`) holds none and decodes by `bench.RecomputeStep`.
"""

import gc
import time
from dataclasses import dataclass

import torch

from chai import bench
from chai.attention import kv_bytes
from chai.roofline import Allocator, Clock, percentiles
from chai.runners.record import failure

OOM = (torch.OutOfMemoryError,)


@dataclass
class BenchPath:
    name: str  # eager | sdpa | static_compiled | recompute | method | method_static
    method: object  # the Method instance that runs
    method_cfg: dict  # its config, as recorded
    attn: str  # the model's attention implementation for the path (a custom method overrides it when applied)
    static: bool
    recompute: bool = False  # no cache at all: every step re-runs the whole sequence

    def new_cache(self, model, batch: int, max_len: int):
        if self.recompute:
            return None
        if self.static:
            return self.method.static_cache(model, batch, max_len)
        return self.method.make_cache(model)


class Decoder:
    """A path set up for a prompt batch `ids` [B, S]: its cache (allocated, filled by a first prefill, K,V bytes
    read off it before any decode) and its decode step (captured or compiled here, once). `prompt` and `decode`
    then make one round on the emptied cache; the caller applies the method and disables gradients."""

    def __init__(self, path: BenchPath, model, ids: torch.Tensor, bcfg, device: torch.device, alloc: Allocator):
        self.path, self.model, self.ids = path, model, ids
        self.n, self.max_len = int(bcfg.new_tokens), ids.shape[1] + int(bcfg.new_tokens)
        self.kind = step_kind(path, bcfg, device)
        self.cache = path.new_cache(model, ids.shape[0], self.max_len)
        token = bench.prefill(model, ids, self.cache)
        self.held, self.allocated = held_bytes(self.cache), alloc.delta()  # K,V after the prompt, before any decode
        started = time.perf_counter()
        self.step = self._new_step(token, bcfg)
        self.setup_ms = (time.perf_counter() - started) * 1e3

    def _new_step(self, token, bcfg):
        if self.path.recompute:
            return bench.RecomputeStep(self.model, self.ids)
        return bench.make_step(self.kind, self.model, self.cache, token, torch.full_like(token, self.ids.shape[1]),
                               bcfg)

    def prompt(self, clock: Clock) -> tuple[torch.Tensor, float, float]:
        """Empty the cache, then prefill: (first token [B, 1], TTFT ms, of which clustering ms)."""
        if self.path.static:
            self.cache.reset()  # in place: a captured graph keeps pointing at the same tensors
        else:
            self.cache = self.path.new_cache(self.model, self.ids.shape[0], self.max_len)
        if self.path.recompute:
            self.step = bench.RecomputeStep(self.model, self.ids)  # the sequence starts again from the prompt
        self.step.cache = self.cache
        ttft, before = [], clustering_s(self.path.method)
        with clock.region(ttft):
            token = bench.prefill(self.model, self.ids, self.cache)
        return token, ttft[0], (clustering_s(self.path.method) - before) * 1e3

    def decode(self, token: torch.Tensor, clock: Clock) -> list[float]:
        """`new_tokens` decode steps after the prompt: ms per step."""
        position = torch.full_like(token, self.ids.shape[1])
        return bench.decode_n_tokens(self.step, token, position, self.n, clock)


def cache_tokens(path: BenchPath, prompt: int, max_len: int) -> int:
    """Token slots the path's cache has after the prompt: a static cache's full length, none without a cache."""
    return 0 if path.recompute else max_len if path.static else prompt


def step_kind(path: BenchPath, bcfg, device: torch.device) -> str:
    """How the path decodes: `recompute`, a static path's step as resolved, or `eager`."""
    if path.recompute:
        return "recompute"
    return bench.static_step_kind(bcfg, device) if path.static else "eager"


def held_bytes(cache) -> dict:
    """{"k", "v"}: bytes the cache tensors hold now (no cache: none)."""
    return {"k": 0, "v": 0} if cache is None else kv_bytes(cache)


def clustering_s(method) -> float:
    """Seconds the method has spent clustering so far (`run_stats()`, cumulative, on the device timeline)."""
    return float(method.run_stats().clustering_s)


def measure(path: BenchPath, model, ids: torch.Tensor, bcfg, device: torch.device) -> dict:
    """Setup (cache, first prefill, memory, step capture), `warmup` untimed rounds, `repeats` timed rounds."""
    clock, alloc = Clock(device), Allocator(device)
    alloc.start()
    decoder = Decoder(path, model, ids, bcfg, device, alloc)
    # per round kind: TTFT, clustering, decode steps, end to end (the TTFT plus that round's steps), all ms
    rounds = {"warmup": ([], [], [], []), "timed": ([], [], [], [])}
    for name, count in (("warmup", bcfg.warmup), ("timed", bcfg.repeats)):
        for _ in range(int(count)):
            token, ttft, cluster = decoder.prompt(clock)
            steps = decoder.decode(token, clock)
            rounds[name][0].append(ttft), rounds[name][1].append(cluster)
            rounds[name][2].extend(steps), rounds[name][3].append(ttft + sum(steps))
    (warm_ttft, _, warm_steps, _), (ttft, cluster, steps, e2e) = rounds["warmup"], rounds["timed"]
    held, end = decoder.held, held_bytes(decoder.cache)  # after the first prompt; after the last round's decode
    return {
        "step": decoder.kind, "cache": None if decoder.cache is None else type(decoder.cache).__name__,
        "cache_tokens": cache_tokens(path, ids.shape[1], decoder.max_len),
        "ttft_ms": percentiles(ttft),
        "clustering_ms": percentiles(cluster),
        "ttnt_ms": percentiles(steps),
        "e2e_ms": percentiles(e2e),
        "warmup": {"setup_ms": decoder.setup_ms, "ttft_ms": percentiles(warm_ttft),
                   "ttnt_ms": percentiles(warm_steps)},
        "kv_measured": {"measured_cache": held["k"] + held["v"], "measured_k": held["k"], "measured_v": held["v"],
                        "allocator_delta": decoder.allocated, "allocator_peak": alloc.peak()},
        "kv_measured_end": {"measured_cache": end["k"] + end["v"], "measured_k": end["k"], "measured_v": end["v"]},
    }


def set_attn(model, name: str) -> None:
    if model.config._attn_implementation != name:
        model.set_attn_implementation(name)


def free_memory(device: torch.device, collect: bool = False) -> None:
    """Return a cell's memory before the next: `collect` after a failure, whose traceback cycles may hold tensors
    (a full gc pass costs ~0.5 s with transformers loaded, too much for every cell)."""
    if collect:
        gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_safely(path, model, ids, bcfg, device, default_attn: str, measure_fn=None) -> dict:
    """`measure` (or `measure_fn`, same arguments) under the path's attention and method; a failure (OOM included)
    becomes the cell's result."""
    result = None
    try:
        set_attn(model, path.attn)
        with torch.no_grad(), path.method.applied(model):
            result = (measure_fn or measure)(path, model, ids, bcfg, device)
        result.update(oom=False, error=None)
    except OOM as err:
        result = {"oom": True, "error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"}
    except Exception as err:  # noqa: BLE001 - a failed cell is a recorded row, the grid goes on
        result = {"oom": False, **failure(err)}
    finally:
        set_attn(model, default_attn)
    free_memory(device, collect=bool(result["error"]))
    return result

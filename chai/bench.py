"""The decode loop mode=bench times, written the way gpt-fast writes generate.py: a small `prefill`,
`decode_one_token` and `decode_n_tokens`, and the per-token step of a static path captured once (a CUDA graph) or
compiled (`torch.compile` of the step only), on a cache allocated once at its full size; and `RecomputeStep`, the
baseline without a cache that recomputes the whole sequence at every step.

Static-path step (`bench.static_step`): `auto` compiles on CUDA (inductor, reduce-overhead: fused norms and rotary,
replayed as a CUDA graph) and runs eagerly on the CPU; `cudagraph` captures the eager step; `compile`; `eager`.
Measuring one cell with these: chai/runners/bench_measure.py; the mode runner: chai/runners/bench.py.
"""

import inspect
import itertools

import torch
from transformers import LlamaForCausalLM

from chai.errors import ChaiError
from chai.roofline import Clock

# transformers 5.24 renamed every model's forward argument `past_key_values` to `cache` (the old name warns on each
# call until its removal in 5.40); older releases know only the old name.
CACHE_ARG = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """logits [B, T, V] -> next token [B, 1] (argmax on the device: no host sync)."""
    return logits[:, -1].argmax(dim=-1, keepdim=True)


def prefill(model, input_ids: torch.Tensor, cache) -> torch.Tensor:
    """Run the prompt [B, S] through the model into `cache` (None: keep no K,V at all); only the last position's
    logits are computed."""
    return greedy(model(input_ids=input_ids, **{CACHE_ARG: cache}, use_cache=cache is not None,
                        logits_to_keep=1).logits)


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


class RecomputeStep:
    """Decoding without a K,V cache, the baseline AnLLM's and similar "x times faster" figures are measured against:
    every step runs the whole sequence so far (prompt [B, S] and the tokens generated) through the model again and
    keeps only the next token. A cache-free forward is a prefill, so its cost grows with the sequence, not the
    step; it yields the tokens a cache would (the same greedy argmax), and holds no K,V between steps."""

    def __init__(self, model, prompt: torch.Tensor):
        self.model, self.ids = model, prompt

    def __call__(self, token, position):
        self.ids = torch.cat([self.ids, token], dim=1)  # [B, S + steps so far]
        return prefill(self.model, self.ids, None), position + 1


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

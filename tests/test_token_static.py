"""The token methods' static cache (chai/methods/_token_static.py): it decodes what the dynamic evicting cache
decodes, token for token, with eviction during the decode steps (a small window, a third of the ids marked), after
`reset()` too; it holds the analytic bound of K,V bytes; its step traces with fullgraph=True and replays as the
bench captures it (no host sync, no Python state that changes between steps)."""

import pytest
import torch

from chai import bench
from chai.attention import kv_bytes
from chai.methods.anchor import Anchor
from chai.methods.sepcache import SepCache, StreamingLLM
from tests.conftest import random_ids
from tests.helpers import tensors_held
from tests.test_bench import bench_cfg, eager_capture
from tests.test_chai_static import greedy

MARKED = list(range(0, 50_000, 3))  # a third of every vocabulary's ids: separators or anchors in prompt and answer
PROMPT, STEPS = 9, 6


def token_method(kind: str):
    method = {"sepllm": lambda: SepCache(sinks=2, window=4, separators=(".",)),
              "streamingllm": lambda: StreamingLLM(2, 4), "anchor": Anchor}[kind]()
    method.use_token_ids([] if kind == "streamingllm" else MARKED)
    return method


KINDS = ["sepllm", "streamingllm", "anchor"]


@pytest.mark.parametrize("kind", KINDS)
def test_static_cache_decodes_like_the_evicting_cache(tiny_llama, kind):
    model, _ = tiny_llama
    method, ids = token_method(kind), random_ids(2, PROMPT, 1000, seed=4)
    with torch.no_grad(), method.applied(model):
        dynamic = greedy(model, ids, method.make_cache(model), STEPS)
        cache = method.static_cache(model, 2, PROMPT + STEPS)
        static = greedy(model, ids, cache, STEPS)
        held = kv_bytes(cache)
        cache.reset()
        again = greedy(model, ids, cache, STEPS)
        method.kv_bytes(model.config, 2, PROMPT, 4)  # the method's ids are the prompt's again (a prefill reset them)
        greedy(model, ids, method.static_cache(model, 2, PROMPT + STEPS), 0)
        bound = method.kv_bytes(model.config, 2, PROMPT + STEPS, 4)
    assert torch.equal(dynamic, static) and torch.equal(static, again)
    assert held == bound
    layer = cache.layers[0]
    assert layer.capacity < PROMPT + STEPS  # it evicts: fewer slots than a full cache
    assert {id(t) for t in tensors_held(vars(layer).values()) if t.dim() == 4} == {id(layer.keys), id(layer.values)}


def test_static_cache_evicts_during_decode(tiny_llama):
    """StreamingLLM after a prompt longer than its window: every step drops what left the window and writes into a
    free slot, so the slots hold the sinks and the window's latest tokens (the last step's eviction done before its
    token is written: the token that leaves with the next one is still there), in no particular order."""
    model, _ = tiny_llama
    method = token_method("streamingllm")
    with torch.no_grad(), method.applied(model):
        cache = method.static_cache(model, 2, PROMPT + STEPS)
        greedy(model, random_ids(2, PROMPT, 1000, seed=5), cache, STEPS)
    held = cache.layers[1].positions.sort(dim=1).values
    last = PROMPT + STEPS - 1  # the position of the last token fed back
    assert held.tolist() == [[-1] * (cache.layers[1].capacity - 6) + [0, 1, last - 3, last - 2, last - 1, last]] * 2


@pytest.mark.parametrize("step_kind", ["compile", "cudagraph"])
@pytest.mark.parametrize("kind", KINDS)
def test_static_step_traces_with_fullgraph(tiny_llama, kind, step_kind, monkeypatch):
    """The bench's own path, as `measure` runs it: prefill, capture or compile (fullgraph=True, dynamic=False), then
    reset() and a fresh prefill: the same tokens as the dynamic evicting cache."""
    monkeypatch.setattr(bench, "capture_graph", eager_capture)
    model, _ = tiny_llama
    method, ids = token_method(kind), random_ids(2, PROMPT, 1000, seed=6)
    cfg = bench_cfg("/tmp/unused", "bench.compile_backend=eager", f"bench.new_tokens={STEPS}")
    with torch.no_grad(), method.applied(model):
        dynamic = greedy(model, ids, method.make_cache(model), STEPS)
        cache = method.static_cache(model, 2, PROMPT + STEPS)
        token = bench.prefill(model, ids, cache)
        step = bench.make_step(step_kind, model, cache, token, torch.full_like(token, PROMPT), cfg.bench)
        cache.reset()
        token = bench.prefill(model, ids, cache)
        position, tokens = torch.full_like(token, PROMPT), [token]
        for _ in range(STEPS):
            token, position = step(token, position)
            tokens.append(token.clone())
    assert torch.equal(torch.cat(tokens, 1), dynamic)


@pytest.mark.parametrize("kind", KINDS)
def test_a_decode_step_applies_the_rule_once_for_every_layer(tiny_llama, kind, monkeypatch):
    """The slots' bookkeeping is the first layer's: per decode step the keep rule and the mask's rule run once, not
    once a layer, and every layer's slot positions are the same buffer (the tokens still equal the evicting cache's:
    the first test)."""
    model, _ = tiny_llama
    method, ids = token_method(kind), random_ids(2, PROMPT, 1000, seed=7)
    with torch.no_grad(), method.applied(model):
        cache = method.static_cache(model, 2, PROMPT + STEPS)
        greedy(model, ids, cache, 0)
        calls = {"keep": 0, "visible": 0}
        for name in calls:
            rule = getattr(method, name)
            monkeypatch.setattr(method, name, lambda *a, rule=rule, name=name: calls.__setitem__(name, calls[name] + 1)
                                or rule(*a))
        for layer in cache.layers:  # the layers hold the rule they were made with
            layer.keep = method.keep
        token = torch.zeros(2, 1, dtype=torch.long)
        bench.decode_one_token(model, token, torch.full_like(token, PROMPT), cache)
    assert model.config.num_hidden_layers > 1 and calls == {"keep": 1, "visible": 1}
    assert len({id(layer.positions) for layer in cache.layers}) == 1

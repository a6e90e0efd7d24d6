"""CHAI's fast paths on the CPU: the static cache decodes exactly what the dynamic CHAI cache decodes, holds the
analytic K,V bytes, its decode step traces with fullgraph=True (what a CUDA-graph capture needs: no host sync, no
graph break), the Triton kernel path (Triton's interpreter, in a fresh process) decodes what the PyTorch path
decodes, and the one-call clustered prefill equals the formula written out."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from chai import attention, bench
from chai.attention import bool_causal_mask, causal_from_start, kv_bytes, plain_causal
from chai.cli import run_mode
from chai.errors import ChaiError
from chai.methods import build_method
from chai.methods._chai_attention import clustered_prefill
from chai.methods import _chai_static
from chai.methods._chai_static import ChaiStaticLayer
from chai.methods.chai import ChaiLayer
from tests.conftest import build_tiny_gqa, random_ids
from tests.test_bench import bench_cfg, cells, eager_capture

VOCAB = 1000
SETTINGS = [
    {"name": "chai", "num_clusters": 3},
    {"name": "chai", "num_clusters": 2, "first_clustered_layer": 1, "representative": "medoid"},
    {"name": "chai_qkv", "num_clusters": 3},
    {"name": "random_groups", "layer_clusters": [2, 3, 4]},
]


def method_of(settings, model):
    settings = {"layer_clusters": None, **settings}
    method = build_method(settings)
    method.prepare(model)
    return method


def greedy(model, ids, cache, steps):
    """Prefill then `steps` greedy decode steps (the bench's functions) -> tokens [B, 1 + steps], last logits."""
    token = bench.prefill(model, ids, cache)
    position, tokens = torch.full_like(token, ids.shape[1]), [token]
    for _ in range(steps):
        token = bench.decode_one_token(model, token, position, cache)
        tokens.append(token)
        position = position + 1
    return torch.cat(tokens, 1)


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: "-".join(f"{v}" for v in s.values()))
@pytest.mark.parametrize("name", ["tiny_llama", "tiny_opt", "tiny_gqa"])
def test_static_cache_decodes_like_the_dynamic_cache(request, name, settings):
    model = request.getfixturevalue(name)[0]
    method = method_of(settings, model)
    ids, steps = random_ids(2, 9, VOCAB, seed=5), 5
    with torch.no_grad(), method.applied(model):
        dynamic = greedy(model, ids, method.make_cache(model), steps)
        cache = method.static_cache(model, 2, 9 + steps)
        static = greedy(model, ids, cache, steps)
        held = kv_bytes(cache)
        cache.reset()  # in place, membership cleared: the next prompt clusters again
        again = greedy(model, ids, cache, steps)
    assert torch.equal(dynamic, static) and torch.equal(static, again)
    per_token = method.kv_bytes_per_token(model.config, 4)
    assert held == {"k": 2 * (9 + steps) * per_token["k"], "v": 2 * (9 + steps) * per_token["v"]}
    assert not any(isinstance(layer, ChaiLayer) for layer in cache.layers) and cache.is_compileable


@pytest.mark.parametrize("kind", ["compile", "cudagraph"])
def test_static_step_traces_with_fullgraph(tiny_llama, kind, monkeypatch):
    """The bench's own capture path: compile (fullgraph=True, dynamic=False) or a graph (replayed eagerly on the
    CPU), then reset() and a fresh prefill, as `measure` runs it: the same tokens as the dynamic cache."""
    monkeypatch.setattr(bench, "capture_graph", eager_capture)
    model, _ = tiny_llama
    method = method_of({"name": "chai", "num_clusters": 3}, model)
    cfg = bench_cfg("/tmp/unused", "bench.compile_backend=eager", "bench.new_tokens=4")
    ids = random_ids(2, 7, VOCAB, seed=2)
    with torch.no_grad(), method.applied(model):
        dynamic = greedy(model, ids, method.make_cache(model), 4)
        cache = method.static_cache(model, 2, 11)
        token = bench.prefill(model, ids, cache)
        step = bench.make_step(kind, model, cache, token, torch.full_like(token, 7), cfg.bench)
        cache.reset()
        token = bench.prefill(model, ids, cache)
        position, tokens = torch.full_like(token, 7), [token]
        for _ in range(4):
            token, position = step(token, position)
            tokens.append(token.clone())
    assert torch.equal(torch.cat(tokens, 1), dynamic)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("fused", [True, False])
def test_graphed_membership_equals_the_eager_one_on_the_gpu(fused, monkeypatch):
    """On CUDA the static cache clusters with one fused kernel launch per layer, or (`fused` off: a setting the
    kernel does not cover) through one CUDA graph per layer, captured at its first prefill: for two different
    prompts in turn (the replay must read the new one), the same memberships and tokens as the dynamic cache, which
    clusters eagerly."""
    if not fused:
        monkeypatch.setattr(_chai_static, "use_fused_membership", lambda plan, query: False)
    model = build_tiny_gqa(layers=3).cuda()
    method = method_of({"name": "chai", "num_clusters": 3}, model)
    with torch.no_grad(), method.applied(model):
        cache = method.static_cache(model, 2, 16)
        for seed in (1, 2):
            ids = random_ids(2, 12, VOCAB, seed=seed).cuda()
            dynamic_cache = method.make_cache(model)
            dynamic = greedy(model, ids, dynamic_cache, 3)
            eager = {i: m.labels.clone() for i, m in method._log.last.items()}
            cache.reset()
            static = greedy(model, ids, cache, 3)
            clustered = [i for i, layer in enumerate(cache.layers) if isinstance(layer, ChaiStaticLayer)]
            assert clustered and all((cache.layers[i].graph is None) == fused for i in clustered)
            assert torch.equal(dynamic, static)
            assert all(torch.equal(cache.layers[i].labels, eager[i]) for i in clustered)


def test_static_cache_refuses_what_its_step_cannot_model(tiny_llama):
    model, _ = tiny_llama
    method = method_of({"name": "chai", "num_clusters": 3}, model)
    with torch.no_grad(), method.applied(model):
        with pytest.raises(ChaiError, match="membership_tokens=5"):
            model(random_ids(1, 3, VOCAB), past_key_values=method.static_cache(model, 1, 8), use_cache=True)
        with pytest.raises(ChaiError, match="unpadded"):
            mask = torch.ones(2, 8, dtype=torch.long)
            mask[1, :2] = 0
            model(random_ids(2, 8, VOCAB), attention_mask=mask, past_key_values=method.static_cache(model, 2, 10),
                  use_cache=True)


@pytest.mark.parametrize("kv_heads,share", [(8, False), (2, False), (8, True)])
@pytest.mark.parametrize("tq,mask_kind", [(10, "none"), (10, "built"), (7, "causal"), (10, "padded")])
@pytest.mark.parametrize("tokens_major", [False, True])
def test_clustered_prefill_equals_the_formula(kv_heads, share, tq, mask_kind, tokens_major):
    """One SDPA call (is_causal when the mask is plain causal, the mask otherwise) equals softmax(q_rep k_rep^T) of
    each head's representative times the head's own V, written out here with every [B, H, Tq, Tk] score; q, k, v
    heads-major or stored [B, T, H, D] as projections give them (then the output is too)."""
    g = torch.Generator().manual_seed(0)
    batch, heads, tk, dim = 2, 8, 10, 4

    def states(n: int, t: int) -> torch.Tensor:
        if tokens_major:
            return torch.randn(batch, t, n, dim, generator=g).transpose(1, 2)
        return torch.randn(batch, n, t, dim, generator=g)

    q, k, v = states(heads, tq), states(kv_heads, tk), states(kv_heads, tk)
    labels = torch.tensor([[0, 0, 1, 1, 2, 2, 2, 0], [1, 0, 1, 0, 0, 2, 2, 2]])
    reps = torch.tensor([[0, 2, 4], [1, 0, 5]])
    key_slot = reps // (heads // kv_heads)
    mask = torch.ones(tk, tk, dtype=torch.bool).tril()[None, None, tk - tq:].expand(batch, 1, tq, tk).clone()
    if mask_kind == "padded":  # request 1 starts at position 3 (left padding): its first rows see nothing real
        mask[1, :, :, :3] = False
        mask[1, :, :3, :3] = torch.eye(3, dtype=torch.bool)  # what transformers' fully-masked-row fix leaves
    passed = {"none": None, "causal": mask, "padded": mask,
              "built": bool_causal_mask(batch_size=batch, q_length=tq, kv_length=tk, device="cpu")}[mask_kind]
    if mask_kind == "built":
        assert passed is not None and bool((passed == mask).all()) and plain_causal(passed)
    assert not plain_causal(mask)  # an equal mask built elsewhere is not known to be causal (reading it would sync)
    k_head = k[:, :, None].expand(-1, -1, heads // kv_heads, -1, -1).reshape(batch, heads, tk, dim)
    probs = torch.softmax((q @ k_head.transpose(-1, -2) * 0.5).masked_fill(~mask, float("-inf")), dim=-1)
    value_of_head = key_slot.gather(1, labels) if share else (torch.arange(heads) // (heads // kv_heads)).expand(2, -1)
    rows = torch.arange(batch)[:, None]
    expected = probs[rows, reps[rows, labels]] @ v[rows, value_of_head]
    k_index = key_slot.gather(1, labels)
    out = clustered_prefill(q, k, v, passed, 0.5, reps.gather(1, labels), k_index, k_index if share else None)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert out.transpose(1, 2).is_contiguous() == tokens_major  # no copy left for the [B, T, H, D] return


def test_bench_times_the_static_path_of_chai(tmp_path):
    run_mode(bench_cfg(tmp_path, "method=chai", "method.num_clusters=2", "bench.seq_lens=[8]",
                       "bench.paths=[static_compiled,method,method_static]"), overrides=[])
    by_path = {r["bench"]["path"]: r for r in cells(tmp_path)}
    assert set(by_path) == {"static_compiled", "method", "method_static"}
    for rec in by_path.values():
        assert rec["error"] is None, rec["error"]
    kv = by_path["method_static"]["bench"]["kv_bytes"]
    assert kv["analytic"] == kv["measured_cache"] and kv["saved_analytic"] > 0


KERNEL_SCRIPT = """
import torch
from chai import bench
from chai.kernels import clustered_decode as kd
from tests.test_chai_static import greedy, method_of
from tests.conftest import _load, random_ids

calls, real = [], kd._kernel


class Counting:  # the decode kernels, counting launches of the values pass (one per decode attention)
    def __init__(self, name):
        self.name = name

    def __getitem__(self, grid):
        if self.name == "shared_scores_values_kernel":
            calls.append(grid)
        return real(self.name)[grid]


kd._kernel = Counting
model = _load("tiny_llama")[0]
for settings in ({"name": "chai", "num_clusters": 3}, {"name": "chai_qkv", "num_clusters": 2}):
    method = method_of(settings, model)
    ids = random_ids(2, 9, 1000, seed=1)
    with torch.no_grad(), method.applied(model):
        static = greedy(model, ids, method.static_cache(model, 2, 13), 4)
        dynamic = greedy(model, ids, method.make_cache(model), 4)
        kernel_calls = len(calls)
        full = model(torch.cat([ids, static[:, :-1]], 1)).logits[:, 8:].argmax(-1)  # no cache: PyTorch rows
    assert kernel_calls == 2 * 4 * 3, kernel_calls  # both caches, every decode step, every layer
    assert torch.equal(static, dynamic) and torch.equal(static, full), (static, dynamic, full)
    calls.clear()
print("KERNEL PATH OK")
"""


@pytest.mark.skipif(not __import__("chai.kernels.clustered_decode").kernels.clustered_decode.HAVE_TRITON,
                    reason="triton is not installed")
def test_triton_kernel_path_in_a_fresh_interpreter():
    """Decode through the Triton kernel (its interpreter on the CPU; TRITON_INTERPRET=1 before triton's import):
    the static and dynamic caches decode what a full forward without cache (PyTorch, row blocks) predicts."""
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", KERNEL_SCRIPT], cwd=root, capture_output=True, text=True,
                          env={**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(
                              [str(root), *filter(None, [os.environ.get("PYTHONPATH")])])},  # keep the GPU's /tmp/site
                          timeout=900, check=False)
    assert done.returncode == 0 and "KERNEL PATH OK" in done.stdout, (done.stdout + done.stderr)[-4000:]


def test_fixed_membership_is_on_the_query_device(tiny_llama):
    """A fixed grouping (chai_static, random_groups) is made on the CPU; the attention hands it to the GPU decode
    kernel, which cannot read host memory (H200, 2026-12-02: chai_static's generation failed with "Pointer argument
    cannot be accessed from Triton"). The `meta` device stands in for the GPU here."""
    from chai.methods._chai_attention import membership_for

    method = method_of({"name": "random_groups", "layer_clusters": [2, 3, 4]}, tiny_llama[0])
    session = method._session_for(tiny_llama[0].config)
    query = torch.empty(2, session.plan.shape.heads, 1, 8, device="meta")
    for layer in range(3):
        found = membership_for(session, layer, query, query, 1.0, past=5, layer=None)
        assert {t.device.type for t in (found.labels, found.reps, found.kv_keep, found.rep_slot)} == {"meta"}
        assert found.labels.shape[0] == 2
    assert session.plan.fixed[0].labels.device.type == "cpu"  # the plan's own copy never moves


def sdpa_calls(run) -> list[tuple]:
    """(key length, mask given, is_causal) of every SDPA call `run()` makes, in order."""
    from unittest import mock

    import torch.nn.functional as F

    calls, real = [], F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kwargs):
        calls.append((k.shape[2], attn_mask is not None, is_causal))
        return real(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kwargs)

    with mock.patch.object(F, "scaled_dot_product_attention", spy), torch.no_grad():
        run()
    return calls


def test_a_methods_dense_layer_prefills_a_static_cache_as_mha_does(tiny_llama):
    """A layer a method leaves dense runs transformers' SDPA call for MHA: over the prompt's keys, no mask, is_causal
    (flash attention on CUDA). With the explicit mask over a static cache's whole length it was ~3x slower on the
    H200 (CHAI with the Dec-24 list, 8 x 4096: TTFT 1115 ms against 1031)."""
    model = tiny_llama[0]
    ids, length = random_ids(2, 9, VOCAB, seed=3), 16
    full = build_method({"name": "mha"}).static_cache(model, 2, length)
    mha = sdpa_calls(lambda: model(ids, past_key_values=full))
    method = method_of({"name": "random_groups", "layer_clusters": [8, 2, 8]}, model)  # layers 0 and 2: dense

    def chai_prefill():
        with method.applied(model):
            model(ids, past_key_values=method.static_cache(model, 2, length))

    calls = sdpa_calls(chai_prefill)
    assert mha == [(9, False, True)] * 3
    assert calls[0] == calls[-1] == mha[0]


def test_a_decode_steps_mask_never_reads_the_static_caches_offset(monkeypatch):
    """A static cache gives the mask a device tensor as q_offset; reading it is a host sync, which broke the bench's
    CUDA-graph capture of the decode step (H200, 2026-12-02: "operation not permitted when stream is capturing").
    A meta tensor cannot be read, so building the mask with one shows it is not: for one query row, and for a
    prompt-sized forward under capture (monkeypatched: no CUDA here). Outside capture a prompt's offset is read."""
    offset = torch.zeros((), dtype=torch.long, device="meta")
    decode = bool_causal_mask(batch_size=2, q_length=1, kv_length=16, q_offset=offset, device="meta")
    assert plain_causal(decode) and not causal_from_start(decode)
    with pytest.raises(Exception, match="meta"):
        bool_causal_mask(batch_size=2, q_length=4, kv_length=16, q_offset=offset, device="meta")
    monkeypatch.setattr(attention, "_capturing", lambda offsets: True)
    captured = bool_causal_mask(batch_size=2, q_length=4, kv_length=16, q_offset=offset, device="meta")
    monkeypatch.undo()
    assert plain_causal(captured) and not causal_from_start(captured)
    zero = torch.zeros((), dtype=torch.long)
    assert causal_from_start(bool_causal_mask(batch_size=2, q_length=4, kv_length=16, q_offset=zero, device="cpu"))

"""The fused membership kernel gives what the torch chain gives (`cluster_first_tokens` with the torch K-Means, then
v_index = rep_slot[labels]), buffer for buffer: on random and attention-like queries and keys, MHA and GQA, several
m and k, float32 and float16, strided views, and on exact copies of a few heads (empty clusters). The static CHAI
cache runs it, one launch per clustered layer and no torch chain, and prefills and decodes what it does with the
kernel switched off. On a CUDA machine the kernel runs on the GPU; elsewhere Triton's interpreter runs it on the
CPU."""

import dataclasses
from types import SimpleNamespace
from unittest import mock

import pytest
import torch

# before anything that may import triton (chai imports transformers, which imports torch._dynamo)
from tests.triton_mode import DEVICE, INTERPRETING, ON_GPU, fresh_interpreter_run, needs_kernel as kernel_marker
import chai.clustering as clustering  # noqa: E402, I001
from chai import bench
from chai.errors import ChaiError
from chai.kernels import fused_kmeans as fk
from chai.kernels import fused_membership as fm
from chai.methods import _chai_static, build_method
from chai.methods._chai_attention import cluster_first_tokens
from chai.methods._chai_static import ChaiStaticLayer
from tests.conftest import random_ids

needs_kernel = kernel_marker(fm.HAVE_TRITON)
BUFFERS = ("labels", "reps", "kv_keep", "rep_slot", "v_index")


def plan_for(heads, kv_heads, dim, tokens, count, **settings):
    """A one-layer online plan as `Chai.make_plan` makes it, its count set afterwards (make_plan runs k = H dense)."""
    method = build_method({"name": "chai", "num_clusters": 1, "layer_clusters": None, "membership_tokens": tokens,
                           **settings})
    config = SimpleNamespace(num_attention_heads=heads, num_key_value_heads=kv_heads, hidden_size=heads * dim,
                             num_hidden_layers=1, head_dim=dim)
    return dataclasses.replace(method.make_plan(config), counts=(count,))


def view(x, layout, tokens):
    """x [B, N, T, D] as the same values in another memory layout, first `tokens` rows: contiguous; transposed (a
    [B, T, N, D] tensor seen as [B, N, T, D], as transformers' attention gets q and k); strided (every other
    element of the last dimension)."""
    if layout == "transposed":
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    elif layout == "strided":
        x = torch.stack([x, torch.zeros_like(x)], dim=-1).flatten(-2)[..., ::2]
    return x[:, :, :tokens]


def random_qk(batch, heads, groups, tokens, dim, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, tokens + 3, dim, generator=g)
    k = torch.randn(batch, heads // groups, tokens + 3, dim, generator=g)
    return q, k


def attention_like_qk(batch, heads, groups, tokens, dim, prototypes, noise, seed):
    """Heads in `prototypes` near-copy groups: each head's queries its group's plus noise; KV heads near-copies too,
    so a head's scores follow its group whatever KV head it reads."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(batch, prototypes, tokens, dim, generator=g)
    q = protos[:, torch.arange(heads) % prototypes] + noise * torch.randn(batch, heads, tokens, dim, generator=g)
    shared = torch.randn(batch, 1, tokens, dim, generator=g)
    k = shared + noise * torch.randn(batch, heads // groups, tokens, dim, generator=g)
    return q, k


def torch_chain(plan, q_first, key, scaling, width) -> dict:
    """The static cache's torch path, its K-Means the torch one (not fused_kmeans)."""
    with mock.patch.object(clustering, "use_fused", lambda features: False):
        m = cluster_first_tokens(plan, 0, q_first, key, scaling, width)
    return dict(labels=m.labels, reps=m.reps, kv_keep=m.kv_keep, rep_slot=m.rep_slot,
                v_index=m.rep_slot.gather(1, m.labels))


def assert_same_membership(q, k, tokens, count, dtype=torch.float32, layout="contiguous", scaling=None):
    """The kernel on q [B, H, >=m, D] and k [B, Hkv, >=m, D] (cast, laid out, first m = `tokens` rows) equals the
    torch chain; returns the kernel's buffers."""
    batch, heads, _, dim = q.shape
    q_first, k_first = (view(t.to(dtype).to(DEVICE), layout, tokens) for t in (q, k))
    scaling = dim ** -0.5 if scaling is None else scaling
    plan = plan_for(heads, k.shape[1], dim, tokens, count)
    width = min(count, k.shape[1])
    membership, v_index = fm.fused_membership(q_first, k_first, scaling, count, width)
    got = dict(labels=membership.labels, reps=membership.reps, kv_keep=membership.kv_keep,
               rep_slot=membership.rep_slot, v_index=v_index)
    want = torch_chain(plan, q_first, k_first, scaling, width)
    for name in BUFFERS:
        rows = (got[name] != want[name]).any(1).nonzero()[:, 0].tolist()
        assert not rows, f"k={count} {name}, rows {rows}: {got[name][rows].tolist()} vs {want[name][rows].tolist()}"
    return got


@needs_kernel
@pytest.mark.parametrize("batch,heads,groups,tokens,dim,dtype,layout,counts", [
    (3, 4, 1, 3, 16, torch.float32, "contiguous", [1, 2, 3, 4]),
    (2, 9, 3, 5, 64, torch.float16, "transposed", [1, 3, 5, 9]),  # SmolLM2's 9 heads over 3 KV heads
    (2, 32, 4, 5, 128, torch.float16, "transposed", [1, 4, 13, 32]),  # LLaMA-7B's layer size, GQA
    (2, 32, 1, 8, 32, torch.float32, "strided", [2, 17, 32]),
    (1, 32, 1, 5, 256, torch.float32, "transposed", [7]),  # D in two chunks of 128
])
def test_random_queries_and_keys(batch, heads, groups, tokens, dim, dtype, layout, counts):
    q, k = random_qk(batch, heads, groups, tokens, dim, seed=heads + tokens)
    for count in counts:
        assert_same_membership(q, k, tokens, count, dtype, layout)


@needs_kernel
@pytest.mark.parametrize("heads,groups,tokens,prototypes,noise,counts", [
    (32, 1, 5, 6, 0.1, [4, 6, 8]),
    (32, 4, 5, 4, 0.05, [3, 4, 16]),
    (9, 3, 3, 3, 0.2, [2, 3, 4]),
])
def test_attention_like_queries(heads, groups, tokens, prototypes, noise, counts):
    """Heads that are noisy copies of a few prototypes: clusters the size of the groups, and more or fewer."""
    q, k = attention_like_qk(3, heads, groups, tokens, 32, prototypes, noise, seed=heads + prototypes)
    for count in counts:
        got = assert_same_membership(q, k, tokens, count, scaling=0.5)
        if count == prototypes and noise <= 0.1:  # the copies of a prototype found as one cluster
            assert (got["labels"].cpu() == (torch.arange(heads) % prototypes)).all()


def exact_copies(batch, heads, groups, distinct, seed):
    """q [B, H, 3, 16], k [B, H / groups, 3, 16] (scaling 1) whose heads are exact copies of `distinct` patterns: key
    j is 200 e_j, and query row i puts 1 on one or two of keys 0..i, so each causal row is 1 on its one or two
    winners (exp(-200) is 0 in float32) and a head's features are 1 and 1/2 where its pattern puts them. Exact on
    both paths, sums and distances too (dyadic values, 16 heads), so neither can round two copies apart."""
    g = torch.Generator().manual_seed(seed)
    rows = [[[1]], [[1, 0], [0, 1], [1, 1]], [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 0, 1], [0, 1, 1]]]
    patterns = torch.zeros(18, 3, 16)
    for p in range(18):  # every combination of a row-1 and a row-2 choice
        for i, choice in enumerate((0, p % 3, p // 3)):
            patterns[p, i, : i + 1] = torch.tensor(rows[i][choice], dtype=torch.float)
    picked = torch.stack([torch.randperm(18, generator=g)[:distinct] for _ in range(batch)])  # [B, distinct]
    which = torch.stack([torch.randperm(heads, generator=g) % distinct for _ in range(batch)])  # [B, H]
    q = patterns[picked.gather(1, which)]
    k = torch.zeros(batch, heads // groups, 3, 16)
    k[:, :, torch.arange(3), torch.arange(3)] = 200.0
    return q, k


@needs_kernel
def test_exact_copies_leave_empty_clusters_and_padded_slots():
    """k above the number of distinct heads: the extra clusters stay empty, numbered last, with cluster 0's
    representative; the representatives read fewer KV heads than the width, so kv_keep repeats its first."""
    q, k = exact_copies(4, 16, 4, 3, seed=3)
    got = assert_same_membership(q, k, 3, 5, scaling=1.0)
    assert (got["labels"].max(1).values == 2).all() and (got["reps"][:, 3:] == 0).all()
    used = [len(set(row)) for row in got["kv_keep"].tolist()]
    assert max(used) < 4 and (got["kv_keep"][:, -1] == got["kv_keep"][:, 0]).all()


def refused(*args, **kwargs):
    raise AssertionError("the fused path ran the torch chain")


def static_run(model, settings, ids, steps):
    """Prefill logits [B, T, V], greedy tokens [B, 1 + steps] and each clustered layer's buffers after the prefill,
    on the CPU, computed on DEVICE (the GPU when there is one: the kernel runs only where the tensors are)."""
    method = build_method({"layer_clusters": None, **settings})
    model.to(DEVICE)
    try:
        method.prepare(model)
        with torch.no_grad(), method.applied(model):
            ids = ids.to(DEVICE)
            cache = method.static_cache(model, ids.shape[0], ids.shape[1] + steps)
            logits = model(input_ids=ids, **{bench.CACHE_ARG: cache}, use_cache=True).logits
            buffers = [{name: getattr(layer, name).cpu() for name in BUFFERS}
                       for layer in cache.layers if isinstance(layer, ChaiStaticLayer)]
            tokens = [bench.greedy(logits)]
            for step in range(steps):
                position = torch.full_like(tokens[-1], ids.shape[1] + step)
                tokens.append(bench.decode_one_token(model, tokens[-1], position, cache))
        return logits.cpu(), torch.cat(tokens, 1).cpu(), buffers
    finally:
        model.to("cpu")  # the fixture is shared by the session


@needs_kernel
@pytest.mark.parametrize("name,settings", [
    ("tiny_llama", {"name": "chai", "num_clusters": 3}),
    ("tiny_gqa", {"name": "chai_qkv", "num_clusters": 2}),  # GQA; members read the representative's V (v_index)
])
def test_static_cache_prefills_and_decodes_as_without_the_kernel(request, monkeypatch, name, settings):
    model = request.getfixturevalue(name)[0]
    ids = random_ids(2, 9, 1000, seed=4)
    with monkeypatch.context() as patched:
        patched.setattr(_chai_static, "cluster_first_tokens", refused)  # the kernel, not the chain, fills them
        fused = static_run(model, settings, ids, steps=2)
    monkeypatch.setattr(_chai_static, "use_fused_membership", lambda plan, query: False)
    chain = static_run(model, settings, ids, steps=2)
    assert len(fused[2]) == len(chain[2]) == 3
    for got, want in zip(fused[2], chain[2]):
        assert all(torch.equal(got[n], want[n]) for n in BUFFERS), (got, want)
    assert torch.equal(fused[0], chain[0]) and torch.equal(fused[1], chain[1])


@needs_kernel
def test_one_launch_per_layer_and_no_torch_chain(tiny_gqa, monkeypatch):
    """A prefill clusters each layer with one launch of the membership kernel, no torch chain, no K-Means kernel."""
    launches, real = [], fm._kernel()

    class Counting:  # the membership kernel, counting launches
        def __getitem__(self, grid):
            launches.append(grid)
            return real[grid]

    monkeypatch.setattr(fm, "_kernel", Counting)
    monkeypatch.setattr(_chai_static, "cluster_first_tokens", refused)
    monkeypatch.setattr(fk, "_kernel", refused)  # nor the fused K-Means of that chain
    static_run(tiny_gqa[0], {"name": "chai", "num_clusters": 3}, random_ids(2, 7, 1000, seed=6), steps=0)
    assert launches == [(2,)] * 3  # 3 clustered layers, one program per request


def test_other_clustering_settings_keep_the_torch_chain(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    query = torch.zeros(1, 8, 6, 16)
    assert fm.use_fused_membership(plan_for(8, 2, 16, 5, 3), query) == fm.HAVE_TRITON
    for settings in ({"representative": "medoid"}, {"cluster_algo": "agglomerative"}, {"causal_features": False}):
        assert not fm.use_fused_membership(plan_for(8, 2, 16, 5, 3, **settings), query)
    assert not fm.use_fused_membership(plan_for(8, 2, 16, fm.MAX_TOKENS + 1, 3), query)
    assert not fm.use_fused_membership(plan_for(8, 2, 16, 5, 3), torch.zeros(1, 8, 6, fm.MAX_HEAD_DIM + 1))
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not fm.use_fused_membership(plan_for(8, 2, 16, 5, 3), query)  # a CPU tensor outside the interpreter


def test_wrong_buffers_and_counts_are_refused():
    q, k = torch.zeros(2, 8, 5, 16), torch.zeros(2, 2, 5, 16)
    with pytest.raises(ChaiError, match="8 heads into 9 clusters"):
        fm.fused_membership(q, k, 1.0, 9, 2)
    with pytest.raises(ChaiError, match="width 1"):
        fm.fused_membership(q, k, 1.0, 3, 1)
    out = [torch.zeros(2, 8, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 2, dtype=torch.int),
           torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 8, dtype=torch.long)]
    with pytest.raises(ChaiError, match="kv_keep as a contiguous int64"):
        fm.fused_membership(q, k, 1.0, 3, 2, out=out)


@pytest.mark.skipif(not ON_GPU or not fm.HAVE_TRITON, reason="needs a CUDA GPU")
def test_llama7b_prefill_sizes_on_the_gpu():
    """A prefill's membership at serving sizes: 16 requests x 32 heads, head size 128, fp16 and transposed as the
    model hands them over, k = 4, 18 and 32, against the torch chain on the same GPU."""
    q, k = random_qk(16, 32, 1, 5, 128, seed=0)
    for count in (4, 18, 32):
        assert_same_membership(q, k, 5, count, torch.float16, "transposed")
    q, k = attention_like_qk(16, 32, 1, 5, 128, 8, 0.1, seed=1)
    assert_same_membership(q, k, 5, 8, torch.float16, scaling=128 ** -0.5)


@pytest.mark.skipif(INTERPRETING or ON_GPU or not fm.HAVE_TRITON, reason="the kernel tests ran in this process")
def test_kernel_in_a_fresh_interpreter():
    """The kernel tests of this file in a process where TRITON_INTERPRET=1 comes before triton's import."""
    fresh_interpreter_run(__file__)

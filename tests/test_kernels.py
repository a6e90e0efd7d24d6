"""The fused clustered-decode kernel equals its PyTorch reference, and the reference is CHAI's formula: with one
cluster per head it is plain multi-head attention. On a CUDA machine the kernel runs on the GPU
(`python -m pytest tests/test_kernels.py` there is the GPU kernel check, a LLaMA-7B-sized case included); elsewhere
Triton's interpreter runs it on the CPU."""

import os

import pytest
import torch
import torch.nn.functional as F

# before anything that may import triton (chai imports transformers, which imports torch._dynamo)
from tests.triton_mode import DEVICE, INTERPRETING, ON_GPU, fresh_interpreter_run, needs_kernel as kernel_marker
from chai.kernels import clustered_decode as kd  # noqa: E402, I001

needs_kernel = kernel_marker(kd.HAVE_TRITON)


def on_device(*tensors):
    """The tensors on the device the kernel runs on (the GPU when there is one; made on the CPU for the same
    random values everywhere)."""
    return tuple(t.to(DEVICE) for t in tensors)


def random_clusters(batch: int, heads: int, clusters: int, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """labels [B, H] with every cluster non-empty, reps [B, C]: a random member of each cluster."""
    labels = torch.stack([torch.randperm(heads, generator=generator) % clusters for _ in range(batch)])
    reps = torch.stack([
        torch.stack([(labels[b] == c).nonzero()[torch.randint(0, int((labels[b] == c).sum()), (1,),
                                                             generator=generator)].squeeze() for c in range(clusters)])
        for b in range(batch)
    ])
    return labels, reps


def inputs(batch, heads, clusters, length, dim, dtype, seed=0, capacity=None):
    """q [B,H,1,D], K_rep [B,C,S,D] and V [B,H,S,D] as views into larger static-cache-like buffers (capacity
    tokens), so the kernel sees the strides a static cache gives it."""
    g = torch.Generator().manual_seed(seed)
    capacity = capacity or length
    q = torch.randn(batch, heads, 1, dim, generator=g).to(dtype)
    k = torch.randn(batch, clusters, capacity, dim, generator=g).to(dtype)
    v = torch.randn(batch, heads, capacity, dim, generator=g).to(dtype)
    q, k, v, labels, reps = on_device(q, k, v, *random_clusters(batch, heads, clusters, g))
    return q, k[:, :, :length], v[:, :, :length], labels, reps


@pytest.mark.parametrize(
    "batch,heads,clusters,length,dim,kv_len",
    [
        (2, 8, 3, 37, 16, None),  # one split, a partial tile
        (1, 4, 2, 300, 12, [100]),  # several splits, empty ones past kv_len, head_dim not a power of 2
        (3, 6, 6, 70, 8, [70, 1, 33]),  # one cluster per head, a single valid token
        (2, 5, 1, 129, 16, [129, 64]),  # a single cluster for every head
    ],
)
@needs_kernel
def test_kernel_matches_reference(batch, heads, clusters, length, dim, kv_len):
    q, k, v, labels, reps = inputs(batch, heads, clusters, length, dim, torch.float32, capacity=length + 7)
    kv = None if kv_len is None else torch.tensor(kv_len, device=DEVICE)
    out = kd.clustered_decode_attention(q, k, v, labels, reps, dim**-0.5, kv_len=kv)
    ref = kd.clustered_attention_reference(q, k, v, labels, reps, dim**-0.5, kv_len=kv)
    assert out.shape == (batch, heads, 1, dim) and out.dtype == v.dtype
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("config", [
    kd.KernelConfig(block_s=16, min_tiles=1),  # short tiles, many splits
    kd.KernelConfig(block_s=32, target_programs=8),  # long splits, several tiles each
    kd.KernelConfig(block_s=None, num_warps=8, min_tiles=2),
    kd.KernelConfig(),  # the tuned defaults: one 128-key tile holds the whole context here
])
@needs_kernel
def test_every_launch_config_matches_reference(config):
    """The tuning script's settings change speed only: tile, warps, splits."""
    q, k, v, labels, reps = inputs(2, 12, 5, 150, 16, torch.float32, seed=3, capacity=160)
    kv = torch.tensor([150, 77], device=DEVICE)
    out = kd.clustered_decode_attention(q, k, v, labels, reps, 0.25, kv_len=kv, config=config)
    ref = kd.clustered_attention_reference(q, k, v, labels, reps, 0.25, kv_len=kv)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


@needs_kernel
def test_kernel_half_precision_and_3d_query():
    q, k, v, labels, reps = inputs(2, 8, 4, 90, 16, torch.float16, seed=1)
    kv = torch.tensor(60, device=DEVICE)  # a 0-d device tensor, as a static cache layer's fill counter
    out = kd.clustered_decode_attention(q[:, :, 0], k, v, labels, reps, 0.25, kv_len=kv)
    ref = kd.clustered_attention_reference(q.float(), k.float(), v.float(), labels, reps, 0.25, kv_len=kv)
    assert out.shape == (2, 8, 16) and out.dtype == torch.float16
    torch.testing.assert_close(out.float(), ref[:, :, 0], atol=2e-3, rtol=2e-3)


@needs_kernel
def test_one_cluster_per_head_is_multi_head_decode():
    q, k, v, _, _ = inputs(2, 6, 6, 50, 16, torch.float32, seed=2)
    identity = torch.arange(6, device=DEVICE).expand(2, 6)
    dense = F.scaled_dot_product_attention(q, k, v, scale=0.3)
    torch.testing.assert_close(kd.clustered_decode_attention(q, k, v, identity, identity, 0.3), dense,
                               atol=1e-5, rtol=1e-5)


@needs_kernel
def test_compact_k_slots_and_grouped_values():
    """CHAI's cache layout: K kept in a few slots (each cluster reads its slot through k_index, two clusters may
    share one under GQA), V for the KV heads only (each query head reads v_index)."""
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 8, 1, 16, generator=g)
    k, v = torch.randn(2, 3, 40, 16, generator=g), torch.randn(2, 4, 40, 16, generator=g)  # 3 K slots, 4 KV heads
    labels = torch.tensor([[0, 0, 1, 1, 2, 2, 2, 0], [1, 1, 1, 0, 0, 2, 2, 2]])
    reps, k_index = torch.tensor([[1, 2, 6], [0, 3, 7]]), torch.tensor([[2, 0, 1], [1, 1, 0]])
    v_index, kv_len = (torch.arange(8) // 2).expand(2, -1), torch.tensor([40, 25])
    q, k, v, labels, reps, k_index, v_index, kv_len = on_device(q, k, v, labels, reps, k_index, v_index, kv_len)
    out = kd.clustered_decode_attention(q, k, v, labels, reps, 0.25, kv_len, k_index=k_index, v_index=v_index)
    for b in range(2):
        n = int(kv_len[b])
        for h in range(8):
            c = int(labels[b, h])
            p = torch.softmax(q[b, int(reps[b, c]), 0] @ k[b, int(k_index[b, c]), :n].T * 0.25, dim=-1)
            torch.testing.assert_close(out[b, h, 0], p @ v[b, h // 2, :n], atol=2e-5, rtol=2e-5)


@needs_kernel
def test_uneven_clusters_and_a_partly_filled_cache():
    """Clusters of 1 and of many heads, different memberships per batch row, an empty cluster, and a fill counter
    shorter than the buffer (splits past it hold nothing)."""
    g = torch.Generator().manual_seed(5)
    heads, dim, capacity = 12, 16, 260
    q = torch.randn(2, heads, 1, dim, generator=g)
    k = torch.randn(2, 4, capacity, dim, generator=g)
    v = torch.randn(2, heads, capacity, dim, generator=g)
    labels = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 1],  # cluster 0: 1 head; 1: 11 heads; 2, 3: empty
                           [3, 2, 2, 3, 2, 0, 2, 2, 1, 2, 2, 2]])  # 1, 1, 8 and 2 heads
    reps = torch.tensor([[10, 4, 0, 0], [5, 8, 9, 3]])
    k_index = torch.tensor([[2, 0, 1, 3], [3, 1, 0, 2]])
    kv_len = torch.tensor([97, 230])
    q, k, v, labels, reps, k_index, kv_len = on_device(q, k, v, labels, reps, k_index, kv_len)
    out = kd.clustered_decode_attention(q, k, v, labels, reps, 0.3, kv_len, k_index=k_index)
    ref = kd.clustered_attention_reference(q, k, v, labels, reps, 0.3, kv_len=kv_len, k_index=k_index)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    for b in range(2):
        n = int(kv_len[b])
        for h in range(heads):
            c = int(labels[b, h])
            p = torch.softmax(q[b, int(reps[b, c]), 0] @ k[b, int(k_index[b, c]), :n].T * 0.3, dim=-1)
            torch.testing.assert_close(out[b, h, 0], p @ v[b, h, :n], atol=2e-5, rtol=2e-5)


@needs_kernel
@pytest.mark.parametrize("kv_len", [23, None, torch.tensor([61, 9])])
def test_default_grouped_values_and_length_forms(kv_len):
    """No v_index under GQA (head h reads V head h // (H / Hv)), no k_index, and the valid length as an int, None
    or a [B] tensor."""
    g = torch.Generator().manual_seed(6)
    q, k = torch.randn(2, 8, 1, 16, generator=g), torch.randn(2, 3, 70, 16, generator=g)[:, :, :61]
    v = torch.randn(2, 2, 61, 16, generator=g)  # 2 KV heads for 8 query heads
    labels = torch.tensor([[0, 0, 0, 0, 0, 1, 2, 0], [2, 1, 1, 1, 1, 1, 0, 1]])
    reps = torch.tensor([[3, 5, 6], [6, 4, 0]])
    q, k, v, labels, reps = on_device(q, k, v, labels, reps)
    kv_len = kv_len.to(DEVICE) if isinstance(kv_len, torch.Tensor) else kv_len
    out = kd.clustered_decode_attention(q, k, v, labels, reps, 0.25, kv_len)
    ref = kd.clustered_attention_reference(q, k, v, labels, reps, 0.25, kv_len=kv_len)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


@needs_kernel
def test_compiled_call_is_one_opaque_op():
    """Under torch.compile (fullgraph) the kernels run as the custom op chai::clustered_decode: same output."""
    q, k, v, labels, reps = inputs(2, 8, 3, 40, 16, torch.float32, seed=8, capacity=48)
    kv = torch.tensor([40, 17], device=DEVICE)
    compiled = torch.compile(kd.clustered_decode_attention, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, labels, reps, 0.25, kv),
                               kd.clustered_decode_attention(q, k, v, labels, reps, 0.25, kv))


def test_reference_members_share_their_representatives_probabilities():
    """Prefill form (many query tokens, causal mask): a member's output is its representative's attention
    probabilities applied to the member's own V."""
    g = torch.Generator().manual_seed(3)
    q, k_full, v = (torch.randn(1, 4, 9, 8, generator=g) for _ in range(3))
    labels, reps = torch.tensor([[0, 0, 1, 1]]), torch.tensor([[1, 2]])
    mask = torch.ones(9, 9, dtype=torch.bool).tril()[None, None]
    out = kd.clustered_attention_reference(q, k_full[:, reps[0]], v, labels, reps, 0.5, mask=mask)
    probs = torch.softmax((q @ k_full.transpose(-1, -2) * 0.5).masked_fill(~mask, float("-inf")), dim=-1)
    for head, rep in ((0, 1), (1, 1), (2, 2), (3, 2)):
        torch.testing.assert_close(out[0, head], probs[0, rep] @ v[0, head])


def test_without_triton_the_reference_runs(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # a CPU tensor outside the interpreter: the reference
    q, k, v, labels, reps = (t.cpu() for t in inputs(1, 4, 2, 20, 8, torch.float32))
    assert not kd._use_triton(q) and os.environ.get("TRITON_INTERPRET") is None
    torch.testing.assert_close(kd.clustered_decode_attention(q, k, v, labels, reps, 0.5),
                               kd.clustered_attention_reference(q, k, v, labels, reps, 0.5))


@pytest.mark.skipif(not ON_GPU or not kd.HAVE_TRITON, reason="needs a CUDA GPU")
def test_llama7b_sized_decode_on_the_gpu():
    """A LLaMA-7B decode step's shape (32 heads in 8 clusters, head_dim 128, fp16) over a long, partly filled
    cache: many splits and tiles, on the GPU, against the reference in float32."""
    q, k, v, labels, reps = inputs(4, 32, 8, 4224, 128, torch.float16, seed=0)
    kv = torch.tensor(3001, device=DEVICE)
    out = kd.clustered_decode_attention(q, k, v, labels, reps, 128**-0.5, kv)
    ref = kd.clustered_attention_reference(q.float(), k.float(), v.float(), labels, reps, 128**-0.5, kv_len=kv)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), ref, atol=2e-3, rtol=2e-3)


@pytest.mark.skipif(INTERPRETING or ON_GPU or not kd.HAVE_TRITON, reason="the kernel tests ran in this process")
def test_kernel_in_a_fresh_interpreter():
    """The kernel tests of this file in a process where TRITON_INTERPRET=1 comes before triton's import."""
    fresh_interpreter_run(__file__)


def test_each_gpu_gets_its_tuned_launch_settings_and_the_environment_overrides_them(monkeypatch):
    """The H200 runs its own tuned settings, other GPUs (and the CPU) the H100's, CHAI_KERNEL_CONFIG beats both."""
    monkeypatch.delenv("CHAI_KERNEL_CONFIG", raising=False)
    assert kd.config_for("NVIDIA H200") == kd.KernelConfig(block_s=128, num_stages=1, target_programs=2048)
    assert kd.config_for("NVIDIA H100 80GB HBM3") == kd.config_for(None) == kd.KernelConfig()
    monkeypatch.setenv("CHAI_KERNEL_CONFIG", '{"block_s": 32, "num_warps": 2}')
    assert kd.config_for("NVIDIA H200") == kd.KernelConfig(block_s=32, num_warps=2)
    monkeypatch.delenv("CHAI_KERNEL_CONFIG")
    assert kd.use_gpu_defaults(torch.device("cpu")) == kd.DEFAULT == kd.KernelConfig()

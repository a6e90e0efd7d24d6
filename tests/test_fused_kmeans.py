"""The fused K-Means kernel gives the memberships `chai.clustering.kmeans` gives, label for label: on random and
attention-like features, on duplicated heads, through empty clusters and refills, in one mixed batch; and
`cluster_heads` runs it where it can. On a CUDA machine the kernel runs on the GPU; elsewhere Triton's interpreter
runs it on the CPU.

Exact duplicates are built from small dyadic numbers, so that every distance the seeding and the pure clusters need
is exact on both paths: with inexact duplicates the torch path's BLAS can round two equal rows differently (see
`chai.kernels.fused_kmeans`), and its labels then follow that rounding, not the algorithm."""

import pytest
import torch

# before anything that may import triton (chai imports transformers, which imports torch._dynamo)
from tests.triton_mode import DEVICE, INTERPRETING, ON_GPU, fresh_interpreter_run, needs_kernel as kernel_marker
import chai.clustering as clustering  # noqa: E402, I001
from chai.clustering import causal_features, cluster_heads, kmeans
from chai.kernels import fused_kmeans as fk

needs_kernel = kernel_marker(fk.HAVE_TRITON)


def gaussian(batch, heads, width, seed=0):
    return torch.randn(batch, heads, width, generator=torch.Generator().manual_seed(seed))


def attention_like(batch, heads, groups, noise, seed=0, tokens=5):
    """CHAI's features of a layer whose heads come in near-copy groups: each head's queries are its group's plus
    noise, against shared keys; causal softmax over `tokens` tokens, lower triangle -> [B, H, tokens(tokens+1)/2]."""
    g = torch.Generator().manual_seed(seed)
    queries = torch.randn(batch, groups, tokens, 16, generator=g)
    keys = torch.randn(batch, 1, tokens, 16, generator=g)
    group = torch.arange(heads) % groups
    q = queries[:, group] + noise * torch.randn(batch, heads, tokens, 16, generator=g)
    causal = torch.ones(tokens, tokens, dtype=torch.bool).tril()
    probs = torch.softmax((q @ keys.transpose(-1, -2) / 4).masked_fill(~causal, float("-inf")), dim=-1)
    return causal_features(probs, tokens)


def duplicates(batch, heads=16, distinct=3, width=15, seed=0):
    """Heads that are exact copies of `distinct` integer points, each point used: with 16 heads the centring is exact
    (means of integers over a power of two) and so is every distance between copies: both paths see the same ties."""
    g = torch.Generator().manual_seed(seed)
    points = torch.randint(-4, 5, (batch, distinct, width), generator=g).float()
    which = torch.stack([torch.randperm(heads, generator=g) % distinct for _ in range(batch)])
    return points.gather(1, which[..., None].expand(-1, -1, width))


def on_a_line(small, width=15):
    """One problem [1, 16, width]: heads at these positions (in 1/128) along the first feature, then 3 heads at +64
    and 3 at -64. All values are multiples of 1/2048 once centred, so the distances near head 0 are exact."""
    x = torch.zeros(1, 16, width)
    x[0, :, 0] = torch.tensor([v / 128 for v in small] + [64.0] * 3 + [-64.0] * 3)
    return x


# Problems where the tolerance decides. The heads at +-64 seed two clusters; the small ones lie within the tolerance
# (1e-5 * mean |x|^2, about 0.0154 = (15.9 / 128)^2) of head 0, so the seeding takes head 0 again for every further
# cluster, and those start empty. Then: (small heads, k, the torch path's refill calls: (empty clusters, moved)).
LINE_CASES = {
    # The heads at -15 are farther from head 0 than the one at +14 (without the tolerance, one of them would be a
    # seed); after the first mean the head at +14 is 24.6 from it, beyond the tolerance: it moves.
    "refill moves the farthest head": ([0, 14] + [-15] * 8, 4, [(1, 1)]),
    # Symmetric around 0: every head stays within the tolerance of the mean, so the cluster stays empty (numbered last).
    "refill declines within the tolerance": ([0, 0] + [15] * 4 + [-15] * 4, 4, [(1, 0)]),
    "two refills in one step": ([0, 14, 11, 15, -12, 10, -14, 5, -11, 4], 5, [(2, 2), (0, 0)]),
    # Declined, the empty cluster keeps its center (head 0) and the next assignment fills it.
    "an empty cluster keeps its center": ([0, -6, -3, 9, -15, 3, -12, -6, -6, -5], 4, [(1, 0), (0, 0)]),
}


@pytest.fixture
def refill_spy(monkeypatch):
    """Each call of the torch path's `_refill_empty` on one problem: (empty clusters, heads it moved)."""
    calls = []
    refill = clustering._refill_empty

    def spy(x, labels, centers, sizes):
        before = labels.clone()
        out = refill(x, labels, centers, sizes)
        calls.append((int((sizes == 0).sum()), int((out[0] != before).sum())))
        return out

    monkeypatch.setattr(clustering, "_refill_empty", spy)
    return calls


def fused(features, k):
    labels, inertia = fk.fused_kmeans(features.to(DEVICE), k, return_inertia=True)
    return labels.cpu(), inertia.cpu()


def assert_same_as_reference(features, k):
    """The kernel's labels equal kmeans' exactly (on the same device), its inertia up to rounding."""
    labels, inertia = fused(features, k)
    ref, ref_inertia = (t.cpu() for t in kmeans(features.to(DEVICE), k))
    assert labels.dtype == torch.long and labels.shape == features.shape[:2]
    mismatch = (labels != ref).any(1).nonzero()[:, 0].tolist()
    assert not mismatch, f"rows {mismatch}: kernel {labels[mismatch].tolist()} vs torch {ref[mismatch].tolist()}"
    spread = (features - features.mean(1, keepdim=True)).pow(2).sum((1, 2))  # the inertia of one cluster
    assert ((inertia - ref_inertia).abs() <= 1e-4 * ref_inertia + 1e-6 * spread).all(), (inertia, ref_inertia)
    return labels


@needs_kernel
@pytest.mark.parametrize("batch,heads,width,k,offset", [
    (3, 9, 15, 1, 0),  # one cluster
    (2, 9, 15, 3, 0),  # SmolLM2's 9 heads
    (2, 9, 15, 9, 0),  # one cluster per head
    (8, 9, 15, 3, 1000),  # far from the origin: without an exact centring (padded heads left out) the rounding shows
    (2, 32, 15, 4, 0),  # LLaMA-7B's 32 heads, 5-token causal features
    (2, 40, 25, 7, 0),  # 25 features (5 x 5 probabilities); N, F and k all padded
    (1, 52, 15, 52, 0),
    (1, 64, 64, 17, 0),
    (1, 96, 15, 8, 0),
    (2, 5, 3, 2, 0),  # fewer features than tl.dot's 16
])
def test_gaussian_features(batch, heads, width, k, offset):
    assert_same_as_reference(gaussian(batch, heads, width, seed=heads + k) + offset, k)


@needs_kernel
@pytest.mark.parametrize("heads,groups,noise,k", [(32, 6, 0.1, 4), (32, 4, 0.02, 8), (9, 3, 0.05, 3), (40, 8, 0.3, 6)])
def test_attention_like_features(heads, groups, noise, k):
    assert_same_as_reference(attention_like(4, heads, groups, noise, seed=heads + k), k)


@needs_kernel
def test_duplicate_heads_leave_empty_clusters_last(refill_spy):
    """k above the number of distinct heads: seeding picks head 0 again, the refill finds no point beyond the
    tolerance, the extra clusters stay empty and are numbered last; copies share their cluster."""
    x = duplicates(3)
    labels = assert_same_as_reference(x, 5)
    assert refill_spy[0] == (3 * 2, 0) and not any(moved for _, moved in refill_spy)  # 2 empty clusters per row
    assert (labels.max(1).values == 2).all()
    for row, feats in zip(labels, x):
        assert len({(tuple(f.tolist()), int(c)) for f, c in zip(feats, row)}) == 3  # one cluster per distinct point


@needs_kernel
@pytest.mark.parametrize("case", LINE_CASES)
def test_empty_clusters_and_refills(case, refill_spy):
    """The torch path takes the branch each case is named for (the spy says so), and the kernel gives its labels."""
    small, k, refills = LINE_CASES[case]
    labels = assert_same_as_reference(on_a_line(small), k)
    assert refill_spy == refills
    if case == "refill moves the farthest head":
        assert labels[0].tolist() == [0, 1] + [0] * 8 + [2] * 3 + [3] * 3  # the head at +14 alone


@needs_kernel
def test_mixed_batch():
    """One launch over rows of every kind above: each program runs its own Lloyd, stopping on its own."""
    lines = [on_a_line(small) for small, k, _ in LINE_CASES.values() if k == 4]
    rows = [gaussian(2, 16, 15, seed=7), attention_like(2, 16, 4, 0.05, seed=8), duplicates(2, seed=9), *lines,
            duplicates(1, distinct=6, seed=10)]
    assert_same_as_reference(torch.cat(rows), 4)


@needs_kernel
def test_cluster_heads_runs_the_kernel(monkeypatch):
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return fk.fused_kmeans(*args, **kwargs)

    monkeypatch.setattr(clustering, "fused_kmeans", counted)
    x = attention_like(3, 9, 3, 0.05, seed=1).to(DEVICE)
    assert fk.use_fused(x)
    assert torch.equal(cluster_heads(x, 3), kmeans(x, 3)[0]) and calls == [1]


def test_without_triton_the_torch_path_runs(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # a CPU tensor outside the interpreter: plain torch
    monkeypatch.setattr(clustering, "fused_kmeans", None)  # would fail if called
    x = gaussian(2, 8, 15)
    assert not fk.use_fused(x)
    assert torch.equal(cluster_heads(x, 3), kmeans(x, 3)[0])


def test_too_many_heads_or_features_use_the_torch_path(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not fk.use_fused(torch.zeros(1, fk.MAX_SIZE + 1, 15))
    assert not fk.use_fused(torch.zeros(1, 8, fk.MAX_SIZE + 1))


@pytest.mark.skipif(not ON_GPU or not fk.HAVE_TRITON, reason="needs a CUDA GPU")
def test_prefill_sized_batches_on_the_gpu():
    """A prefill's clustering at serving sizes: 64 requests x 32 heads, k = 4 and 18 (the released LLaMA-7B
    lists' late and middle layers), against the torch path on the same GPU."""
    for k in (4, 18):
        assert_same_as_reference(attention_like(64, 32, 8, 0.1, seed=k), k)
        assert_same_as_reference(gaussian(64, 32, 15, seed=k), k)


@pytest.mark.skipif(INTERPRETING or ON_GPU or not fk.HAVE_TRITON, reason="the kernel tests ran in this process")
def test_kernel_in_a_fresh_interpreter():
    """The kernel tests of this file in a process where TRITON_INTERPRET=1 comes before triton's import."""
    fresh_interpreter_run(__file__)

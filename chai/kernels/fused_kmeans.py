"""CHAI's per-request head clustering (Agarwal et al., ICML 2024) in one kernel launch per layer: the whole K-Means of
every request of a batch, one program each, in on-chip memory.

`fused_kmeans(features, k)` gives the memberships `chai.clustering.kmeans(features, k)` gives (its defaults: one
farthest-point start, at most 100 Lloyd updates), from the same features: the same centring, seeding with its
tolerance rule, empty-cluster refill, early stop and canonical numbering, with the same distance formula. The torch
path syncs with the host at every Lloyd step (the convergence and refill checks) and launches tens of small kernels
per step; here the early stop happens inside each program, so a layer's clustering is one launch with no sync.

Equality is of labels, not of bits: sums run in another order than torch's (a BLAS matmul, a vectorised
reduction), so distances can differ in the last bits, and a point whose two nearest centers are within float32
rounding of each other (about 1e-7 |x|^2 apart, |x|^2 its squared distance from the centroid), or whose distance
is within rounding of the tolerance, can then change side. Exact copies of a head are computed alike here, so they
always share a cluster; the torch path's CPU matmul (MKL) can round two equal rows differently, and where a tie
between copies decides (k above the number of distinct heads, values that are not exact), its labels follow that
rounding and can even split the copies. On random and attention-like features (tests/test_fused_kmeans.py) and on
SmolLM2's own (5 tokens of 16 prompts, 30 layers, k = 1..9: 4320 problems) the labels agreed in every problem.

Runs on CUDA tensors, and under TRITON_INTERPRET=1 on CPU tensors (how the tests check it); `use_fused` says
which. Limits: N heads, F features and k clusters are padded to powers of two of at least 16 (tl.dot's smallest
side), up to MAX_SIZE = 128; a program holds x [BN, BF], the centers [BK, BF] and the distances [BN, BK] in
registers. Compiled for sm_90 it fits without spilling at 16 padded features up to 64 heads (any k) or 128 heads
(k up to 32), and at 32 features up to 32 heads; larger tiles spill some values to local memory (L1). A new
(BN, BF, BK) compiles a new kernel: k is a runtime argument, so one model compiles a few variants (k up to 16, 32,
64, ...), not one per cluster count.
"""

import contextlib
import functools
import importlib.util
import os

import torch

from chai.errors import check_cluster_count

HAVE_TRITON = importlib.util.find_spec("triton") is not None
MAX_SIZE = 128  # heads, features or clusters: beyond it most of a program's tiles would spill out of registers


@functools.cache
def _kernel():
    """The Triton kernel, imported on first use (the interpreter must be on before triton's first import)."""
    from chai.kernels._kmeans_triton import kmeans_kernel

    return kmeans_kernel


def use_fused(features: torch.Tensor) -> bool:
    """Whether `fused_kmeans` can run on these features: triton is installed and the tensor is on a GPU, or the
    interpreter is on (CPU tensors); the head and feature counts are within MAX_SIZE."""
    fits = features.dim() == 3 and max(features.shape[1:]) <= MAX_SIZE
    return HAVE_TRITON and fits and (features.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


def _block(n: int) -> int:
    """A power of two >= n and >= 16 (tl.dot's smallest side)."""
    return max(16, 1 << max(0, (n - 1).bit_length()))


def _warps(blocks: dict) -> int:
    """Warps per program: 8 for the smallest tiles, 16 beyond, the fewest that compiled without spills for sm_90
    (ptxas -v) over tiles of 16..128 heads, 16..64 features and 16..128 clusters (32 heads, 16 padded features, k up
    to 16: 8 warps, 86 registers). Not yet timed on a GPU: scripts/bench_kmeans.py --warps compares."""
    return 8 if blocks["BN"] <= 32 and blocks["BF"] == blocks["BK"] == 16 else 16


def fused_kmeans(features: torch.Tensor, k: int, iters: int = 100, return_inertia: bool = False,
                 num_warps: int | None = None):
    """features [B, N, F] -> canonical labels [B, N] int64 (and inertia [B] float32 with return_inertia), equal to
    `chai.clustering.kmeans(features, k, iters)` (see the module docstring for where equality could break).
    `num_warps`: per program (one problem), None for `_warps`' choice."""
    batch, heads, width = features.shape
    check_cluster_count(heads, k)
    x = features.detach().float().contiguous()
    labels = torch.empty(batch, heads, dtype=torch.long, device=x.device)
    inertia = torch.empty(batch, dtype=torch.float32, device=x.device)
    if batch:
        blocks = dict(BN=_block(heads), BF=_block(width), BK=_block(k))
        # Triton launches on the current GPU: make it the tensors' one (a model spread over GPUs).
        with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
            # No fused multiply-add: torch's eager ops round each product and sum, so should the kernel.
            _kernel()[(batch,)](x, labels, inertia, heads, width, k, iters, **blocks,
                                num_warps=num_warps or _warps(blocks), enable_fp_fusion=False)
    return (labels, inertia) if return_inertia else labels

"""CHAI's online membership (Agarwal et al., ICML 2024) in one kernel launch per layer: from the first m query and key
rows of a prompt straight to the membership, one program per request.

`fused_membership(q_first, k_first, scaling, count, width)` computes what `cluster_first_tokens` computes for a plan
with causal features, K-Means and "first" representatives, and what `ChaiStaticLayer.set_membership` derives from it:
each head's causal attention probabilities over the first m tokens (float32, scaled, softmax per row, the lower
triangle in torch.tril_indices order), `chai.clustering.kmeans` on them (the fused K-Means kernel's own code, see
`chai.kernels.fused_kmeans`), each cluster's lowest member head as its representative, then `Membership.build`'s
kv_keep and rep_slot for `width` slots and v_index = rep_slot[labels]. The torch chain is about 60 small kernels a
layer (the static cache replayed them as a CUDA graph); this is one launch, with no host sync and no copy of the
inputs (strided views are read in place), so it can also be captured in a CUDA graph.

Equality is of labels up to float32 rounding ties, as for `fused_kmeans`: the dot products and softmax sums run in
another order than torch's matmul and softmax, so features differ from torch's in the last bits, and a head whose two
nearest centers are within rounding of each other can change side. The representatives, kept KV heads and slots are
exact functions of the labels.

Runs on CUDA tensors, and under TRITON_INTERPRET=1 on CPU tensors (how the tests check it); `use_fused_membership`
says whether a plan and query can take it. Limits: up to MAX_HEADS query heads, MAX_TOKENS membership tokens
(m(m+1)/2 features up to fused_kmeans.MAX_SIZE), head size up to MAX_HEAD_DIM. Registers per program: one query row
and one key row of every head, [BN, BD] each (BD chunks of the head dimension, BN * BD <= 4096), the scores and
features [BN, BF], then the K-Means tiles of `fused_kmeans` (its warp choice too). Heads, features and clusters are
padded to powers of two of at least 16 (tl.dot's smallest side). ptxas for sm_90 (Triton 3.6, compiled without a
GPU): LLaMA-7B's layer (32 heads, head size 128, m = 5) fits without spilling, 128 registers at 8 warps (k up to 16)
and 111 at 16 warps (k up to 32); 32 heads over 8 KV heads spill 16 bytes, m = 8 at 64 heads about 2 KB. On an
H200 at 1 x 2048 on the 7B shape: 0.68 ms for 32 launches, 21 us a layer
(results/bench/profile_prefill_1x2048_h200.txt). m and the head size are compile-time constants (the pair loop is
unrolled), k and the width are not: one compile serves every layer of a model whose counts share a padded size.
"""

import contextlib
import functools
import os

import torch

from chai.clustering import Membership
from chai.errors import ChaiError, check_cluster_count
from chai.kernels.fused_kmeans import HAVE_TRITON, MAX_SIZE, _block, _warps

MAX_HEADS = MAX_SIZE  # the K-Means tiles' bound
MAX_TOKENS = 15  # 120 features: the largest m with m(m+1)/2 <= MAX_SIZE
MAX_HEAD_DIM = 256
ROW_TILE = 4096  # elements of a [heads, head-dim chunk] row tile: 8 or 16 per thread at 16 or 8 warps
ITERS = 100  # Lloyd updates at most: chai.clustering.kmeans' default, which cluster_heads runs


@functools.cache
def _kernel():
    """The Triton kernel, imported on first use (the interpreter must be on before triton's first import)."""
    from chai.kernels._membership_triton import membership_kernel

    return membership_kernel


def use_fused_membership(plan, query: torch.Tensor) -> bool:
    """Whether `fused_membership` computes this plan's online membership (a `ChaiPlan`: causal features, K-Means,
    "first" representatives) for `query` [B, H, T, D]: triton is installed and the tensor is on a GPU, or on the CPU
    under the interpreter; not inside torch.compile (a raw launch is no traceable op); sizes within the limits."""
    settings = plan.causal_features and plan.cluster_algo == "kmeans" and plan.representative == "first"
    fits = (query.dim() == 4 and query.shape[1] <= MAX_HEADS and plan.membership_tokens <= MAX_TOKENS
            and query.shape[-1] <= MAX_HEAD_DIM)
    where = query.is_cuda or (query.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")
    return HAVE_TRITON and settings and fits and where and not torch.compiler.is_compiling()


def _outputs(batch: int, heads: int, count: int, width: int, device, out) -> tuple[torch.Tensor, ...]:
    """(labels [B, H], reps [B, C], kv_keep [B, width], rep_slot [B, C], v_index [B, H]): `out` checked (int64,
    contiguous, on `device`: the kernel writes rows of them at b * row), or new tensors."""
    shapes = [(batch, heads), (batch, count), (batch, width), (batch, count), (batch, heads)]
    if out is None:
        return tuple(torch.empty(shape, dtype=torch.long, device=device) for shape in shapes)
    for name, tensor, shape in zip(("labels", "reps", "kv_keep", "rep_slot", "v_index"), out, shapes):
        if (tuple(tensor.shape) != shape or tensor.dtype != torch.long or not tensor.is_contiguous()
                or tensor.device != device):
            raise ChaiError(f"fused_membership writes {name} as a contiguous int64 {list(shape)} tensor on {device}, "
                            f"got {tensor.dtype} {list(tensor.shape)} on {tensor.device}.")
    return tuple(out)


def _blocks(heads: int, kv_heads: int, tokens: int, dim: int, count: int, width: int) -> dict:
    """The padded tile sides (compile-time constants); D and M are exact: they bound unrolled loops."""
    rows = _block(heads)
    return dict(M=tokens, D=dim, BN=rows, BF=_block(tokens * (tokens + 1) // 2), BK=_block(count),
                BD=min(_block(dim), max(16, ROW_TILE // rows)), BKV=_block(kv_heads), BW=_block(width))


def fused_membership(q_first: torch.Tensor, k_first: torch.Tensor, scaling: float, count: int, width: int,
                     out: tuple[torch.Tensor, ...] | None = None) -> tuple[Membership, torch.Tensor]:
    """q_first [B, H, m, D], k_first [B, Hkv, m, D] (the prompt's first m rows, any float dtype, any strides) ->
    (Membership: labels [B, H], reps [B, count], kv_keep [B, width], rep_slot [B, count]; v_index [B, H]), all
    int64, as `cluster_first_tokens` with causal features, K-Means and "first" representatives, then
    `rep_slot.gather(1, labels)`. `width`: kv_keep's slots, at least the KV heads the representatives read
    (min(count, Hkv) always is). `out`: tensors of those five to write into, in that order (a static cache's
    buffers), else new ones. No host sync."""
    batch, heads, tokens, dim = q_first.shape
    kv_heads = k_first.shape[1]
    if k_first.shape[0] != batch or k_first.shape[2] != tokens or k_first.shape[3] != dim or heads % kv_heads:
        raise ChaiError(f"fused_membership: queries {list(q_first.shape)} do not fit keys {list(k_first.shape)}.")
    check_cluster_count(heads, count)
    if not min(count, kv_heads) <= width <= kv_heads:
        raise ChaiError(f"fused_membership: width {width} must lie in {min(count, kv_heads)}..{kv_heads}.")
    outputs = _outputs(batch, heads, count, width, q_first.device, out)
    if batch:
        blocks = _blocks(heads, kv_heads, tokens, dim, count, width)
        warps = _warps(blocks)
        with torch.cuda.device(q_first.device) if q_first.is_cuda else contextlib.nullcontext():
            # No fused multiply-add: torch's eager ops round each product and sum, so should the kernel.
            _kernel()[(batch,)](q_first, k_first, *outputs, *q_first.stride(), *k_first.stride(), float(scaling),
                                heads, heads // kv_heads, count, width, ITERS, **blocks, PRECISE=q_first.is_cuda,
                                num_warps=warps, enable_fp_fusion=False)
    labels, reps, kv_keep, rep_slot, v_index = outputs
    return Membership(labels, reps, kv_keep, rep_slot), v_index

"""The Triton kernel behind `chai.kernels.fused_membership.fused_membership` (see there for the contract); a module of
its own so that triton is imported only when the kernel is first used.

One program per request b, everything in registers, in four stages:
1. Scores: for each causal pair (i, j), j <= i < M, the dot product q_i . k_j of every head at once, [BN, BD] tiles
   of one query row and one key row (all heads) multiplied and summed over the head dimension (in chunks of BD),
   written to column i(i+1)/2 + j of a [BN, BF] tile: torch.tril_indices' order, so the tile is laid out as the
   features are. The M(M+1)/2 pairs are unrolled (M and D are compile-time constants); a row tile is reloaded for
   each pair it is in, from L1.
2. Features: per head and query row i, the softmax of columns i(i+1)/2 .. i(i+1)/2 + i, scaled as
   `chai.attention.attention_probs` scales: the causal row of P over the first M tokens, its masked entries left out
   (torch's are exp(-huge) = 0, which adds nothing to the sum).
3. K-Means on those features: `_kmeans_triton`'s own centring, seeding, Lloyd loop and canonical numbering.
4. Membership: each cluster's lowest member head (representative "first"), the KV heads those read, their slots,
   and each head's value slot, as `chai.clustering.Membership.build` and `ChaiStaticLayer.set_membership` compute
   them, from [BK, BKV], [BKV, BKV], [BW, BKV] and [BN, BK] comparison tiles (no gathers).
"""

import triton
import triton.language as tl
from triton.language.extra import libdevice

from chai.kernels._kmeans_triton import canonical, centre, lloyd


@triton.jit
def _scores(Q, K, q_sh, q_st, q_sd, k_sh, k_st, k_sd, N, groups,
            M: tl.constexpr, D: tl.constexpr, BN: tl.constexpr, BF: tl.constexpr, BD: tl.constexpr):
    """[BN, BF]: q_i . k_j in float32 of every head (GQA: KV head h // groups) for each pair j <= i < M at column
    i(i+1)/2 + j; 0 in padded heads and columns. Q, K: one request's first rows (strided, any float dtype)."""
    heads = tl.arange(0, BN)
    row_ok = heads < N
    q_heads = Q + heads.to(tl.int64)[:, None] * q_sh  # [BN, 1] pointers (int64: a long prompt's head stride is big)
    k_heads = K + (heads // groups).to(tl.int64)[:, None] * k_sh
    cols = tl.arange(0, BF)[None, :]
    scores = tl.zeros([BN, BF], dtype=tl.float32)
    for d0 in tl.static_range(0, D, BD):
        dims = d0 + tl.arange(0, BD)[None, :]
        ok = row_ok[:, None] & (dims < D)
        for i in tl.static_range(M):
            q = tl.load(q_heads + i * q_st + dims * q_sd, mask=ok, other=0.0).to(tl.float32)  # [BN, BD]
            for j in tl.static_range(i + 1):
                k = tl.load(k_heads + j * k_st + dims * k_sd, mask=ok, other=0.0).to(tl.float32)
                dot = tl.sum(q * k, axis=1)  # [BN]
                scores = tl.where(cols == i * (i + 1) // 2 + j, scores + dot[:, None], scores)
    return scores


@triton.jit
def _exp(x, PRECISE: tl.constexpr):
    """exp in float32: libdevice's expf when compiled (tl.exp is ex2.approx there, a few ulp off torch's expf, more
    for large arguments), numpy's under the interpreter (which has no libdevice)."""
    if PRECISE:
        return libdevice.exp(x)
    else:
        return tl.exp(x)


@triton.jit
def _causal_softmax(scores, scaling, M: tl.constexpr, BF: tl.constexpr, PRECISE: tl.constexpr):
    """scores [BN, BF] as `_scores` lays them out -> the causal softmax rows, same layout (columns from M(M+1)/2 on
    come out 0): row i is columns i(i+1)/2 .. i(i+1)/2 + i. Scaled after the dot product, as torch scales."""
    cols = tl.arange(0, BF)[None, :]
    scores = scores * scaling
    probs = tl.zeros_like(scores)
    for i in tl.static_range(M):
        row = (cols >= i * (i + 1) // 2) & (cols <= i * (i + 1) // 2 + i)
        top = tl.max(tl.where(row, scores, float("-inf")), axis=1)
        e = _exp(tl.where(row, scores - top[:, None], float("-inf")), PRECISE)
        probs = tl.where(row, tl.math.div_rn(e, tl.sum(e, axis=1)[:, None]), probs)  # div_rn: IEEE, as torch's
    return probs


@triton.jit
def _first_members(labels, row_ok, BN: tl.constexpr, BK: tl.constexpr):
    """Canonical labels [BN] -> (reps [BK]: each cluster's lowest member head, an empty cluster cluster 0's;
    filled [BK]: whether the cluster has a member), as `representatives(..., "first")`."""
    heads = tl.arange(0, BN)
    clusters = tl.arange(0, BK)
    mine = (labels[:, None] == clusters[None, :]) & row_ok[:, None]  # padded heads belong nowhere
    lowest = tl.min(tl.where(mine, heads[:, None], BN), axis=0)  # [BK]: BN if empty
    filled = lowest < BN
    first = tl.sum(tl.where(clusters == 0, lowest, 0), axis=0)  # cluster 0 holds head 0 (canonical numbering)
    return tl.where(filled, lowest, first), filled


@triton.jit
def _kv_slots(reps, filled, groups, BK: tl.constexpr, BKV: tl.constexpr):
    """(used [BKV]: KV heads a filled cluster's representative reads; below [BKV]: used KV heads below each one;
    rep_slot [BK]: the slot, among the used KV heads in ascending order, of each representative's KV head)."""
    kvs = tl.arange(0, BKV)
    rep_kv = reps // groups  # GQA: query head h reads KV head h // groups
    reads = (rep_kv[:, None] == kvs[None, :]) & filled[:, None]  # [BK, BKV]
    used = tl.max(reads.to(tl.int32), axis=0) > 0
    below = tl.sum(((kvs[None, :] < kvs[:, None]) & used[None, :]).to(tl.int32), axis=1)  # [BKV]
    rep_slot = tl.sum(((kvs[None, :] < rep_kv[:, None]) & used[None, :]).to(tl.int32), axis=1)  # [BK]
    return used, below, rep_slot


@triton.jit
def _kv_keep(used, below, BKV: tl.constexpr, BW: tl.constexpr):
    """[BW]: slot s holds the s-th used KV head (ascending); slots past the used ones repeat the first."""
    kvs = tl.arange(0, BKV)
    slots = tl.arange(0, BW)
    held = used[None, :] & (below[None, :] == slots[:, None])  # [BW, BKV]: at most one KV head per slot
    first = tl.min(tl.where(used, kvs, BKV), axis=0)
    return tl.where(tl.max(held.to(tl.int32), axis=1) > 0, tl.sum(tl.where(held, kvs[None, :], 0), axis=1), first)


@triton.jit(do_not_specialize=["k", "width"])  # both change from layer to layer: one compile serves every layer
def membership_kernel(Q, K, Labels, Reps, KvKeep, RepSlot, VIndex,
                      q_sb, q_sh, q_st, q_sd, k_sb, k_sh, k_st, k_sd, scaling, N, groups, k, width, iters,
                      M: tl.constexpr, D: tl.constexpr, BN: tl.constexpr, BF: tl.constexpr, BD: tl.constexpr,
                      BK: tl.constexpr, BKV: tl.constexpr, BW: tl.constexpr, PRECISE: tl.constexpr):
    """One program per request b: Q [B, N, >=M, D], K [B, N // groups, >=M, D] (strided) -> Labels [B, N],
    Reps [B, k], KvKeep [B, width], RepSlot [B, k], VIndex [B, N], int64 contiguous."""
    b = tl.program_id(0).to(tl.int64)
    heads = tl.arange(0, BN)
    clusters = tl.arange(0, BK)
    row_ok = heads < N
    scores = _scores(Q + b * q_sb, K + b * k_sb, q_sh, q_st, q_sd, k_sh, k_st, k_sd, N, groups, M, D, BN, BF, BD)
    features = tl.where(row_ok[:, None], _causal_softmax(scores, scaling, M, BF, PRECISE), 0.0)  # [BN, BF]

    ok = row_ok[:, None] & (tl.arange(0, BF)[None, :] < M * (M + 1) // 2)
    x, xx, tol = centre(features, ok, N)
    labels, _ = lloyd(x, xx, tol, row_ok, k, iters, BN, BK)
    labels = canonical(labels, N, BN, BK)

    reps, filled = _first_members(labels, row_ok, BN, BK)
    used, below, rep_slot = _kv_slots(reps, filled, groups, BK, BKV)
    v_index = tl.sum(tl.where(labels[:, None] == clusters[None, :], rep_slot[None, :], 0), axis=1)  # [BN]
    slots = tl.arange(0, BW)
    tl.store(Labels + b * N + heads, labels.to(tl.int64), mask=row_ok)
    tl.store(VIndex + b * N + heads, v_index.to(tl.int64), mask=row_ok)
    tl.store(Reps + b * k + clusters, reps.to(tl.int64), mask=clusters < k)
    tl.store(RepSlot + b * k + clusters, rep_slot.to(tl.int64), mask=clusters < k)
    tl.store(KvKeep + b * width + slots, _kv_keep(used, below, BKV, BW).to(tl.int64), mask=slots < width)

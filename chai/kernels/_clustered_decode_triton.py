"""The Triton kernels behind `chai.kernels.clustered_decode.clustered_decode_attention` (see there for the layout);
a module of its own so that triton is imported only when the kernels are first used.

Two streaming passes and a merge: pass 1 reads each cluster's K once and writes its representative's scores
(float32, one per key); pass 2 reads each head's V once with its cluster's scores (4 bytes per key, mostly from L2,
next to the head's 2 * head_dim bytes of V) and leaves per-split partial results; the merge combines the splits.
On an H100 this reads 2.0-2.7 TB/s at LLaMA-7B decode shapes, where one fused kernel (K tile once per chunk of
member heads, every member's V in the same program) reached 1.0-2.5 TB/s (results/bench/kernel_tune_*.jsonl)."""

import triton
import triton.language as tl


@triton.jit
def _grid():
    """(cluster or head, split, batch row) of this program; the row 64-bit: b * stride overflows int32 on large
    caches."""
    return tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)


@triton.jit
def _split_tiles(KvLen, b, stride_kvl, kv_limit, split, BLOCK_S: tl.constexpr, TILES: tl.constexpr,
                 HAS_KVLEN: tl.constexpr):
    """(valid length of row b, first key of the split, tiles holding a valid key): splits past it run none."""
    kv_len = tl.minimum(tl.load(KvLen + b * stride_kvl), kv_limit) if HAS_KVLEN else kv_limit
    lo = split * (TILES * BLOCK_S)
    return kv_len, lo, tl.minimum(tl.maximum(kv_len - lo + BLOCK_S - 1, 0) // BLOCK_S, TILES)


@triton.jit
def rep_scores_kernel(
    Q, K, Reps, KIdx, KvLen, Scores,
    stride_qb, stride_qh, stride_kb, stride_kc, stride_ks, stride_kib, stride_kvl, stride_sb, stride_sc,
    clusters, kv_limit, scaling,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, TILES: tl.constexpr,
    DYNAMIC_LOOP: tl.constexpr, HAS_KIDX: tl.constexpr, HAS_KVLEN: tl.constexpr,
):
    """One program per (cluster, split, batch): scores[b, c, s] = q[b, rep(c)] . K[b, kc(c), s] * scaling for the
    split's keys below the valid length (later ones are not written: pass 2 never reads them)."""
    c, split, b = _grid()
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    r = tl.load(Reps + b * clusters + c)
    kc = tl.load(KIdx + b * stride_kib + c) if HAS_KIDX else c
    q = tl.load(Q + b * stride_qb + r * stride_qh + d, mask=d_ok, other=0.0).to(tl.float32) * scaling
    kv_len, lo, n_tiles = _split_tiles(KvLen, b, stride_kvl, kv_limit, split, BLOCK_S, TILES, HAS_KVLEN)
    k_base = K + b * stride_kb + kc * stride_kc
    out = Scores + b * stride_sb + c * stride_sc
    # Compiled, the loop stops at the last tile holding a valid token (splits past kv_len run nothing). The
    # interpreter cannot loop to a runtime bound (its scalars are 1-element arrays): there the loop runs TILES
    # times and the tiles past n_tiles are fully masked.
    for tile in range(n_tiles if DYNAMIC_LOOP else TILES):
        s = lo + tile * BLOCK_S + tl.arange(0, BLOCK_S)
        s_ok = (s < kv_len) & (tile < n_tiles)
        k = tl.load(k_base + s[:, None] * stride_ks + d[None, :], mask=s_ok[:, None] & d_ok[None, :], other=0.0)
        tl.store(out + s, tl.sum(k.to(tl.float32) * q[None, :], axis=1), mask=s_ok)


@triton.jit
def shared_scores_values_kernel(
    Scores, V, Labels, VIdx, KvLen, Acc, M, L,
    stride_sb, stride_sc, stride_vb, stride_vh, stride_vs, stride_vib, stride_kvl, heads, splits, v_group, kv_limit,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, TILES: tl.constexpr,
    DYNAMIC_LOOP: tl.constexpr, HAS_VIDX: tl.constexpr, HAS_KVLEN: tl.constexpr,
):
    """One program per (head, split, batch): the split's softmax statistics of the head's cluster scores (max, then
    sum of exp) and p @ V of the head, as partial results for `merge_splits_kernel`."""
    h, split, b = _grid()
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    c = tl.load(Labels + b * heads + h)
    vh = tl.load(VIdx + b * stride_vib + h) if HAS_VIDX else h // v_group
    kv_len, lo, n_tiles = _split_tiles(KvLen, b, stride_kvl, kv_limit, split, BLOCK_S, TILES, HAS_KVLEN)
    scores = Scores + b * stride_sb + c * stride_sc
    m_i = tl.full([BLOCK_S], float("-inf"), tl.float32)
    for tile in range(n_tiles if DYNAMIC_LOOP else TILES):  # the scores are 1/64 of the V bytes: read them twice
        s = lo + tile * BLOCK_S + tl.arange(0, BLOCK_S)
        m_i = tl.maximum(m_i, tl.load(scores + s, mask=(s < kv_len) & (tile < n_tiles), other=float("-inf")))
    m = tl.max(m_i, axis=0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)  # an empty split: nothing accumulates
    l_i = tl.zeros([BLOCK_S], tl.float32)
    acc = tl.zeros([BLOCK_D], tl.float32)
    v_base = V + b * stride_vb + vh * stride_vh
    for tile in range(n_tiles if DYNAMIC_LOOP else TILES):
        s = lo + tile * BLOCK_S + tl.arange(0, BLOCK_S)
        s_ok = (s < kv_len) & (tile < n_tiles)
        p = tl.where(s_ok, tl.exp(tl.load(scores + s, mask=s_ok, other=0.0) - m_safe), 0.0)
        l_i += p
        val = tl.load(v_base + s[:, None] * stride_vs + d[None, :], mask=s_ok[:, None] & d_ok[None, :], other=0.0)
        acc += tl.sum(p[:, None] * val.to(tl.float32), axis=0)
    out = (b * heads + h) * splits + split
    tl.store(Acc + out * BLOCK_D + d, acc)
    tl.store(M + out, m)
    tl.store(L + out, tl.sum(l_i, axis=0))


@triton.jit
def merge_splits_kernel(
    Acc, M, L, Out, stride_ob, stride_oh, heads, splits,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SPLITS: tl.constexpr,
):
    """One program per (batch, head): log-sum-exp merge of the splits' (max score, sum of exp, p @ V); empty
    splits hold m = -inf and weigh nothing."""
    o = tl.program_id(0).to(tl.int64)
    b = o // heads
    h = o % heads
    sp = tl.arange(0, BLOCK_SPLITS)
    sp_ok = sp < splits
    d = tl.arange(0, BLOCK_D)
    m = tl.load(M + o * splits + sp, mask=sp_ok, other=float("-inf"))
    l = tl.load(L + o * splits + sp, mask=sp_ok, other=0.0)
    m_max = tl.max(m, axis=0)
    w = tl.where(m == float("-inf"), 0.0, tl.exp(m - m_max))
    acc = tl.load(Acc + (o * splits + sp)[:, None] * BLOCK_D + d[None, :], mask=sp_ok[:, None], other=0.0)
    out = tl.sum(acc * w[:, None], axis=0) / tl.sum(l * w, axis=0)
    tl.store(Out + b * stride_ob + h * stride_oh + d, out.to(Out.dtype.element_ty), mask=d < HEAD_DIM)

"""The Triton kernel behind `chai.kernels.clustered_decode.clustered_decode_attention` (see there for the layout);
a module of its own so that triton is imported only when the kernel is first used."""

import triton
import triton.language as tl


@triton.jit
def clustered_decode_kernel(
    Q, K, V, Order, Labels, Reps, KIdx, VIdx, KvLen, Acc, M, L,
    stride_qb, stride_qh, stride_kb, stride_kc, stride_ks, stride_vb, stride_vh, stride_vs,
    heads, clusters, splits, scaling,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, TILES: tl.constexpr,
):
    slot = tl.program_id(0)  # b * H + rank of the head in cluster order
    split = tl.program_id(1)
    b = (slot // heads).to(tl.int64)  # 64-bit offsets: b * stride overflows int32 on large caches
    h = tl.load(Order + slot)
    c = tl.load(Labels + b * heads + h)
    r = tl.load(Reps + b * clusters + c)
    kc = tl.load(KIdx + b * clusters + c)  # K entry of the cluster
    hv = tl.load(VIdx + b * heads + h)  # V head of this query head
    kv_len = tl.load(KvLen + b)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    q = tl.load(Q + b * stride_qb + r * stride_qh + d, mask=d_ok, other=0.0).to(tl.float32) * scaling
    m_i = tl.full([1], float("-inf"), tl.float32)
    l_i = tl.zeros([1], tl.float32)
    acc = tl.zeros([BLOCK_D], tl.float32)
    lo = split * (TILES * BLOCK_S)
    # A constant trip count (TILES) rather than range(lo, kv_len): tiles past kv_len are fully masked (no
    # memory traffic), and the interpreter cannot loop to a runtime bound.
    for tile in range(TILES):
        s = lo + tile * BLOCK_S + tl.arange(0, BLOCK_S)
        s_ok = s < kv_len
        tile_ok = s_ok[:, None] & d_ok[None, :]
        k = tl.load(K + b * stride_kb + kc * stride_kc + s[:, None] * stride_ks + d[None, :], mask=tile_ok,
                    other=0.0).to(tl.float32)  # [BLOCK_S, BLOCK_D]
        score = tl.where(s_ok, tl.sum(k * q[None, :], axis=1), float("-inf"))  # [BLOCK_S]
        m_new = tl.maximum(m_i, tl.max(score, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing valid yet: keep alpha and p at 0
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(score - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        val = tl.load(V + b * stride_vb + hv * stride_vh + s[:, None] * stride_vs + d[None, :], mask=tile_ok,
                      other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * val, axis=0)
        m_i = m_new
    out = (b * heads + h) * splits + split
    tl.store(Acc + out * BLOCK_D + d, acc)
    tl.store(M + out + tl.arange(0, 1), m_i)
    tl.store(L + out + tl.arange(0, 1), l_i)

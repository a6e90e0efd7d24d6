"""The Triton kernels behind `chai.kernels.clustered_decode.clustered_decode_attention` (see there for the layout);
a module of its own so that triton is imported only when the kernels are first used."""

import triton
import triton.language as tl


@triton.jit
def _work_item(Labels, Reps, KIdx, VIdx, KvLen, b, item, stride_kib, stride_vib, stride_kvl, heads, clusters,
               v_group, kv_limit, BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr, GROUP: tl.constexpr,
               HAS_KIDX: tl.constexpr, HAS_VIDX: tl.constexpr, HAS_KVLEN: tl.constexpr):
    """What program `item` of batch row b works on. Work items are numbered cluster by cluster (cluster c has
    ceil(n_c / GROUP) of them) and found from the labels row, so no member table is built outside. Returns the
    representative head r, the cluster's K entry kc, the chunk's member heads [GROUP] and their V heads, which
    of those rows exist, whether the item exists at all (the grid holds a static upper bound) and the valid
    length. Without KIdx / VIdx / KvLen (HAS_* false) the cluster reads K entry c, head h reads V head
    h // v_group and the valid length is kv_limit; the index tensors may have batch stride 0 (one row for all)."""
    hh = tl.arange(0, BLOCK_H)
    cc = tl.arange(0, BLOCK_C)
    gg = tl.arange(0, GROUP)
    lab = tl.load(Labels + b * heads + hh, mask=hh < heads, other=-1)  # [BLOCK_H]
    # Work items per cluster, their running total, and the (cluster, chunk) of this item.
    counts = tl.sum((lab[None, :] == cc[:, None]).to(tl.int32), axis=1)  # [BLOCK_C]
    chunks = (counts + GROUP - 1) // GROUP
    cum = tl.sum(tl.where(cc[None, :] <= cc[:, None], chunks[None, :], 0), axis=1)  # inclusive running total
    total = tl.sum(chunks, axis=0)
    c = tl.sum((cum <= item).to(tl.int32), axis=0)  # empty clusters (no chunk) are stepped over
    active = item < total
    c = tl.where(active, c, 0)
    chunk = item - tl.sum(tl.where(cc == c, cum - chunks, 0), axis=0)
    # Member heads of this chunk: the cluster's heads in increasing order, ranks chunk*GROUP .. +GROUP-1.
    is_mem = lab == c
    rank = tl.sum(tl.where((hh[None, :] < hh[:, None]) & is_mem[None, :], 1, 0), axis=1)  # [BLOCK_H]
    sel = is_mem[None, :] & (rank[None, :] == chunk * GROUP + gg[:, None]) & active  # [GROUP, BLOCK_H]
    head = tl.sum(tl.where(sel, hh[None, :], 0), axis=1)  # [GROUP]
    row_ok = tl.sum(sel.to(tl.int32), axis=1) > 0
    vhead = tl.load(VIdx + b * stride_vib + head, mask=row_ok, other=0) if HAS_VIDX else head // v_group  # [GROUP]
    r = tl.load(Reps + b * clusters + c)
    kc = tl.load(KIdx + b * stride_kib + c) if HAS_KIDX else c  # K entry of the cluster
    kv_len = tl.minimum(tl.load(KvLen + b * stride_kvl), kv_limit) if HAS_KVLEN else kv_limit  # <= buffer
    return r, kc, head, vhead, row_ok, active, kv_len


@triton.jit
def _tile_count(split, kv_len, active, BLOCK_S: tl.constexpr, TILES: tl.constexpr):
    """(first key of the split, tiles holding a valid key): splits past kv_len and absent items run none."""
    lo = split * (TILES * BLOCK_S)
    n_tiles = tl.minimum(tl.maximum(kv_len - lo + BLOCK_S - 1, 0) // BLOCK_S, TILES)
    return lo, tl.where(active, n_tiles, 0)


@triton.jit
def clustered_decode_kernel(
    Q, K, V, Labels, Reps, KIdx, VIdx, KvLen, Acc, M, L,
    stride_qb, stride_qh, stride_kb, stride_kc, stride_ks, stride_vb, stride_vh, stride_vs,
    stride_kib, stride_vib, stride_kvl, heads, clusters, splits, v_group, kv_limit, scaling,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, TILES: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr, GROUP: tl.constexpr, DYNAMIC_LOOP: tl.constexpr,
    HAS_KIDX: tl.constexpr, HAS_VIDX: tl.constexpr, HAS_KVLEN: tl.constexpr, MMA: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One program per (work item, split, batch): a work item is one chunk of up to GROUP member heads of one
    cluster (`_work_item`). The program streams the cluster's K tiles once, computes the representative's scores
    with an online softmax, and accumulates p @ V for each of its member heads, on CUDA cores or (MMA) on tensor
    cores. Tensor cores: the representative's query is repeated to the 16 rows an MMA needs (every row computes the
    same scores; row 0 is stored), and the members' V tiles sit side by side as one [BLOCK_S, GROUP * BLOCK_D]
    operand, so p @ V for every member is one dot; tiles reach the MMA through shared memory, which lets Triton
    pipeline their loads (num_stages) with few registers per thread, where the CUDA-core path holds a whole
    [GROUP, BLOCK_S, BLOCK_D] float32 tile in registers."""
    item = tl.program_id(0)
    split = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)  # 64-bit offsets: b * stride overflows int32 on large caches
    r, kc, head, vhead, row_ok, active, kv_len = _work_item(
        Labels, Reps, KIdx, VIdx, KvLen, b, item, stride_kib, stride_vib, stride_kvl, heads, clusters, v_group,
        kv_limit, BLOCK_H, BLOCK_C, GROUP, HAS_KIDX, HAS_VIDX, HAS_KVLEN)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    lo, n_tiles = _tile_count(split, kv_len, active, BLOCK_S, TILES)
    k_base = K + b * stride_kb + kc * stride_kc
    v_base = V + b * stride_vb
    if MMA:
        # Column j of the V operand: member j // BLOCK_D, dimension j % BLOCK_D.
        gg = tl.arange(0, GROUP)
        j = tl.arange(0, GROUP * BLOCK_D)
        dj = j % BLOCK_D
        of_member = gg[:, None] == (j // BLOCK_D)[None, :]  # [GROUP, GROUP * BLOCK_D]
        col_head = tl.sum(tl.where(of_member, head[:, None], 0), axis=0)
        col_member = tl.sum(tl.where(of_member, row_ok[:, None].to(tl.int32), 0), axis=0) > 0  # a member exists
        q = tl.load(Q + b * stride_qb + r * stride_qh + d, mask=d_ok, other=0.0)
        q_rows = tl.broadcast_to(q[None, :], (16, BLOCK_D))
        m_i = tl.full([16], float("-inf"), tl.float32)
        l_i = tl.zeros([16], tl.float32)
        acc = tl.zeros([16, GROUP * BLOCK_D], tl.float32)
        for tile in range(n_tiles if DYNAMIC_LOOP else TILES):  # see the CUDA-core loop
            s = lo + tile * BLOCK_S + tl.arange(0, BLOCK_S)
            s_ok = (s < kv_len) & (tile < n_tiles)
            k = tl.load(k_base + s[:, None] * stride_ks + d[None, :], mask=s_ok[:, None] & d_ok[None, :],
                        other=0.0)
            score = tl.dot(q_rows, tl.trans(k), input_precision=PRECISION) * scaling  # [16, BLOCK_S], rows equal
            score = tl.where(s_ok[None, :], score, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(score, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing valid yet: keep alpha and p at 0
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(score - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            # Loaded member by member ([GROUP, BLOCK_S, BLOCK_D], contiguous along D, so the loads vectorise), then
            # laid side by side: [BLOCK_S, GROUP * BLOCK_D].
            v_ptr = v_base + vhead[:, None, None] * stride_vh + s[None, :, None] * stride_vs + d[None, None, :]
            val = tl.load(v_ptr, mask=row_ok[:, None, None] & s_ok[None, :, None] & d_ok[None, None, :], other=0.0)
            val = tl.reshape(tl.trans(val, (1, 0, 2)), (BLOCK_S, GROUP * BLOCK_D))
            acc = acc * alpha[:, None] + tl.dot(p.to(val.dtype), val, input_precision=PRECISION)
            m_i = m_new
        first = tl.arange(0, 16)[:, None] == 0
        out_col = (b * heads + col_head) * splits + split
        tl.store(Acc + out_col * BLOCK_D + dj, tl.sum(tl.where(first, acc, 0.0), axis=0), mask=col_member)
        out = (b * heads + head) * splits + split  # [GROUP]
        tl.store(M + out, tl.zeros([GROUP], tl.float32) + tl.max(m_i, axis=0), mask=row_ok)
        tl.store(L + out, tl.zeros([GROUP], tl.float32) + tl.max(l_i, axis=0), mask=row_ok)
    else:
        q = tl.load(Q + b * stride_qb + r * stride_qh + d, mask=d_ok, other=0.0).to(tl.float32) * scaling
        m_i = tl.full([1], float("-inf"), tl.float32)
        l_i = tl.zeros([1], tl.float32)
        acc = tl.zeros([GROUP, BLOCK_D], tl.float32)
        # Compiled, the loop stops at the last tile holding a valid token (splits past kv_len and items past the
        # last one run nothing). The interpreter cannot loop to a runtime bound (its scalars are 1-element arrays):
        # there the loop runs TILES times and the tiles past n_tiles are fully masked.
        for tile in range(n_tiles if DYNAMIC_LOOP else TILES):
            s = lo + tile * BLOCK_S + tl.arange(0, BLOCK_S)
            s_ok = (s < kv_len) & (tile < n_tiles)
            tile_ok = s_ok[:, None] & d_ok[None, :]
            k = tl.load(k_base + s[:, None] * stride_ks + d[None, :], mask=tile_ok, other=0.0).to(tl.float32)
            score = tl.where(s_ok, tl.sum(k * q[None, :], axis=1), float("-inf"))  # [BLOCK_S]
            m_new = tl.maximum(m_i, tl.max(score, axis=0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing valid yet: keep alpha and p at 0
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(score - m_safe)
            l_i = l_i * alpha + tl.sum(p, axis=0)
            # Every member's V tile at once, [GROUP, BLOCK_S, BLOCK_D]: absent members (rows past the cluster's
            # size) are masked off and read nothing.
            v_ptr = v_base + vhead[:, None, None] * stride_vh + s[None, :, None] * stride_vs + d[None, None, :]
            val = tl.load(v_ptr, mask=row_ok[:, None, None] & tile_ok[None, :, :], other=0.0).to(tl.float32)
            acc = acc * alpha[:, None] + tl.sum(p[None, :, None] * val, axis=1)
            m_i = m_new
        out = (b * heads + head) * splits + split  # [GROUP]
        tl.store(Acc + out[:, None] * BLOCK_D + d[None, :], acc, mask=row_ok[:, None])
        tl.store(M + out, tl.zeros([GROUP], tl.float32) + m_i, mask=row_ok)
        tl.store(L + out, tl.zeros([GROUP], tl.float32) + l_i, mask=row_ok)


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

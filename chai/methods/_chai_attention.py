"""CHAI's clustered attention as plain functions of a `ChaiSession` (helpers of `chai/methods/chai.py`).

Membership: the first m = `membership_tokens` query rows of a layer and the K of every head give each head a feature
(its causal attention probabilities over those m tokens); the heads are clustered into the layer's count and one
representative per cluster is picked (`membership_for`). Attention: softmax(q k^T) of the representatives only,
shared by every member, times each head's own V (`clustered`); the forward that finds the membership runs its
rows before m as MHA (`first_clustered`).

Several query rows (a prefill): every head gets its representative's query and K and keeps its own V, and one
`scaled_dot_product_attention` call computes all heads (`clustered_prefill`): flash attention when the mask is plain
causal, a masked kernel otherwise; no [B, H, Tq, Tk] tensor is ever built and nothing waits on the host. The rows
before m, which the membership was found from, are then overwritten with MHA's (a second call over m rows only).
One unpadded decode token on CUDA goes to the Triton kernel.

Left padding (lm-eval's batched generation): a row's first m tokens are its first real ones. Their column in each
row (`first_real`) is read from the mask of the forward that finds the membership; features, the rows run as MHA and
everything after follow it, so a padded row computes what it would alone. The membership is found in the prefill
then, which needs every prompt of the batch to have at least m tokens (else one line says so).
"""

import torch
import torch.nn.functional as F

from chai.attention import attention_probs, dense, plain_causal, repeat_heads, to_output
from chai.clustering import Membership, causal_features, cluster_heads, representatives
from chai.errors import ChaiError
from chai.kernels import clustered_decode as kd
from chai.methods._chai_plan import ChaiPlan, ChaiSession


def pick(x: torch.Tensor, index: torch.Tensor, tokens_major: bool = False) -> torch.Tensor:
    """Per-request head gather: x [B, N, ...], index [B, M] -> [B, M, ...] (no host sync, capturable). Advanced
    indexing copies whole [T, D] head slices; `gather` with an index expanded to x's shape did the index arithmetic
    per element (twice as slow on a CPU for [2, 32, 2048, 128] fp16 queries). The copy moves 8-byte words where the
    layout allows: CUDA's index kernel handles one element per step, and with fp16 elements it ran at 0.74 TB/s on
    an H200 (69.7 of CHAI's 1083 ms prefill at 8 x 4096, against MHA's 1029 ms), 4x the elements it needs.
    `tokens_major`: x stored [B, T, N, D] (as projections give queries, keys and values) comes back stored that way,
    for a query: SDPA's output follows the query's layout, and a heads-major one cost the attention function's
    [B, T, H, D] return a copy of it per layer. Otherwise the copy is heads-major: its index kernel has one index
    tensor fewer to read (in two H200 profiles of a 1 x 2048 prefill its 96 gathers took 1.22 ms heads-major and
    1.47 ms tokens-major)."""
    index = index.to(x.device)
    rows = arange(x.shape[0], x.device)[:, None]
    if tokens_major and x.dim() == 4 and x.shape[2] > 1 and x.stride(2) > x.stride(1):
        words = as_words(x.transpose(1, 2))  # [B, T, N, W]
        tokens = arange(x.shape[2], x.device)[:, None]
        out = words[rows[:, :, None], tokens, index[:, None, :]]  # [B, T, M, W]
        return (out.view(x.dtype) if words.dtype != x.dtype else out).transpose(1, 2)
    words = as_words(x)
    out = words[rows, index]
    return out.view(x.dtype) if words is not x else out


_ARANGES: dict[torch.device, torch.Tensor] = {}


def arange(n: int, device) -> torch.Tensor:
    """torch.arange(n, device=device) as a view of one kept range per device: each pick needed one or two fresh
    ones, launches among the ~17 a layer that CHAI's eager prefill added to MHA's. Made fresh under capture or tracing,
    where a kept tensor would hold values a graph has not computed yet."""
    if torch.compiler.is_compiling():  # first: dynamo cannot trace is_current_stream_capturing (returns a bool)
        return torch.arange(n, device=device)
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return torch.arange(n, device=device)
    kept = _ARANGES.get(device)
    if kept is None or kept.numel() < n:
        with torch.inference_mode(False):  # a normal tensor: made under inference mode it could not index later
            kept = _ARANGES[device] = torch.arange(max(n, 4096), device=device)  # autograd-recorded work
    return kept[:n]


def as_words(x: torch.Tensor) -> torch.Tensor:
    """x with its last dimension reinterpreted as 8-byte words (4 fp16 values a word), or x itself where its layout
    does not allow that (odd head size, a last dimension that is not contiguous), or when traced by torch.compile
    (its layout checks are not traceable; a compiled decode step picks one token, where the width does not
    matter). Bits are unchanged."""
    if torch.compiler.is_compiling():
        return x
    ratio = 8 // x.element_size()
    aligned = x.shape[-1] % ratio == 0 and x.storage_offset() % ratio == 0
    if ratio < 2 or x.stride(-1) != 1 or not aligned or any(s % ratio for s in x.stride()[:-1]):
        return x
    return x.view(torch.int64)


def causal(past: int, tq: int, tk: int, device) -> torch.Tensor:
    """[1, 1, Tq, Tk] boolean causal mask for queries at positions past..past+Tq-1."""
    q = torch.arange(past, past + tq, device=device)[:, None]
    return (torch.arange(tk, device=device)[None] <= q)[None, None]


def first_real(mask: torch.Tensor | None) -> torch.Tensor | None:
    """[B] each row's first real (unpadded) column, read from the last query row of a boolean mask [B or 1, 1, Tq,
    Tk] (under left padding the last row is a real token and sees its row's first real key; a right-padded row's
    last row sees key 0); None when every row starts at column 0 (no left padding). One host sync, only for a mask
    that is not plain causal."""
    if plain_causal(mask):
        return None
    starts = mask[:, 0, -1, :].int().argmax(dim=-1)  # argmax: the first True
    return starts if bool(starts.any()) else None


def take_rows(x: torch.Tensor, starts: torch.Tensor | None, m: int) -> torch.Tensor:
    """x [B, N, T, D] -> [B, N, m, D]: per row the m columns from its `starts` [B] on (None: the first m)."""
    if starts is None:
        return x[:, :, :m]
    columns = starts.to(x.device)[:, None] + torch.arange(m, device=x.device)  # [B, m]
    return x.gather(2, columns[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[3]))


def clustered_prefill(query, key, value, mask, scaling, q_index, k_index, v_index=None) -> torch.Tensor:
    """query [B, H, Tq, D] at positions Tk-Tq..Tk-1; key [B, Sk, Tk, D]; value [B, Hv, Tk, D]; per head [B, H]: the
    query head whose scores it shares (its representative, q_index), the K entry they use (k_index), and the V
    entry it reads (v_index; None: its own, head h // (H / Hv)); mask [B or 1, 1, Tq, Tk] bool, or None when
    Tq == Tk (causal).

    One SDPA call: head h attends with its representative's query and its cluster's K entry, and reads its own V.
    Gathers are per request (no host sync); `is_causal` when the mask is plain causal, so CUDA runs flash attention.
    The gathered q and k cost two [B, H, T, D] copies, small beside the layer's projections. Returns [B, H, Tq, D],
    stored as the query is."""
    heads, tq, tk = query.shape[1], query.shape[2], key.shape[2]
    q = pick(query, q_index, tokens_major=True)  # the output's layout (K and V may differ: SDPA reads strides)
    k = pick(key, k_index)
    v = repeat_heads(value, heads // value.shape[1]) if v_index is None else pick(value, v_index)
    if tq == tk and plain_causal(mask):  # SDPA's is_causal aligns rows and keys at 0: right only when Tq == Tk
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling)


def clustered(session: ChaiSession, query, key, value, mask, scaling, m: Membership, compact: bool) -> torch.Tensor:
    """softmax(q k^T) of the representatives only, shared by every member, times each head's own V (or the
    representative's V with share_values). keys are compact ([B, S, T, D], read through rep_slot) or full
    ([B, Hkv, T, D], read through rep // groups). One unpadded decode token on CUDA: the Triton kernel; else
    `clustered_prefill`. query [B, H, Tq, D] -> [B, H, Tq, D]."""
    share_values, groups = session.plan.share_values, session.plan.shape.groups
    if query.shape[2] == 1 and kd._use_triton(query) and (plain_causal(mask) or session.mask_is_full(mask)):
        key_slot = m.rep_slot if compact else m.reps // groups  # [B, C]
        v_index = key_slot.gather(1, m.labels) if share_values else None
        return kd.clustered_decode_attention(query, key, value, m.labels, m.reps, scaling, k_index=key_slot,
                                             v_index=v_index)
    head_rep = m.reps.gather(1, m.labels)  # [B, H]: each head's representative
    if compact:
        k_index = m.rep_slot.gather(1, m.labels)
    else:  # every K head there: the representative's own (its group's), the same index under MHA's layout
        k_index = head_rep if groups == 1 else head_rep // groups
    return clustered_prefill(query, key, value, mask, scaling, head_rep, k_index, k_index if share_values else None)


def first_clustered(session: ChaiSession, query, key, value, mask, scaling, m: Membership, past: int,
                    starts: torch.Tensor | None = None) -> torch.Tensor:
    """The forward that found the membership (every K head still there): each row's first m real tokens as MHA
    (first_tokens=dense, online membership; `starts` [B]: first real columns, None for 0), the rest with the
    representatives' scores. query [B, H, Tq, D] -> [B, H, Tq, D]."""
    plan, tq = session.plan, query.shape[2]
    online_dense = plan.membership == "online" and plan.first_tokens == "dense"
    lead = 0 if starts is None else int(starts.max())  # the padded rows' MHA rows end this much later
    n_dense = min(max(plan.membership_tokens + lead - past, 0), tq) if online_dense else 0
    # All rows clustered in one call (flash attention needs the rows to start at key 0), then the first n_dense
    # rows, a handful, replaced by MHA's.
    out = clustered(session, query, key, value, mask, scaling, m, compact=False)
    if n_dense:
        # A causal row sees no key after its own position: the first rows read `seen` keys, not the whole prompt
        # (at 8 x 4096 that is 5 of 4096 keys), and from position 0 with a plain causal mask they are is_causal.
        seen = past + n_dense
        first = dict(scale=scaling, enable_gqa=plan.shape.groups > 1)
        q, k, v = query[:, :, :n_dense], key[:, :, :seen], value[:, :, :seen]
        if past == 0 and plain_causal(mask):
            mha = F.scaled_dot_product_attention(q, k, v, is_causal=True, **first)
        else:
            rows = causal(past, n_dense, seen, query.device) if mask is None else mask[..., :n_dense, :seen]
            mha = F.scaled_dot_product_attention(q, k, v, rows, **first)
        if starts is not None:  # a row's MHA rows are its first m real ones; its later rows stay clustered
            columns = torch.arange(past, seen, device=query.device)
            own = columns[None] < (starts.to(query.device) + plan.membership_tokens)[:, None]  # [B, n_dense]
            mha = torch.where(own[:, None, :, None], mha, out[:, :, :n_dense])
        out[:, :, :n_dense] = mha
    return out


def cluster_first_tokens(plan: ChaiPlan, layer_idx: int, q_first, key, scaling, width=None,
                         starts: torch.Tensor | None = None) -> Membership:
    """Cluster a layer's heads by their attention over the first m tokens. q_first [B, H, m, D]; key [B, Hkv, >=m, D]
    with every KV head (before compaction), each row's first m real tokens from its `starts` [B] on (None: 0);
    `width`: kept-K slots of a fixed-size cache (`Membership.build`)."""
    m = plan.membership_tokens
    k_first = repeat_heads(take_rows(key, starts, m), plan.shape.groups)  # [B, H, m, D]
    mask = causal(0, m, m, q_first.device) if plan.causal_features else None
    probs = attention_probs(q_first, k_first, mask, scaling)  # [B, H, m, m]
    features = causal_features(probs, m) if plan.causal_features else probs.flatten(2)  # [B, H, F]
    count = plan.counts[layer_idx]
    labels = cluster_heads(features, count, plan.cluster_algo)  # [B, H]
    reps = representatives(features, labels, count, plan.representative)  # [B, C]
    return Membership.build(labels, reps, plan.shape.groups, plan.shape.kv_heads, width)


def membership_for(session: ChaiSession, layer_idx: int, query, key, scaling, past: int, layer,
                   width: int | None = None, starts: torch.Tensor | None = None) -> Membership | None:
    """This forward's membership for a clustered layer: fixed (static/random), or clustered from the first m tokens
    (None while fewer than m exist). `layer`: the layer's `ChaiLayer` (collects query rows across forwards) or
    None (the rows must all be in this forward); `width`: see `cluster_first_tokens`; `starts` [B]: each row's first
    real column under left padding (None: 0), when the prefill must hold every row's first m tokens."""
    plan = session.plan
    if plan.fixed is not None:
        return plan.fixed_membership(layer_idx, query.shape[0], query.device)
    m = plan.membership_tokens
    if layer is None and past > 0:
        raise ChaiError("CHAI decoding needs its own cache: pass past_key_values=method.make_cache(model).")
    if starts is not None:
        shortest = key.shape[2] - int(starts.max())
        if past > 0 or shortest < m:
            raise ChaiError(f"CHAI clusters each request from its first membership_tokens={m} tokens: a left-padded "
                            f"batch needs every prompt that long (the shortest has {shortest}); use batch size 1.")
        q_first = take_rows(query, starts, m)
    elif layer is not None:
        q_first = layer.first_queries(query, m)  # [B, H, m, D] once m tokens exist
    else:
        q_first = query[:, :, :m] if query.shape[2] >= m else None
    if q_first is None:
        return None
    started = session.log.start(query.device)
    membership = cluster_first_tokens(plan, layer_idx, q_first, key, scaling, width, starts)
    session.log.record(layer_idx, membership, started)
    return membership


def dynamic_attention(session: ChaiSession, layer, module, query, key, value, attention_mask, scaling, dropout,
                      **kwargs):
    """A clustered layer with a `ChaiLayer` (`layer`) or without a CHAI cache (None). query [B, H, Tq, D];
    key/value [B, Hkv or S, Tk, D] as the cache returned them. Returns transformers' (output [B, Tq, H, D], None)."""
    idx, tq, tk = module.layer_idx, query.shape[2], key.shape[2]
    past = layer.past if layer is not None else tk - tq
    mask = attention_mask if attention_mask is not None else causal(past, tq, tk, query.device)
    if layer is not None and layer.membership is not None:
        return to_output(clustered(session, query, key, value, mask, scaling, layer.membership, compact=True)), None
    starts = first_real(attention_mask) if session.plan.fixed is None else None  # left padding
    membership = membership_for(session, idx, query, key, scaling, past, layer, starts=starts)
    if membership is None:  # fewer than m tokens so far: plain MHA, every K kept
        return dense(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
    out = first_clustered(session, query, key, value, mask, scaling, membership, past, starts)
    if layer is not None:
        layer.compact(membership)
    return to_output(out), None

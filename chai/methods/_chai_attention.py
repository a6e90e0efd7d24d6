"""CHAI's clustered attention as plain functions of a `ChaiSession` (helpers of `chai/methods/chai.py`).

Membership: the first m = `membership_tokens` query rows of a layer and the K of every head give each head a feature
(its causal attention probabilities over those m tokens); the heads are clustered into the layer's count and one
representative per cluster is picked (`membership_for`). Attention: softmax(q k^T) of the representatives only,
shared by every member, times each head's own V (`clustered`); the forward that finds the membership runs its
rows before m as MHA (`first_clustered`).

Clustered rows (prefill): the representatives' scores are computed `ROW_BUDGET / (B * H * Tk)` query rows at a time,
in the input dtype with a float32 softmax, and only up to the last key the block can see (the mask is causal), so
the largest temporary is [B, C, rows, Tk] float32 instead of [B, C, Tq, Tk]; V is never copied per head (GQA reads
it through a grouped view). One unpadded decode token on CUDA goes to the Triton kernel instead.
"""

import time

import torch
import torch.nn.functional as F

from chai.attention import additive, attention_probs, dense, repeat_heads, to_output
from chai.clustering import Membership, causal_features, cluster_heads, representatives
from chai.errors import ChaiError
from chai.kernels import clustered_decode as kd
from chai.methods._chai_plan import ChaiPlan, ChaiSession

ROW_BUDGET = 1 << 28  # elements of the [B, H, rows, Tk] block of shared probabilities (512 MiB in fp16)


def pick(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Per-request head gather: x [B, N, ...], index [B, M] -> [B, M, ...] (a gather: no host sync, capturable)."""
    index = index.to(x.device).reshape(*index.shape, *(1,) * (x.dim() - 2))
    return x.gather(1, index.expand(x.shape[0], index.shape[1], *x.shape[2:]))


def causal(past: int, tq: int, tk: int, device) -> torch.Tensor:
    """[1, 1, Tq, Tk] boolean causal mask for queries at positions past..past+Tq-1."""
    q = torch.arange(past, past + tq, device=device)[:, None]
    return (torch.arange(tk, device=device)[None] <= q)[None, None]


def clustered_rows(query, key, value, mask, scaling, labels, reps, key_slot, value_slot=None,
                   budget: int = ROW_BUDGET) -> torch.Tensor:
    """query [B, H, Tq, D] at positions Tk-Tq..Tk-1; key [B, Sk, Tk, D], cluster c scores with K entry key_slot
    [B, C]; value [B, Hv, Tk, D]: head h reads V head h // (H / Hv), or with `value_slot` [B, C] (share_values) its
    cluster's V entry; labels [B, H], reps [B, C]; mask [B or 1, 1, Tq, Tk] bool, causal (keys after a block's last
    row are never read), or None. Returns [B, H, Tq, D] in value's dtype."""
    batch, heads, tq, dim = query.shape
    tk, kv_heads = key.shape[2], value.shape[1]
    q_rep = pick(query, reps) * scaling  # [B, C, Tq, D]
    k_rep = pick(key, key_slot)  # [B, C, Tk, D]
    v_rep = None if value_slot is None else pick(value, value_slot)  # [B, C, Tk, D]
    rows = max(1, min(tq, budget // max(1, batch * heads * tk)))
    out = []
    for start in range(0, tq, rows):
        end = min(tq, start + rows)
        cols = tk if mask is None else tk - tq + end  # causal: later keys are masked for every row of the block
        scores = torch.matmul(q_rep[:, :, start:end], k_rep[:, :, :cols].transpose(-1, -2)).float()  # [B, C, r, cols]
        if mask is not None:
            scores += additive(mask[..., start:end, :cols], torch.float32)
        probs = torch.softmax(scores, dim=-1).to(value.dtype)
        del scores
        if v_rep is not None:  # members share V too: one output per cluster
            out.append(pick(probs @ v_rep[:, :, :cols], labels))
            continue
        shared = pick(probs, labels)  # [B, H, r, cols]: each head reads its cluster's row
        grouped = shared.reshape(batch, kv_heads, -1, cols)  # GQA: the query heads of a KV head, rows stacked
        out.append((grouped @ value[:, :, :cols]).reshape(batch, heads, end - start, dim))
    return out[0] if len(out) == 1 else torch.cat(out, dim=2)


def clustered(session: ChaiSession, query, key, value, mask, scaling, m: Membership, compact: bool) -> torch.Tensor:
    """softmax(q k^T) of the representatives only, shared by every member, times each head's own V (or the
    representative's V with share_values). keys are compact ([B, S, T, D], read through rep_slot) or full
    ([B, Hkv, T, D], read through rep // groups). One unpadded decode token on CUDA: the Triton kernel; else
    `clustered_rows`. query [B, H, Tq, D] -> [B, H, Tq, D]."""
    share_values = session.plan.share_values
    key_slot = m.rep_slot if compact else m.reps // session.plan.shape.groups  # [B, C]
    value_slot = key_slot if share_values else None
    if query.shape[2] == 1 and kd._use_triton(query) and session.mask_is_full(mask):
        v_index = key_slot.gather(1, m.labels) if share_values else None
        return kd.clustered_decode_attention(query, key, value, m.labels, m.reps, scaling, k_index=key_slot,
                                             v_index=v_index)
    return clustered_rows(query, key, value, mask, scaling, m.labels, m.reps, key_slot, value_slot)


def first_clustered(session: ChaiSession, query, key, value, mask, scaling, m: Membership, past: int) -> torch.Tensor:
    """The forward that found the membership (every K head still there): rows before m as MHA (first_tokens=dense,
    online membership), the rest with the representatives' scores. query [B, H, Tq, D] -> [B, H, Tq, D]."""
    plan, tq = session.plan, query.shape[2]
    online_dense = plan.membership == "online" and plan.first_tokens == "dense"
    n_dense = min(max(plan.membership_tokens - past, 0), tq) if online_dense else 0
    parts = []
    if n_dense:
        parts.append(F.scaled_dot_product_attention(query[:, :, :n_dense], key, value, mask[..., :n_dense, :],
                                                    scale=scaling, enable_gqa=plan.shape.groups > 1))
    if n_dense < tq:
        rest = (query[:, :, n_dense:], key, value, mask[..., n_dense:, :], scaling, m)
        parts.append(clustered(session, *rest, compact=False))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


def cluster_first_tokens(plan: ChaiPlan, layer_idx: int, q_first, key, scaling) -> Membership:
    """Cluster a layer's heads by their attention over the first m tokens. q_first [B, H, m, D]; key [B, Hkv, >=m, D]
    with every KV head (before compaction)."""
    m = plan.membership_tokens
    k_first = repeat_heads(key[:, :, :m], plan.shape.groups)  # [B, H, m, D]
    mask = causal(0, m, m, q_first.device) if plan.causal_features else None
    probs = attention_probs(q_first, k_first, mask, scaling)  # [B, H, m, m]
    features = causal_features(probs, m) if plan.causal_features else probs.flatten(2)  # [B, H, F]
    count = plan.counts[layer_idx]
    labels = cluster_heads(features, count, plan.cluster_algo)  # [B, H]
    reps = representatives(features, labels, count, plan.representative)  # [B, C]
    return Membership.build(labels, reps, plan.shape.groups, plan.shape.kv_heads)


def membership_for(session: ChaiSession, layer_idx: int, query, key, scaling, past: int, layer) -> Membership | None:
    """This forward's membership for a clustered layer: fixed (static/random), or clustered from the first m tokens
    (None while fewer than m exist). `layer`: the layer's `ChaiLayer` (collects query rows across forwards) or
    None (the rows must all be in this forward)."""
    plan = session.plan
    if plan.fixed is not None:
        return plan.fixed_membership(layer_idx, query.shape[0])
    m = plan.membership_tokens
    if layer is None and past > 0:
        raise ChaiError("CHAI decoding needs its own cache: pass past_key_values=method.make_cache(model).")
    if layer is not None:
        q_first = layer.first_queries(query, m)  # [B, H, m, D] once m tokens exist
    else:
        q_first = query[:, :, :m] if query.shape[2] >= m else None
    if q_first is None:
        return None
    started = time.perf_counter()
    membership = cluster_first_tokens(plan, layer_idx, q_first, key, scaling)
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
    membership = membership_for(session, idx, query, key, scaling, past, layer)
    if membership is None:  # fewer than m tokens so far: plain MHA, every K kept
        return dense(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
    out = first_clustered(session, query, key, value, mask, scaling, membership, past)
    if layer is not None:
        layer.compact(membership)
    return to_output(out), None

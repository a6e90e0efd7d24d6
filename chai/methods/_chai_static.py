"""CHAI's fast paths (helpers of `chai/methods/chai.py`): clustered attention over many query rows computed a block
of rows at a time, and the static cache whose decode step is one Triton kernel per layer and can be captured as a
CUDA graph.

Clustered rows (prefill): members share their representative's softmax(q k^T). The representatives' scores are
computed `ROW_BUDGET / (B * H * Tk)` query rows at a time, in the input dtype with a float32 softmax, and only up to
the last key the block can see (the mask is causal), so the largest temporary is [B, C, rows, Tk] float32 instead
of [B, C, Tq, Tk]; V is never copied per head (GQA reads it through a grouped view).

`ChaiStaticLayer` (`Chai.static_cache`): per clustered layer, K for the kept KV heads [B, S, L, D] (S = min(C, Hkv)
with online membership, the exact count with a fixed one) and V [B, Hkv, L, D] ([B, S, L, D] with share_values),
allocated once at the first update and written in place at the fill counter (a device tensor), as transformers'
StaticLayer does. Membership (labels, reps, kept KV heads, representative slots) lives in preallocated buffers that
a prefill fills with `copy_`, so a step captured after one prefill stays valid after `reset()` and the next.
Online membership: the first forward must hold at least `membership_tokens` tokens (the whole prompt); it runs
eagerly (clustering, host syncs) and writes the kept K after clustering. A decode step (one query token) reads
K and V through `clustered_decode_attention` with the fill counter as the valid length: no host sync, no Python
state that changes between steps. Padded batches are refused at prefill (the step does not read the mask).
"""

import torch
from transformers.cache_utils import StaticLayer

from chai.attention import additive
from chai.clustering import Membership
from chai.errors import ChaiError
from chai.kernels.clustered_decode import clustered_decode_attention

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


class ChaiStaticLayer(StaticLayer):
    """A CHAI cache layer of fixed size (see the module docstring): keys [B, S, L, D], values [B, Hkv or S, L, D],
    membership buffers labels [B, H], reps [B, C], kv_keep [B, S], rep_slot [B, C], v_index [B, H]."""

    def __init__(self, method, layer_idx: int, max_cache_len: int, batch_size: int, kept: int):
        super().__init__(max_cache_len=max_cache_len)  # get_seq_length, get_mask_sizes: StaticLayer's
        self.cumulative_length = torch.tensor(0, dtype=torch.long)  # fill counter, a device tensor once allocated
        self.method, self.layer_idx, self.batch_size, self.kept = method, layer_idx, batch_size, kept
        self.ready = False  # membership buffers filled (Python: set by an eager prefill, constant while decoding)
        self.pending = None  # online: the first forward's (keys, values, positions) until it has clustered
        self.returned = None

    def lazy_initialization(self, key_states, value_states) -> None:
        batch, kv_heads, _, dim = key_states.shape
        if batch != self.batch_size:
            raise ChaiError(f"this CHAI static cache was made for batch {self.batch_size}, not {batch}.")
        shape, count = self.method._shape, self.method._counts[self.layer_idx]
        self.dtype, self.device = key_states.dtype, key_states.device
        v_heads = self.kept if self.method.share_values else kv_heads
        new = dict(dtype=self.dtype, device=self.device)
        self.keys = torch.zeros(batch, self.kept, self.max_cache_len, dim, **new)
        self.values = torch.zeros(batch, v_heads, self.max_cache_len, value_states.shape[-1], **new)
        ints = dict(dtype=torch.long, device=self.device)
        self.labels, self.v_index = torch.zeros(batch, shape.heads, **ints), torch.zeros(batch, shape.heads, **ints)
        self.reps, self.rep_slot = torch.zeros(batch, count, **ints), torch.zeros(batch, count, **ints)
        self.kv_keep = torch.zeros(batch, self.kept, **ints)
        self.cumulative_length = self.cumulative_length.to(self.device)
        if not torch.compiler.is_compiling():
            for t in (self.keys, self.values, self.labels, self.v_index, self.reps, self.rep_slot, self.kv_keep,
                      self.cumulative_length):
                torch._dynamo.mark_static_address(t)
        self.is_initialized = True
        fixed = self.method._fixed
        if fixed is not None:  # chai_static, random_groups: the membership exists before token 0
            self.set_membership(fixed[self.layer_idx].index(torch.zeros(batch, dtype=torch.long)))

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        positions = torch.arange(key_states.shape[2], device=self.device) + self.cumulative_length
        self.cumulative_length.add_(key_states.shape[2])
        self.method._announced[self.layer_idx] = self
        if not self.ready:  # online, first forward: every K head until the membership exists (compact_from)
            if not self.method.share_values:
                self.values.index_copy_(2, positions, value_states)
            self.pending = (key_states, value_states, positions)
            self.returned = key_states
            return key_states, value_states
        self.keys.index_copy_(2, positions, pick(key_states, self.kv_keep))  # [B, S, Tnew, D]
        kept_values = pick(value_states, self.kv_keep) if self.method.share_values else value_states
        self.values.index_copy_(2, positions, kept_values)
        self.returned = self.keys
        return self.keys, self.values

    def set_membership(self, m: Membership) -> None:
        """Copy a membership into the buffers (in place: a captured step keeps reading them)."""
        keep = m.kv_keep
        if keep.shape[1] < self.kept:  # fewer distinct KV heads than slots: repeat one (slots past it go unread)
            keep = torch.cat([keep, keep[:, :1].expand(-1, self.kept - keep.shape[1])], dim=1)
        for buffer, value in ((self.labels, m.labels), (self.reps, m.reps), (self.rep_slot, m.rep_slot),
                              (self.kv_keep, keep), (self.v_index, m.rep_slot.gather(1, m.labels))):
            buffer.copy_(value)
        self.ready = True

    def membership(self) -> Membership:
        return Membership(self.labels, self.reps, self.kv_keep, self.rep_slot)

    def compact_from(self, m: Membership) -> None:
        """Online membership found in the first forward: fill the buffers and write that forward's kept K (V)."""
        self.set_membership(m)
        keys, values, positions = self.pending
        self.keys.index_copy_(2, positions, pick(keys, self.kv_keep))
        if self.method.share_values:
            self.values.index_copy_(2, positions, pick(values, self.kv_keep))
        self.pending = None

    def decode(self, query, scaling) -> torch.Tensor:
        """The captured step: query [B, H, 1, D] -> [B, H, 1, D], fill counter as the valid length."""
        v_index = self.v_index if self.method.share_values else None
        return clustered_decode_attention(query, self.keys, self.values, self.labels, self.reps, scaling,
                                          kv_len=self.cumulative_length, k_index=self.rep_slot, v_index=v_index)

    def attend(self, query, key, mask, scaling) -> torch.Tensor:
        """This layer's attention (called by `Chai.attention` with what `update` returned): the captured decode
        step, or an eager multi-token forward. query [B, H, Tq, D] -> [B, H, Tq, D]."""
        tq, method = query.shape[2], self.method
        if tq == 1 and self.ready:
            return self.decode(query, scaling)
        filled = self.check_prefill(mask, tq)
        mask = causal(filled - tq, tq, filled, query.device) if mask is None else mask[..., :filled]
        if self.ready:  # fixed membership, or a later forward: compact K in the buffer
            keys, values = self.keys[:, :, :filled], self.values[:, :, :filled]
            return method._clustered(query, keys, values, mask, scaling, self.membership(), compact=True)
        if filled != tq:
            raise ChaiError("the static CHAI cache clusters in its first forward: pass the whole prompt at once.")
        membership = method._membership(self.layer_idx, query, key, scaling, 0, None)
        if membership is None:
            raise ChaiError(f"the static CHAI cache needs a prompt of at least method.membership_tokens="
                            f"{method.membership_tokens} tokens.")
        keys, values, _ = self.pending  # every K (and V) head of the prompt
        out = method._first_clustered(query, keys, values, mask, scaling, membership, 0)
        self.compact_from(membership)
        return out

    def check_prefill(self, mask, tq: int) -> int:
        """Eager (host syncs allowed): the filled length, after refusing padded batches."""
        filled = int(self.cumulative_length)
        if mask is not None and not bool((mask[..., :filled] == causal(filled - tq, tq, filled, mask.device)).all()):
            raise ChaiError("the static CHAI cache takes unpadded batches only (its decode step reads no mask).")
        return filled

    def reset(self) -> None:
        """Empty in place (the tensors a captured step reads stay where they are); online membership cleared."""
        if self.is_initialized:
            self.keys.zero_()
            self.values.zero_()
        self.cumulative_length.zero_()
        self.pending = None
        self.ready = self.ready and self.method._fixed is not None

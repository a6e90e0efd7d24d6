"""CHAI's static cache (`Chai.static_cache`, helper of `chai/methods/chai.py`): a decode step that is one Triton
kernel per layer and can be captured as a CUDA graph.

`ChaiStaticLayer`: per clustered layer, K for the kept KV heads [B, S, L, D] (S = min(C, Hkv) with online
membership, the exact count with a fixed one) and V [B, Hkv, L, D] ([B, S, L, D] with share_values), allocated once
at the first update and written in place at the fill counter (a device tensor), as transformers' StaticLayer does.
Membership (labels, reps, kept KV heads, representative slots) lives in preallocated buffers that a prefill fills
with `copy_`, so a step captured after one prefill stays valid after `reset()` and the next. Online membership: the
first forward must hold at least `membership_tokens` tokens (the whole prompt); it clusters on the device (no host
sync when the batch is unpadded) and writes the kept K after clustering. With the paper's clustering (causal
features, K-Means, first representatives) that is one Triton launch per layer, from the first m query and key rows
straight into the buffers (`chai.kernels.fused_membership`, on CUDA or under Triton's interpreter); any other
setting runs the torch chain (about 60 small kernels a layer), on CUDA replayed as one CUDA graph per layer
(`MembershipGraph`, captured at the cache's first prefill): launched one by one, its kernels cost the host more time
than the GPU spends on a whole layer at batch 1. A decode step (one query token) reads K and V through
`clustered_decode_attention` with the fill counter as the valid length: no host sync, no Python state that changes
between steps. Padded batches are refused at prefill (the step does not read the mask).
"""

import torch
from transformers.cache_utils import StaticLayer

from chai.attention import plain_causal
from chai.clustering import Membership
from chai.errors import ChaiError
from chai.kernels.clustered_decode import clustered_decode_attention
from chai.kernels.fused_membership import fused_membership, use_fused_membership
from chai.methods._chai_attention import causal, cluster_first_tokens, clustered, first_clustered, pick
from chai.methods._chai_plan import ChaiSession
from chai.methods.base import ReturnedKeys


class ChaiStaticLayer(ReturnedKeys, StaticLayer):
    """A CHAI cache layer of fixed size (see the module docstring): keys [B, S, L, D], values [B, Hkv or S, L, D],
    membership buffers labels [B, H], reps [B, C], kv_keep [B, S], rep_slot [B, C], v_index [B, H]."""

    def __init__(self, session: ChaiSession, layer_idx: int, max_cache_len: int, batch_size: int, kept: int):
        super().__init__(max_cache_len=max_cache_len)  # get_seq_length, get_mask_sizes: StaticLayer's
        self.cumulative_length = torch.tensor(0, dtype=torch.long)  # fill counter, a device tensor once allocated
        self.session, self.plan, self.layer_idx = session, session.plan, layer_idx
        self.batch_size, self.kept = batch_size, kept
        self.ready = False  # membership buffers filled (Python: set by an eager prefill, constant while decoding)
        self.host_filled: int | None = 0  # the fill counter as the host knows it (None: a decode step moved it)
        self.pending = None  # online: the first forward's (keys, values, positions) until it has clustered
        self.graph: MembershipGraph | None = None  # online, CUDA: the clustering as a CUDA graph

    def lazy_initialization(self, key_states, value_states) -> None:
        batch, kv_heads, _, dim = key_states.shape
        if batch != self.batch_size:
            raise ChaiError(f"this CHAI static cache was made for batch {self.batch_size}, not {batch}.")
        heads, count = self.plan.shape.heads, self.plan.counts[self.layer_idx]
        self.dtype, self.device = key_states.dtype, key_states.device
        v_heads = self.kept if self.plan.share_values else kv_heads
        new = dict(dtype=self.dtype, device=self.device)
        self.keys = torch.zeros(batch, self.kept, self.max_cache_len, dim, **new)
        self.values = torch.zeros(batch, v_heads, self.max_cache_len, value_states.shape[-1], **new)
        ints = dict(dtype=torch.long, device=self.device)
        self.labels, self.v_index = torch.zeros(batch, heads, **ints), torch.zeros(batch, heads, **ints)
        self.reps, self.rep_slot = torch.zeros(batch, count, **ints), torch.zeros(batch, count, **ints)
        self.kv_keep = torch.zeros(batch, self.kept, **ints)
        self.cumulative_length = self.cumulative_length.to(self.device)
        if not torch.compiler.is_compiling():
            for t in (self.keys, self.values, self.labels, self.v_index, self.reps, self.rep_slot, self.kv_keep,
                      self.cumulative_length):
                torch._dynamo.mark_static_address(t)
        self.is_initialized = True
        if self.plan.fixed is not None:  # chai_static, random_groups: the membership exists before token 0
            self.set_membership(self.plan.fixed_membership(self.layer_idx, batch))

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        tq = key_states.shape[2]
        positions = torch.arange(tq, device=self.device) + self.cumulative_length
        self.cumulative_length.add_(tq)
        # A captured decode step advances the counter without running this line again, so after one the host no
        # longer knows the fill; a prefill after reset() knows it without reading the device.
        self.host_filled = None if (tq == 1 and self.ready) or self.host_filled is None else self.host_filled + tq
        self.session.announce(self.layer_idx, self)
        share_values = self.plan.share_values
        if not self.ready:  # online, first forward: every K head until the membership exists (compact)
            if not share_values:
                self.values.index_copy_(2, positions, value_states)
            self.pending = (key_states, value_states, positions)
            self.returned = key_states
            return key_states, value_states
        self.keys.index_copy_(2, positions, pick(key_states, self.kv_keep))  # [B, S, Tnew, D]
        self.values.index_copy_(2, positions, pick(value_states, self.kv_keep) if share_values else value_states)
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

    def compact(self) -> None:
        """Online membership found in the first forward (in the buffers): write that forward's kept K (V)."""
        keys, values, positions = self.pending
        self.keys.index_copy_(2, positions, pick(keys, self.kv_keep))
        if self.plan.share_values:
            self.values.index_copy_(2, positions, pick(values, self.kv_keep))
        self.pending = None

    def decode(self, query, scaling) -> torch.Tensor:
        """The captured step: query [B, H, 1, D] -> [B, H, 1, D], fill counter as the valid length."""
        v_index = self.v_index if self.plan.share_values else None
        return clustered_decode_attention(query, self.keys, self.values, self.labels, self.reps, scaling,
                                          kv_len=self.cumulative_length, k_index=self.rep_slot, v_index=v_index)

    def attend(self, query, key, mask, scaling) -> torch.Tensor:
        """This layer's attention (called by `Chai.attention` with what `update` returned): the captured decode
        step, or an eager multi-token forward. query [B, H, Tq, D] -> [B, H, Tq, D]."""
        tq = query.shape[2]
        if tq == 1 and self.ready:
            return self.decode(query, scaling)
        filled = self.check_prefill(mask, tq)
        if plain_causal(mask):  # rows filled-tq..filled-1 over keys 0..filled-1; None: is_causal (flash attention)
            mask = None if filled == tq else causal(filled - tq, tq, filled, query.device)
        else:
            mask = mask[..., :filled]
        if self.ready:  # fixed membership, or a later forward: compact K in the buffer
            keys, values = self.keys[:, :, :filled], self.values[:, :, :filled]
            return clustered(self.session, query, keys, values, mask, scaling, self.membership(), compact=True)
        if filled != tq:
            raise ChaiError("the static CHAI cache clusters in its first forward: pass the whole prompt at once.")
        membership = self.find_membership(query, key, scaling)
        keys, values, _ = self.pending  # every K (and V) head of the prompt
        out = first_clustered(self.session, query, keys, values, mask, scaling, membership, 0)
        self.compact()
        return out

    def find_membership(self, query, key, scaling) -> Membership:
        """Cluster the first m tokens of the prompt (query [B, H, Tq, D], key [B, Hkv, Tq, D]) into the buffers."""
        m = self.plan.membership_tokens
        if query.shape[2] < m:
            raise ChaiError(f"the static CHAI cache needs a prompt of at least method.membership_tokens={m} tokens.")
        q_first, k_first = query[:, :, :m], key[:, :, :m]
        log = self.session.log
        started = log.start(query.device)
        if use_fused_membership(self.plan, query):  # one launch, straight into the buffers
            fused_membership(q_first, k_first, scaling, self.plan.counts[self.layer_idx], self.kept,
                             out=(self.labels, self.reps, self.kv_keep, self.rep_slot, self.v_index))
            self.ready = True
        elif MembershipGraph.usable(query):
            if self.graph is None:
                self.graph = MembershipGraph(self.fill_membership, q_first, k_first, scaling)
            self.graph.replay(q_first, k_first)
            self.ready = True  # what set_membership does in Python, which a replay does not run
        else:
            self.fill_membership(q_first, k_first, scaling)
        membership = self.membership()
        log.record(self.layer_idx, membership, started)
        return membership

    def fill_membership(self, q_first, k_first, scaling) -> None:
        """The clustering itself: q_first [B, H, m, D], k_first [B, Hkv, m, D] -> the membership buffers."""
        self.set_membership(cluster_first_tokens(self.plan, self.layer_idx, q_first, k_first, scaling, self.kept))

    def check_prefill(self, mask, tq: int) -> int:
        """The filled length, after refusing padded batches; neither reads the device when the host knows the fill
        (a prefill after reset()) and the mask is causal by construction (`plain_causal`)."""
        filled = self.host_filled if self.host_filled is not None else int(self.cumulative_length)
        if plain_causal(mask):
            return filled
        if not bool((mask[..., :filled] == causal(filled - tq, tq, filled, mask.device)).all()):
            raise ChaiError("the static CHAI cache takes unpadded batches only (its decode step reads no mask).")
        return filled

    def reset(self) -> None:
        """Empty in place (the tensors a captured step reads stay where they are); online membership cleared."""
        if self.is_initialized:
            self.keys.zero_()
            self.values.zero_()
        self.cumulative_length.zero_()
        self.host_filled = 0
        self.pending = None
        self.ready = self.ready and self.plan.fixed is not None


class MembershipGraph:
    """One layer's clustering (`fill`: features, K-Means, representatives, buffer writes) captured as a CUDA graph:
    a prefill copies its first m query and key rows into the graph's inputs and replays it, three launches in place
    of about sixty. Valid while the cache lives: its buffers never move, and B, m and the scaling are fixed."""

    def __init__(self, fill, q_first: torch.Tensor, k_first: torch.Tensor, scaling: float):
        self.q, self.k = q_first.clone(), k_first.clone()
        with torch.cuda.device(q_first.device):
            # Warm-up outside the graph (PyTorch's recipe): compiles the K-Means kernel, sizes the allocations.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                fill(self.q, self.k, scaling)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                fill(self.q, self.k, scaling)

    @staticmethod
    def usable(query: torch.Tensor) -> bool:
        """Eager CUDA work outside any capture or compilation (those record the kernels themselves)."""
        return (query.is_cuda and not torch.compiler.is_compiling()
                and not torch.cuda.is_current_stream_capturing())

    def replay(self, q_first: torch.Tensor, k_first: torch.Tensor) -> None:
        self.q.copy_(q_first)
        self.k.copy_(k_first)
        self.graph.replay()

"""CHAI's dynamic cache layer (`Chai.cache_layer`, `Chai.make_cache`): grows like transformers' DynamicLayer, and
drops the K of the KV heads no representative reads once its layer's membership is known."""

import torch
from transformers.cache_utils import DynamicLayer

from chai.clustering import Membership
from chai.methods._chai_attention import pick
from chai.methods._chai_plan import ChaiSession
from chai.methods.base import ReturnedKeys


class ChaiLayer(ReturnedKeys, DynamicLayer):
    """A cache layer that keeps every K head until its layer's membership is known, then only the K of the KV heads
    representatives read (V too with `share_values`). keys [B, S, T, D] with S <= Hkv, values [B, Hkv or S, T, D]."""

    def __init__(self, session: ChaiSession, layer_idx: int):
        super().__init__()
        self.session, self.plan, self.layer_idx = session, session.plan, layer_idx
        self.membership: Membership | None = None
        self.queries: torch.Tensor | None = None  # [B, H, <m, D] first query rows, until the layer clusters
        self.past = 0  # tokens cached before the current forward

    def update(self, key_states, value_states, *args, **kwargs):
        self.past = self.get_seq_length()
        if self.membership is not None:
            key_states = pick(key_states, self.membership.kv_keep)  # [B, S, Tnew, D]
            if self.plan.share_values:
                value_states = pick(value_states, self.membership.kv_keep)
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        self.returned = keys
        self.session.announce(self.layer_idx, self)
        return keys, values

    def first_queries(self, query: torch.Tensor, m: int) -> torch.Tensor | None:
        """Collect query rows of positions < m across forwards; [B, H, m, D] once all m are there."""
        have = 0 if self.queries is None else self.queries.shape[2]
        if have < m:
            rows = query[:, :, : m - have]
            self.queries = rows if self.queries is None else torch.cat([self.queries, rows], dim=2)
        return self.queries if self.queries.shape[2] >= m else None

    def compact(self, membership: Membership) -> None:
        """Drop the K (and with share_values the V) of heads no representative reads."""
        self.membership, self.queries = membership, None
        self.keys = pick(self.keys, membership.kv_keep)
        if self.plan.share_values:
            self.values = pick(self.values, membership.kv_keep)

    def _select_requests(self, rows: torch.Tensor) -> None:
        """Keep the membership and collected queries in step with the cache's requests. rows [B'] indices."""
        if self.membership is not None:
            self.membership = self.membership.index(rows)
        if self.queries is not None:
            self.queries = self.queries[rows.to(self.queries.device)]

    def batch_repeat_interleave(self, repeats: int) -> None:
        batch = self.keys.shape[0] if self.is_initialized and self.keys.dim() == 4 else 0
        super().batch_repeat_interleave(repeats)
        self._select_requests(torch.arange(batch).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._select_requests(torch.as_tensor(indices))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._select_requests(beam_idx)

    def reset(self) -> None:
        super().reset()
        self.membership = self.queries = None

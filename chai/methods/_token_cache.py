"""A dynamic cache layer that really deletes tokens, each request its own (used by `sepcache`).

Transformers updates the cache before the attention function runs: `update` returns this forward's keys (what
was kept plus the new tokens) and only then drops every token the keep rule says no later query can see. Requests
of one batch keep different tokens, so the layer stores them padded: per request its kept tokens first, in order,
then empty slots (zeros, position -1) up to the longest request. Positions stay the original ones: keys are cached
after the rotary embedding, so nothing is renumbered, and `get_seq_length` counts the tokens seen, not kept
(transformers derives the next positions from it).
"""

import torch
from transformers.cache_utils import DynamicLayer


class TokenEvictingLayer(DynamicLayer):
    """keys/values [B, Hkv, K, D]: per request at most K kept tokens; positions [B, K] their original positions
    (-1: an empty slot); marked [B, K] whether each was a marked (e.g. separator) token.

    keep(positions [B, N], marked [B, N], seen) -> [B, N] bool: what a query at position `seen` or later may see.
    new_marks(batch, tokens, device) -> [B, Tn] bool: the marks of this forward's tokens.
    on_evict(kept [B], seen): told after every eviction (the method's statistics)."""

    is_croppable = False  # evicted tokens cannot come back

    def __init__(self, keep, new_marks, on_evict=None):
        super().__init__()
        self.keep, self.new_marks, self.on_evict = keep, new_marks, on_evict
        self.seen = 0
        self.positions = self.marked = None
        self.columns = None  # (positions, marked) [B, Tk] of the keys `update` returned last: attention reads them
        self.returned = None  # those keys, to check the attention got this forward's

    def update(self, key_states, value_states, *args, **kwargs):
        batch, _, new, _ = key_states.shape
        device = key_states.device
        fresh = torch.arange(self.seen, self.seen + new, device=device).expand(batch, new)
        marks = self.new_marks(batch, new, device)
        keys, values = super().update(key_states, value_states, *args, **kwargs)  # kept + new: this forward's keys
        positions = fresh if self.positions is None else torch.cat([self.positions, fresh], dim=1)
        marked = marks if self.marked is None else torch.cat([self.marked, marks], dim=1)
        self.columns, self.returned = (positions, marked), keys
        self.seen += new
        self._evict(keys, values, positions, marked)
        return keys, values

    def _evict(self, keys, values, positions, marked) -> None:
        keep = (positions >= 0) & self.keep(positions, marked, self.seen)  # [B, N]
        counts = keep.sum(dim=1)
        width = int(counts.max()) if counts.numel() else 0  # one host sync per layer and forward
        order = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices[:, :width]  # kept first, in order
        used = torch.arange(width, device=keep.device) < counts[:, None]  # [B, width]
        self.positions = torch.where(used, positions.gather(1, order), -1)
        self.marked = marked.gather(1, order) & used
        self.keys = _take(keys, order, used)
        self.values = _take(values, order, used)
        if self.on_evict is not None:
            self.on_evict(counts, self.seen)

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int, *args) -> tuple[int, int]:
        """The mask's width: the slots kept plus this forward's tokens (what `update` will return)."""
        kept = self.keys.shape[2] if self.is_initialized and self.keys is not None and self.keys.dim() == 4 else 0
        return kept + query_length, 0

    def _select(self, rows: torch.Tensor) -> None:
        if self.positions is not None:
            rows = rows.to(self.positions.device)
            self.positions, self.marked = self.positions[rows], self.marked[rows]

    def batch_repeat_interleave(self, repeats: int) -> None:
        batch = 0 if self.positions is None else self.positions.shape[0]
        super().batch_repeat_interleave(repeats)
        self._select(torch.arange(batch).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._select(torch.as_tensor(indices))

    def reset(self) -> None:
        super().reset()
        self.seen = 0
        self.positions = self.marked = self.columns = self.returned = None


def _take(states: torch.Tensor, order: torch.Tensor, used: torch.Tensor) -> torch.Tensor:
    """states [B, H, N, D] -> [B, H, width, D]: the columns `order` [B, width] picks; empty slots zeroed."""
    index = order[:, None, :, None].expand(-1, states.shape[1], -1, states.shape[3])
    return states.gather(2, index).masked_fill(~used[:, None, :, None], 0)

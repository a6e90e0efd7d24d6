"""The token methods' static cache (`TokenMethod.static_cache`, the bench's `method_static` path): the same keep rule
as `TokenEvictingLayer`, in buffers allocated once and written in place, so a decode step has no host sync and no
Python state that changes between steps, and can be compiled or captured as a CUDA graph.

Per request the layer holds `capacity` slots (keys/values [B, Hkv, C, D], positions [B, C] with -1 for an empty slot,
marked [B, C]). A prompt (the first forward after `reset()`) runs as in the dynamic layer, then its kept tokens are
written to the first slots. A decode step first empties the slots the rule says no query from now on can see (what
the dynamic layer deletes after the step before), then writes the new token into the first empty slot: slots are
reused, so the rows are not in position order, and the attention reads the rule's mask off the slots sorted by
position (the new token last) and scattered back. Every layer sees the same tokens under the same rule, so the slot
bookkeeping (positions, marks, which slot a step writes, the mask) is one set of buffers made and updated by the
first layer; the others only write their keys and values into the slot it chose and read its mask. Done per layer,
that bookkeeping was 27 more tensor ops a layer in every decode step (counted eagerly; the compiled step fuses
some). The capacity is set by the first prompt: the most tokens a request kept of it plus one slot for every decode
step the cache has room for (`max_cache_len` - prompt), which no rule can exceed (a step adds one token);
`TokenMethod.kv_bytes` counts the same bound. Unpadded batches only (the bench's).
"""

import torch
from transformers.cache_utils import StaticLayer

from chai.errors import ChaiError
from chai.methods._token_cache import TokenLayer, take_columns
from chai.methods.base import shared_plan


class StaticTokenLayer(TokenLayer, StaticLayer):
    """keys/values [B, Hkv, C, D], positions [B, C] (-1: empty), marked [B, C], the latter two the first layer's for
    every layer (`shared`); `cumulative_length` (a device tensor): the tokens seen, i.e. the position of the next
    one. keep/new_marks/on_evict/new_positions: as for `TokenEvictingLayer`."""

    is_croppable = False

    def __init__(self, keep, new_marks, on_evict, new_positions, max_cache_len: int, batch_size: int,
                 shared: dict | None = None, first: bool = True):
        super().__init__(max_cache_len=max_cache_len)
        self.keep, self.new_marks, self.on_evict, self.new_positions = keep, new_marks, on_evict, new_positions
        # the prompt's plan (as the dynamic layer's), the slot buffers, each decode step's slot and mask
        self.shared, self.first = ({} if shared is None else shared), first
        self.batch_size = batch_size
        self.capacity: int | None = None  # slots per request, set by the first prompt
        self.prefilled = False  # Python: set by a prompt, constant while decoding (a compiled step's guard)

    def update(self, key_states, value_states, *args, **kwargs):
        if self.prefilled:
            return self._decode(key_states, value_states)
        return self._prompt(key_states, value_states)

    def _prompt(self, key_states, value_states):
        batch, _, tokens, _ = key_states.shape
        device = key_states.device
        if batch != self.batch_size or self.new_positions(batch, tokens, device) is not None:
            raise ChaiError(f"this static token cache was made for {self.batch_size} unpadded requests, got "
                            f"{batch}{' with padding' if batch == self.batch_size else ''}.")
        positions = torch.arange(tokens, device=device).expand(batch, tokens)
        marks = self.new_marks(batch, tokens, device)
        keep, counts, most = shared_plan(self.shared, self.first, (batch, tokens),
                                         lambda: self._plan(positions, marks, tokens))
        needed = most + self.max_cache_len - tokens  # what it keeps, then one slot a decode step
        self._allocate(key_states, value_states, needed)
        if needed > self.capacity:
            raise ChaiError(f"this static token cache holds {self.capacity} tokens a request (set by its first "
                            f"prompt); this prompt keeps {most} and leaves room for {self.max_cache_len - tokens} "
                            f"steps: make a new cache for it.")
        width = min(tokens, self.capacity)
        order, used = take_columns(keep, counts, width)
        if self.first:  # the slot buffers are shared: the other layers' tokens are the same
            self.positions.fill_(-1)
            self.marked.fill_(False)
            self.positions[:, :width] = torch.where(used, positions.gather(1, order), -1)
            self.marked[:, :width] = marks.gather(1, order) & used
        for states, buffer in ((key_states, self.keys), (value_states, self.values)):
            index = order[:, None, :, None].expand(-1, states.shape[1], -1, states.shape[3])
            buffer[:, :, :width] = states.gather(2, index).masked_fill(~used[:, None, :, None], 0)
        self.cumulative_length.fill_(tokens)
        self.prefilled = True
        self.columns, self.returned = (positions, marks), key_states
        if self.on_evict is not None:
            self.on_evict(counts, tokens)
        return key_states, value_states

    def _plan(self, positions, marks, tokens: int):
        """(keep, counts, the most any request keeps) of a prompt: its one host sync."""
        keep = self.keep(positions, marks, tokens)
        counts = keep.sum(dim=1)
        return keep, counts, int(counts.max())

    def _allocate(self, key_states, value_states, capacity: int) -> None:
        if self.is_initialized:
            return
        batch, kv_heads, _, dim = key_states.shape
        self.capacity = min(capacity, self.max_cache_len)
        self.dtype, self.device = key_states.dtype, key_states.device
        new = dict(dtype=self.dtype, device=self.device)
        self.keys = torch.zeros(batch, kv_heads, self.capacity, dim, **new)
        self.values = torch.zeros(batch, kv_heads, self.capacity, value_states.shape[-1], **new)
        if self.first:
            self.shared["slots"] = (torch.full((batch, self.capacity), -1, dtype=torch.long, device=self.device),
                                    torch.zeros(batch, self.capacity, dtype=torch.bool, device=self.device))
        self.positions, self.marked = self.shared["slots"]
        self.cumulative_length = self.cumulative_length.to(self.device)
        self.rows = torch.arange(batch, device=self.device)
        if not torch.compiler.is_compiling():
            for t in (self.keys, self.values, self.positions, self.marked, self.cumulative_length):
                torch._dynamo.mark_static_address(t)
        self.is_initialized = True

    def _decode(self, key_states, value_states):
        """One token a request: empty what the rule drops from now on, write the token into the first empty slot."""
        batch, _, tokens, _ = key_states.shape
        if tokens != 1:
            raise ChaiError(f"a static token cache decodes one token a step after its prompt, got {tokens}.")
        if self.first:  # the step's bookkeeping, for every layer; the others run after it in the same forward
            now = self.cumulative_length
            keep = (self.positions >= 0) & self.keep(self.positions, self.marked, now)
            self.positions.masked_fill_(~keep, -1)
            self.marked.logical_and_(keep)
            slot = (self.positions < 0).to(torch.int32).argmax(dim=1)  # [B]: the capacity guarantees one is empty
            self.positions[self.rows, slot] = now
            self.marked[self.rows, slot] = self.new_marks(batch, 1, key_states.device)[:, 0]
            self.shared["step"] = {"slot": slot}
        slot = self.shared["step"]["slot"]
        self.keys[self.rows, :, slot] = key_states[:, :, 0]
        self.values[self.rows, :, slot] = value_states[:, :, 0]
        self.cumulative_length.add_(1)
        self.columns, self.returned = (self.positions, self.marked), self.keys
        return self.keys, self.values

    def allowed(self, visible, rows: int) -> torch.Tensor:
        """[B, 1, rows, Tk] what this forward's queries see: a prompt's as the dynamic layer's; a decode step's by
        the rule over the slots in position order (empty slots first, the new token last), scattered back."""
        positions, marked = self.columns
        if positions is not self.positions:
            return visible(positions, marked, rows)
        step = self.shared["step"]
        if "mask" not in step:  # the first layer's; the others' slots are the same
            order = positions.argsort(dim=1)
            seen = visible(positions.gather(1, order), marked.gather(1, order), 1)
            step["mask"] = torch.zeros_like(seen).scatter(-1, order[:, None, None, :], seen)
        return step["mask"]

    def get_mask_sizes(self, query_length: int, *args) -> tuple[int, int]:
        return (self.capacity if self.prefilled else query_length), 0

    def reset(self) -> None:
        """Empty in place (a captured step keeps pointing at the same buffers); the capacity stays."""
        if self.is_initialized:
            self.positions.fill_(-1)
            self.marked.fill_(False)
            self.cumulative_length.zero_()
        self.prefilled = False
        self.columns = self.returned = None

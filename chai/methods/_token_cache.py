"""Keeping fewer tokens: a dynamic cache layer that really deletes them, each request its own, and `TokenMethod`,
what the methods that use it share (sepcache, anchor).

Transformers updates the cache before the attention function runs: `update` returns this forward's keys (what
was kept plus the new tokens) and only then drops every token the keep rule says no later query can see. Requests
of one batch keep different tokens, so the layer stores them padded: per request its kept tokens first, in order,
then empty slots (zeros, position -1) up to the longest request. Positions stay the original ones: keys are cached
after the rotary embedding, so nothing is renumbered, and `get_seq_length` counts the tokens seen, not kept
(transformers derives the next positions from it).

Left padding (lm-eval's batched generation): a token's position is its row's count of real tokens before it, from
the 2-D attention mask the model is called with (as `generate` numbers them), and pad tokens get -1, an empty slot:
they take no sink or window slot, are never seen and are dropped at the first eviction, so a padded row keeps and
sees what it would alone.
"""

from typing import ClassVar

import torch
from transformers.cache_utils import Cache, DynamicLayer, StaticLayer

from chai.attention import AttnShape, dense
from chai.errors import require
from chai.methods.base import Method, ReturnedKeys, RunStats, shared_plan


class TokenLayer(ReturnedKeys):
    """What the token methods' attention asks of their cache layers, dynamic (`TokenEvictingLayer`) or static
    (`chai.methods._token_static.StaticTokenLayer`): `columns`, (positions, marked) of the keys `update` returned
    last, `take_returned(key)` and `allowed(visible, rows)`."""

    columns = None


class TokenEvictingLayer(TokenLayer, DynamicLayer):
    """keys/values [B, Hkv, K, D]: per request at most K kept tokens; positions [B, K] their original positions
    (-1: an empty slot); marked [B, K] whether each was a marked (e.g. separator) token.

    keep(positions [B, N], marked [B, N], seen) -> [B, N] bool: what a query at position `seen` or later may see.
    new_marks(batch, tokens, device) -> [B, Tn] bool: the marks of this forward's tokens.
    on_evict(kept [B], seen): told after every eviction (the method's statistics).
    new_positions(batch, tokens, device) -> [B, Tn] positions of this forward's tokens (-1: padding), or None when
    they are their columns (no padding).
    shared: a dict every layer of one cache holds, where the first layer leaves each forward's eviction plan for the
    others (the same tokens under the same rule: one keep decision and one host sync a forward, not one a layer)."""

    is_croppable = False  # evicted tokens cannot come back

    def __init__(self, keep, new_marks, on_evict=None, new_positions=None, shared: dict | None = None,
                 first: bool = True):
        super().__init__()
        self.keep, self.new_marks, self.on_evict, self.new_positions = keep, new_marks, on_evict, new_positions
        self.shared, self.first = ({} if shared is None else shared), first
        self.seen = 0
        self.positions = self.marked = None
        self.columns = None  # (positions, marked) [B, Tk] of the keys `update` returned last: attention reads them

    def update(self, key_states, value_states, *args, **kwargs):
        batch, _, new, _ = key_states.shape
        device = key_states.device
        fresh, upcoming = self._fresh_positions(batch, new, device)
        marks = self.new_marks(batch, new, device)
        keys, values = super().update(key_states, value_states, *args, **kwargs)  # kept + new: this forward's keys
        positions = fresh if self.positions is None else torch.cat([self.positions, fresh], dim=1)
        marked = marks if self.marked is None else torch.cat([self.marked, marks], dim=1)
        self.columns, self.returned = (positions, marked), keys
        self.seen += new
        self._evict(keys, values, positions, marked, upcoming)
        return keys, values

    def _fresh_positions(self, batch: int, new: int, device):
        """This forward's positions [B, Tn] and the next token's position: an int, or [B, 1] under padding."""
        given = None if self.new_positions is None else self.new_positions(batch, new, device)
        if given is None:
            return torch.arange(self.seen, self.seen + new, device=device).expand(batch, new), self.seen + new
        last = given.max(dim=1, keepdim=True).values
        if self.positions is not None:  # a row whose new tokens are all padding: its kept tokens say where it is
            last = torch.maximum(last, self.positions.max(dim=1, keepdim=True).values)
        return given, last + 1

    def _evict(self, keys, values, positions, marked, upcoming) -> None:
        key = (self.seen, tuple(positions.shape))  # a later layer of the same forward finds the first one's plan
        order, used, counts, self.positions, self.marked = shared_plan(
            self.shared, self.first, key, lambda: self._plan(positions, marked, upcoming))
        self.keys = _take(keys, order, used)
        self.values = _take(values, order, used)
        if self.on_evict is not None:
            self.on_evict(counts, upcoming)

    def _plan(self, positions, marked, upcoming):
        """(order, used, counts, positions, marked) of what the rule keeps: the kept columns first, in order."""
        keep = (positions >= 0) & self.keep(positions, marked, upcoming)  # [B, N]
        counts = keep.sum(dim=1)
        width = int(counts.max()) if counts.numel() else 0  # the one host sync of a forward
        order, used = take_columns(keep, counts, width)
        return order, used, counts, torch.where(used, positions.gather(1, order), -1), marked.gather(1, order) & used

    def allowed(self, visible, rows: int) -> torch.Tensor:
        """[B, 1, rows, Tk] what this forward's queries (the last `rows` columns) see under the rule `visible`; a
        pad row sees itself, not nothing."""
        positions, marked = self.columns
        columns = positions.shape[1]
        itself = torch.arange(columns, device=positions.device) == torch.arange(columns - rows, columns,
                                                                                 device=positions.device)[:, None]
        return visible(positions, marked, rows) | itself

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


def take_columns(keep: torch.Tensor, counts: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """keep [B, N] -> (order [B, width]: the kept columns first, in order; used [B, width]: which are kept)."""
    order = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices[:, :width]
    return order, torch.arange(width, device=keep.device) < counts[:, None]


def _take(states: torch.Tensor, order: torch.Tensor, used: torch.Tensor) -> torch.Tensor:
    """states [B, H, N, D] -> [B, H, width, D]: the columns `order` [B, width] picks; empty slots zeroed."""
    index = order[:, None, :, None].expand(-1, states.shape[1], -1, states.shape[3])
    return states.gather(2, index).masked_fill(~used[:, None, :, None], 0)


class TokenMethod(Method):
    """What the token-eviction methods share (sepcache, anchor): a rule over marked tokens (separators, anchors)
    whose ids `prepare` finds, applied as a mask when scoring and by `TokenEvictingLayer` when decoding.

    A subclass gives `visible(k_pos, k_marked, rows)` (which keys the queries in the last `rows` columns see),
    `keep(positions, marked, seen)` (what a query at position `seen` or later may still see: the cache deletes the
    rest) and `unknown_kept(tokens)` (tokens kept when the ids are not known), and sets `_ids` in `prepare`.

    The ids reach the attention through a forward pre-hook on the model (registered in `on_apply`, removed in
    `on_remove`), which marks each forward's tokens and follows the sequence across forwards with a cache."""

    family: ClassVar[str | None] = None  # the paper's name, the family of every variant's label (None: the label)

    def _start(self) -> None:
        """Called by a subclass's __post_init__: the state a run fills."""
        self._ids = None  # [n] marked ids (prepare)
        self._hook = None
        self._cache = None  # the evicting cache of the current forward, None for any other
        self._new_marks = None  # [B, Tn] marked tokens among this forward's
        self._new_positions = None  # [B, Tn] their positions under padding (-1: a pad), None: their columns
        self._marks = None  # [B, T] marked tokens of the whole sequence so far
        self._kept, self._seen = [], []  # per request: tokens kept, tokens seen (after a prefill, or a request)

    def use_token_ids(self, ids) -> None:
        """Set the marked ids directly (tests, or a tokenizer-free caller)."""
        self._ids = torch.as_tensor(ids, dtype=torch.long)

    def on_apply(self, model) -> None:
        require(self._ids is not None, f"{self.name}: call prepare(model, context) with a tokenizer before applying "
                                       f"it.")
        self._ids = self._ids.to(model.device)  # on the model's device: a captured step cannot copy from the host
        self._hook = model.register_forward_pre_hook(self._capture, with_kwargs=True)

    def on_remove(self, model) -> None:
        if self._hook is not None:
            self._hook.remove()
        self._hook = self._cache = self._new_marks = self._new_positions = None

    def _capture(self, module, args, kwargs):
        """Forward pre-hook: mark this forward's tokens; follow the sequence across forwards with a cache."""
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:  # embeddings only: nothing can be marked, so only a rule without marks runs
            require(not len(self._ids), f"{self.name}: needs input_ids to mark tokens, got inputs_embeds.")
            ids = torch.zeros(kwargs["inputs_embeds"].shape[:2], dtype=torch.long,
                              device=kwargs["inputs_embeds"].device)
        marks = is_marked(ids, self._ids)
        self._new_positions = padded_positions(kwargs.get("attention_mask"), ids.shape[1])
        if self._new_positions is not None:
            marks &= self._new_positions >= 0  # a pad is never a separator or an anchor
        cache = _sequence_cache(args, kwargs)
        first = cache.layers[0] if isinstance(cache, Cache) and cache.layers else None
        self._cache, self._new_marks = (cache if isinstance(first, TokenLayer) else None), marks
        if isinstance(first, StaticLayer) and isinstance(first, TokenLayer):
            if not first.prefilled:  # a decode step reads no sequence-long state: its cache holds the marks
                self._marks = marks
            return
        past = cache.get_seq_length() if isinstance(cache, Cache) else 0
        if past == 0:
            self._marks = marks
        else:
            require(self._marks is not None and self._marks.shape == (ids.shape[0], past),
                    f"{self.name}: a forward continues a cache of {past} tokens this method did not see.")
            self._marks = torch.cat([self._marks, marks], dim=1)

    def attention(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        # query: [B, H, Tq, D]; key, value: [B, Hkv, Tk, D] (the cache's kept tokens and this forward's)
        batch, _, rows, _ = query.shape
        columns = key.shape[2]
        layer = self._cache.layers[module.layer_idx] if self._cache is not None else None
        if layer is not None:  # the model's mask is not read: padding is in the columns' positions (-1)
            require(layer.take_returned(key), f"{self.name}: the attention got keys that are not its cache layer's.")
            allowed = layer.allowed(self.visible, rows)
        else:  # one sequence in columns: scoring, or a cache that keeps everything
            require(self._marks is not None and self._marks.shape[1] == columns,
                    f"{self.name}: {columns} keys but marks known for "
                    f"{None if self._marks is None else self._marks.shape[1]} tokens.")
            k_pos = torch.arange(columns, device=key.device).expand(batch, columns)
            allowed = self.visible(k_pos, self._marks.to(key.device), rows)
            given = as_bool_mask(attention_mask)
            itself = k_pos[:, None, None, :] == k_pos[:, None, -rows:, None]  # no row left empty: pad rows see self
            allowed = (allowed if given is None else allowed & given) | itself
            if module.layer_idx == 0:
                self._count_scoring(given)
        return dense(module, query, key, value, allowed, scaling, dropout, **kwargs)

    def kept_tokens(self, marked: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """[B] tokens the evicting cache holds after each request's `lengths` [B] tokens (marked [B, T]): the keep
        rule the cache applies, at each request's own length."""
        ends = lengths.to(marked.device)[:, None]
        pos = torch.arange(marked.shape[1], device=marked.device)[None].expand_as(marked)
        real = pos < ends
        return (self.keep(pos, marked & real, ends) & real).sum(dim=1)

    def _count_scoring(self, given) -> None:
        """What the evicting cache would hold after each request of a scoring forward (real tokens only)."""
        marks = self._marks
        if given is None:
            lengths = torch.full((marks.shape[0],), marks.shape[1], device=marks.device)
        else:  # a request's last row (or a pad row after it) sees all its real tokens
            lengths = given[:, 0, -1, :].sum(dim=-1).expand(marks.shape[0])
        self._record(self.kept_tokens(marks, lengths), lengths)

    def _record(self, kept, seen) -> None:
        self._kept += torch.as_tensor(kept).tolist()
        self._seen += torch.as_tensor(seen).reshape(-1).expand(len(kept)).tolist()  # seen: one count, or one a row

    def _marks_of_new(self, batch: int, tokens: int, device) -> torch.Tensor:
        marks = self._new_marks
        require(marks is not None and marks.shape == (batch, tokens),
                f"{self.name}: the evicting cache was used outside `with method.applied(model)`.")
        return marks.to(device)

    def _positions_of_new(self, batch: int, tokens: int, device) -> torch.Tensor | None:
        positions = self._new_positions
        return None if positions is None else positions.to(device)

    def cache_layer(self, layer_idx: int, config, shared: dict | None = None):
        return TokenEvictingLayer(self.keep, self._marks_of_new, self._record if layer_idx == 0 else None,
                                  self._positions_of_new, shared, first=layer_idx == 0)

    def make_cache(self, model) -> Cache:
        shared = {}  # the layers' common eviction plan, one a forward (TokenEvictingLayer)
        layers = AttnShape.of(model.config).layers
        return Cache(layers=[self.cache_layer(i, model.config, shared) for i in range(layers)])

    def static_cache(self, model, batch_size: int, max_cache_len: int):
        """The bench's `method_static` cache: the same rule in buffers written in place (see _token_static)."""
        from chai.methods._token_static import StaticTokenLayer  # it builds on this module

        shared = {}  # the prompt's plan, made by the first layer for all
        return Cache(layers=[StaticTokenLayer(self.keep, self._marks_of_new, self._record if i == 0 else None,
                                              self._positions_of_new, max_cache_len, batch_size, shared, i == 0)
                             for i in range(AttnShape.of(model.config).layers)])

    def kv_bytes(self, config, batch: int, tokens: int, dtype_bytes: int) -> dict:
        """batch x max(kept) tokens (the cache pads requests to the longest), kept counted by the rule from the ids
        of the last sequence seen when it has `batch` rows: at `tokens` when it has that many (from its first
        `tokens`: what the cache held at that length, e.g. after the prompt of a prefill and decode); past its end,
        what it kept at its end plus every later token (the bound a static cache is sized by: its prompt, then
        `tokens` - prompt decode steps); without ids, `unknown_kept(tokens)`."""
        marks = self._marks
        kept = self.unknown_kept(tokens)
        if marks is not None and marks.shape[0] == batch and batch:
            known = min(tokens, marks.shape[1])
            kept = int(self.kept_tokens(marks, torch.full((batch,), known, device=marks.device)).max())
            kept += tokens - known
        per_token = AttnShape.of(config).dense_kv_bytes_per_token(dtype_bytes)
        return {name: batch * kept * value for name, value in per_token.items()}

    def prompt_facts(self, ids) -> dict:
        """The share of a prompt's tokens [B, S] the rule marks (separators, anchors) and how many ids it marks."""
        if self._ids is None:
            return {}
        marked = is_marked(ids, self._ids)
        return {"marked_fraction": float(marked.float().mean()) if ids.numel() else 0.0, "marked_ids": len(self._ids)}

    def kept_facts(self) -> dict | None:
        """Tokens kept per request over the run: mean, min, median, max, and the kept share of the tokens seen."""
        if not self._kept:
            return None
        kept = torch.tensor(self._kept, dtype=torch.float64)
        return {"requests": len(self._kept), "mean": float(kept.mean()), "min": int(kept.min()),
                "median": float(kept.median()), "max": int(kept.max()),
                "kept_fraction": float(kept.sum()) / max(1, sum(self._seen))}

    def with_kept_facts(self, info: dict) -> dict:
        """A subclass's `describe()` facts plus the kept-token statistics, once there are any."""
        facts = self.kept_facts()
        return {**info, "kept_tokens": facts} if facts else info

    @classmethod
    def display(cls, settings: dict, facts: dict | None = None) -> dict:
        """Method's display with the paper's name as the family (labels carry the variant: training-free, ...)."""
        shown = super().display(settings, facts)
        return {**shown, "family": cls.family or shown["family"]}

    def run_stats(self) -> RunStats:
        facts = self.kept_facts()
        return RunStats(extra={"kept_tokens": facts} if facts else {})


def is_marked(ids: torch.Tensor, marked_ids: torch.Tensor) -> torch.Tensor:
    """ids [B, T] -> [B, T] bool: which are among `marked_ids` [n]. A broadcast compare, not torch.isin: on CUDA,
    isin sorts and takes unique values once the ids outnumber ~10 x n^0.145 (21 for SepLLM's 141 separator ids),
    a host sync that a captured decode step cannot make."""
    return (ids[..., None] == marked_ids.to(ids.device)).any(dim=-1)


def padded_positions(attention_mask, tokens: int) -> torch.Tensor | None:
    """[B, tokens] positions of a forward's tokens from the model's 2-D padding mask [B, past + tokens] (1: real):
    the real tokens before each in its row, -1 for a pad, as `generate` numbers them; None without a 2-D mask."""
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        return None
    real = attention_mask[:, -tokens:].bool()
    return torch.where(real, attention_mask.long().cumsum(dim=1)[:, -tokens:] - 1, -1)


def as_bool_mask(mask) -> torch.Tensor | None:
    """The model's mask as boolean [B or 1, 1, Tq, Tk] (True = attend), None when it gave none."""
    if mask is None or mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min / 2


def _sequence_cache(args, kwargs):
    for name in ("cache", "past_key_values"):
        if kwargs.get(name) is not None:
            return kwargs[name]
    return args[3] if len(args) > 3 else None

"""Attention building blocks shared by the methods: shapes, masks, the dense reference, cache byte counts.

Conventions (transformers' attention-function contract): `query` [B, H, Tq, D], `key`/`value` [B, Hkv, Tk, D]
after the cache update, boolean `mask` [B, 1, Tq, Tk] with True = attend, and an attention function returns
([B, Tq, H, D], weights-or-None). Always use the `scaling` argument: OPT pre-scales q and passes scaling=1.0.
"""

import functools
import inspect
import weakref
from dataclasses import dataclass

import torch

# transformers' SDPA forward and mask builder are imported where they are called: importing them pulls in
# torch._dynamo (~10 s on a loaded 2-core machine), and run.py's bad-input checks import the methods (which import
# this module) before any model exists.


@dataclass(frozen=True)
class AttnShape:
    layers: int
    heads: int
    kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, config) -> "AttnShape":
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        return cls(config.num_hidden_layers, heads, kv_heads, head_dim)

    @property
    def groups(self) -> int:
        return self.heads // self.kv_heads

    def kv_of_query(self, device=None) -> torch.Tensor:
        """[H] index of the KV head each query head reads (GQA: consecutive query heads share one)."""
        return torch.arange(self.heads, device=device) // self.groups

    def dense_kv_bytes_per_token(self, dtype_bytes: int) -> dict:
        per_tensor = self.layers * self.kv_heads * self.head_dim * dtype_bytes
        return {"k": per_tensor, "v": per_tensor}


# id -> (weak reference, starts at position 0) of the masks built plain causal: no padding, no window (a tensor's ==
# is elementwise, so a WeakSet, which compares members with ==, cannot hold them); the flag: its query rows and keys
# both start at position 0 (a prompt's first forward)
_PLAIN_CAUSAL: dict[int, tuple[weakref.ref, bool]] = {}


@functools.cache
def _signature(function) -> inspect.Signature:
    """A function's signature, read once (every forward builds a mask)."""
    return inspect.signature(function)


def bool_causal_mask(*args, **kwargs):
    """Mask function for custom attention names: always a boolean [B, 1, Tq, Tk] mask (True = attend), never the
    `None` + is_causal shortcut, because our functions slice rows and need the mask explicitly. A mask built from
    positions alone (no padding mask, no window) is remembered (`plain_causal`): a kernel may then run `is_causal`
    (flash attention) without reading the mask, which would cost a host sync."""
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    kwargs["allow_is_causal_skip"] = False
    mask = sdpa_mask(*args, **kwargs)
    if torch.compiler.is_compiling():  # a compiled step cannot hold Python ids; it never asks `plain_causal`
        return mask
    given = _signature(sdpa_mask).bind_partial(*args, **kwargs).arguments  # names differ across releases
    plain = (given.get("attention_mask") is None and given.get("local_size") is None
             and given.get("mask_function", causal_mask_function) is causal_mask_function)
    if plain and mask is not None:
        key = id(mask)
        forget = lambda _, key=key: _PLAIN_CAUSAL.pop(key, None)  # noqa: E731
        _PLAIN_CAUSAL[key] = (weakref.ref(mask, forget), _starts_at_zero(given, sdpa_mask))
    return mask


def _starts_at_zero(given: dict, builder) -> bool:
    """Whether a mask's query rows and keys start at position 0 (transformers' `q_offset`, `kv_offset`). A static
    cache passes q_offset as a one-element device tensor: reading it is a host sync, which a captured CUDA graph
    forbids (the bench's decode step) and a decode step need not pay, so it is read only for a prompt-sized forward
    outside capture, once per forward before the first layer, as transformers' own SDPA mask reads it. False (the
    explicit mask, always correct) for one query row, under capture, or on a release whose builder has no offsets."""
    if "q_offset" not in _signature(builder).parameters or int(given.get("q_length", 0)) <= 1:
        return False
    offsets = [given.get(name, 0) for name in ("q_offset", "kv_offset")]
    return not _capturing(offsets) and all(int(o) == 0 for o in offsets)


def _capturing(offsets: list) -> bool:
    """Whether a CUDA graph is being captured while an offset lives on the GPU (a CPU-only build cannot even ask)."""
    on_gpu = any(isinstance(o, torch.Tensor) and o.device.type == "cuda" for o in offsets)
    return on_gpu and torch.cuda.is_current_stream_capturing()


def plain_causal(mask: torch.Tensor | None) -> bool:
    """Whether `mask` (or None) is causal by position alone: built by `bool_causal_mask` with no padding and no
    window. Known without reading the mask (no host sync); False when unsure, e.g. for a slice of such a mask."""
    if mask is None:
        return True
    if torch.compiler.is_compiling():
        return False
    known = _PLAIN_CAUSAL.get(id(mask))
    return known is not None and known[0]() is mask


def causal_from_start(mask: torch.Tensor | None) -> bool:
    """Whether `mask` is plain causal with its query rows at positions 0..Tq-1 over keys from position 0 (a prompt's
    first forward): then rows see only the first Tq keys, whatever a static cache holds after them."""
    return mask is not None and plain_causal(mask) and _PLAIN_CAUSAL[id(mask)][1]


def additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | float:
    """Boolean mask -> additive bias (0 / -inf-ish) in `dtype`; None -> 0."""
    if mask is None:
        return 0.0
    if mask.dtype != torch.bool:
        return mask.to(dtype)
    return torch.zeros((), dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


def repeat_heads(states: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, Hkv, T, D] -> [B, Hkv * groups, T, D], each KV head repeated for the query heads of its group."""
    return states if groups == 1 else states.repeat_interleave(groups, dim=1)


def attention_probs(query, key, mask, scaling) -> torch.Tensor:
    """softmax(q k^T * scaling + mask) in float32. query [B, H, Tq, D], key [B, H, Tk, D] -> [B, H, Tq, Tk]."""
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scaling
    return torch.softmax(scores + additive(mask, torch.float32), dim=-1)


def dense(module, query, key, value, mask, scaling, dropout=0.0, **kwargs):
    """Plain multi-head attention through transformers' SDPA path (what MHA runs), for layers a method leaves
    alone."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    tq = query.shape[2]
    if tq > 1 and causal_from_start(mask):
        # What transformers' own mask gives MHA here: no mask, is_causal over the first Tq keys, so CUDA runs flash
        # attention. A static cache's keys run past the prompt; the explicit mask over them was ~3x slower (H200,
        # LLaMA-7B, 8 x 4096: 7.3 ms a layer against MHA's 2.25), and the keys after Tq are masked anyway.
        key, value, mask = key[:, :, :tq], value[:, :, :tq], None
    return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)


def to_output(out: torch.Tensor) -> torch.Tensor:
    """[B, H, T, D] -> [B, T, H, D], the layout attention functions return."""
    return out.transpose(1, 2).contiguous()


def kv_bytes(cache) -> dict:
    """Bytes held by the K and V tensors of every layer of a transformers cache, as allocated."""
    total = {"k": 0, "v": 0}
    for layer in cache.layers:
        for name, attr in (("k", "keys"), ("v", "values")):
            tensor = getattr(layer, attr, None)
            if isinstance(tensor, torch.Tensor):
                total[name] += tensor.numel() * tensor.element_size()
    return total

"""MHA: dense multi-head attention, the baseline every method is compared with and reduces to at its no-op setting."""

from dataclasses import dataclass

from transformers import StaticCache

from chai.methods import register
from chai.methods.base import Method


@register
@dataclass
class MHA(Method):
    """The model's own attention (`model.attn_implementation`, SDPA by default); stores every K and V head."""

    name = "mha"
    custom_attention = False
    label, order, color = "MHA", 0, "tab:red"

    def static_cache(self, model, batch_size: int, max_cache_len: int):
        """The fast decode path's cache (mode=bench): transformers' StaticCache, every K and V head preallocated
        for `max_cache_len` tokens on the first update and written in place, so a decode step can be captured as
        a CUDA graph or compiled with fullgraph=True; `reset()` empties it in place."""
        return StaticCache(config=model.config, max_cache_len=max_cache_len)

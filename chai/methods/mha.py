"""MHA: dense multi-head attention, the baseline every method is compared with and reduces to at its no-op setting."""

from dataclasses import dataclass

from chai.methods import register
from chai.methods.base import Method


@register
@dataclass
class MHA(Method):
    """The model's own attention (`model.attn_implementation`, SDPA by default); stores every K and V head."""

    name = "mha"
    custom_attention = False

"""Test helpers shared across test files (not fixtures)."""

from hydra import compose, initialize_config_dir

from chai.paths import CONF_DIR


def compose_cfg(overrides: list[str]):
    """The config `python run.py <overrides>` would run, composed in-process."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def assert_one_line_error(make, pattern: str) -> None:
    """`make()` raises a ChaiError matching `pattern` whose message is one line (what run.py prints)."""
    import pytest

    from chai.errors import ChaiError

    with pytest.raises(ChaiError, match=pattern) as err:
        make()
    assert "\n" not in str(err.value)


def logits(model, ids, method=None):
    """The model's logits for `ids`, under `method` when given (applied only for this forward)."""
    import torch

    with torch.no_grad():
        if method is None:
            return model(ids).logits
        with method.applied(model):
            return model(ids).logits


def kept_k_static_cache(model, max_cache_len: int, kept: list[int]):
    """A static cache that stores K for the `kept` heads only and V for every head: the stand-ins for CHAI's cache
    in the bench and capacity tests."""
    import torch
    from transformers.cache_utils import Cache, StaticLayer

    class KeptKStaticLayer(StaticLayer):
        def lazy_initialization(self, key_states, value_states):
            super().lazy_initialization(key_states, value_states)
            batch, heads, _, dim = value_states.shape  # V keeps every head, unlike K
            self.values = torch.zeros(batch, heads, self.max_cache_len, dim, dtype=value_states.dtype,
                                      device=self.keys.device)
            torch._dynamo.mark_static_address(self.values)

        def update(self, key_states, value_states, *args, **kwargs):
            return super().update(key_states[:, kept], value_states, *args, **kwargs)

    return Cache(layers=[KeptKStaticLayer(max_cache_len) for _ in range(model.config.num_hidden_layers)])


def kept_k_bytes(config, batch: int, tokens: int, dtype_bytes: int, kept_heads: int) -> dict:
    """K,V bytes of a cache holding K for `kept_heads` heads and V for every head, per the method contract."""
    from chai.attention import AttnShape

    shape = AttnShape.of(config)
    per_head = batch * tokens * shape.layers * shape.head_dim * dtype_bytes
    return {"k": kept_heads * per_head, "v": shape.heads * per_head}

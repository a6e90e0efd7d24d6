"""Test helpers shared across test files (not fixtures)."""

import weakref

import torch
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


def evicting_decode(model, method, ids, prompt: int):
    """Logits of a prefill of `prompt` tokens into the method's (evicting) cache, then one token at a time
    (teacher-forced), and the cache: what scoring with the method's mask must equal."""
    cache = method.make_cache(model)
    steps = [model(ids[:, :prompt], past_key_values=cache).logits]
    steps += [model(ids[:, t:t + 1], past_key_values=cache).logits for t in range(prompt, ids.shape[1])]
    return torch.cat(steps, dim=1), cache


def assert_scores_and_decodes_like_mha(model, method, ids, prompt: int = 4):
    """A setting under which the method changes nothing: scoring with its mask equals MHA exactly, and decoding into
    its evicting cache equals it to rounding. Returns that cache (for what it kept)."""
    with torch.no_grad():
        dense = model(ids).logits
        with method.applied(model):
            scored = model(ids).logits
            decoded, cache = evicting_decode(model, method, ids, prompt=prompt)
    assert torch.equal(scored, dense) and torch.allclose(decoded, dense, atol=1e-5)
    return cache


def assert_right_padding_is_ignored(model, method, ids, real: int) -> None:
    """Row 1 right-padded after `real` tokens (lm-eval's layout) scores as the same row alone, and nothing is NaN."""
    padded, mask = ids.clone(), torch.ones_like(ids)
    padded[1, real:], mask[1, real:] = 0, 0
    with torch.no_grad(), method.applied(model):
        batch = model(padded, attention_mask=mask).logits
        alone = model(ids[1:, :real]).logits
    assert torch.allclose(batch[1:, :real], alone, atol=1e-5) and not batch.isnan().any()


def assert_cache_holds_the_kept_tokens(model, method, ids, kept: list[int]) -> None:
    """After a prefill of `ids` [2, T] into the method's evicting cache: each request holds `kept` tokens (counted
    by hand), the bytes in the cache tensors equal the method's analytic count (padded: 2 x the longest request's),
    and the run statistics say the same."""
    from chai.attention import AttnShape, kv_bytes

    length = ids.shape[1]
    cache = method.make_cache(model)
    with torch.no_grad(), method.applied(model):
        model(ids, past_key_values=cache)
    assert (cache.layers[0].positions >= 0).sum(1).tolist() == kept
    held = {tuple(t.shape) for layer in cache.layers for t in tensors_held(vars(layer).values()) if t.dim() == 4}
    assert {shape[2] for shape in held} == {max(kept)}  # no K or V of an evicted token stays referenced
    assert kv_bytes(cache) == method.kv_bytes(model.config, 2, length, 4)
    assert kv_bytes(cache)["k"] == 2 * max(kept) * AttnShape.of(model.config).dense_kv_bytes_per_token(4)["k"]
    stats = method.run_stats().extra["kept_tokens"]
    assert (stats["min"], stats["max"], stats["kept_fraction"]) == (min(kept), max(kept), sum(kept) / (2 * length))


def tensors_held(values) -> list:
    """The tensors among `values`, inside tuples and lists, and behind weak references that are still alive."""
    found = []
    for value in values:
        value = value() if isinstance(value, weakref.ref) else value
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, (tuple, list)):
            found += tensors_held(value)
    return found


def assert_model_restored_after_applied(model, method, ids) -> None:
    """After `with method.applied(model)` the model computes exactly what it did before, and holds no hook of the
    method's (the token methods register a forward pre-hook while applied)."""
    hooks = dict(model._forward_pre_hooks)
    with torch.no_grad():
        before = model(ids).logits
        with method.applied(model):
            model(ids)
        after = model(ids).logits
    assert torch.equal(before, after) and dict(model._forward_pre_hooks) == hooks

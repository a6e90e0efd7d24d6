"""The one interface every attention method implements.

A method is a dataclass whose fields are its paper's hyperparameters (validated in `__post_init__`, so bad values
fail before any model loads) plus up to five hooks:

- `check_shape(config)`: checks against the model's shape from its config alone (no weights), so `run.py`
  rejects e.g. more clusters than heads before the model loads; `prepare` runs the same checks on the real model.
- `prepare(model, context)`: checks against the model's shape and loads what it needs offline (calibration).
- `attention(module, query, key, value, mask, scaling, ...)`: registered under the method's name through
  transformers' `AttentionInterface`, with a boolean causal mask through `AttentionMaskInterface`.
- `cache_layer(layer_idx, config)`: a transformers cache layer; a method that stores less K or V returns its own.
- `kv_bytes_per_token(config, dtype_bytes)`: the analytic K,V bytes one token of context costs (batch 1).

`with method.applied(model):` switches the model to the method and always switches it back: after the block the
model computes exactly what it did before (a test checks this). Runners only ever talk to this interface.
"""

import contextlib
from dataclasses import asdict, dataclass
from typing import ClassVar

from transformers.cache_utils import Cache, DynamicLayer

from chai.attention import AttnShape, bool_causal_mask


@dataclass
class RunContext:
    """What `prepare` may use: the composed config, the tokenizer, and where data and artifacts live."""

    cfg: object = None
    tokenizer: object = None
    model_name: str = "model"
    data_dir: str | None = None
    results_dir: str | None = None


@dataclass
class Method:
    name: ClassVar[str] = "base"
    # False: the model keeps its own attention implementation (MHA).
    custom_attention: ClassVar[bool] = True

    def check_shape(self, config) -> None:
        """Check the settings against a model's shape. `config`: a transformers config, or any object with its
        fields (num_hidden_layers, num_attention_heads, ...; chai.preflight reads them without loading weights).
        Default: no constraint."""

    def prepare(self, model, context: RunContext | None = None) -> None:
        """Check the method against the model; load or compute offline artifacts. Default: nothing to do."""

    def attention(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        raise NotImplementedError

    def cache_layer(self, layer_idx: int, config):
        return DynamicLayer()

    def make_cache(self, model) -> Cache:
        shape = AttnShape.of(model.config)
        return Cache(layers=[self.cache_layer(i, model.config) for i in range(shape.layers)])

    def kv_bytes_per_token(self, config, dtype_bytes: int) -> dict:
        return AttnShape.of(config).dense_kv_bytes_per_token(dtype_bytes)

    def describe(self) -> dict:
        """Method-specific facts for the run record (chosen clusters, clustering time, ...)."""
        return {}

    def settings(self) -> dict:
        return asdict(self)

    def on_apply(self, model) -> None:
        """Extra changes while applied (e.g. pruned projection weights); undone by `on_remove`."""

    def on_remove(self, model) -> None:
        pass

    @contextlib.contextmanager
    def applied(self, model):
        # Imported here, not at the top: transformers' modeling and masking utilities take seconds to import, and
        # run.py's preflight imports the methods (for `check_shape`) before any model exists.
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        previous = model.config._attn_implementation
        if self.custom_attention:
            AttentionInterface.register(self.name, self.attention)
            AttentionMaskInterface.register(self.name, bool_causal_mask)
            model.set_attn_implementation(self.name)
        try:
            self.on_apply(model)  # inside the try: a failure half-way through is undone too
            yield self
        finally:
            self.on_remove(model)
            if self.custom_attention:
                model.set_attn_implementation(previous)

"""The one interface every attention method implements; runners, the bench and the report use nothing else.

A method is a dataclass whose fields are its paper's hyperparameters (validated in `__post_init__`, so bad values
fail before any model loads). Every hook has a default, so a method overrides only what it changes:

| hook | default | used by |
|---|---|---|
| `check_shape(config)` | no constraint | preflight: settings against the model's config, no weights |
| `check_tokenizer(tokenizer)` | nothing | every runner, before the model loads: what the method needs of it |
| `prepare(model, context)` | nothing | every runner, once the model is loaded (offline artifacts) |
| `attention(module, q, k, v, mask, scaling, ...)` | required when `custom_attention` | transformers' `AttentionInterface` |
| `mask_function()` | boolean causal mask | transformers' `AttentionMaskInterface` (a method may hide evicted tokens) |
| `cache_layer(layer_idx, config)` | `DynamicLayer` | the dynamic cache (`make_cache`): a method that stores less returns its own |
| `static_cache(model, batch, max_len)` | None (no static path) | bench `method_static`: preallocated, capturable decode step |
| `kv_bytes(config, batch, tokens, dtype_bytes)` | every K and V head | K,V bytes held for `batch` requests of `tokens` tokens (analytic) |
| `kv_bytes_read(config, batch, context, dtype_bytes)` | = `kv_bytes` | bytes one decode step reads (the roofline) |
| `input_text(text)` | unchanged | lm-eval: the text a prompt is read as (AnLLM-AC marks its sentences) |
| `set_prompt_lengths(lengths)` | stored | lm-eval scoring: per row, how many leading tokens are prompt (None: unknown) |
| `prompt_facts(ids)` | {} | bench: what the method makes of a cell's prompt (a token method: the share it marks) |
| `run_stats()` | `RunStats()` | counters for the record: clustering time, decode kernel settings, K,V read fraction |
| `label`, `order`, `color`, `variant(settings)`, `display(settings, facts)` | the name | how tables and figures show the method (stored in records) |
| `describe()` | {} | free-form facts for the record (chosen clusters, ...) |

`with method.applied(model):` switches the model to the method and always switches it back: after the block the
model computes exactly what it did before (a test checks this).
"""

import contextlib
from dataclasses import asdict, dataclass, field
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
class RunStats:
    """What a method measured about itself while it ran (cumulative since it was built)."""

    clustering_s: float = 0.0  # seconds spent deciding memberships (synchronised on the device)
    clustering_calls: int = 0
    decode_kernel: dict | None = None  # launch settings of a custom decode kernel: part of a bench cell's identity
    # K,V bytes read per decode step as a fraction of dense, measured over the run; None: reads all it holds
    kv_read_fraction: float | None = None
    extra: dict = field(default_factory=dict)


class ReturnedKeys:
    """A cache layer whose method's attention checks that the keys it got are the ones `update` returned last
    (transformers passes the attention function tensors, not the cache layer): `update` sets `returned`, and the
    attention calls `take_returned`."""

    returned = None

    def take_returned(self, key) -> bool:
        """Whether `key` is what `update` returned last, forgetting it: held on, every layer's prompt keys stayed
        alive until the next forward (8 x 8192 on the Llama-2-7B shape: 17.2 GB beside a 1.1 GB StreamingLLM cache,
        the H200 bench's allocator delta; CHAI's caches held every head's)."""
        returned, self.returned = self.returned, None
        return returned is key


def shared_plan(shared: dict, first: bool, key, make):
    """What `make()` returns, made by a cache's first layer and reused by the others while `key` matches: every
    layer of a forward sees the same tokens under the same rule (one decision and one host sync a forward)."""
    plan = shared.get("plan")
    if first or plan is None or plan[0] != key:
        plan = shared["plan"] = (key, make())
    return plan[1]


@dataclass
class Method:
    name: ClassVar[str] = "base"
    # False: the model keeps its own attention implementation (MHA).
    custom_attention: ClassVar[bool] = True
    # Display metadata: tables and figures read these from the records (`display()`), never from a list of names.
    label: ClassVar[str] = ""  # e.g. "CHAI"; empty: the name
    order: ClassVar[int] = 50  # rows and legends sort by it (the baseline first)
    color: ClassVar[str | None] = None  # a matplotlib colour, or None for the next free one

    def check_shape(self, config) -> None:
        """Check the settings against a model's shape. `config`: a transformers config, or any object with its
        fields (num_hidden_layers, num_attention_heads, ...; chai.preflight reads them without loading weights).
        Default: no constraint."""

    def prepare(self, model, context: RunContext | None = None) -> None:
        """Check the method against the model; load or compute offline artifacts. Default: nothing to do."""

    def attention(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        raise NotImplementedError

    def mask_function(self):
        """The mask function registered beside `attention` (transformers' mask-interface signature)."""
        return bool_causal_mask

    def cache_layer(self, layer_idx: int, config):
        return DynamicLayer()

    def make_cache(self, model) -> Cache:
        shape = AttnShape.of(model.config)
        return Cache(layers=[self.cache_layer(i, model.config) for i in range(shape.layers)])

    def static_cache(self, model, batch_size: int, max_cache_len: int) -> Cache | None:
        """A preallocated cache whose decode step can be captured (no host sync, tensors written in place,
        `reset()` empties it in place; K in `layer.keys`, V in `layer.values`). None: the method has no static path."""
        return None

    def has_static_cache(self) -> bool:
        return type(self).static_cache is not Method.static_cache

    def kv_bytes(self, config, batch: int, tokens: int, dtype_bytes: int) -> dict:
        """{"k", "v"}: bytes the cache holds for `batch` requests of `tokens` tokens each. Default: every head."""
        per_token = AttnShape.of(config).dense_kv_bytes_per_token(dtype_bytes)
        return {name: batch * tokens * value for name, value in per_token.items()}

    def kv_bytes_read(self, config, batch: int, context: float, dtype_bytes: int) -> dict:
        """{"k", "v"}: bytes one decode step reads from the cache at `context` cached tokens. Default: all it holds."""
        return self.kv_bytes(config, batch, context, dtype_bytes)

    def kv_bytes_per_token(self, config, dtype_bytes: int, tokens: int = 1024) -> dict:
        """Bytes held per token of context at batch 1, over a `tokens`-token request (exact for a cache that grows
        linearly; an average for one that evicts)."""
        held = self.kv_bytes(config, 1, tokens, dtype_bytes)
        return {name: value / tokens for name, value in held.items()}

    def check_tokenizer(self, tokenizer) -> None:
        """Fail in one line, before the weights load, when the tokenizer lacks what the method needs (AnLLM-AC:
        its added anchor token). Default: nothing."""

    def input_text(self, text: str) -> str:
        """The text a request's prompt is read as (lm-eval's contexts, before tokenizing; continuations and
        perplexity text are left as they are). Default: unchanged. A method whose model was trained on marked input
        adds the marks here (AnLLM-AC's anchor token after each sentence)."""
        return text

    def set_prompt_lengths(self, lengths) -> None:
        """`lengths`: [batch] long tensor, per row the number of leading tokens of the next forward(s) that are prompt
        (positions at or after it are generated / continuation tokens), or None once those forwards are done.
        Without it a method treats a forward of more than one query row as the prompt (prefill) and a single-row
        forward with a cache as a decode step. Default: stored as `_prompt_lengths`, nothing else; only a method
        that treats prompt and generated tokens differently (SparQ sparsifies decode steps only) reads it."""
        self._prompt_lengths = lengths

    def prompt_facts(self, ids) -> dict:
        """What the method makes of a prompt batch `ids` [B, S], for a bench cell's record. Default: nothing."""
        return {}

    def run_stats(self) -> RunStats:
        return RunStats()

    @classmethod
    def variant(cls, settings: dict) -> str:
        """The setting that tells this method's rows apart in a table ('30%', '8x'); '' for none."""
        return ""

    @classmethod
    def display(cls, settings: dict, facts: dict | None = None) -> dict:
        """How the report shows a run of this method with `settings` (stored in every record). `facts`: the run's
        `describe()` (a record's method_info), for a label that needs the model (DejaVu-static's real share)."""
        label = cls.label or cls.name
        suffix = cls.variant(settings)
        return {"label": f"{label} {suffix}" if suffix else label, "family": label, "order": cls.order,
                "color": cls.color}

    def describe(self) -> dict:
        """Method-specific facts for the run record (chosen clusters, ...)."""
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
            AttentionMaskInterface.register(self.name, self.mask_function())
            model.set_attn_implementation(self.name)
        try:
            self.on_apply(model)  # inside the try: a failure half-way through is undone too
            yield self
        finally:
            self.on_remove(model)
            if self.custom_attention:
                model.set_attn_implementation(previous)

"""SepLLM, training-free (Chen et al., "SepLLM: Accelerate Large Language Models by Compressing One Segment into One
Separator", ICML 2025, arXiv 2412.12094): each query attends only to
(a) the first `sinks` tokens (attention sinks),
(b) every separator token seen so far (a token whose text is one of `separators`), and
(c) the `window` most recent tokens, itself included.
With no separators this is StreamingLLM (Xiao et al., 2023: sinks + window), registered as `streamingllm`
(conf/method/streamingllm.yaml).

How it runs
- Which ids are separators: `prepare(model, context)` decodes every id of `context.tokenizer`'s vocabulary; an id
  is a separator when its text, as is or stripped of spaces, is one of `separators`, or, for "\\n" in
  `separators`, when its text contains a newline and nothing but whitespace ("\\n\\n" and " \\n" count too).
- The token ids reach the attention through a forward pre-hook on the model (registered in `on_apply`, removed in
  `on_remove`): it marks the separators of each forward's input_ids.
- Scoring (lm-eval: one forward per request, no cache reuse): the attention combines the model's mask (causal and
  lm-eval's right padding) with the SepLLM rule over token positions, so every row sees what decoding with the
  evicting cache would let it see (a test checks this). Positions are columns of the sequence: pad tokens on the
  left (generation of left-padded batches) would take the sink and window slots.
- Decoding (`make_cache`): `TokenEvictingLayer` (chai/methods/_token_cache.py) deletes after every forward the K,V
  of tokens no later query can see (not a sink, not a separator, older than the window of the next position),
  per request, and keeps each kept token's original position and separator mark for the attention. The model's
  mask is not read on that path: requests in one evicting cache must be unpadded.

Parameters
- sinks: leading tokens always kept (>= 0).
- window: recent tokens each query sees, itself included (>= 1); the cache keeps window - 1 of them between steps.
- separators: the separator texts; empty: StreamingLLM.

K,V bytes: the evicting cache stores each request's kept tokens padded to the longest request of the batch, so it
holds batch x max(kept) tokens; kept = sinks + separators outside the window + window - 1, capped by the length.
`kv_bytes` counts them from the ids of the last sequence the method saw when its shape matches (exact), else
without separators (exact for StreamingLLM, a lower bound for SepLLM).
"""

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache

from chai.attention import AttnShape, dense
from chai.errors import ChaiError, require
from chai.methods import register
from chai.methods._token_cache import TokenEvictingLayer
from chai.methods.base import Method, RunStats

NEWLINE = "\n"


def separator_ids(tokenizer, separators) -> torch.Tensor:
    """[n] the vocabulary ids whose text is a separator (see the module docstring)."""
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    wanted = set(separators)
    newline = NEWLINE in wanted
    found = [i for i, text in enumerate(texts)
             if text in wanted or text.strip(" ") in wanted or (newline and NEWLINE in text and not text.strip())]
    return torch.tensor(found, dtype=torch.long)


def visible(q_pos, k_pos, k_marked, sinks: int, window: int) -> torch.Tensor:
    """The SepLLM rule: q_pos [B, Tq], k_pos [B, Tk] (-1: empty slot), k_marked [B, Tk] -> [B, 1, Tq, Tk] bool."""
    q, k = q_pos[:, :, None], k_pos[:, None, :]
    kept = (k < sinks) | k_marked[:, None, :] | (q - k < window)
    return ((k >= 0) & (k <= q) & kept)[:, None]


def kept_tokens(marked: torch.Tensor, lengths: torch.Tensor, sinks: int, window: int) -> torch.Tensor:
    """[B] tokens the evicting cache holds after each request's `lengths` [B] tokens; marked [B, T] separators."""
    pos = torch.arange(marked.shape[1], device=marked.device)[None]
    ends = lengths.to(marked.device)[:, None]
    keep = (pos < sinks) | marked | (pos > ends - window)
    return (keep & (pos < ends)).sum(dim=1)


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


@register
@dataclass
class SepCache(Method):
    """SepLLM's sinks + separators + window, as a mask for scoring and a cache that deletes the rest."""

    name = "sepcache"
    label, order, color = "SepLLM (training-free)", 40, "tab:brown"
    family = "SepLLM"

    sinks: int = 4
    window: int = 256
    separators: tuple = (".", ",", ";", ":", "?", "!", "\n")

    def __post_init__(self):
        require(isinstance(self.sinks, int) and self.sinks >= 0, f"sepcache: sinks must be an integer >= 0, "
                f"got {self.sinks!r}.")
        require(isinstance(self.window, int) and self.window >= 1, f"sepcache: window must be an integer >= 1, "
                f"got {self.window!r}.")
        require(all(isinstance(s, str) and s for s in self.separators),
                f"sepcache: separators must be a list of non-empty strings, got {list(self.separators)!r}.")
        self.separators = tuple(self.separators)  # Hydra gives a ListConfig
        self._ids = None  # [n] separator ids (prepare)
        self._hook = None
        self._cache = None  # the evicting cache of the current forward, None for any other
        self._new_marks = None  # [B, Tn] separators among this forward's tokens
        self._marks = None  # [B, T] separators of the whole sequence so far
        self._kept, self._seen = [], []  # per request: tokens kept, tokens seen (cache after a prefill / request)

    # -- setup -------------------------------------------------------------------------------------------------

    def prepare(self, model, context=None) -> None:
        if not self.separators:
            self._ids = torch.zeros(0, dtype=torch.long)
            return
        tokenizer = getattr(context, "tokenizer", None)
        require(tokenizer is not None, "sepcache: separators need the model's tokenizer (none offline): set "
                                       "model.tokenizer, or method=streamingllm (no separators).")
        self._ids = separator_ids(tokenizer, self.separators)

    def use_separator_ids(self, ids) -> None:
        """Set the separator ids directly (tests, or a tokenizer-free caller)."""
        self._ids = torch.as_tensor(ids, dtype=torch.long)

    def on_apply(self, model) -> None:
        if self._ids is None and not self.separators:
            self._ids = torch.zeros(0, dtype=torch.long)
        require(self._ids is not None, "sepcache: call prepare(model, context) with a tokenizer before applying it.")
        self._hook = model.register_forward_pre_hook(self._capture, with_kwargs=True)

    def on_remove(self, model) -> None:
        if self._hook is not None:
            self._hook.remove()
        self._hook = self._cache = self._new_marks = None

    def _capture(self, module, args, kwargs):
        """Forward pre-hook: mark this forward's separators; follow the sequence across forwards with a cache."""
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            embeds = kwargs.get("inputs_embeds")
            require(not len(self._ids), "sepcache: needs input_ids to find separators, got inputs_embeds.")
            ids = torch.zeros(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        marks = torch.isin(ids, self._ids.to(ids.device))
        cache = _sequence_cache(args, kwargs)
        past = cache.get_seq_length() if isinstance(cache, Cache) else 0
        ours = isinstance(cache, Cache) and bool(cache.layers) and isinstance(cache.layers[0], TokenEvictingLayer)
        self._cache = cache if ours else None
        self._new_marks = marks
        if past == 0:
            self._marks = marks
        elif self._marks is not None and self._marks.shape == (ids.shape[0], past):
            self._marks = torch.cat([self._marks, marks], dim=1)
        else:
            raise ChaiError(f"sepcache: a forward continues a cache of {past} tokens this method did not see.")

    # -- attention ---------------------------------------------------------------------------------------------

    def attention(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        # query: [B, H, Tq, D]; key, value: [B, Hkv, Tk, D] (the cache's kept tokens and this forward's)
        batch, _, rows, _ = query.shape
        columns = key.shape[2]
        layer = self._cache.layers[module.layer_idx] if self._cache is not None else None
        if layer is not None:
            require(layer.returned is key, "sepcache: the attention got keys that are not its cache layer's.")
            k_pos, k_marked = layer.columns
            allowed = visible(k_pos[:, -rows:], k_pos, k_marked, self.sinks, self.window)
        else:  # one sequence in columns: scoring, or a cache that keeps everything
            require(self._marks is not None and self._marks.shape[1] == columns,
                    f"sepcache: {columns} keys but separators known for "
                    f"{None if self._marks is None else self._marks.shape[1]} tokens.")
            k_pos = torch.arange(columns, device=key.device).expand(batch, columns)
            allowed = visible(k_pos[:, -rows:], k_pos, self._marks.to(key.device), self.sinks, self.window)
            given = as_bool_mask(attention_mask)
            itself = k_pos[:, None, None, :] == k_pos[:, None, -rows:, None]  # no row left empty: pad rows see self
            allowed = (allowed if given is None else allowed & given) | itself
            if module.layer_idx == 0:
                self._count_scoring(given)
        return dense(module, query, key, value, allowed, scaling, dropout, **kwargs)

    def _count_scoring(self, given) -> None:
        """What the evicting cache would hold after each request of a scoring forward (real tokens only)."""
        marks = self._marks
        if given is None:
            lengths = torch.full((marks.shape[0],), marks.shape[1], device=marks.device)
        else:  # a request's last row (or a pad row after it) sees all its real tokens
            lengths = given[:, 0, -1, :].sum(dim=-1).expand(marks.shape[0])
        self._record(kept_tokens(marks, lengths, self.sinks, self.window), lengths)

    def _record(self, kept, seen) -> None:
        self._kept += torch.as_tensor(kept).tolist()
        self._seen += torch.as_tensor(seen).expand(len(kept)).tolist()

    # -- cache -------------------------------------------------------------------------------------------------

    def _keep(self, positions, marked, seen: int) -> torch.Tensor:
        """What a query at position `seen` (the next token) or later may still see."""
        return (positions < self.sinks) | marked | (positions > seen - self.window)

    def _marks_of_new(self, batch: int, tokens: int, device) -> torch.Tensor:
        marks = self._new_marks
        require(marks is not None and marks.shape == (batch, tokens),
                "sepcache: the evicting cache was used outside `with method.applied(model)`.")
        return marks.to(device)

    def _evicted(self, layer_idx: int):
        if layer_idx != 0:
            return None
        return lambda kept, seen: self._record(kept, seen)

    def cache_layer(self, layer_idx: int, config):
        return TokenEvictingLayer(self._keep, self._marks_of_new, self._evicted(layer_idx))

    # -- bytes and facts ---------------------------------------------------------------------------------------

    def kv_bytes(self, config, batch: int, tokens: int, dtype_bytes: int) -> dict:
        """batch x max(kept) tokens (the padded layout), kept counted from the ids of the last sequence seen when it
        has this shape, else without separators."""
        marks = self._marks
        if marks is not None and tuple(marks.shape) == (batch, tokens):
            lengths = torch.full((batch,), tokens, device=marks.device)
            kept = int(kept_tokens(marks, lengths, self.sinks, self.window).max()) if batch else 0
        else:
            kept = min(tokens, self.sinks + self.window - 1)
        per_token = AttnShape.of(config).dense_kv_bytes_per_token(dtype_bytes)
        return {name: batch * kept * value for name, value in per_token.items()}

    def _kept_facts(self) -> dict | None:
        if not self._kept:
            return None
        kept = torch.tensor(self._kept, dtype=torch.float64)
        return {"requests": len(self._kept), "mean": float(kept.mean()), "min": int(kept.min()),
                "median": float(kept.median()), "max": int(kept.max()),
                "kept_fraction": float(kept.sum()) / max(1, sum(self._seen))}

    def run_stats(self) -> RunStats:
        facts = self._kept_facts()
        return RunStats(extra={"kept_tokens": facts} if facts else {})

    def describe(self) -> dict:
        info = {"separators": list(self.separators), "separator_ids": None if self._ids is None else len(self._ids)}
        facts = self._kept_facts()
        if facts:
            info["kept_tokens"] = facts
        return info

    @classmethod
    def variant(cls, settings: dict) -> str:
        text = f"window {settings.get('window')}, sinks {settings.get('sinks')}"
        return text if settings.get("separators", ("x",)) else f"{text}, no separators"

    @classmethod
    def display(cls, settings: dict, facts: dict | None = None) -> dict:
        return {**super().display(settings, facts), "family": cls.family}


@register
@dataclass
class StreamingLLM(SepCache):
    """StreamingLLM (Xiao et al., 2023, arXiv 2309.17453): SepLLM without separators, attention sinks plus a window."""

    name = "streamingllm"

    separators: tuple = ()

    def __post_init__(self):
        require(not self.separators, "streamingllm: has no separators; use method=sepcache to keep some.")
        super().__post_init__()

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
- The token ids reach the attention through a forward pre-hook on the model (`TokenMethod`,
  chai/methods/_token_cache.py, what this method shares with `anchor`): it marks the separators of each forward.
- Scoring (lm-eval: one forward per request, no cache reuse): the attention combines the model's mask (causal and
  lm-eval's right padding) with the SepLLM rule over token positions, so every row sees what decoding with the
  evicting cache would let it see (a test checks this). Positions are columns of the sequence (lm-eval pads
  scoring requests on the right).
- Decoding (`make_cache`): `TokenEvictingLayer` (chai/methods/_token_cache.py) deletes after every forward the K,V
  of tokens no later query can see (not a sink, not a separator, older than the window of the next position),
  per request, and keeps each kept token's original position and separator mark for the attention. A left-padded
  batch (lm-eval's generation) numbers positions from the model's 2-D attention mask and pads are empty slots, so
  each row keeps and sees what it would alone (tests/test_generate.py).

Parameters
- sinks: leading tokens always kept (>= 0).
- window: recent tokens each query sees, itself included (>= 1); the cache keeps window - 1 of them between steps.
- separators: the separator texts; empty: StreamingLLM.

K,V bytes: the evicting cache stores each request's kept tokens padded to the longest request of the batch, so it
holds batch x max(kept) tokens; kept = sinks + separators outside the window + window - 1, capped by the length.
`kv_bytes` counts them from the ids of the last sequence the method saw when it has the batch and at least the
tokens asked for (exact: its first tokens), else without separators (exact for StreamingLLM, a lower bound for
SepLLM).
"""

from dataclasses import dataclass

import torch

from chai.errors import require
from chai.methods import register
from chai.methods._token_cache import TokenMethod

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


@register
@dataclass
class SepCache(TokenMethod):
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
        self._start()
        if not self.separators:  # StreamingLLM: nothing to find, no tokenizer needed
            self._ids = torch.zeros(0, dtype=torch.long)

    def prepare(self, model, context=None) -> None:
        if not self.separators:
            return
        tokenizer = getattr(context, "tokenizer", None)
        require(tokenizer is not None, "sepcache: separators need the model's tokenizer (none offline): borrow one "
                                       "(++model.tokenizer=smollm2), or method=streamingllm (no separators).")
        self._ids = separator_ids(tokenizer, self.separators)

    # -- the rule (TokenMethod's hooks) ------------------------------------------------------------------------

    def visible(self, k_pos, k_marked, rows: int) -> torch.Tensor:
        return visible(k_pos[:, -rows:], k_pos, k_marked, self.sinks, self.window)

    def keep(self, positions, marked, seen) -> torch.Tensor:
        """What a query at position `seen` (the next token; [B, 1] or an int) or later may still see."""
        return (positions < self.sinks) | marked | (positions > seen - self.window)

    def unknown_kept(self, tokens: int) -> int:
        return min(tokens, self.sinks + self.window - 1)  # without separators: exact for StreamingLLM

    # -- facts and display -------------------------------------------------------------------------------------

    def describe(self) -> dict:
        return self.with_kept_facts({"separators": list(self.separators),
                                     "separator_ids": None if self._ids is None else len(self._ids)})

    @classmethod
    def variant(cls, settings: dict) -> str:
        text = f"window {settings.get('window')}, sinks {settings.get('sinks')}"
        return text if settings.get("separators", ("x",)) else f"{text}, no separators"


@register
@dataclass
class StreamingLLM(SepCache):
    """StreamingLLM (Xiao et al., 2023, arXiv 2309.17453): SepLLM without separators, attention sinks plus a window."""

    name = "streamingllm"
    # A published method of its own (and SepLLM's ablation): its own family on the frontier, not a SepLLM setting.
    label, order, color = "StreamingLLM", 41, "goldenrod"
    family = "StreamingLLM"

    separators: tuple = ()

    def __post_init__(self):
        require(not self.separators, "streamingllm: has no separators; use method=sepcache to keep some.")
        super().__post_init__()

    @classmethod
    def variant(cls, settings: dict) -> str:
        return f"window {settings.get('window')}, sinks {settings.get('sinks')}"  # never separators: the name says so

"""AnLLM's anchor-based self-attention, AnSAN (Pang et al., "Anchor-based Large Language Models", ACL 2024 Findings,
arXiv 2402.07616), and its anchor-based inference: the text is cut into sentences and the last token of each
sentence, its anchor, is taught to summarise it. A query at position q sees a key at k <= q when
(a) k is in q's sentence, or
(b) k is the anchor of an earlier sentence and q is not itself an anchor (an anchor sees only its own sentence).
A token's sentence is the number of anchors strictly before it; positions are the original ones (RoPE unchanged).
At inference, once a sentence is complete its non-anchor tokens can never be seen again: the cache deletes them and
holds every anchor so far plus the open sentence.

Variants (`kind`)
- ep (endpoint): existing tokens are anchors, those whose text is one of `anchors` (default sentence-ending
  punctuation). On a base model this is training-free, a lower bound: its period was never taught to summarise the
  sentence; conf/model/anllm_ep_7b.yaml is the authors' checkpoint trained with it.
- ac: a token the authors added, `ac_token` (`<AC>`, id 32001 of conf/model/anllm_ac_7b.yaml's tokenizer), is the
  only anchor, and the input carries one after each sentence (`input_text`, applied to lm-eval's contexts and
  generation prompts; the scored continuations are the task's text). The authors split their training text with
  NLTK's Punkt tokenizer and appended `<AC>` to each sentence (paper, appendix B.1); their released harness marks
  id 32001 as the anchor. Here a sentence ends at one of `anchors` followed by whitespace or the end of the text
  (Punkt's model is not offline: abbreviations such as "e.g." also end a sentence here). The tokenizer must hold
  the token as one added token (the AC checkpoint's does); no other model has been trained with it.

How it runs (as `sepcache`, chai/methods/sepcache.py)
- Which ids are anchors: `prepare(model, context)` decodes the tokenizer's vocabulary (sepcache's `separator_ids`).
- The token ids reach the attention through a forward pre-hook on the model (`TokenMethod`,
  chai/methods/_token_cache.py, shared with `sepcache`) that marks each forward's anchors.
- Scoring (lm-eval: one forward per request): the AnSAN rule as a boolean mask combined with the model's mask
  (causal, right padding), so every row sees what decoding with the evicting cache lets it see (a test checks this).
- Decoding (`make_cache`): `TokenEvictingLayer` (chai/methods/_token_cache.py) keeps, per request, the anchors and
  the tokens after its last anchor. Since every anchor stays, the sentence of each cached key is the count of
  anchors kept before it, so the cache path applies the whole rule (an anchor query must not see earlier anchors).
  A left-padded batch (generation) works as each row alone: pads are empty slots, never anchors.

Parameters
- kind: the paper's variant, "ep" or "ac" (see above).
- anchors: ep: the anchor texts ("\\n" also matches tokens of only whitespace with a newline); ac: the sentence ends
  after which `ac_token` is inserted.
- ac_token: ac's anchor token.

K,V bytes: per request kept = anchors + tokens after the last anchor, stored padded to the longest request.
`kv_bytes` counts them from the ids of the last sequence the method saw when it has the batch and at least the
tokens asked for (exact: its first tokens), else as if no token were an anchor (every token kept: an upper bound).
"""

import re
from dataclasses import dataclass

import torch

from chai.errors import require
from chai.methods import register
from chai.methods._token_cache import TokenMethod
from chai.methods.sepcache import separator_ids

KINDS = ("ep", "ac")  # endpoint: existing tokens are anchors; ac: an added <AC> token


def ac_id(tokenizer, token: str) -> torch.Tensor:
    """[1] the id of AnLLM-AC's added anchor token, which the tokenizer must read as one token wherever it stands."""
    ids = tokenizer(f"a{token}b", add_special_tokens=False)["input_ids"]
    found = tokenizer.convert_tokens_to_ids(token)
    require(isinstance(found, int) and found in ids and found != tokenizer.unk_token_id,
            f"anchor: kind=ac needs a tokenizer that holds {token} as one added token, as AnLLM-AC's does "
            f"(model=anllm_ac_7b with model.path=...); this one does not. Use kind=ep.")
    return torch.tensor([found], dtype=torch.long)


def sentences(marked: torch.Tensor) -> torch.Tensor:
    """[B, T] anchor marks of columns in position order -> [B, T] each column's sentence (anchors strictly before).
    Empty slots (never marked) between the columns do not change the count."""
    marked = marked.long()
    return marked.cumsum(dim=1) - marked


def visible(k_pos: torch.Tensor, k_marked: torch.Tensor, rows: int) -> torch.Tensor:
    """The AnSAN rule for the queries in the last `rows` columns: k_pos [B, Tk] (-1: empty slot), k_marked [B, Tk]
    -> [B, 1, rows, Tk] bool. The columns must hold every anchor before them (a sequence, or the evicting cache)."""
    sentence = sentences(k_marked)
    q, k = k_pos[:, -rows:, None], k_pos[:, None, :]
    q_sentence, k_sentence = sentence[:, -rows:, None], sentence[:, None, :]
    q_anchor, k_anchor = k_marked[:, -rows:, None], k_marked[:, None, :]
    seen = (q_sentence == k_sentence) | (k_anchor & ~q_anchor)
    return ((k >= 0) & (k <= q) & seen)[:, None]


def last_anchor(positions: torch.Tensor, marked: torch.Tensor) -> torch.Tensor:
    """[B, 1] the position of each request's last anchor, -1 for none."""
    return torch.where(marked, positions, -1).max(dim=1, keepdim=True).values


@register
@dataclass
class Anchor(TokenMethod):
    """AnLLM's anchors: a sentence's tokens are seen only inside it; later sentences see its anchor."""

    name = "anchor"
    label, order, color = "AnLLM anchors", 42, "tab:pink"
    family = "AnLLM"

    kind: str = "ep"  # the paper's variant ("variant" is the display hook of every method)
    anchors: tuple = (".", "?", "!")
    ac_token: str = "<AC>"

    def __post_init__(self):
        require(self.kind in KINDS, f"anchor: kind must be one of {', '.join(KINDS)}, got {self.kind!r}.")
        require(len(self.anchors) > 0 and all(isinstance(a, str) and a for a in self.anchors),
                f"anchor: anchors must be a non-empty list of non-empty strings, got {list(self.anchors)!r}.")
        require(isinstance(self.ac_token, str) and self.ac_token != "" and not any(c.isspace() for c in self.ac_token),
                f"anchor: ac_token must be a token's text without spaces, got {self.ac_token!r}.")
        self.anchors = tuple(self.anchors)  # Hydra gives a ListConfig
        # ac: a sentence end followed by whitespace or the text's end (not by the token already: idempotent)
        ends = "|".join(re.escape(a) for a in sorted(self.anchors, key=len, reverse=True))
        self._sentence_end = re.compile(f"({ends})(?=\\s|$)")
        self._start()
        self._trained = False  # the model was trained with these anchors (AnLLM's checkpoints)

    def prepare(self, model, context=None) -> None:
        tokenizer = getattr(context, "tokenizer", None)
        require(tokenizer is not None, "anchor: finding the anchor tokens needs the model's tokenizer (none "
                                       "offline): set model.path, or ++model.tokenizer=smollm2 for random weights.")
        self._ids = separator_ids(tokenizer, self.anchors) if self.kind == "ep" else ac_id(tokenizer, self.ac_token)
        self._trained = str(getattr(context, "model_name", "")).startswith(f"anllm_{self.kind}")  # conf/model/

    def check_tokenizer(self, tokenizer) -> None:
        if self.kind == "ac":
            ac_id(tokenizer, self.ac_token)

    def input_text(self, text: str) -> str:
        """ac: `ac_token` after each sentence (see the module docstring); ep: the text as it is."""
        return text if self.kind == "ep" else self._sentence_end.sub(lambda m: m.group(1) + self.ac_token, text)

    # -- the rule (TokenMethod's hooks) ------------------------------------------------------------------------

    def visible(self, k_pos, k_marked, rows: int) -> torch.Tensor:
        return visible(k_pos, k_marked, rows)

    def keep(self, positions, marked, seen) -> torch.Tensor:
        """Every anchor and the open sentence (after the last anchor): all a later query can see."""
        return marked | (positions > last_anchor(positions, marked))

    def unknown_kept(self, tokens: int) -> int:
        return tokens  # no anchor known: every token (an upper bound)

    # -- facts and display -------------------------------------------------------------------------------------

    def describe(self) -> dict:
        return self.with_kept_facts({"anchors": list(self.anchors), "trained_anchors": self._trained,
                                     "anchor_ids": None if self._ids is None else len(self._ids)})

    @classmethod
    def variant(cls, settings: dict) -> str:
        return str(settings.get("kind", "ep")).upper()

    @classmethod
    def display(cls, settings: dict, facts: dict | None = None) -> dict:
        shown = super().display(settings, facts)
        if not (facts or {}).get("trained_anchors"):  # a base model: its anchors were never taught to summarise
            shown["label"] = shown["label"].replace(cls.label, f"{cls.label} (training-free)", 1)
        return shown

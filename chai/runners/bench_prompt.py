"""A bench cell's prompt (`bench.prompt`): the [batch, seq_len] token ids every path of the cell runs.

- `random` (the default): uniform random ids from `bench.input_seed`. MHA, and every method whose work does not
  depend on which tokens it sees, times the same on any ids. A method that keeps tokens by what they are
  (separators, sentence ends) finds almost none among random ids, so it evicts as no text makes it evict: time it
  on `text`.
- `text`: the C4 validation text of the data directory (chai.perplexity's file), deterministic: its documents in
  file order, each tokenized alone by the model's tokenizer (no special tokens), a blank line's tokens between
  them, and row b of a cell the stream's tokens [b*S, (b+1)*S), so each row is a different stretch of text. A
  model with random weights and no tokenizer offline borrows one (`++model.tokenizer=smollm2`, as a method that
  finds its separators in the vocabulary needs anyway), and ids past the model's vocabulary are folded into it
  (id mod vocab_size). SmolLM2's 49152 ids over LLaMA's 32000 fold 3% of C4's tokens; on the first 300 documents
  none of those is a separator or a sentence end, and the share of separators moves from 10.154% to 10.159%
  (sentence ends: 4.468% to 4.469%).
A cell records what it ran (`bench.prompt`): the kind, the source, the tokenizer, the share of ids folded, and the
method's own reading of the ids (`prompt_facts`: a token method's share of marked tokens).
"""

import torch

from chai.errors import ChaiError
from chai.long_context import documents
from chai.paths import data_file
from chai.perplexity import C4_FILE, SEPARATOR

PROMPTS = ("random", "text")


def random_ids(model, batch: int, seq_len: int, seed: int) -> torch.Tensor:
    """[batch, seq_len] random token ids, the same for every path and every run with the same seed."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (batch, seq_len), generator=generator).to(model.device)


def text_stream(tokenizer, path, tokens: int) -> torch.Tensor:
    """[tokens] the first ids of the C4 token stream of the file at `path` (see the module docstring)."""
    gap = tokenizer(SEPARATOR, add_special_tokens=False)["input_ids"]
    ids = []
    for doc in documents(str(path)):
        ids += tokenizer(doc, add_special_tokens=False)["input_ids"]
        if len(ids) >= tokens:
            return torch.tensor(ids[:tokens], dtype=torch.long)
        ids += gap
    raise ChaiError(f"{path} holds {len(ids)} tokens, fewer than bench.prompt=text needs for the largest cell "
                    f"({tokens}): lower bench.batch_sizes or bench.seq_lens.")


class Prompts:
    """The prompt of every cell of a run: random ids, or cuts of one C4 token stream made once, as long as the
    largest cell needs."""

    def __init__(self, bcfg, model, tokenizer=None, tokenizer_name: str | None = None, data_dir=None):
        self.kind, self.seed, self.model = bcfg.prompt, int(bcfg.input_seed), model
        if self.kind == "text":
            if tokenizer is None:
                raise ChaiError("bench.prompt=text needs a tokenizer and the model has none offline: borrow one "
                                "(++model.tokenizer=smollm2), or bench.prompt=random.")
            need = max(bcfg.batch_sizes) * max(bcfg.seq_lens)
            self.stream = text_stream(tokenizer, data_file(C4_FILE, data_dir), need)
            self.tokenizer = tokenizer_name

    def batch(self, batch: int, seq_len: int) -> tuple[torch.Tensor, dict]:
        """([batch, seq_len] ids on the model's device, what a cell records about them)."""
        if self.kind == "random":
            return random_ids(self.model, batch, seq_len, self.seed), {"kind": "random", "seed": self.seed}
        ids, vocab = self.stream[: batch * seq_len].view(batch, seq_len), self.model.config.vocab_size
        facts = {"kind": "text", "source": C4_FILE, "tokenizer": self.tokenizer,
                 "folded_fraction": float((ids >= vocab).float().mean())}
        return (ids % vocab).to(self.model.device), facts

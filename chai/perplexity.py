"""Perplexity data (issue 17, part 2), made from the local data directory as deterministic files with a sha256
manifest (`chai.long_context.cached_rows`), for the tasks in `chai.tasks`.

- WikiText-2 (`wikitext_pages`): lm-eval's builtin `wikitext` task reads EleutherAI/wikitext_document_level, one
  row per article (`page`). Its builder splits `wiki.test.raw` at each top-level heading line (` = Title = `);
  the same rule on the same raw file (byte-exact, see the data's SOURCES.md) gives the same 62 test articles.
- C4 at a length (`c4_chunks`): the C4 validation documents joined by blank lines, in file order, and cut into
  consecutive chunks of exactly `length` tokens of the model's tokenizer, counted as lm-eval's `tok_encode` counts
  them (the tokenizer's default special tokens). Scored with loglikelihood_rolling and a window of at least
  `length` tokens, each chunk is one window: every token is predicted from the chunk's own earlier tokens only
  (the first from lm-eval's prefix token), as in the GPTQ-style C4 perplexity at 2k/4k/8k. The 2000 documents
  are a C4 validation subset, not GPTQ's set (see SOURCES.md): numbers are comparable between our runs only.
"""

import hashlib
import math
from pathlib import Path

from chai.errors import ChaiError, require
from chai.long_context import cached_rows, documents, token_counter, tokenizer_fingerprint
from chai.paths import data_file

C4_FILE = "c4/c4_validation_2k.jsonl"
SEPARATOR = "\n\n"  # between C4 documents in the token stream
CHARS_PER_TOKEN = 8  # text tokenized per wanted token when looking for a chunk's end (grown if too little)
NEAR = 4  # how many token positions either side of the ideal cut are tried for an exact count
VERSION = 1  # bump when the splitting or the chunking changes


def wikitext_pages(raw: str) -> list[str]:
    """The articles of a WikiText raw file, as EleutherAI/wikitext_document_level's builder cuts them: a new page at
    each line that reads `= Title =` once `= = =` and `= =` are closed up, the heading line starting the page."""
    pages, lines = [], []
    for line in raw.split("\n"):
        closed = line.replace("= = =", "===").replace("= =", "==").strip()
        if closed.startswith("= ") and closed.endswith(" ="):
            page = "\n".join(lines)
            if page.strip():
                pages.append(page)
            lines = []
        lines.append(line)
    pages.append("\n".join(lines))
    return pages


def cached_wikitext_pages(raw_path: Path, out_dir: Path) -> tuple[Path, dict]:
    """(path, manifest) of `{"page": ...}` rows cut from `raw_path`, reused while the raw file's bytes are the same."""
    raw = raw_path.read_bytes()
    fields = {"derived_from": raw_path.name, "source_sha256": hashlib.sha256(raw).hexdigest(), "version": VERSION,
              "rule": "EleutherAI/wikitext_document_level pages"}
    path = Path(out_dir) / f"{raw_path.stem}_pages.jsonl"
    return path, cached_rows(path, fields, lambda: [{"page": p} for p in wikitext_pages(raw.decode("utf-8"))])


def chunk_end(text: str, start: int, length: int, tokenizer, count) -> int | None:
    """The end of the chunk of exactly `length` tokens that begins at text[start]: a token boundary of the text's
    tokenization from `start`, checked by re-counting the chunk alone (a cut inside a word can re-tokenize
    differently, so the nearest boundaries either side are tried too). None when the text runs out first."""
    wanted = length - count("")  # special tokens the tokenizer adds (BOS) are part of the count
    chars = CHARS_PER_TOKEN * length
    while True:
        window = text[start:start + chars]
        offsets = tokenizer(window, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        at_end = start + chars >= len(text)
        if len(offsets) > wanted + NEAR or at_end:
            break
        chars *= 2
    for k in sorted(range(wanted - NEAR, wanted + NEAR + 1), key=lambda k: (abs(k - wanted), k)):
        if 0 < k <= len(offsets) and count(window[:offsets[k - 1][1]]) == length:
            return start + offsets[k - 1][1]
    if at_end:
        return None
    raise ChaiError(f"no cut of the C4 stream at character {start} gives a chunk of exactly {length} tokens.")


def c4_chunks(docs, length: int, n: int, tokenizer) -> list[dict]:
    """The first n consecutive chunks of exactly `length` tokens of the documents joined by SEPARATOR."""
    text, count = SEPARATOR.join(docs), token_counter(tokenizer)
    rows, start = [], 0
    for i in range(n):
        end = chunk_end(text, start, length, tokenizer, count)
        require(end is not None, f"the C4 file holds only {i} chunks of {length} tokens: set task.n={i} or fewer.")
        rows.append({"id": f"c4-L{length}-{i}", "index": i, "length": length, "n_tokens": length,
                     "text": text[start:end]})
        start = end
    return rows


def cached_c4_chunks(length: int, n: int, tokenizer, data_dir, out_dir: Path) -> tuple[Path, dict]:
    """(path, manifest) of `c4_chunks` of the C4 validation file, reused when made from the same inputs."""
    source = data_file(C4_FILE, str(data_dir) if data_dir else None)
    fields = {"task": "c4_ppl", "length": length, "n": n, "source": C4_FILE, "version": VERSION,
              "tokenizer": Path(str(tokenizer.name_or_path)).name, "tokenizer_sha256": tokenizer_fingerprint(tokenizer),
              "vocab_size": len(tokenizer)}
    path = Path(out_dir) / f"c4_ppl_L{length}_n{n}.jsonl"
    return path, cached_rows(path, fields, lambda: c4_chunks(documents(str(source)), length, n, tokenizer))


def token_perplexity(samples: list[dict], encode) -> dict:
    """exp(-summed loglikelihood / summed tokens) over a loglikelihood_rolling task's logged samples (lm-eval reports
    word and byte level only). Each document's text is its request's one argument and every one of its tokens
    (`encode`, lm-eval's own tok_encode) is predicted once; its loglikelihood is the request's one response."""
    loglikelihood = sum(float(sample["filtered_resps"][0]) for sample in samples)
    tokens = sum(len(encode(sample["arguments"][0][0])) for sample in samples)
    return {"token_perplexity": math.exp(-loglikelihood / tokens), "n_tokens": tokens}

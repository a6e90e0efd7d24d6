"""RULER-style synthetic long-context tasks, generated offline and deterministically (issue 17, step 1).

Five task types after RULER (Hsieh et al. 2024, "RULER: What's the Real Context Size of Your Long-Context
Language Models?"): niah_single, niah_multikey, niah_multivalue, variable_tracking, common_words. Each example
is a prompt whose haystack, needles and question tokenize, with the model's own tokenizer, to between 95% and
100% of a target length (see `chai.long_context_tasks` for the templates and the fitting).

These are NOT RULER's official tasks, and scores on them are not RULER scores:
- the haystack is real text from C4 validation (default) or WikiText-2 test, read from the data directory,
  not Paul Graham essays or RULER's repeated "noise" sentences;
- the templates (instructions, needles, questions, answer prefixes) are our own wording;
- keys are two-word names, values 7-digit (NIAH) or 5-digit (variable tracking) numbers, from a seeded
  `random.Random`; common_words draws its words from the haystack, not RULER's English word list;
- lengths (e.g. 1024...8192) are counted with the evaluated model's tokenizer, special tokens included,
  and fitted by trimming the haystack; no chat template is applied.

Metric (`score`): RULER's string_match_all: the share of target strings that occur in the prediction,
case-insensitively (1.0 or 0.0 for one target, partial credit for several). A prediction that lists extra
strings is not penalised, as in RULER.

Output (`write_task`): one JSONL file per (task, length, n, seed, source), keys sorted, fixed separators, no
timestamps: same inputs give byte-identical files. Its sha256 is returned and written beside it in
`<file>.manifest.json`, so a record can carry the hash of the exact data it scored.
"""

import hashlib
import json
import random
from functools import lru_cache
from pathlib import Path

from chai.errors import did_you_mean, require
from chai.long_context_tasks import TASKS
from chai.paths import data_dir as default_data_dir

SOURCES = {"c4": "c4/c4_validation_2k.jsonl", "wikitext2": "wikitext2/wikitext-2-raw-v1_test.jsonl"}
HAYSTACK_CHARS_PER_TOKEN = 12  # text gathered per target token: > 2x what fits, and enough words for common_words
VERSION = 1  # bump when a template or the fitting changes, so old files and hashes are not mistaken for new


@lru_cache(maxsize=4)
def documents(path: str) -> tuple[str, ...]:
    """The non-empty "text" fields of a JSONL file, in file order."""
    with open(path) as f:
        texts = (json.loads(line)["text"].strip() for line in f if line.strip())
        return tuple(t for t in texts if t)


def haystack_text(docs, start: int, chars: int) -> str:
    """The first `chars` characters of the documents joined by newlines, starting at document `start` and
    wrapping around."""
    taken, total = [], 0
    for i in range(len(docs)):
        taken.append(docs[(start + i) % len(docs)])
        total += len(taken[-1]) + 1
        if total >= chars:
            break
    return "\n".join(taken)[:chars]


def source_path(source: str, data_dir=None) -> Path:
    if source not in SOURCES:
        raise did_you_mean("haystack source", source, SOURCES)
    path = default_data_dir(str(data_dir) if data_dir else None) / SOURCES[source]
    require(path.exists(), f"haystack file {path} not found: set data_dir=... or CHAI_DATA_DIR to the folder "
                           f"that holds '{SOURCES[source]}'.")
    return path


def token_counter(tokenizer):
    """Tokens the model sees for a prompt: its own tokenizer, special tokens (e.g. BOS) included."""
    return lambda text: len(tokenizer(text)["input_ids"])


def generate(task: str, length: int, n: int, seed: int, tokenizer, data_dir=None, source: str = "c4") -> list[dict]:
    """n examples of `task` at `length` tokens. Example i draws everything from random.Random(f"{task}:{seed}:{i}"),
    so it does not depend on n."""
    if task not in TASKS:
        raise did_you_mean("long-context task", task, TASKS)
    require(isinstance(length, int) and length > 0, f"length must be a positive integer, got {length!r}.")
    require(isinstance(n, int) and n > 0, f"n must be a positive integer, got {n!r}.")
    docs = documents(str(source_path(source, data_dir)))
    count = token_counter(tokenizer)
    examples = []
    for i in range(n):
        rng = random.Random(f"{task}:{seed}:{i}")
        text = haystack_text(docs, rng.randrange(len(docs)), HAYSTACK_CHARS_PER_TOKEN * length)
        fields = TASKS[task](rng, text, length, count)
        examples.append({"id": f"{task}-{length}-{seed}-{i}", "task": task, "length": length, "seed": seed,
                         "index": i, "source": source, "metric": "string_match_all", **fields})
    return examples


def dumps(example: dict) -> str:
    return json.dumps(example, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def write_task(task: str, length: int, n: int, seed: int, tokenizer, data_dir=None, out_dir=".",
               source: str = "c4") -> tuple[Path, str]:
    """Write `generate(...)` as JSONL under out_dir; return (path, sha256 of its bytes). The manifest beside it
    holds the hash and the inputs that made it."""
    body = "".join(dumps(e) + "\n" for e in generate(task, length, n, seed, tokenizer, data_dir, source))
    data = body.encode("utf-8")
    digest = hashlib.sha256(data).hexdigest()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{task}_{source}_L{length}_n{n}_s{seed}.jsonl"
    path.write_bytes(data)
    manifest = {"file": path.name, "sha256": digest, "task": task, "length": length, "n": n, "seed": seed,
                "source": source, "version": VERSION, "tokenizer": Path(str(tokenizer.name_or_path)).name,
                "vocab_size": len(tokenizer)}
    Path(f"{path}.manifest.json").write_text(json.dumps(manifest, sort_keys=True, indent=1) + "\n")
    return path, digest


def score(prediction: str, example: dict) -> float:
    """RULER's string_match_all: the share of the example's targets found in the prediction, ignoring case."""
    targets = example["target"]
    targets = [targets] if isinstance(targets, str) else targets
    found = sum(t.lower() in prediction.lower() for t in targets)
    return found / len(targets)

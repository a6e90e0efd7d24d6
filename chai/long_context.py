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

Output (`write_task`): one JSONL file per (task, length, answer room, n, seed, source), keys sorted, fixed
separators, no timestamps: same inputs give byte-identical files. Its sha256 is returned and written beside it in
`<file>.manifest.json`, so a record can carry the hash of the exact data it scored. `cached_task` reuses a file
whose manifest names the same inputs (and the same tokenizer, by the hash of its vocabulary) and whose bytes still
hash to it.

Answer room (`answer_tokens`, RULER's tokens_to_generate): the prompt is fitted to `length - answer_tokens`, so
prompt plus answer fit in a window of `length` tokens and lm-eval never cuts the prompt from the left.

As lm-eval tasks (`conf/task/niah_single.yaml` etc., written by `chai.tasks`): `generate_until` with greedy
decoding, scored per document by `process_results` (= `score`). Further differences from RULER's protocol: no chat
template, smaller answer budgets (`max_gen_toks` per task config), and niah/variable_tracking stop at the first
newline (RULER generates to its budget); lm-eval 0.4's own `ruler` tasks download their haystack and needle data.
"""

import hashlib
import json
import random
from functools import lru_cache, partial
from pathlib import Path

from chai.errors import did_you_mean, require
from chai.long_context_tasks import TASKS
from chai.paths import data_dir as default_data_dir
from chai.paths import write_atomic

SOURCES = {"c4": "c4/c4_validation_2k.jsonl", "wikitext2": "wikitext2/wikitext-2-raw-v1_test.jsonl"}
HAYSTACK_CHARS_PER_TOKEN = 12  # text gathered per target token: > 2x what fits, and enough words for common_words
METRIC = "string_match_all"
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


@lru_cache(maxsize=4)
def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's vocabulary: files made with one tokenizer are never reused for another."""
    return hashlib.sha256(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode()).hexdigest()


def check_inputs(task: str, length: int, n: int, answer_tokens: int = 0) -> None:
    """One-line errors for a task name or counts that cannot make a file (no tokenizer needed)."""
    if task not in TASKS:
        raise did_you_mean("long-context task", task, TASKS)
    for name, value in (("length", length), ("n", n)):
        require(isinstance(value, int) and not isinstance(value, bool) and value > 0,
                f"{name} must be a positive integer, got {value!r}.")
    require(isinstance(answer_tokens, int) and 0 <= answer_tokens < length,
            f"the answer room ({answer_tokens!r} generated tokens) must be an integer in [0, length={length}).")


def generate(task: str, length: int, n: int, seed: int, tokenizer, data_dir=None, source: str = "c4",
             answer_tokens: int = 0) -> list[dict]:
    """n examples of `task` whose prompts fit `length - answer_tokens` tokens. Example i draws everything from
    random.Random(f"{task}:{seed}:{i}"), so it does not depend on n."""
    check_inputs(task, length, n, answer_tokens)
    docs = documents(str(source_path(source, data_dir)))
    count = token_counter(tokenizer)
    budget = length - answer_tokens
    examples = []
    for i in range(n):
        rng = random.Random(f"{task}:{seed}:{i}")
        text = haystack_text(docs, rng.randrange(len(docs)), HAYSTACK_CHARS_PER_TOKEN * length)
        fields = TASKS[task](rng, text, budget, count)
        examples.append({"id": f"{task}-{length}-{seed}-{i}", "task": task, "length": length, "seed": seed,
                         "index": i, "source": source, "metric": METRIC, **fields})
    return examples


def dumps(example: dict) -> str:
    return json.dumps(example, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def manifest_path(path: Path) -> Path:
    return Path(f"{path}.manifest.json")


def write_rows(path: Path, rows, fields: dict) -> dict:
    """Write `rows` as JSONL at `path` and, beside it, the manifest: its sha256 and the `fields` that made it."""
    data = "".join(dumps(row) + "\n" for row in rows).encode("utf-8")
    manifest = {"file": path.name, "sha256": hashlib.sha256(data).hexdigest(), **fields}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, data)
    write_atomic(manifest_path(path), (json.dumps(manifest, sort_keys=True, indent=1) + "\n").encode())
    return manifest


def reusable(path: Path, fields: dict) -> dict | None:
    """The manifest of an existing file made from the same `fields` whose bytes still hash to it, else None."""
    if not path.exists() or not manifest_path(path).exists():
        return None
    manifest = json.loads(manifest_path(path).read_text())
    same = all(manifest.get(key) == value for key, value in fields.items())
    return manifest if same and hashlib.sha256(path.read_bytes()).hexdigest() == manifest.get("sha256") else None


def cached_rows(path: Path, fields: dict, make_rows) -> dict:
    """The manifest of `path`: reused when `reusable`, else `make_rows()` written there."""
    return reusable(path, fields) or write_rows(path, make_rows(), fields)


def task_file(task: str, length: int, n: int, seed: int, tokenizer, out_dir, source: str,
              answer_tokens: int) -> tuple[Path, dict]:
    """(path, manifest fields) of the file these inputs make."""
    name = f"{task}_{source}_L{length}_g{answer_tokens}_n{n}_s{seed}.jsonl"
    fields = {"task": task, "length": length, "answer_tokens": answer_tokens, "n": n, "seed": seed,
              "source": source, "version": VERSION, "tokenizer": Path(str(tokenizer.name_or_path)).name,
              "tokenizer_sha256": tokenizer_fingerprint(tokenizer), "vocab_size": len(tokenizer)}
    return Path(out_dir) / name, fields


def write_task(task: str, length: int, n: int, seed: int, tokenizer, data_dir=None, out_dir=".",
               source: str = "c4", answer_tokens: int = 0) -> tuple[Path, str]:
    """Write `generate(...)` as JSONL under out_dir; return (path, sha256 of its bytes). The manifest beside it
    holds the hash and the inputs that made it."""
    path, fields = task_file(task, length, n, seed, tokenizer, out_dir, source, answer_tokens)
    rows = generate(task, length, n, seed, tokenizer, data_dir, source, answer_tokens)
    return path, write_rows(path, rows, fields)["sha256"]


def cached_task(task: str, length: int, n: int, seed: int, tokenizer, data_dir=None, out_dir=".",
                source: str = "c4", answer_tokens: int = 0) -> tuple[Path, dict]:
    """(path, manifest) of the task file, reused from out_dir when its manifest names the same inputs and its bytes
    still hash to it, else generated (about a second per example at 8k tokens on a 2-core CPU)."""
    path, fields = task_file(task, length, n, seed, tokenizer, out_dir, source, answer_tokens)
    make = partial(generate, task, length, n, seed, tokenizer, data_dir, source, answer_tokens)
    return path, cached_rows(path, fields, make)


def score(prediction: str, example: dict) -> float:
    """RULER's string_match_all: the share of the example's targets found in the prediction, ignoring case."""
    targets = example["target"]
    targets = [targets] if isinstance(targets, str) else targets
    found = sum(t.lower() in prediction.lower() for t in targets)
    return found / len(targets)


def process_results(doc: dict, results: list[str]) -> dict:
    """lm-eval's per-document hook (`process_results: !function` in the task YAML chai.tasks writes): the one
    greedy prediction scored by `score`."""
    return {METRIC: score(results[0], doc)}

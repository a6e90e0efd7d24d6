"""Scoring for mode=eval (the runner: chai/runners/eval.py): a model + method zero-shot with lm-eval.

The model is built once, wrapped in lm-eval's `HFLM`, and scored by `simple_evaluate` inside
`method.applied(model)`: no scoring code of our own. The record also carries the K,V bytes one token of context
costs under the method, analytic and measured from a real cache filled by a probe prompt.
"""

import json
import time
from pathlib import Path

import torch
from lm_eval import simple_evaluate
from lm_eval.models.huggingface import HFLM

from chai.attention import kv_bytes
from chai.bench import CACHE_ARG
from chai.generate import cache_for_generation
from chai.paths import data_dir
from chai.perplexity import token_perplexity
from chai.tasks import require_window

PROBE_FALLBACK = "The quick brown fox jumps over the lazy dog. " * 64
SAMPLE_FIELDS = ("doc_id", "target", "arguments", "resps", "filtered_resps", "acc", "acc_norm", "string_match_all",
                 "word_perplexity", "byte_perplexity", "bits_per_byte")


class CountingHFLM(HFLM):
    """HFLM that counts the tokens it pushes through the model (padded batch shape), for tokens per second, and
    shows one progress bar per eval: the one over the requests (with its ETA), not the instant tokenizing one.

    It also tells the method where each row's prompt ends (`Method.set_prompt_lengths`): lm-eval scores a request
    in one forward over `(context + continuation)[-(max_length + 1):][:-1]`, right-padded with zeros; the context
    rows are the prompt and the continuation rows stand for generated tokens (a method that sparsifies decode steps
    only must leave the prompt rows dense). Generation (`generate_until`) runs on the method's own cache, prompt
    lengths unknown (chai.generate). Nothing here names a method."""

    tokens_seen = 0
    bar_over_requests = False

    def __init__(self, *args, method=None, **kwargs):
        self.method = method  # set first: HFLM's own init may already run batches (batch_size="auto")
        self._prompt_of = None  # {input token tuple: prompt lengths}, while lm-eval scores loglikelihood requests
        super().__init__(*args, **kwargs)

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        self.bar_over_requests = not disable_tqdm
        return super().loglikelihood(requests, disable_tqdm=True)  # hides the tokenizing bar and, below, ...

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        bar, self.bar_over_requests = self.bar_over_requests, False  # ... brings back the one over the requests
        self._prompt_of = prompt_lookup(requests, self.max_length)
        self._input_sizes = {len(key) for key in self._prompt_of}  # once per eval, not per forward
        try:
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm and not bar, **kwargs)
        finally:
            self._prompt_of = None

    def _detect_batch_size(self, *args, **kwargs):
        lookup, self._prompt_of = self._prompt_of, None  # its probe batches are no requests: nothing to tell
        try:
            return super()._detect_batch_size(*args, **kwargs)
        finally:
            self._prompt_of = lookup

    def _encode_pair(self, context: str, continuation: str):
        """A scored request: the method reads the context as `Method.input_text` gives it, the continuation as it is
        (what is scored is the task's text)."""
        return super()._encode_pair(self._input(context), continuation)

    def tok_batch_encode(self, strings: list[str], *args, **kwargs):
        """Generation prompts (`generate_until`), read as `Method.input_text` gives them."""
        return super().tok_batch_encode([self._input(s) for s in strings], *args, **kwargs)

    def _input(self, text: str) -> str:
        return text if self.method is None else self.method.input_text(text)

    def _model_call(self, inps, *args, **kwargs):
        self.tokens_seen += inps.numel()
        if self.method is None or self._prompt_of is None:
            return super()._model_call(inps, *args, **kwargs)
        self.method.set_prompt_lengths(prompt_lengths(inps, self._prompt_of, self.logits_cache, self._input_sizes))
        try:
            return super()._model_call(inps, *args, **kwargs)
        finally:
            self.method.set_prompt_lengths(None)

    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        """lm-eval's `generate_until` step, on the method's own cache (chai.generate): HFLM's call as it is (greedy
        unless the task samples, its stop sequences, the tokenizer's pad id, the left-padded batch's attention_mask),
        plus a fresh cache of the method. Counts the prompt and generated tokens (padded batch shape)."""
        generation_kwargs.update(cache_for_generation(self.model, self.method))
        out = super()._model_generate(context, max_length, stop, **generation_kwargs)
        self.tokens_seen += out.numel()
        return out


def prompt_lookup(requests, max_length: int) -> dict[tuple, set]:
    """{input token tuple: {prompt lengths}} for lm-eval's (strings, context ids, continuation ids) requests: the
    input row is `(context + continuation)[-(max_length + 1):][:-1]` and its last len(continuation) - 1 rows are
    continuation tokens (the row before them, the context's last token, predicts the first one)."""
    lookup = {}
    for _, context, continuation in requests:
        inp = tuple((context + continuation)[-(max_length + 1) :][:-1])
        lookup.setdefault(inp, set()).add(len(inp) - len(continuation) + 1)
    return lookup


def prompt_lengths(inps: torch.Tensor, lookup: dict[tuple, set], shared_forward: bool,
                   sizes: set[int] | None = None) -> torch.Tensor:
    """[batch] prompt lengths of lm-eval's right-padded input rows. A row is found by trying each length from its
    last nonzero token to the padded width (the padding is zeros, but a real input may end in token 0 itself), only
    the lengths some request's input has (`sizes`, from `lookup` when not given): one or two per row, not one
    tuple per padding position, since this runs on every forward of every method. A
    row that matches no request or several, or requests with different prompt lengths outside a shared forward,
    fails loudly. Under lm-eval's logits cache (`shared_forward`) requests with one input share one forward, run
    for the one with the longest continuation: its prompt length, the smallest, is what that forward stands for."""
    sizes = {len(key) for key in lookup} if sizes is None else sizes
    found = []
    for row in inps.tolist():
        real = len(row)
        while real > 0 and row[real - 1] == 0:
            real -= 1
        matches = [lookup[key] for n in range(real, len(row) + 1)
                   if n in sizes and (key := tuple(row[:n])) in lookup]
        if len(matches) != 1 or (len(matches[0]) > 1 and not shared_forward):
            raise RuntimeError(
                f"evaluate: cannot tell where the prompt ends in an lm-eval input row of {real} tokens "
                f"(prompt lengths of the requests it matches: {[sorted(m) for m in matches]})"
            )
        found.append(min(matches[0]))
    return torch.tensor(found, dtype=torch.long, device=inps.device)


def probe_ids(tokenizer, tokens: int, configured_data_dir=None) -> torch.Tensor:
    """[1, tokens] ids of real text (the first C4 calibration document when present) for K,V measurements."""
    c4 = data_dir(configured_data_dir) / "c4" / "c4_validation_2k.jsonl"
    text = PROBE_FALLBACK
    if c4.exists():
        with c4.open() as f:
            text = " ".join(json.loads(next(f))["text"] for _ in range(4))
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :tokens]
    return ids


@torch.no_grad()
def measure_kv_bytes_per_token(model, method, input_ids: torch.Tensor) -> dict:
    """Fill a fresh cache of the method with one prompt and divide the bytes its K and V tensors hold by the
    prompt length (batch 1)."""
    cache = method.make_cache(model)
    with method.applied(model):
        model(input_ids.to(model.device), **{CACHE_ARG: cache}, use_cache=True)
    held = kv_bytes(cache)
    tokens = input_ids.shape[1]
    return {"k": held["k"] / tokens, "v": held["v"] / tokens, "total": (held["k"] + held["v"]) / tokens}


def kv_record(model, method, tokenizer, cfg) -> dict:
    """K,V bytes per token of context at the probe prompt's length: analytic (the method's `kv_bytes`) and measured
    from a cache the probe filled. Equal for a cache that grows linearly; for one that evicts, both are the average
    over the same prompt."""
    dtype_bytes = torch.finfo(model.dtype).bits // 8
    ids = probe_ids(tokenizer, cfg.eval.kv_probe_tokens, cfg.data_dir)
    # measured first: a method whose kept tokens depend on the text (sepcache's separators) counts them, by its rule,
    # from the ids it has seen; the count stays independent of the cache tensors the measurement reads
    measured = measure_kv_bytes_per_token(model, method, ids)
    analytic = method.kv_bytes_per_token(model.config, dtype_bytes, tokens=ids.shape[1])
    analytic["total"] = analytic["k"] + analytic["v"]
    return {"analytic": analytic, "measured": measured, "probe_tokens": int(cfg.eval.kv_probe_tokens)}


def metrics_of(results: dict, task: str) -> dict:
    """lm-eval's `acc,none` / `acc_stderr,none` -> {"acc": .., "acc_stderr": ..}."""
    metrics = {}
    for key, value in results["results"][task].items():
        name, _, filt = key.partition(",")
        if name == "alias" or not isinstance(value, (int, float)):
            continue
        metrics[name if filt in ("none", "") else f"{name}/{filt}"] = value
    return metrics


def write_samples(folder: Path, run_id: str, samples: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{run_id}.jsonl"
    with path.open("w") as f:
        for sample in samples:
            keep = {k: sample[k] for k in SAMPLE_FIELDS if k in sample}
            f.write(json.dumps(keep, default=str) + "\n")
    return path


def evaluate(model, tokenizer, method, task_manager, task_name: str, cfg, window: int | None = None) -> dict:
    """Score `task_name` with lm-eval under `method`; returns the measurement part of a record. `window`: tokens
    each request needs in one model window (a generated task's length), checked against lm-eval's max_length
    before scoring (lm-eval itself would cut the prompt from the left without a word)."""
    lm = CountingHFLM(
        pretrained=model, tokenizer=tokenizer, batch_size=cfg.eval.batch_size, max_length=cfg.eval.max_length,
        method=method,
    )
    limit = "eval.max_length" if cfg.eval.max_length else "the model's own limit (lm-eval's max_length)"
    require_window(task_name, window, lm.max_length, limit)
    started = time.perf_counter()
    with method.applied(model):
        results = simple_evaluate(
            model=lm,
            tasks=[task_name],
            task_manager=task_manager,
            num_fewshot=cfg.task.num_fewshot,
            limit=cfg.task.limit,
            log_samples=True,
            random_seed=cfg.seed,
            numpy_random_seed=cfg.seed,
            torch_random_seed=cfg.seed,
            fewshot_random_seed=cfg.seed,
        )
    wall = time.perf_counter() - started
    samples = results["samples"][task_name]
    metrics = metrics_of(results, task_name)
    if (results.get("configs", {}).get(task_name) or {}).get("output_type") == "loglikelihood_rolling":
        metrics.update(token_perplexity(samples, lm.tok_encode))
    return {
        "metrics": metrics,
        "max_length": lm.max_length,
        "n_examples": len(samples),
        "n_requests": sum(len(s["arguments"]) for s in samples),
        "timing": {"wall_s": wall, "tokens": lm.tokens_seen, "tokens_per_s": lm.tokens_seen / wall},
        "samples": samples,
        "lm_eval_config": results.get("configs", {}).get(task_name),
    }


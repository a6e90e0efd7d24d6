"""Issue 17, parts 1-2: the long-context tasks and the perplexity tasks as lm-eval tasks. Configs compose, bad
settings fail in one line before a model loads, the written task YAML loads through TaskManager with the generated
prompts and chai's scorer, C4 chunks hold exactly `length` tokens, and the runner records metrics and the data's
sha256 (tiny random Llama, SmolLM2's tokenizer, real C4/WikiText rows)."""

import hashlib
import json
import math
import os
import re

import pytest
from lm_eval.tasks import get_task_dict

import chai.models
import chai.runners.setup
from chai.config import compose_model
from chai.errors import ChaiError
from chai.long_context import SOURCES, cached_task, documents, process_results, score, token_counter
from chai.models import load_tokenizer
from chai.paths import data_dir, gguf_from_package, gguf_snapshot_dir
from chai.perplexity import C4_FILE, SEPARATOR, c4_chunks, cached_c4_chunks, wikitext_pages
from chai.preflight import preflight
from chai.runners.eval import items_of
from chai.tasks import prepare_task
from tests.helpers import assert_one_line_error, compose_cfg

LONG_CONTEXT = ("niah_single", "niah_multikey", "niah_multivalue", "variable_tracking", "common_words")


@pytest.fixture(scope="module")
def tokenizer():
    missing = [s for s in [*SOURCES.values(), "wikitext2/wiki.test.raw"] if not (data_dir() / s).exists()]
    if missing:
        pytest.skip(f"no data directory with {missing}")
    return load_tokenizer(compose_model("smollm2"))


@pytest.fixture
def cache(tokenizer, tmp_path, monkeypatch):
    """An empty chai cache (task YAMLs, generated data) that still holds SmolLM2's de-quantized copy (its
    tokenizer), so nothing is written to the user's cache."""
    model = compose_model("smollm2")
    snapshot = gguf_snapshot_dir(model.name, gguf_from_package(model.package, model.gguf_file))
    (tmp_path / "cache").mkdir()
    os.symlink(snapshot, tmp_path / "cache" / snapshot.name)
    monkeypatch.setenv("CHAI_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def no_model_loads(monkeypatch):
    def trap(*args, **kwargs):
        raise AssertionError("a model was loaded")

    for module in (chai.models, chai.runners.setup):
        for name in ("load_model", "load_tokenizer"):
            monkeypatch.setattr(module, name, trap)


def lm_eval_task(task):
    """The lm-eval task object a PreparedTask's manager builds."""
    return get_task_dict([task.name], task.manager)[task.name]


# --- configs ----------------------------------------------------------------------------------------------------


def test_configs_compose_with_a_sweepable_length():
    for name in LONG_CONTEXT:
        task = compose_cfg([f"task={name}", "task.length=1024"]).task
        assert (task.name, task.kind, task.length, task.n, task.haystack, task.num_fewshot) == (
            name, "long_context", 1024, 100, "c4", 0)
        assert 0 < task.max_gen_toks < 1024
    assert list(compose_cfg(["task=common_words"]).task.until) == []
    assert list(compose_cfg(["task=niah_multikey"]).task.until) == ["\n"]
    c4 = compose_cfg(["task=c4_ppl", "task.length=8192"]).task
    assert (c4.kind, c4.length) == ("perplexity", 8192)
    assert compose_cfg(["task=wikitext"]).task.derive == "wikitext_pages"


@pytest.mark.parametrize("overrides, message", [
    (["task.length=0"], "task.length must be a positive integer, got 0."),
    (["task.length=abc"], "task.length must be a positive integer, got 'abc'."),
    (["task.length=32"], "task.max_gen_toks (32) must be smaller than task.length (32)"),
    (["task.name=niah_singel"], "unknown long-context task 'niah_singel'. Did you mean 'niah_single'?"),
    (["task.kind=longcontext"], "unknown task kind 'longcontext'. Did you mean 'long_context'?"),
    (["task.haystack=pg19"], "unknown haystack source 'pg19'"),
    (["task.until=[3]"], "task.until must be a list of non-empty strings"),
    (["task.source=hub"], "task.source must be local"),
    (["task=c4_ppl", "task.n=0"], "task.n must be a positive integer, got 0."),
])
def test_bad_settings_fail_in_one_line_before_a_model_loads(no_model_loads, overrides, message):
    assert_one_line_error(lambda: preflight(compose_cfg(["task=niah_single", *overrides])), re.escape(message))


@pytest.mark.parametrize("task, missing", [("niah_single", "c4_validation_2k.jsonl"),
                                           ("c4_ppl", "c4_validation_2k.jsonl")])
def test_missing_source_data_names_the_file(no_model_loads, tmp_path, task, missing):
    assert_one_line_error(lambda: preflight(compose_cfg([f"task={task}", f"data_dir={tmp_path}"])),
                          f"{missing} not found.*CHAI_DATA_DIR")


def test_a_window_smaller_than_the_length_fails_before_a_model_loads(no_model_loads, tmp_path):
    from chai.cli import run_mode

    cfg = compose_cfg(["task=niah_single", "task.length=1024", "eval.max_length=512", f"results_dir={tmp_path}",
                       "logger.wandb.mode=disabled", "model=tiny_llama"])
    assert_one_line_error(lambda: run_mode(cfg, overrides=[]),
                          r"needs 1024 tokens in one window .* but eval.max_length is 512: set eval.max_length=1024")


def test_a_model_window_smaller_than_the_length_fails_before_scoring(cache, tmp_path):
    """No eval.max_length: lm-eval takes the model's positions (tiny_llama: 512), checked once the model is built."""
    from chai.cli import run_mode

    cfg = compose_cfg(["task=niah_single", "task.length=1024", "task.n=1", f"results_dir={tmp_path}",
                       "logger.wandb.mode=disabled", "model=tiny_llama", "device=cpu"])
    failed = run_mode(cfg, overrides=[], in_sweep=True)
    assert "needs 1024 tokens in one window" in failed["error"] and "lm-eval's max_length) is 512" in failed["error"]
    assert "traceback" not in failed  # bad input, not a crash


# --- the lm-eval task -------------------------------------------------------------------------------------------


def test_written_yaml_loads_through_task_manager_with_the_prompts_and_the_scorer(tokenizer, cache):
    cfg = compose_cfg(["task=niah_multivalue", "task.length=256", "task.n=3"]).task
    task = prepare_task(cfg, None, tokenizer)
    rows = [json.loads(line) for line in open(task.data["path"])]
    assert task.data["sha256"] == hashlib.sha256(open(task.data["path"], "rb").read()).hexdigest()
    assert (task.window, task.data["answer_tokens"], task.data["length"]) == (256, 64, 256)
    built = lm_eval_task(task)
    assert built.OUTPUT_TYPE == "generate_until"
    assert built.config.process_results is process_results  # chai's own function, imported through the YAML
    docs = list(built.test_docs())
    assert [d["input"] for d in docs] == [r["input"] for r in rows]
    count = token_counter(tokenizer)
    for doc in docs:
        assert built.fewshot_context(doc, 0) == doc["input"]  # no few-shot, no description, no chat template
        assert 0.95 * (256 - 64) <= count(doc["input"]) <= 256 - 64  # room for the answer in the window
        for prediction in (" " + ", ".join(doc["target"]), " " + doc["target"][0], " none"):
            assert built.process_results(doc, [prediction]) == {"string_match_all": score(prediction, doc)}
    built.build_all_requests(limit=1, rank=0, world_size=1)
    assert built.instances[0].args == (docs[0]["input"], {"until": ["\n"], "do_sample": False, "max_gen_toks": 64})


def test_generated_file_is_reused_by_its_manifest_and_remade_when_changed(tokenizer, tmp_path):
    path, first = cached_task("niah_single", 256, 2, 0, tokenizer, out_dir=tmp_path, answer_tokens=16)
    written = path.stat().st_mtime_ns
    assert cached_task("niah_single", 256, 2, 0, tokenizer, out_dir=tmp_path, answer_tokens=16) == (path, first)
    assert path.stat().st_mtime_ns == written  # reused, not rewritten
    path.write_text(path.read_text().replace("magic", "MAGIC"))
    assert cached_task("niah_single", 256, 2, 0, tokenizer, out_dir=tmp_path, answer_tokens=16)[1] == first
    assert hashlib.sha256(path.read_bytes()).hexdigest() == first["sha256"]  # remade, byte for byte


def test_items_keep_partial_credit_and_the_0_1_string_for_the_rest():
    samples = [{"doc_id": 1, "string_match_all": 0.5, "acc": 1}, {"doc_id": 0, "string_match_all": 1.0, "acc": 0}]
    assert items_of(samples) == {"doc_ids": "range", "acc": "01", "string_match_all": [1.0, 0.5]}
    samples = [{"doc_id": 0, "string_match_all": 1.0}, {"doc_id": 1, "string_match_all": 0.0}]
    assert items_of(samples) == {"doc_ids": "range", "string_match_all": "10"}


# --- perplexity data --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("length, n", [(256, 4), (2048, 2)])
def test_c4_chunks_have_exactly_length_tokens_and_are_byte_identical(tokenizer, tmp_path, length, n):
    first, manifest = cached_c4_chunks(length, n, tokenizer, None, tmp_path / "a")
    second, again = cached_c4_chunks(length, n, tokenizer, None, tmp_path / "b")
    assert first.read_bytes() == second.read_bytes() and manifest["sha256"] == again["sha256"]
    rows = [json.loads(line) for line in first.read_text().splitlines()]
    # lm-eval's tok_encode counts with the tokenizer's default special tokens, as token_counter does
    assert [len(tokenizer.encode(r["text"])) for r in rows] == [length] * n
    stream = SEPARATOR.join(documents(str(data_dir() / C4_FILE)))
    assert stream.startswith("".join(r["text"] for r in rows))  # consecutive, nothing skipped


def test_c4_runs_out_in_one_line(tokenizer):
    docs = documents(str(data_dir() / C4_FILE))[:3]
    with pytest.raises(ChaiError, match=r"the C4 file holds only \d chunks of 256 tokens: set task.n=\d or fewer"):
        c4_chunks(docs, 256, 50, tokenizer)


def test_wikitext_is_lm_eval_task_over_the_hub_copys_articles(cache):
    raw = (data_dir() / "wikitext2" / "wiki.test.raw").read_text()
    pages = wikitext_pages(raw)
    assert len(pages) == 62 and raw.endswith("\n".join(pages))  # the hub copy's 62 test articles, every line kept
    assert all(page.startswith(" = ") and not page.startswith(" = = ") for page in pages)
    task = prepare_task(compose_cfg(["task=wikitext"]).task, None)
    built = lm_eval_task(task)
    docs = list(built.test_docs())
    assert [d["page"] for d in docs] == pages and task.data["source_sha256"].startswith("173c87a5")
    assert built.OUTPUT_TYPE == "loglikelihood_rolling"
    assert built.doc_to_target(docs[0]).startswith(" = Robert Boulter =\n")  # lm-eval's detokenizer ran


# --- end to end -------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_runner_records_a_generation_and_a_perplexity_task(cache, tmp_path):
    from chai.cli import run_mode

    base = [f"results_dir={tmp_path}", "logger.wandb.mode=disabled", "device=cpu", "model=tiny_llama",
            "task.length=256", "task.n=2", "task.limit=2"]
    niah = run_mode(compose_cfg([*base, "task=niah_single", "task.max_gen_toks=8"]), overrides=[])
    assert set(niah["metrics"]) >= {"string_match_all"} and niah["n_examples"] == 2
    assert len(niah["items"]["string_match_all"]) == 2
    data = niah["task_data"]
    assert data["sha256"] == hashlib.sha256(open(data["path"], "rb").read()).hexdigest()
    assert (data["task"], data["length"], data["answer_tokens"], data["fits_one_window"]) == (
        "niah_single", 256, 8, True)
    assert data["max_length"] == niah["max_length"] == 512  # tiny_llama's positions: the 256-token window fits

    # an evicting method's kept-token facts are the evaluation's: one per row and forward (2 requests x 8 tokens),
    # not also the K,V probe's prompt that the record measures bytes with afterwards
    evicting = run_mode(compose_cfg([*base, "task=niah_single", "task.max_gen_toks=8", "method=streamingllm",
                                     "method.window=16"]), overrides=[])
    assert evicting["method_info"]["kept_tokens"]["requests"] == 2 * 8

    ppl = run_mode(compose_cfg([*base, "task=c4_ppl"]), overrides=[])
    metrics = ppl["metrics"]
    assert {"word_perplexity", "byte_perplexity", "bits_per_byte"} <= set(metrics)
    assert metrics["n_tokens"] == 2 * 256  # exactly `length` tokens per chunk, as lm-eval counted them
    samples = [json.loads(line) for line in open(ppl["samples_path"])]
    loglikelihood = sum(float(s["filtered_resps"][0]) for s in samples)
    assert metrics["token_perplexity"] == pytest.approx(math.exp(-loglikelihood / 512))
    assert ppl["task_data"]["sha256"] and ppl["task_data"]["window"] == 256

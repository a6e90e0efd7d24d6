"""AnLLM's anchors (chai/methods/anchor.py) on tiny random models: the mask of a scoring forward is the paper's rule
(checked against a brute-force oracle) and gives exactly what an evicting prefill plus token-by-token decoding
gives; with no anchor it is MHA; the model is unchanged after `applied`; the bytes the cache holds are the analytic
count of kept tokens (every anchor and the open sentence)."""

import copy

import pytest
import torch

from chai.cli import run_mode
from chai.methods import build_method
from chai.methods.anchor import Anchor, visible
from chai.methods.base import RunContext
from chai.preflight import model_config
from tests.conftest import random_ids
from tests.helpers import (assert_cache_holds_the_kept_tokens, assert_model_restored_after_applied,
                           assert_one_line_error, assert_right_padding_is_ignored, assert_scores_and_decodes_like_mha,
                           compose_cfg, evicting_decode)

ANCHORS = (11, 13)  # ids that stand for anchors in these tests
ROW_ANCHORS = ((2, 5, 9), (3, 4, 12))  # where each row's anchors are


def ids_with_anchors(length: int, rows=ROW_ANCHORS) -> torch.Tensor:
    """[2, length] random ids (none an anchor), anchors at different positions in the two rows."""
    ids = random_ids(2, length, vocab=1000) + 100
    for row, (where, anchor) in enumerate(zip(rows, ANCHORS)):
        ids[row, [p for p in where if p < length]] = anchor
    return ids


def method() -> Anchor:
    m = Anchor()
    m.use_token_ids(ANCHORS)
    return m


def oracle(anchor: list[bool]) -> torch.Tensor:
    """[T, T] the paper's rule, one (q, k) at a time: same sentence, or an earlier sentence's anchor seen by a
    non-anchor query. A token's sentence: the anchors strictly before it."""
    sentence = [sum(anchor[:t]) for t in range(len(anchor))]
    allowed = torch.zeros(len(anchor), len(anchor), dtype=torch.bool)
    for q in range(len(anchor)):
        for k in range(q + 1):
            earlier_anchor = anchor[k] and sentence[k] < sentence[q] and not anchor[q]
            allowed[q, k] = sentence[k] == sentence[q] or earlier_anchor
    return allowed


def test_the_mask_is_the_papers_rule():
    torch.manual_seed(0)
    marked = torch.rand(3, 24) < 0.25
    marked[0, :] = False
    marked[1, -1] = marked[2, 0] = True  # no anchor; one at the end; one at the start
    positions = torch.arange(24).expand(3, 24)
    mask = visible(positions, marked, 24)[:, 0]
    assert torch.equal(mask, torch.stack([oracle(row.tolist()) for row in marked]))
    assert torch.equal(visible(positions, marked, 5)[:, 0], mask[:, -5:])  # the last rows alone: the same rows


def test_scoring_with_the_mask_equals_decoding_with_the_evicting_cache(tiny_llama):
    model, _ = tiny_llama
    ids, m = ids_with_anchors(16), method()
    with torch.no_grad(), m.applied(model):
        scored = model(ids, use_cache=False).logits.log_softmax(-1)  # one forward: the mask hides the evicted
        decoded, cache = evicting_decode(model, m, ids, prompt=7)
    assert torch.allclose(scored, decoded.log_softmax(-1), atol=1e-5)
    for layer in cache.layers:  # every anchor, then the open sentence
        assert layer.positions.tolist() == [[2, 5, 9, 10, 11, 12, 13, 14, 15], [3, 4, 12, 13, 14, 15, -1, -1, -1]]
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits.log_softmax(-1), scored, atol=1e-3)  # the rule changed it


def test_scoring_respects_right_padding(tiny_llama):
    model, _ = tiny_llama
    ids, m = ids_with_anchors(12), method()
    assert_right_padding_is_ignored(model, m, ids, real=8)


def test_no_anchor_is_mha(tiny_llama):
    model, _ = tiny_llama
    ids, m = ids_with_anchors(10, rows=((), ())), method()
    cache = assert_scores_and_decodes_like_mha(model, m, ids)
    assert cache.layers[0].positions.tolist() == [list(range(10))] * 2  # one open sentence: nothing evicted


def test_the_model_computes_as_before_after_applied(tiny_llama):
    model, _ = tiny_llama
    ids, m = ids_with_anchors(12), method()
    assert_model_restored_after_applied(model, m, ids)


def expected_kept(ids: torch.Tensor) -> list[int]:
    """Tokens each request keeps after a prefill, counted by hand: its anchors and the tokens after the last."""
    kept = []
    for row in ids.tolist():
        where = [p for p, token in enumerate(row) if token in ANCHORS]
        kept.append(len(where) + len(row) - 1 - (where[-1] if where else -1))
    return kept


@pytest.mark.parametrize("length", [3, 9, 20])
def test_bytes_held_equal_the_analytic_count_of_kept_tokens(tiny_llama, length):
    model, _ = tiny_llama
    ids, m = ids_with_anchors(length), method()
    assert_cache_holds_the_kept_tokens(model, m, ids, expected_kept(ids))


def test_scoring_reports_what_the_cache_would_keep(tiny_llama):
    model, _ = tiny_llama
    ids, m = ids_with_anchors(16), method()
    with torch.no_grad(), m.applied(model):
        model(ids)
    facts = m.describe()["kept_tokens"]
    assert (facts["requests"], facts["min"], facts["max"]) == (2, *sorted(expected_kept(ids)))


def test_anchor_ids_come_from_the_tokenizer(tiny_llama):
    _, tokenizer = tiny_llama
    m = Anchor()
    m.prepare(None, RunContext(tokenizer=tokenizer, model_name="tiny_llama"))
    found = set(m._ids.tolist())
    assert {tokenizer.convert_tokens_to_ids(t) for t in (".", "?", "!")} <= found and len(found) < 100
    assert tokenizer.convert_tokens_to_ids(",") not in found and not m.describe()["trained_anchors"]


def test_bad_settings_fail_in_one_line():
    assert_one_line_error(lambda: Anchor(kind="xx"), "kind must be one of ep, ac")
    assert_one_line_error(lambda: Anchor(kind="ac", ac_token="<A C>"), "ac_token must be a token's text")
    assert_one_line_error(lambda: Anchor(anchors=()), "anchors must be a non-empty list")
    assert_one_line_error(lambda: Anchor().prepare(None, RunContext()), "needs the model's tokenizer")


def test_ac_puts_its_token_after_each_sentence_of_a_prompt():
    """AnLLM-AC's input: the token after every sentence end that whitespace or the text's end follows (not inside
    "3.5" or ".com"), once however often it is applied; EP reads the text as it is."""
    ac = Anchor(kind="ac")
    text = "It rains. Why? Stay in! Pi is 3.5 or see x.com now. Last one."
    marked = "It rains.<AC> Why?<AC> Stay in!<AC> Pi is 3.5 or see x.com now.<AC> Last one.<AC>"
    assert ac.input_text(text) == marked and ac.input_text(marked) == marked
    assert Anchor().input_text(text) == text
    assert Anchor(kind="ac", anchors=["?"], ac_token="<S>").input_text(text) == text.replace("Why?", "Why?<S>")


def test_ac_anchors_are_the_added_token_only(tiny_llama):
    """kind=ac marks the added token's id, and only it; a tokenizer without it fails in one line."""
    _, tokenizer = tiny_llama
    m = Anchor(kind="ac")
    assert_one_line_error(lambda: m.prepare(None, RunContext(tokenizer=tokenizer)), "holds <AC> as one added token")
    with_ac = copy.deepcopy(tokenizer)
    with_ac.add_special_tokens({"additional_special_tokens": ["<AC>"]})
    m.prepare(None, RunContext(tokenizer=with_ac, model_name="anllm_ac_7b"))
    ids = with_ac(m.input_text("One. Two."), add_special_tokens=False)["input_ids"]
    assert m._ids.tolist() == [with_ac.convert_tokens_to_ids("<AC>")] and ids.count(m._ids.item()) == 2
    assert m.describe()["trained_anchors"] and m.display({"kind": "ac"}, m.describe())["label"] == "AnLLM anchors AC"


def test_ac_without_its_token_fails_before_the_model_loads(monkeypatch):
    """A run with kind=ac on a model whose tokenizer lacks <AC> stops at the tokenizer, never loading weights."""
    from chai.runners import setup as runner_setup

    def no_weights(*args, **kwargs):
        raise AssertionError("the model was loaded before the tokenizer was checked")

    monkeypatch.setattr(runner_setup, "load_model", no_weights)
    cfg = compose_cfg(["method=anchor", "method.kind=ac", "model=tiny_llama", "device=cpu"])
    assert_one_line_error(lambda: runner_setup.setup(cfg), "holds <AC> as one added token")


def test_lm_eval_reads_a_prompt_as_the_method_gives_it(monkeypatch):
    """The lm-eval wrapper hands contexts and generation prompts through `Method.input_text`; a scored
    continuation stays the task's text."""
    from lm_eval.api.model import TemplateLM
    from lm_eval.models.huggingface import HFLM

    from chai.evaluate import CountingHFLM

    monkeypatch.setattr(TemplateLM, "_encode_pair", lambda self, context, continuation: (context, continuation))
    monkeypatch.setattr(HFLM, "tok_batch_encode", lambda self, strings, *a, **k: strings)
    lm = CountingHFLM.__new__(CountingHFLM)  # no model: only the two encoders run
    lm.method = Anchor(kind="ac")
    assert lm._encode_pair("Q: It rains. Why?", " Stay in. Now.") == ("Q: It rains.<AC> Why?<AC>", " Stay in. Now.")
    assert lm.tok_batch_encode(["A. B", "C"], padding_side="left") == ["A.<AC> B", "C"]
    lm.method = None
    assert lm._encode_pair("It rains. Why?", " x") == ("It rains. Why?", " x")


def test_configs_build_and_show_their_settings():
    m = build_method(compose_cfg(["method=anchor"]).method)
    assert (m.kind, m.anchors) == ("ep", (".", "?", "!"))
    shown = m.display(m.settings(), m.describe())
    assert (shown["label"], shown["family"], shown["color"]) == ("AnLLM anchors (training-free) EP", "AnLLM",
                                                                 "tab:pink")
    assert m.display(m.settings(), {"trained_anchors": True})["label"] == "AnLLM anchors EP"



@pytest.mark.parametrize("name", ["anllm_ep_7b", "anllm_ac_7b"])
def test_anllm_model_configs_give_shapes_and_fail_in_one_line_when_absent(name):
    cfg = compose_cfg([f"model={name}", "model.init=random"]).model
    shape = model_config(cfg, needs_tokenizer=False)  # model.init=random: timing at its shape, no weights
    assert (shape.num_hidden_layers, shape.num_attention_heads, shape.hidden_size) == (32, 32, 4096)
    weights = compose_cfg([f"model={name}", "model.path=/nonexistent/anllm"]).model
    assert_one_line_error(lambda: model_config(weights), f"model 'pangjh3/AnLLM-{name[6:8].upper()}-7B-PT' is not "
                                                         "available offline")


def test_eval_runs_anchor_through_lm_eval(tmp_path, piqa_rows):
    common = [f"results_dir={tmp_path}", "logger.wandb.mode=disabled", "device=cpu", "model=tiny_llama",
              "experiment_name=accuracy", "task.limit=4"]
    mha, ours = (run_mode(compose_cfg([*common, f"method={name}"]), overrides=[]) for name in ("mha", "anchor"))
    assert ours["n_examples"] == 4 and not ours.get("error"), ours.get("error")
    held = ours["kv_bytes_per_token"]
    assert held["measured"] == held["analytic"] and held["measured"]["total"] < mha["kv_bytes_per_token"]["measured"][
        "total"]  # the probe text has sentences: their non-anchor tokens are gone
    assert ours["display"]["label"] == "AnLLM anchors (training-free) EP"

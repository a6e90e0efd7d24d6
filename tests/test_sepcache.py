"""SepLLM's cache (chai/methods/sepcache.py) on tiny random models: the mask a scoring forward applies gives exactly
what an evicting prefill plus token-by-token decoding gives, with separators and without (StreamingLLM); a window
that covers the sequence is MHA; the model is unchanged after `applied`; the bytes the cache holds are the analytic
count of kept tokens."""

import pytest
import torch

from chai.methods import build_method
from chai.methods._token_cache import is_marked
from chai.methods.base import RunContext
from chai.methods.sepcache import SepCache, StreamingLLM, separator_ids
from tests.conftest import random_ids
from tests.helpers import (assert_cache_holds_the_kept_tokens, assert_model_restored_after_applied,
                           assert_one_line_error, assert_right_padding_is_ignored, assert_scores_and_decodes_like_mha,
                           compose_cfg, evicting_decode)

SEPARATORS = (11, 13)  # ids that stand for separators in these tests


def ids_with_separators(length: int) -> torch.Tensor:
    """[2, length] random ids, separators at different positions in the two rows."""
    ids = random_ids(2, length, vocab=1000) + 100
    ids[0, [p for p in (2, 5, 9) if p < length]] = SEPARATORS[0]
    ids[1, [p for p in (3, 4, 12) if p < length]] = SEPARATORS[1]
    return ids


def method(sinks: int, window: int, separated: bool) -> SepCache:
    m = SepCache(sinks=sinks, window=window, separators=(".",)) if separated else StreamingLLM(sinks, window)
    m.use_token_ids(SEPARATORS if separated else [])
    return m


@pytest.mark.parametrize("separated", [True, False], ids=["sepllm", "streamingllm"])
def test_scoring_with_the_mask_equals_decoding_with_the_evicting_cache(tiny_llama, separated):
    model, _ = tiny_llama
    ids, m = ids_with_separators(16), method(sinks=2, window=4, separated=separated)
    with torch.no_grad(), m.applied(model):
        scored = model(ids, use_cache=False).logits.log_softmax(-1)  # one forward: the mask hides the evicted
        decoded, cache = evicting_decode(model, m, ids, prompt=6)
    assert torch.allclose(scored, decoded.log_softmax(-1), atol=1e-5)
    kept = cache.layers[0].positions.tolist()
    if separated:  # sinks 0, 1; each row's separators; the 3 latest (the next token completes the window of 4)
        assert kept == [[0, 1, 2, 5, 9, 13, 14, 15], [0, 1, 3, 4, 12, 13, 14, 15]]
    else:
        assert kept == [[0, 1, 13, 14, 15]] * 2
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits.log_softmax(-1), scored, atol=1e-3)  # the rule changed it


def test_scoring_respects_right_padding(tiny_llama):
    model, _ = tiny_llama
    ids, m = ids_with_separators(12), method(sinks=1, window=3, separated=True)
    assert_right_padding_is_ignored(model, m, ids, real=8)


def test_a_window_over_the_whole_sequence_is_mha(tiny_llama):
    model, _ = tiny_llama
    ids, m = ids_with_separators(10), method(sinks=0, window=10, separated=True)
    cache = assert_scores_and_decodes_like_mha(model, m, ids)
    assert cache.layers[0].positions.tolist() == [list(range(1, 10))] * 2  # nothing the next token sees is gone


def test_the_model_computes_as_before_after_applied(tiny_llama):
    model, _ = tiny_llama
    ids, m = ids_with_separators(12), method(sinks=1, window=3, separated=True)
    assert_model_restored_after_applied(model, m, ids)


def expected_kept(ids: torch.Tensor, sinks: int, window: int) -> list[int]:
    """Tokens each request keeps after a prefill, counted by hand: sinks + separators + the window - 1 latest."""
    length = ids.shape[1]
    return [sum(1 for p in range(length) if p < sinks or int(row[p]) in SEPARATORS or p > length - window)
            for row in ids]


@pytest.mark.parametrize("length", [3, 9, 20])
def test_bytes_held_equal_the_analytic_count_of_kept_tokens(tiny_llama, length):
    model, _ = tiny_llama
    ids, m = ids_with_separators(length), method(sinks=2, window=4, separated=True)
    assert_cache_holds_the_kept_tokens(model, m, ids, expected_kept(ids, 2, 4))


def test_the_cache_decides_what_to_evict_once_a_forward(tiny_llama):
    """Every layer holds the same tokens under the same rule: the first layer's eviction plan (one keep decision,
    one host sync) serves the others, in a prefill and in a decode step."""
    model, _ = tiny_llama
    m, calls = method(sinks=2, window=4, separated=True), []
    rule = m.keep
    m.keep = lambda *args: calls.append(1) or rule(*args)
    ids = ids_with_separators(12)
    with torch.no_grad(), m.applied(model):
        cache = m.make_cache(model)
        model(ids[:, :8], past_key_values=cache)
        model(ids[:, 8:9], past_key_values=cache)
    assert len(calls) == 2 and len(cache.layers) == 3
    assert len({id(layer.positions) for layer in cache.layers}) == 1


def test_scoring_reports_what_the_cache_would_keep(tiny_llama):
    model, _ = tiny_llama
    ids, m = ids_with_separators(16), method(sinks=2, window=4, separated=True)
    with torch.no_grad(), m.applied(model):
        model(ids)
    facts = m.describe()["kept_tokens"]
    assert (facts["requests"], facts["min"], facts["max"]) == (2, *sorted(expected_kept(ids, 2, 4)))


class FakeTokenizer:
    vocab = ["a", " .", ",", "\n", " \n\n", "a.", "!", "x\n", "..."]

    def __len__(self):
        return len(self.vocab)

    def batch_decode(self, ids):
        return [self.vocab[i] for (i,) in ids]


def test_separator_ids_come_from_the_tokenizer(tiny_llama):
    _, tokenizer = tiny_llama
    assert separator_ids(FakeTokenizer(), (".", ",", "!", "\n")).tolist() == [1, 2, 3, 4, 6]
    assert separator_ids(FakeTokenizer(), (".",)).tolist() == [1]
    m = SepCache()
    m.prepare(None, RunContext(tokenizer=tokenizer))
    found = set(m._ids.tolist())
    assert {tokenizer.convert_tokens_to_ids(t) for t in (".", ",", "Ċ")} <= found and len(found) < 200


def test_bad_settings_fail_in_one_line():
    assert_one_line_error(lambda: SepCache(window=0), "window must be an integer >= 1")
    assert_one_line_error(lambda: SepCache(sinks=-1), "sinks must be an integer >= 0")
    assert_one_line_error(lambda: SepCache().prepare(None, RunContext()), "need the model's tokenizer")
    assert_one_line_error(lambda: StreamingLLM(separators=(".",)), "use method=sepcache")
    StreamingLLM().prepare(None, RunContext())  # no separators: no tokenizer needed


def test_configs_build_and_show_their_settings():
    sep = build_method(compose_cfg(["method=sepcache"]).method)
    streaming = build_method(compose_cfg(["method=streamingllm"]).method)
    assert sep.separators == (".", ",", ";", ":", "?", "!", "\n") and streaming.separators == ()
    assert streaming.name == "streamingllm" and isinstance(streaming, SepCache)
    assert sep.display(sep.settings())["label"] == "SepLLM (training-free) window 256, sinks 4"
    shown = streaming.display(streaming.settings())
    assert shown["label"] == "StreamingLLM window 256, sinks 4" and shown["family"] == "StreamingLLM"  # its own line
    no_separators = build_method(compose_cfg(["method=sepcache", "method.separators=[]"]).method)
    assert no_separators.display(no_separators.settings())["label"].endswith("no separators")


def test_marks_are_the_ids_torch_isin_finds():
    """The broadcast compare the hook uses (no host sync under CUDA-graph capture) finds what torch.isin finds."""
    ids, table = random_ids(3, 50, vocab=300), torch.tensor([0, 7, 11, 13, 299, 12345])
    assert torch.equal(is_marked(ids, table), torch.isin(ids, table)) and is_marked(ids, table).any()
    assert not is_marked(ids, torch.zeros(0, dtype=torch.long)).any()

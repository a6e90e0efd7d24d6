"""Generation under every method (chai/generate.py) on a tiny random grouped-query Llama, each method at a setting
that changes what the model computes (its logits differ from MHA's): Hugging Face's `generate` on the method's own
cache gives, token for token, what a hand-written prefill plus one-token loop gives; a left-padded batch (lm-eval's
layout) gives each row what it gets alone; MHA through `generate` is plain `model.generate`; SparQ's prompt stays
dense; CHAI refuses in one line a padded batch it cannot cluster; lm-eval's `generate_until` runs on the cache."""

import pytest
import torch

from chai.generate import generate, step_by_step
from chai.methods import METHODS, _discover, build_method
from tests.conftest import random_ids
from tests.helpers import assert_one_line_error

PROMPT, NEW, PAD = 12, 8, 4  # prompt tokens, generated tokens, left padding of the second row
MARKED = (11, 13)  # ids that stand for separators (sepcache) and anchors (anchor)
CLUSTERS = {"num_clusters": 2, "layer_clusters": None}


def head_scores(layers: int = 3, heads: int = 8) -> list:
    return torch.rand(layers, heads, generator=torch.Generator().manual_seed(1)).tolist()


def static_groups(layers: int = 3) -> dict:
    """A calibration artifact's static groups for 8 heads at 1 and 2 clusters (what chai_static reads)."""
    return {"static_groups_by_count": [[[list(range(8))], [[0, 3, 5, 6], [1, 2, 4, 7]]]] * layers}


SETTINGS = {  # every registered method, at a setting that changes the computation within PROMPT + NEW tokens
    "mha": {},
    "chai": CLUSTERS,
    "chai_qkv": CLUSTERS,
    "chai_static": CLUSTERS,
    "random_groups": CLUSTERS,
    "dejavu_static": {"sparsity": 0.5, "head_scores": head_scores()},
    "sparq": {"compression": None, "r": 2, "k": 4},
    "kv_compress": {"kv_heads": 1, "merge": "svd_w"},
    "sepcache": {"sinks": 2, "window": 4, "separators": ["."]},
    "streamingllm": {"sinks": 2, "window": 4},
    "anchor": {},
}


def method(name: str):
    built = build_method({"name": name, **SETTINGS[name]})
    if name in ("sepcache", "anchor"):
        built.use_token_ids(MARKED)
    if name == "chai_static":
        built._artifact = static_groups()
    return built


def prompts() -> torch.Tensor:
    """[2, PROMPT] ids below 1000 (tiny_gqa's vocabulary), marked tokens at different positions in the two rows."""
    ids = random_ids(2, PROMPT, vocab=1000, seed=3)
    ids[0, [2, 6, 9]] = MARKED[0]
    ids[1, [5, 7, 10]] = MARKED[1]
    return ids


def left_padded(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row 1 shortened by PAD tokens and left-padded with zeros (lm-eval's generation layout) and its mask."""
    padded, mask = ids.clone(), torch.ones_like(ids)
    padded[1, :PAD], mask[1, :PAD] = 0, 0
    return padded, mask


@pytest.fixture(scope="module")
def mha_logits(tiny_gqa):
    model, _ = tiny_gqa
    return generate(model, method("mha"), prompts()[:1], max_new_tokens=NEW, return_logits=True)[1]


def assert_same_generation(got, want) -> None:
    (ids, logits), (want_ids, want_logits) = got, want
    assert torch.equal(ids, want_ids)
    assert torch.allclose(logits, want_logits, atol=1e-5), float((logits - want_logits).abs().max())


def test_every_registered_method_is_covered():
    _discover()
    assert set(SETTINGS) == {name for name, cls in METHODS.items() if cls.__module__.startswith("chai.methods.")}


@pytest.mark.parametrize("name", SETTINGS)
def test_generate_equals_step_by_step(tiny_gqa, mha_logits, name):
    model, _ = tiny_gqa
    ids, m = prompts()[:1], method(name)
    got = generate(model, m, ids, max_new_tokens=NEW, return_logits=True)
    assert_same_generation(got, step_by_step(model, m, ids, NEW, return_logits=True))
    changed = float((got[1] - mha_logits).abs().max())
    assert (changed == 0) if name == "mha" else (changed > 1e-3), changed  # equality above is no triviality


@pytest.mark.parametrize("name", SETTINGS)
def test_a_left_padded_batch_generates_what_each_row_does_alone(tiny_gqa, name):
    model, _ = tiny_gqa
    ids, m = prompts(), method(name)
    padded, mask = left_padded(ids)
    got = generate(model, m, padded, attention_mask=mask, max_new_tokens=NEW, return_logits=True)
    assert_same_generation(got, step_by_step(model, m, padded, NEW, attention_mask=mask, return_logits=True))
    for row, alone in ((0, ids[:1]), (1, ids[1:, PAD:])):
        want = generate(model, m, alone, max_new_tokens=NEW, return_logits=True)
        assert_same_generation((got[0][row:row + 1], got[1][row:row + 1]), want)


def test_mha_generate_is_plain_model_generate(tiny_gqa):
    model, _ = tiny_gqa
    padded, mask = left_padded(prompts())
    with torch.no_grad():
        plain = model.generate(padded, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    assert torch.equal(generate(model, method("mha"), padded, attention_mask=mask, max_new_tokens=NEW),
                       plain[:, PROMPT:])


def test_sparq_reads_the_prompt_densely_and_sparsifies_decode_steps(tiny_gqa, mha_logits):
    """Prompt lengths are unknown while generating: the prefill is the prompt (dense), each later step sparse."""
    model, _ = tiny_gqa
    _, logits = generate(model, method("sparq"), prompts()[:1], max_new_tokens=NEW, return_logits=True)
    assert torch.allclose(logits[:, 0], mha_logits[:, 0], atol=1e-5)  # predicted from the prefill's last row
    assert not torch.allclose(logits[:, 1:], mha_logits[:, 1:], atol=1e-3)


def test_chai_refuses_a_padded_prompt_shorter_than_its_membership_tokens(tiny_gqa):
    model, _ = tiny_gqa
    padded, mask = left_padded(prompts())
    padded[1, :PROMPT - 3], mask[1, :PROMPT - 3] = 0, 0  # row 1 keeps 3 tokens, CHAI clusters from 5
    assert_one_line_error(lambda: generate(model, method("chai"), padded, attention_mask=mask, max_new_tokens=2),
                          "membership_tokens=5 tokens: a left-padded batch .* shortest has 3")


def test_lm_eval_generate_until_decodes_from_the_methods_cache(tiny_llama):
    """CHAI decodes only from its own cache (a plain one fails), so generate_until passing it is what makes this run;
    its texts are what `generate` gives the same left-padded batch, and the tokens counted are that batch's."""
    from lm_eval.api.instance import Instance

    from chai.evaluate import CountingHFLM

    model, tokenizer = tiny_llama
    m = method("chai")
    lm = CountingHFLM(pretrained=model, tokenizer=tokenizer, batch_size=2, max_length=64, method=m)
    contexts = ["The cat sat on the mat and looked at the door.", "A short prompt, six words."]
    until = {"until": ["never appears"], "max_gen_toks": 5, "do_sample": False}
    requests = [Instance("generate_until", {}, (text, until), i) for i, text in enumerate(contexts)]
    with m.applied(model):
        texts = lm.generate_until(requests, disable_tqdm=True)
    ids, mask = lm.tok_batch_encode(contexts)
    new = generate(model, m, ids, attention_mask=mask, max_new_tokens=5, pad_token_id=tokenizer.pad_token_id)
    assert texts == [lm.tok_decode(row.tolist()) for row in new]
    assert lm.tokens_seen == ids.numel() + new.numel()

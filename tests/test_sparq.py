"""SparQ on tiny random models: the no-op setting equals MHA, row-wise == step-by-step decoding with a cache (every
row in scope, and prompt dense + continuation sparse as published), the vectorised rows == a literal one-query
transcription of the paper's algorithm, the current token always kept, memory and bytes-moved counts, the prompt
lengths chai.evaluate tells a method, labels, the model restored, one-line errors."""

import math
import re

import pytest
import torch

from chai.attention import attention_probs, repeat_heads
from chai.evaluate import CountingHFLM, measure_kv_bytes_per_token, prompt_lengths, prompt_lookup
from chai.methods import build_method
from chai.methods.base import Method
from chai.methods.sparq import SparQ, choose_positions, sparq_rows
from tests.conftest import build_tiny_gqa, random_ids
from tests.helpers import assert_one_line_error, compose_cfg, logits


def tiny_gqa():
    """8 query heads over 2 KV heads, head_dim 8 (SmolLM2's grouped-query layout, smaller)."""
    return build_tiny_gqa(layers=2, vocab=512)


@torch.no_grad()
def decoded_logits(model, method, ids, prefill=0):
    """Logits of every position from a prefill of `prefill` tokens, then one token at a time through a cache."""
    cache = method.make_cache(model)
    with method.applied(model):
        out = [model(ids[:, :prefill], past_key_values=cache, use_cache=True).logits] if prefill else []
        for t in range(prefill, ids.shape[1]):
            out.append(model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits)
    return torch.cat(out, dim=1)


def test_full_r_and_k_give_mha_logits(tiny_model):
    model, _ = tiny_model
    ids = random_ids(2, 40)
    method = SparQ(compression=None, r=8, k=40, scope="all_rows")  # head_dim 8
    torch.testing.assert_close(logits(model, ids, method), logits(model, ids), rtol=0, atol=1e-5)


def test_sparse_path_at_full_r_and_k_is_dense_attention():
    """The sparse code path itself (not the dense shortcut) with every component and position kept."""
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 12, 8, generator=generator) for _ in range(3))
    k, v = k[:, :2], v[:, :2]  # 2 KV heads
    allowed = torch.ones(12, 12, dtype=torch.bool).tril()[None, None].expand(2, 1, 12, 12)
    rows = torch.ones(2, 1, 12, dtype=torch.long)
    out = sparq_rows(q, k, v, allowed, 8**-0.5, 8, rows * 12, rows * 3, rows.bool(), True)
    expected = attention_probs(q, repeat_heads(k, 2), allowed, 8**-0.5) @ repeat_heads(v, 2)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def reference_one_query(q, keys, values, scaling, r, k, local_k):
    """The paper's Algorithm 1 for one decode step, literally, with the GQA rule. q: [G, D]; keys, values: [S, D]."""
    abs_q = q.abs()
    i1 = abs_q.sum(0).topk(r).indices
    tau = torch.sqrt(abs_q[:, i1].sum(-1) / abs_q.sum(-1))[:, None]  # relative to scaling = 1/sqrt(D)
    s_hat = torch.softmax(q[:, i1] @ keys[:, i1].T * scaling / tau, dim=-1)  # [G, S]
    length = keys.shape[0]
    local = list(range(length - local_k, length))
    rest = [i for i in s_hat.sum(0).argsort(descending=True).tolist() if i not in local]
    i2 = torch.tensor(sorted(local + rest[: k - local_k]))
    y = torch.softmax(q @ keys[i2].T * scaling, dim=-1) @ values[i2]
    alpha = s_hat[:, i2].sum(-1, keepdim=True)
    return alpha * y + (1 - alpha) * values.mean(0)


def test_rows_match_the_algorithm_written_out_for_one_query():
    generator = torch.Generator().manual_seed(1)
    length, dim = 30, 16
    q = torch.randn(1, 4, length, dim, generator=generator)
    keys, values = torch.randn(2, 1, 2, length, dim, generator=generator)
    allowed = torch.ones(length, length, dtype=torch.bool).tril()[None, None]
    k_rows, sparse = torch.full((1, 1, length), 8), (torch.arange(length) >= 8)[None, None]
    out = sparq_rows(q, keys, values, allowed, dim**-0.5, 4, k_rows, k_rows // 4, sparse, True)
    for row in (10, 17, 29):
        for kv in range(2):
            expected = reference_one_query(
                q[0, 2 * kv : 2 * kv + 2, row], keys[0, kv, : row + 1], values[0, kv, : row + 1], dim**-0.5, 4, 8, 2
            )
            torch.testing.assert_close(out[0, 2 * kv : 2 * kv + 2, row], expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "settings, prefill",
    [({"compression": None, "r": 3, "k": 8}, 0), ({"compression": 4, "k": None}, 0),
     ({"compression": 2, "k": None, "dense_prefix": 10}, 10)],
)
def test_row_wise_equals_step_by_step_decoding(tiny_model, settings, prefill):
    model, _ = tiny_model
    ids = random_ids(2, 48, seed=2)
    method = SparQ(**settings, scope="all_rows")
    row_wise = logits(model, ids, method)
    assert not torch.allclose(row_wise, logits(model, ids), atol=1e-4)  # SparQ really acts
    torch.testing.assert_close(decoded_logits(model, method, ids, prefill), row_wise, rtol=0, atol=1e-5)


def test_row_wise_equals_decoding_on_grouped_query_heads():
    model = tiny_gqa()
    ids = random_ids(1, 40, vocab=512, seed=3)
    method = SparQ(compression=None, r=2, k=8, store_k_twice=True, scope="all_rows")
    row_wise = logits(model, ids, method)
    assert not torch.allclose(row_wise, logits(model, ids), atol=1e-4)
    torch.testing.assert_close(decoded_logits(model, method, ids), row_wise, rtol=0, atol=1e-5)


def test_model_is_restored_exactly(tiny_model):
    model, _ = tiny_model
    ids = random_ids(1, 32, seed=4)
    before = logits(model, ids)
    logits(model, ids, SparQ(compression=8, k=None, scope="all_rows"))
    assert torch.equal(logits(model, ids), before)


@pytest.mark.parametrize("twice", [False, True])
def test_kv_memory_equals_analytic_count(tiny_llama, twice):
    model, _ = tiny_llama
    method = SparQ(store_k_twice=twice)
    # tiny_llama: 3 layers x 8 KV heads x head_dim 8 x 4 bytes; the authors' layout holds K twice.
    dense = 3 * 8 * 8 * 4
    assert method.kv_bytes_per_token(model.config, 4) == {"k": dense * (2 if twice else 1), "v": dense}
    measured = measure_kv_bytes_per_token(model, method, random_ids(1, 20))
    assert (measured["k"], measured["v"]) == (dense * (2 if twice else 1), dense)


def test_bytes_moved_per_decode_step(tiny_llama):
    model, _ = tiny_llama
    method = SparQ(compression=2, k=None, scope="all_rows", reference_context=2048)
    logits(model, random_ids(1, 64, seed=5), method)
    info = method.describe()
    # head_dim 8, compression 2: r = 4, k = 2048 / 4 = 512; per layer and KV head r*S + 2*k*D + D vs 2*S*D.
    per_step = 3 * 8 * 4
    assert (info["r"], info["k_at_reference"]) == (4, 512)
    assert info["bytes_per_step"] == (4 * 2048 + 2 * 512 * 8 + 8) * per_step
    assert info["dense_bytes_per_step"] == 2 * 2048 * 8 * per_step
    assert info["compression"] == pytest.approx(2, rel=1e-3)
    # Measured over the 64 rows just scored: rows 1..64 of context n, k = round(n / 4) (rows with n <= k dense).
    moved = dense = 0
    for n in range(1, 65):
        k = max(1, math.floor(n / 4 + 0.5))
        dense += 2 * n * 8
        moved += 4 * n + 2 * k * 8 + 8 if n > k else 2 * n * 8
    assert info["measured"]["steps"] == 64
    assert info["measured"]["bytes_per_step"] == pytest.approx(moved * per_step / 64)
    assert info["measured"]["compression"] == pytest.approx(dense / moved)
    assert method.run_stats().kv_read_fraction == pytest.approx(moved / dense)


def test_presets_published_and_row_wise():
    for ratio in (2, 4, 8):
        published = build_method(compose_cfg([f"method=sparq_{ratio}x"]).method)
        assert (published.compression, published.k, published.scope) == (ratio, 128, "continuation")
        assert published.local_fraction == 0.25 and published.reallocate_to_mean
        rowwise = build_method(compose_cfg([f"method=sparq_rowwise_{ratio}x"]).method)
        assert (rowwise.compression, rowwise.k, rowwise.scope, rowwise.dense_prefix) == (ratio, None, "all_rows", 0)
    base = build_method(compose_cfg(["method=sparq"]).method)
    assert (base.compression, base.k, base.scope) == (8, 128, "continuation")


def test_labels_tell_published_from_row_wise_and_old_records_are_row_wise():
    def label(settings):
        return SparQ.display(settings)["label"]

    assert label(SparQ(compression=8).settings()) == "SparQ 8x (k=128)"
    assert label(SparQ(compression=4, k=None, scope="all_rows").settings()) == "SparQ row-wise 4x"
    assert label(SparQ(compression=8, k=None).settings()) == "SparQ 8x (k per row)"
    # A record written before `scope` existed (k derived per row, every row sparse): the row-wise variant.
    old = {"compression": 8, "dense_prefix": 0, "k": None, "local_fraction": 0.25, "r": None,
           "reallocate_to_mean": True, "reference_context": 2048, "store_k_twice": False}
    assert label(old) == "SparQ row-wise 8x (current not forced)"
    assert label({**old, "scope": "all_rows", "keep_current": False}) == "SparQ row-wise 8x (current not forced)"


def test_keep_current_false_is_the_earlier_row_wise_rule():
    """keep_current=false: local_k = floor(k / 4), 0 for k < 4 (the committed row-wise records); true: at least 1."""
    n = torch.tensor([[[10, 40]]])  # at 8x: k = floor(10 / 16 + 0.5) = 1, floor(40 / 16 + 0.5) = 3
    loose = SparQ(compression=8, k=None, scope="all_rows", keep_current=False).budgets(n)
    kept = SparQ(compression=8, k=None, scope="all_rows").budgets(n)
    assert loose[1].tolist() == [[[0, 0]]] and kept[1].tolist() == [[[1, 1]]]
    assert torch.equal(loose[0], kept[0])


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"compression": None, "r": 0, "k": 4}, "r must be an integer >= 1"),
        ({"compression": None, "r": 2, "k": 0}, "k must be an integer >= 1"),
        ({"compression": 0.5}, "compression must be null or a number >= 1"),
        ({"compression": None, "r": 2, "k": None}, "set compression, or both r and k"),
        ({"k": 0}, "k must be an integer >= 1 or null"),
        ({"scope": "prompt"}, "scope must be one of continuation, all_rows, got 'prompt'"),
        ({"local_fraction": 2}, "local_fraction must be in [0, 1]"),
        ({"dense_prefix": -1}, "dense_prefix must be an integer >= 0"),
    ],
)
def test_invalid_settings_fail_in_one_line(settings, message):
    assert_one_line_error(lambda: SparQ(**settings), re.escape(message))


def test_r_above_head_dim_fails_in_one_line(tiny_llama):
    model, _ = tiny_llama
    assert_one_line_error(lambda: SparQ(compression=None, r=9, k=4).prepare(model), "r=9 exceeds the model's head_dim 8")


@torch.no_grad()
def told_logits(model, method, ids, prompt_lengths):
    """Logits of one forward over `ids` with the method told where each row's prompt ends (as chai.evaluate does)."""
    method.set_prompt_lengths(torch.tensor(prompt_lengths))
    try:
        return logits(model, ids, method)
    finally:
        method.set_prompt_lengths(None)


def test_prompt_rows_are_exactly_dense_and_only_continuation_rows_are_counted(tiny_model):
    model, _ = tiny_model
    ids = random_ids(2, 48, seed=6)
    method = SparQ(compression=None, r=2, k=4)  # scope: continuation (the published one)
    sparse, mha = told_logits(model, method, ids, [20, 30]), logits(model, ids)
    assert torch.equal(sparse[0, :20], mha[0, :20]) and torch.equal(sparse[1, :30], mha[1, :30])
    assert not torch.allclose(sparse[0, 20:], mha[0, 20:], atol=1e-4)  # SparQ really acts on the continuation
    assert method.describe()["measured"]["steps"] == (48 - 20) + (48 - 30)  # per layer: the continuation rows
    assert 0 < method.run_stats().kv_read_fraction < 1


@pytest.mark.parametrize("settings", [{"compression": None, "r": 3, "k": 6}, {"compression": 4, "k": 8}])
def test_continuation_rows_equal_decoding_after_a_dense_prefill(tiny_model, settings):
    model, _ = tiny_model
    ids = random_ids(2, 40, seed=7)
    method = SparQ(**settings)
    scored = told_logits(model, method, ids, [12, 25])
    # Untold, the decode loop's prefill (several rows) is the prompt and its single-row steps are decode steps.
    for row, prompt in enumerate((12, 25)):
        decoded = decoded_logits(model, method, ids[row : row + 1], prefill=prompt)
        torch.testing.assert_close(scored[row : row + 1], decoded, rtol=0, atol=1e-5)


def test_the_current_token_is_always_kept():
    method = SparQ(compression=None, r=2, k=2, local_fraction=0.25, scope="all_rows")  # floor(2 / 4) = 0
    n = torch.tensor([[[6, 9]]])
    k_rows, local_rows, sparse = method.budgets(n)
    assert local_rows.tolist() == [[[1, 1]]] and bool(sparse.all())
    # The current position (the last allowed one) scores lowest and is still chosen.
    allowed = torch.ones(1, 1, 1, 9, dtype=torch.bool)
    score = torch.linspace(1, 0, 9).reshape(1, 1, 1, 9)
    chosen = choose_positions(score, allowed, k_rows[..., 1:], local_rows[..., 1:])
    assert chosen[0, 0, 0].nonzero().flatten().tolist() == [0, 8]


def test_fixed_k_on_a_short_sequence_is_dense_and_reads_everything(tiny_model):
    model, _ = tiny_model
    ids = random_ids(1, 40, seed=8)
    method = SparQ()  # published: k = 128 > 40 positions
    torch.testing.assert_close(decoded_logits(model, method, ids, prefill=10), logits(model, ids), rtol=0, atol=1e-5)
    assert method.describe()["measured"]["steps"] == 30  # the decode steps, not the prefill
    assert method.run_stats().kv_read_fraction == 1.0


class PromptRecorder(Method):
    """A stand-in method that leaves the model alone and records what chai.evaluate tells it."""

    name = "prompt_recorder"
    custom_attention = False

    def __init__(self):
        self.told = []

    def set_prompt_lengths(self, lengths):
        self.told.append(None if lengths is None else lengths.tolist())


def test_evaluate_tells_the_method_where_each_prompt_ends(tiny_llama):
    model, tokenizer = tiny_llama
    method = PromptRecorder()
    lm = CountingHFLM(pretrained=model, tokenizer=tokenizer, batch_size=4, max_length=16, method=method)
    inputs = []
    hook = model.register_forward_pre_hook(lambda _, args: inputs.append(args[0].tolist()))  # the padded rows
    requests = [  # (strings, context ids, continuation ids) -> expected prompt length of its input row
        ((("a", "b"), [5, 6, 7], [8, 9]), 3),
        ((("c", "d"), [11, 12, 13, 14, 0], [15]), 5),  # the input ends in token 0, like the padding
        ((("e", "f"), list(range(100, 118)), [21, 22, 23]), 16 - 3 + 1),  # truncated on the left to 16 rows
        ((("g", "h"), [31, 32], [33, 34, 35]), 2),  # shares its input with the next: one forward, for this one
        ((("i", "j"), [31, 32, 33, 34], [35]), 2),
    ]
    try:
        lm._loglikelihood_tokens([request for request, _ in requests])
    finally:
        hook.remove()
    expected = {tuple((ctx + cont)[-17:][:-1]): length for (_, ctx, cont), length in requests}
    told = [lengths for lengths in method.told if lengths is not None]
    assert method.told[1::2] == [None] * len(told)  # reset after every forward
    seen = {}
    for rows, lengths in zip(inputs, told, strict=True):
        for row, length in zip(rows, lengths, strict=True):
            real = next(tuple(row[:n]) for n in range(len(row), 0, -1) if tuple(row[:n]) in expected)
            seen[real] = length
    assert seen == expected


def test_an_input_row_that_matches_no_request_fails_loudly():
    lookup = prompt_lookup([(("a", "b"), [5, 6, 7], [8, 9])], max_length=16)
    assert prompt_lengths(torch.tensor([[5, 6, 7, 8, 0]]), lookup, shared_forward=True).tolist() == [3]
    with pytest.raises(RuntimeError, match="cannot tell where the prompt ends"):
        prompt_lengths(torch.tensor([[5, 6, 9, 8, 0]]), lookup, shared_forward=True)

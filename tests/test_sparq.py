"""SparQ on tiny random models: the no-op setting equals MHA, row-wise == step-by-step decoding with a cache, the
vectorised rows == a literal one-query transcription of the paper's algorithm, memory and bytes-moved counts,
the model restored, one-line errors."""

import math
import re

import pytest
import torch

from chai.attention import attention_probs, repeat_heads
from chai.evaluate import measure_kv_bytes_per_token
from chai.methods import build_method
from chai.methods.sparq import SparQ, sparq_rows
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
    method = SparQ(compression=None, r=8, k=40)  # head_dim 8
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
    [({"compression": None, "r": 3, "k": 8}, 0), ({"compression": 4}, 0), ({"compression": 2, "dense_prefix": 10}, 10)],
)
def test_row_wise_equals_step_by_step_decoding(tiny_model, settings, prefill):
    model, _ = tiny_model
    ids = random_ids(2, 48, seed=2)
    method = SparQ(**settings)
    row_wise = logits(model, ids, method)
    assert not torch.allclose(row_wise, logits(model, ids), atol=1e-4)  # SparQ really acts
    torch.testing.assert_close(decoded_logits(model, method, ids, prefill), row_wise, rtol=0, atol=1e-5)


def test_row_wise_equals_decoding_on_grouped_query_heads():
    model = tiny_gqa()
    ids = random_ids(1, 40, vocab=512, seed=3)
    method = SparQ(compression=None, r=2, k=8, store_k_twice=True)
    row_wise = logits(model, ids, method)
    assert not torch.allclose(row_wise, logits(model, ids), atol=1e-4)
    torch.testing.assert_close(decoded_logits(model, method, ids), row_wise, rtol=0, atol=1e-5)


def test_model_is_restored_exactly(tiny_model):
    model, _ = tiny_model
    ids = random_ids(1, 32, seed=4)
    before = logits(model, ids)
    logits(model, ids, SparQ(compression=8))
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
    method = SparQ(compression=2, reference_context=2048)
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


def test_presets_set_the_compression():
    for ratio in (2, 4, 8):
        method = build_method(compose_cfg([f"method=sparq_{ratio}x"]).method)
        assert isinstance(method, SparQ) and method.compression == ratio and method.reallocate_to_mean
    assert build_method(compose_cfg(["method=sparq"]).method).compression == 8


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"compression": None, "r": 0, "k": 4}, "r must be an integer >= 1"),
        ({"compression": None, "r": 2, "k": 0}, "k must be an integer >= 1"),
        ({"compression": 0.5}, "compression must be null or a number >= 1"),
        ({"compression": None, "r": 2}, "set compression, or both r and k"),
        ({"local_fraction": 2}, "local_fraction must be in [0, 1]"),
        ({"dense_prefix": -1}, "dense_prefix must be an integer >= 0"),
    ],
)
def test_invalid_settings_fail_in_one_line(settings, message):
    assert_one_line_error(lambda: SparQ(**settings), re.escape(message))


def test_r_above_head_dim_fails_in_one_line(tiny_llama):
    model, _ = tiny_llama
    assert_one_line_error(lambda: SparQ(compression=None, r=9, k=4).prepare(model), "r=9 exceeds the model's head_dim 8")

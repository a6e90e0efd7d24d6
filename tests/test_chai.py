"""CHAI's claims on tiny random models (Llama, OPT, and a grouped-query Llama), offline, CPU, float32."""

import copy
from types import SimpleNamespace

import pytest
import torch

from chai.attention import AttnShape, kv_bytes
from chai.config import compose_model
from chai.errors import ChaiError
from chai.evaluate import measure_kv_bytes_per_token
from chai.methods import build_method
from chai.methods.chai import ChaiLayer, load_preset, presets
from chai.models import architecture
from tests.conftest import random_ids
from tests.helpers import assert_one_line_error, tensors_held

VOCAB = 1000  # ids drawn below every tiny model's vocabulary


@pytest.fixture(params=["tiny_llama", "tiny_opt", "tiny_gqa"])
def any_model(request):
    return request.getfixturevalue(request.param)[0]


def chai(**settings):
    settings.setdefault("layer_clusters", None)
    return build_method({"name": settings.pop("name", "chai"), **settings})


@torch.no_grad()
def logits(model, ids, method=None, cache=None):
    if method is None:
        return model(ids).logits
    with method.applied(model):
        if cache is None:
            return model(ids).logits
        return model(ids, past_key_values=cache, use_cache=True).logits


def test_clusters_equal_heads_is_mha(tiny_model):
    model, _ = tiny_model
    heads = model.config.num_attention_heads
    ids = random_ids(2, 24, VOCAB)
    ref = logits(model, ids)
    dense = chai(num_clusters=heads)  # by default such layers run dense: no clustering at all
    torch.testing.assert_close(logits(model, ids, dense), ref, rtol=0, atol=1e-5)
    assert set(dense.describe()["clusters_per_layer"]) == {"dense"} and dense.run_stats().clustering_calls == 0
    method = chai(num_clusters=heads)
    method.full_layers_dense = False  # here: the clustered path itself, at its no-op setting
    torch.testing.assert_close(logits(model, ids, method), ref, rtol=0, atol=1e-5)
    cache = method.make_cache(model)
    torch.testing.assert_close(logits(model, ids, method, cache), ref, rtol=0, atol=1e-5)
    assert method.run_stats().clustering_calls > 0  # the clustered path really ran
    assert kv_bytes(cache)["k"] == kv_bytes(cache)["v"]
    # the same check can fail: fewer clusters change the logits, but not the first m rows (plain MHA)
    fewer = logits(model, ids, chai(num_clusters=2))
    assert (fewer[:, 5:] - ref[:, 5:]).abs().max() > 1e-3
    torch.testing.assert_close(fewer[:, :5], ref[:, :5], rtol=0, atol=1e-5)
    # and with CHAI's caches: the static one (one prompt forward, first rows is_causal), the dynamic one with the
    # prompt in two pieces (3 tokens, then the rest: the first rows at past 3, with a mask)
    method = chai(num_clusters=2)
    static = logits(model, ids, method, method.static_cache(model, 2, 24))
    pieces = method.make_cache(model)
    pieced = torch.cat([logits(model, ids[:, :3], method, pieces), logits(model, ids[:, 3:], method, pieces)], 1)
    for out in (static, pieced):
        torch.testing.assert_close(out[:, :5], ref[:, :5], rtol=0, atol=1e-5)
        assert (out[:, 5:] - ref[:, 5:]).abs().max() > 1e-3


@pytest.mark.parametrize("prompt_len", [9, 3])
def test_greedy_generation_equals_full_recompute(any_model, prompt_len):
    """Decoding with the shrunken cache gives what one full forward over the same tokens gives; a prompt shorter
    than m stays dense until m tokens exist, then clusters exactly as the full forward does."""
    model = any_model
    method = chai(num_clusters=3)
    cache = method.make_cache(model)
    ids = random_ids(1, prompt_len, VOCAB, seed=prompt_len)
    steps = []
    with torch.no_grad(), method.applied(model):
        out = model(ids, past_key_values=cache, use_cache=True).logits
        for _ in range(8):
            steps.append(out[:, -1])
            ids = torch.cat([ids, out[:, -1].argmax(-1, keepdim=True)], dim=1)
            out = model(ids[:, -1:], past_key_values=cache, use_cache=True).logits
    full = logits(model, ids, method)
    torch.testing.assert_close(torch.stack(steps, 1), full[:, prompt_len - 1 : -1], rtol=0, atol=1e-4)
    for idx, layer in enumerate(cache.layers):
        assert torch.equal(layer.membership.labels, method.last_memberships[idx].labels)
    shape = AttnShape.of(model.config)
    kept = sum(layer.membership.kept_kv()[0] for layer in cache.layers)
    assert kv_bytes(cache)["k"] == kept * ids.shape[1] * shape.head_dim * 4  # every fed token, fewer heads
    assert kept < shape.layers * shape.kv_heads or shape.groups > 1


def test_generate_api_uses_the_chai_cache(tiny_llama):
    model, _ = tiny_llama
    method = chai(num_clusters=2)
    ids = random_ids(1, 7, VOCAB, seed=3)
    cache = method.make_cache(model)
    with torch.no_grad(), method.applied(model):
        out = model.generate(ids, past_key_values=cache, max_new_tokens=6, do_sample=False, pad_token_id=0)
    full = logits(model, out, method)
    assert torch.equal(out[:, 7:], full[:, 6:-1].argmax(-1))
    assert all(isinstance(layer, ChaiLayer) and layer.keys.shape[1] <= 2 for layer in cache.layers)


def test_stored_bytes_equal_the_analytic_count(tiny_llama):
    model, _ = tiny_llama
    shape = AttnShape.of(model.config)
    ids = random_ids(1, 17, VOCAB)
    for settings, k_heads, v_heads in (
        ({"layer_clusters": [2, 5, 8]}, [2, 5, 8], [8, 8, 8]),
        ({"layer_clusters": [2, 5, 8], "first_clustered_layer": 1}, [8, 5, 8], [8, 8, 8]),
        ({"num_clusters": 3, "share_values": True}, [3, 3, 3], [3, 3, 3]),
    ):
        method = chai(**settings)
        cache = method.make_cache(model)
        logits(model, ids, method, cache)
        per_token = shape.head_dim * 4 * ids.shape[1]
        assert kv_bytes(cache) == {"k": sum(k_heads) * per_token, "v": sum(v_heads) * per_token}
        for layer in cache.layers:  # and no other K or V stays referenced (the prompt's keys of every head did)
            held = {id(t) for t in tensors_held(vars(layer).values()) if t.dim() == 4}
            assert held == {id(layer.keys), id(layer.values)}
        analytic = method.kv_bytes_per_token(model.config, 4)
        assert analytic == {"k": sum(k_heads) * shape.head_dim * 4, "v": sum(v_heads) * shape.head_dim * 4}
        measured = measure_kv_bytes_per_token(model, method, ids)
        assert (measured["k"], measured["v"]) == (analytic["k"], analytic["v"])


def test_gqa_keeps_a_kv_head_only_while_a_representative_reads_it(tiny_gqa):
    model, _ = tiny_gqa
    shape = AttnShape.of(model.config)
    method = chai(num_clusters=1)  # one representative: one KV head of the two
    cache = method.make_cache(model)
    logits(model, random_ids(1, 12, VOCAB), method, cache)
    assert kv_bytes(cache)["k"] == shape.layers * 1 * 12 * shape.head_dim * 4
    assert kv_bytes(cache)["v"] == shape.layers * 2 * 12 * shape.head_dim * 4
    method = chai(num_clusters=5)
    cache = method.make_cache(model)
    logits(model, random_ids(1, 12, VOCAB), method, cache)
    kept = [layer.membership.kept_kv()[0] for layer in cache.layers]
    assert kv_bytes(cache)["k"] == sum(kept) * 12 * shape.head_dim * 4
    assert kv_bytes(cache)["k"] <= method.kv_bytes_per_token(model.config, 4)["k"] * 12


@pytest.mark.parametrize("algo", ["kmeans", "agglomerative"])
def test_batch_of_three_prompts_equals_each_alone(any_model, algo):
    """lm-eval right-pads and passes no attention mask: every request still gets its own membership. The 3-token
    prompt is shorter than m = 5 and runs as plain MHA, alone or in the batch."""
    model = any_model
    prompts = [random_ids(1, n, VOCAB, seed=n)[0] for n in (12, 7, 3)]
    batch = torch.zeros(3, 12, dtype=torch.long)
    for row, p in enumerate(prompts):
        batch[row, : len(p)] = p
    for use_cache in (False, True):
        method = chai(num_clusters=3, cluster_algo=algo)
        together = logits(model, batch, method, method.make_cache(model) if use_cache else None)
        if not use_cache:
            groups = [method.last_memberships[0].groups(row) for row in range(3)]
            assert groups[0] != groups[1]  # per-request memberships
        for row, p in enumerate(prompts):
            alone = logits(model, p[None], method, method.make_cache(model) if use_cache else None)
            torch.testing.assert_close(together[row, : len(p)], alone[0], rtol=0, atol=1e-5)


def plant_identical_heads(model, pairs):
    """Make the query and key projections of heads (a, b) identical in every layer."""
    model = copy.deepcopy(model)
    shape = AttnShape.of(model.config)
    d = shape.head_dim
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            for a, b in pairs:
                attn.q_proj.weight[b * d : (b + 1) * d] = attn.q_proj.weight[a * d : (a + 1) * d]
                attn.k_proj.weight[b * d : (b + 1) * d] = attn.k_proj.weight[a * d : (a + 1) * d]
    return model


@pytest.mark.parametrize("algo", ["kmeans", "agglomerative"])
def test_identical_heads_land_in_one_cluster(tiny_llama, algo):
    model = plant_identical_heads(tiny_llama[0], [(1, 6)])
    ids = random_ids(3, 10, VOCAB, seed=7)
    for k in (2, 4, 7):
        method = chai(num_clusters=k, cluster_algo=algo)
        logits(model, ids, method)
        for m in method.last_memberships.values():
            assert torch.equal(m.labels[:, 1], m.labels[:, 6]), (algo, k)


def test_bad_settings_fail_with_one_line(tiny_llama):
    model, _ = tiny_llama
    cases = [
        ({"num_clusters": 0}, "num_clusters must be >= 1"),
        ({"layer_clusters": [2, 0, 2]}, "entries must be >= 1"),
        ({"layer_clusters": "llama7b_jul"}, "did you mean 'llama7b_jul2024'"),
        ({"num_clusters": 2, "cluster_algo": "kmean"}, "did you mean 'kmeans'"),
        ({"num_clusters": 2, "membership_tokens": 0}, "membership_tokens"),
        ({"layer_clusters": None}, "needs cluster counts"),
    ]
    for settings, message in cases:
        assert_one_line_error(lambda: chai(**settings), f"(?i){message}")
    for settings, message in (
        ({"num_clusters": 9}, "asks for 9 clusters but has 8 heads"),
        ({"layer_clusters": [2, 2]}, "gives 2 cluster counts but the model has 3 layers"),
        ({"layer_clusters": "llama7b_dec2024"}, "gives 32 cluster counts"),
        ({"num_clusters": 2, "first_clustered_layer": 3}, "first_clustered_layer"),
    ):
        assert_one_line_error(lambda: chai(**settings).prepare(model), message)
    with pytest.raises(ChaiError, match="unknown setting|has no setting"):
        build_method({"name": "chai", "clusters": 3})


def test_applied_restores_the_model_exactly(tiny_model):
    model, _ = tiny_model
    ids = random_ids(2, 16, VOCAB)
    before, implementation = logits(model, ids), model.config._attn_implementation
    inside = logits(model, ids, chai(num_clusters=2))
    assert not torch.allclose(inside, before)
    assert torch.equal(logits(model, ids), before)
    assert model.config._attn_implementation == implementation


def test_decoding_without_the_chai_cache_fails_clearly(tiny_llama):
    from transformers import DynamicCache

    model, _ = tiny_llama
    method = chai(num_clusters=2)
    cache = DynamicCache()
    with torch.no_grad(), method.applied(model), pytest.raises(ChaiError, match="make_cache"):
        model(random_ids(1, 8, VOCAB), past_key_values=cache, use_cache=True)
        model(random_ids(1, 1, VOCAB), past_key_values=cache, use_cache=True)


def test_presets_match_their_models():
    assert {"llama7b_jul2024", "llama7b_dec2024", "llama33b"} <= set(presets())
    for name in presets():
        preset = load_preset(name)
        config = architecture(compose_model(preset["model"]))
        assert len(preset["layers"]) == config.num_hidden_layers, name
        assert max(preset["layers"]) <= config.num_attention_heads, name
        method = chai(layer_clusters=name)
        method.prepare(SimpleNamespace(config=config))  # the config is all it reads: no weights
        heads = config.num_attention_heads
        assert method.describe()["clusters_per_layer"] == ["dense" if c == heads else c for c in preset["layers"]]


def test_reference_code_options(tiny_llama):
    """agglomerative + features without the causal mask + clustered first tokens (the released code's choices)."""
    model, _ = tiny_llama
    ids = random_ids(2, 14, VOCAB)
    ref = logits(model, ids)
    reference = chai(num_clusters=3, cluster_algo="agglomerative", causal_features=False, first_tokens="clustered")
    out = logits(model, ids, reference)
    assert (out[:, :5] - ref[:, :5]).abs().max() > 1e-4  # first tokens clustered too
    paper = logits(model, ids, chai(num_clusters=3, representative="medoid"))
    torch.testing.assert_close(paper[:, :5], ref[:, :5], rtol=0, atol=1e-5)


def test_variants_random_groups_and_qkv(tiny_llama):
    model, _ = tiny_llama
    ids = random_ids(1, 12, VOCAB)
    rand = chai(name="random_groups", layer_clusters=[2, 3, 4], seed=1)
    cache = rand.make_cache(model)
    logits(model, ids, rand, cache)
    groups = rand.describe()["example_groups"]
    assert [len(groups[str(layer)]) for layer in range(3)] == [2, 3, 4]
    assert rand.run_stats().clustering_calls == 0
    assert kv_bytes(cache)["k"] == 9 * 12 * 8 * 4
    other = chai(name="random_groups", layer_clusters=[2, 3, 4], seed=2)
    other.prepare(model)
    assert other.describe()["example_groups"] != groups
    qkv = chai(name="chai_qkv", num_clusters=3)
    assert qkv.share_values and qkv.kv_bytes_per_token(model.config, 4)["v"] == 3 * 3 * 8 * 4


@pytest.mark.slow
def test_smollm2_batch_membership_and_bytes(smollm2, piqa_rows):
    """Real weights, 9 query heads over 3 KV heads: three real prompts batched equal each alone; K bytes shrink."""
    model, tokenizer = smollm2
    texts = [row["goal"] for row in piqa_rows[:3]]
    prompts = [tokenizer(t, return_tensors="pt").input_ids[0] for t in texts]
    batch = torch.zeros(3, max(len(p) for p in prompts), dtype=torch.long)
    for row, p in enumerate(prompts):
        batch[row, : len(p)] = p
    method = chai(num_clusters=2)  # two representatives: at most two of the three KV heads keep their K
    cache = method.make_cache(model)
    together = logits(model, batch, method, cache)
    for row, p in enumerate(prompts):
        alone = logits(model, p[None], method)
        # float32 rounding by shape: MHA's own batched and single logits differ by up to 7e-5 on some CPUs, and
        # CHAI's shared scores carry such a difference through 30 layers to 4.3e-4 (logits up to ~30); a request
        # clustered with another's heads or K would be off by far more.
        torch.testing.assert_close(together[row, : len(p)], alone[0], rtol=0, atol=1e-3)
    per_token = method.kv_bytes_per_token(model.config, 4)
    measured = measure_kv_bytes_per_token(model, method, prompts[0][None])
    assert measured["k"] <= per_token["k"] < AttnShape.of(model.config).dense_kv_bytes_per_token(4)["k"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "offset", "odd_width"])
def test_pick_copies_each_requests_heads_in_every_layout(dtype, layout):
    """pick (8-byte words where the layout allows) against a per-request loop over plain indexing, bit for bit:
    the transposed layout is how queries arrive ([B, T, H, D] memory), `offset` a view that starts mid-row,
    `odd_width` a head size the words do not divide (the element-wise fallback)."""
    from chai.methods._chai_attention import as_words, pick
    g = torch.Generator().manual_seed(0)
    width = 7 if layout == "odd_width" else 16
    base = torch.randn(3, 10, 6, width + 4, generator=g).to(dtype)  # [B, T, H, D + 4]
    x = {"contiguous": base[..., :width].contiguous().transpose(1, 2).contiguous(),
         "transposed": base[..., :width].transpose(1, 2),
         "offset": base[..., 4:].transpose(1, 2),
         "odd_width": base[..., :width].transpose(1, 2)}[layout]  # [B, H, T, D]
    index = torch.tensor([[5, 0, 0, 2], [1, 1, 3, 4], [2, 5, 0, 1]])
    expected = torch.stack([x[b][index[b]] for b in range(3)])
    for tokens_major in (False, True):
        picked = pick(x, index, tokens_major)
        assert torch.equal(picked.view(torch.uint8), expected.contiguous().view(torch.uint8))
        # asked for, a tokens-major x stays tokens-major; else the copy is heads-major
        assert picked.transpose(1, 2).is_contiguous() == (tokens_major and layout != "contiguous")
        assert picked.is_contiguous() == (not tokens_major or layout == "contiguous")
    words = layout in ("contiguous", "transposed", "offset") and dtype != torch.float64
    assert (as_words(x).dtype == torch.int64) == words

"""DEJAVU-static head pruning on tiny random models: no-op at sparsity 0, pruning == zeroing the dropped heads'
output, K,V memory == the analytic count of kept heads, the model restored bit for bit, labels that state the share
of heads really dropped, the dense-first-layers variant, one-line errors."""

import json
import re
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoConfig

from chai.attention import AttnShape
from chai.errors import ChaiError
from chai.evaluate import measure_kv_bytes_per_token
from chai.methods import build_method
from chai.methods.dejavu_static import DejaVuStatic, attention_modules
from tests.conftest import build_tiny_gqa, random_ids
from tests.helpers import assert_one_line_error, compose_cfg, logits


def tiny_gqa():
    """8 query heads over 2 KV heads, head_dim 8: the grouped-query case (SmolLM2's layout, smaller)."""
    return build_tiny_gqa(layers=2, vocab=512)


def random_scores(model, seed=0) -> list:
    shape = AttnShape.of(model.config)
    return torch.rand(shape.layers, shape.heads, generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
def zeroed_heads_logits(model, method, ids):
    """The dense model with each dropped head's output columns of the output projection set to zero: what pruning
    must compute (a dropped head contributes nothing; kept heads are unchanged)."""
    shape = AttnShape.of(model.config)
    modules, saved = attention_modules(model), {}
    for layer, plan in method._plans.items():
        out = getattr(modules[layer], "o_proj", None) or modules[layer].out_proj
        saved[layer] = out.weight.detach().clone()
        for head in set(range(shape.heads)) - set(plan.heads):
            out.weight.data[:, head * shape.head_dim : (head + 1) * shape.head_dim] = 0
    try:
        return model(ids).logits
    finally:
        for layer, weight in saved.items():
            out = getattr(modules[layer], "o_proj", None) or modules[layer].out_proj
            out.weight.data.copy_(weight)


def test_sparsity_zero_gives_mha_logits(tiny_model):
    model, _ = tiny_model
    ids = random_ids(2, 24)
    method = DejaVuStatic(sparsity=0.0, head_scores=random_scores(model))
    method.prepare(model)
    torch.testing.assert_close(logits(model, ids, method), logits(model, ids), rtol=0, atol=1e-5)


@pytest.mark.parametrize("dense_layers", [0, 1])
def test_pruning_equals_zeroed_heads_and_is_undone(tiny_model, dense_layers):
    model, _ = tiny_model
    ids = random_ids(2, 24, seed=1)
    before = logits(model, ids)
    params = {name: p for name, p in model.named_parameters()}
    method = DejaVuStatic(sparsity=0.5, dense_layers=dense_layers, head_scores=random_scores(model))
    method.prepare(model)
    assert sorted(method._plans) == list(range(dense_layers, model.config.num_hidden_layers))
    pruned = logits(model, ids, method)
    assert not torch.allclose(pruned, before, atol=1e-4)
    torch.testing.assert_close(pruned, zeroed_heads_logits(model, method, ids), rtol=0, atol=1e-5)
    # Restored bit for bit: the very same Parameters, the same logits.
    assert torch.equal(logits(model, ids), before)
    assert all(p is params[name] for name, p in model.named_parameters())


def test_grouped_query_pruning_drops_a_kv_head_only_when_its_group_is_gone():
    model = tiny_gqa()
    ids = random_ids(1, 20, vocab=512)
    # Heads 0-3 (KV head 0) score lowest in layer 0; in layer 1 the low scores straddle both groups.
    scores = [[0.1, 0.2, 0.3, 0.4, 1.0, 1.1, 1.2, 1.3], [0.1, 1.0, 0.2, 1.1, 0.3, 1.2, 0.4, 1.3]]
    method = DejaVuStatic(sparsity=0.5, head_scores=scores)
    method.prepare(model)
    assert method._plans[0].heads == (4, 5, 6, 7) and method._plans[0].kv_heads == (1,)
    assert method._plans[1].heads == (1, 3, 5, 7) and method._plans[1].kv_heads == (0, 1)
    before = logits(model, ids)
    torch.testing.assert_close(logits(model, ids, method), zeroed_heads_logits(model, method, ids), rtol=0, atol=1e-5)
    assert torch.equal(logits(model, ids), before)
    # K,V memory: layer 0 keeps 1 KV head, layer 1 both; head_dim 8, float32.
    assert method.kv_bytes_per_token(model.config, 4) == {"k": (1 + 2) * 8 * 4, "v": (1 + 2) * 8 * 4}
    measured = measure_kv_bytes_per_token(model, method, ids)
    assert measured["k"] == measured["v"] == (1 + 2) * 8 * 4


@pytest.mark.parametrize("sparsity, kept", [(0.1, 7), (0.3, 6), (0.5, 4), (0.9, 1), (0.99, 1)])
def test_kv_memory_equals_analytic_count(tiny_model, sparsity, kept):
    model, _ = tiny_model
    method = DejaVuStatic(sparsity=sparsity, dense_layers=1, head_scores=random_scores(model, seed=2))
    method.prepare(model)
    # tiny models: 3 layers x 8 heads, head_dim 8, float32; the first layer is left dense.
    expected = (8 + 2 * kept) * 8 * 4
    assert method.kv_bytes_per_token(model.config, 4) == {"k": expected, "v": expected}
    measured = measure_kv_bytes_per_token(model, method, random_ids(1, 16))
    assert measured["k"] == measured["v"] == expected
    assert method.describe()["attention_compute_fraction"] == (8 + 2 * kept) / 24


def test_decoding_with_a_cache_matches_one_forward(tiny_model):
    model, _ = tiny_model
    ids = random_ids(1, 12, seed=3)
    method = DejaVuStatic(sparsity=0.5, head_scores=random_scores(model))
    method.prepare(model)
    cache = method.make_cache(model)
    with torch.no_grad(), method.applied(model):
        full = model(ids).logits
        steps = [model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits for t in range(ids.shape[1])]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-5)


def test_scores_from_a_json_file(tiny_llama, tmp_path):
    model, _ = tiny_llama
    scores = random_scores(model)
    path = tmp_path / "tiny_llama.json"
    path.write_text(json.dumps({"head_importance": scores}))
    from_file, from_list = DejaVuStatic(head_scores=str(path)), DejaVuStatic(head_scores=scores)
    from_file.prepare(model)
    from_list.prepare(model)
    assert from_file._plans == from_list._plans


def test_config_builds_the_method():
    method = build_method(compose_cfg(["method=dejavu_static", "method.sparsity=0.3", "method.dense_layers=2"]).method)
    assert isinstance(method, DejaVuStatic) and (method.sparsity, method.dense_layers) == (0.3, 2)
    assert "per-token predictor" in DejaVuStatic().describe()["variant"]


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"sparsity": 1.0}, "sparsity must be in [0, 1)"),
        ({"sparsity": -0.1}, "sparsity must be in [0, 1)"),
        ({"sparsity": "half"}, "sparsity must be a number"),
        ({"dense_layers": -1}, "dense_layers must be an integer >= 0"),
    ],
)
def test_invalid_settings_fail_in_one_line(settings, message):
    assert_one_line_error(lambda: DejaVuStatic(**settings), re.escape(message))


def test_scores_of_the_wrong_shape_fail_in_one_line(tiny_llama):
    model, _ = tiny_llama
    with pytest.raises(ChaiError, match=r"head scores have shape \[2, 8\].*\[3, 8\]"):
        DejaVuStatic(head_scores=[[1.0] * 8] * 2).prepare(model)
    with pytest.raises(ChaiError, match="dense_layers=5 exceeds"):
        DejaVuStatic(dense_layers=5, head_scores=random_scores(model)).prepare(model)


@pytest.mark.parametrize(
    "sparsity, label", [(0.1, "11% (1/9 heads)"), (0.3, "33% (3/9 heads)"), (0.5, "56% (5/9 heads)")]
)
def test_a_prepared_run_is_labelled_by_the_heads_really_dropped(sparsity, label):
    # SmolLM2's 9 heads over 3 KV heads; with head scores given, prepare reads only the config.
    config = AutoConfig.for_model("llama", num_hidden_layers=2, num_attention_heads=9, num_key_value_heads=3,
                                  hidden_size=72)
    model = SimpleNamespace(config=config)
    method = DejaVuStatic(sparsity=sparsity, head_scores=random_scores(model))
    assert method.display(method.settings())["label"] == f"DejaVu-static {sparsity * 100:.0f}% (requested)"
    method.prepare(model)
    assert method.display(method.settings(), method.describe())["label"] == f"DejaVu-static {label}"
    dropped = int(label.split("(")[1].split("/")[0])
    assert {k: method.describe()[k] for k in ("pruned_heads", "heads", "pruned_fraction")} == {
        "pruned_heads": dropped, "heads": 9, "pruned_fraction": dropped / 9}


def test_old_records_state_the_requested_sparsity_or_the_share_their_facts_show():
    old = {"dense_layers": 0, "sparsity": 0.3}  # settings of a record written before the real share was shown
    assert DejaVuStatic.display(old)["label"] == "DejaVu-static 30% (requested)"
    # its method_info: every layer keeps 6 of 9 heads (compute fraction 6/9): the share is solved from them
    facts = {"pruned_layers": list(range(30)), "kept_heads": {"0": [0, 1, 2, 3, 4, 5]}, "attention_compute_fraction": 6 / 9}
    assert DejaVuStatic.display(old, facts)["label"] == "DejaVu-static 33% (3/9 heads)"
    dense = {"dense_layers": 3, "sparsity": 0.5}  # 3 of 30 layers whole, 27 keep 4 of 9
    facts = {"pruned_layers": list(range(3, 30)), "kept_heads": {"3": [0, 1, 2, 3]},
             "attention_compute_fraction": (3 * 9 + 27 * 4) / (30 * 9)}
    assert DejaVuStatic.display(dense, facts)["label"] == "DejaVu-static 56% (5/9 heads), first 3 layers dense"


def test_dense_layers_variant_keeps_the_first_layers_and_says_so(tiny_model):
    method = build_method(compose_cfg(["method=dejavu_static_dense"]).method)
    assert isinstance(method, DejaVuStatic) and method.dense_layers == 3 and method.sparsity == 0.5
    assert DejaVuStatic.display(method.settings())["label"] == "DejaVu-static 50% (requested), first 3 layers dense"
    model, _ = tiny_model  # 3 layers x 8 heads: with the first 2 dense only the last is pruned
    method = DejaVuStatic(sparsity=0.5, dense_layers=2, head_scores=random_scores(model))
    method.prepare(model)
    assert sorted(method._plans) == [2] and method.describe()["pruned_layers"] == [2]
    assert method.display(method.settings(), method.describe())["label"] == (
        "DejaVu-static 50% (4/8 heads), first 2 layers dense")
    ids = random_ids(1, 16, seed=4)
    torch.testing.assert_close(logits(model, ids, method), zeroed_heads_logits(model, method, ids), rtol=0, atol=1e-5)

"""CHAI's offline phase on a tiny Llama with planted head groups: the rules and the static grouping must find them,
the sensitivity table must see that clustering within a planted group costs nothing, and the budget allocation must
equal a brute-force search."""

import copy
import itertools
import json
import re

import pytest
import torch
from omegaconf import OmegaConf

from chai.attention import AttnShape
from chai import cluster_counts
from chai.calibration import artifact_path, calibrate, consensus_groups, load_or_calibrate, noise_curve, settings_of
from chai.config import compose_model
from chai.errors import ChaiError
from chai.methods import RunContext, build_method
from chai.paths import data_dir
from chai.runners.calibrate import run
from tests.conftest import random_ids

SMALL = {"n_docs": 6, "seq_len": 24, "feature_tokens": 8, "batch_size": 4, "noise_draws": 32,
         "sensitivity": {"n_docs": 3, "batch_size": 4}}
PLANTED = [[0, 1, 2], [3, 4, 5, 6, 7]]


@pytest.fixture(scope="module")
def corpus():
    if not (data_dir() / "c4" / "c4_validation_2k.jsonl").exists():
        pytest.skip("no C4 calibration file in the data directory")


def planted(model, groups=PLANTED):
    """Heads of each group get the group's first head's query and key projections: identical attention scores."""
    model = copy.deepcopy(model)
    d = AttnShape.of(model.config).head_dim
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                for group in groups:
                    for head in group[1:]:
                        proj.weight[head * d : (head + 1) * d] = proj.weight[group[0] * d : (group[0] + 1) * d]
    return model


def test_count_rules():
    sharp = [10.0, 6.0, 1.0, 0.8, 0.6, 0.4, 0.2, 0.0]
    assert cluster_counts.kneedle(sharp) == 3
    assert cluster_counts.threshold(sharp, 0.15) == 3
    assert cluster_counts.threshold(sharp, 0.5) == 3
    assert cluster_counts.threshold(sharp, 0.7) == 2
    assert cluster_counts.threshold(sharp, 0.01) == 8  # never below: every head its own cluster
    assert cluster_counts.kneedle([1.0, 1.0, 1.0]) == 1  # identical heads: one cluster
    assert cluster_counts.kneedle([5.0]) == 1


def test_kneedle_finds_an_elbow_in_noise():
    """The paper's rule on 9 structureless heads (flat-Dirichlet causal rows over 5 tokens) still picks a middle
    count: the knee of any convex 9-point curve. The threshold rule reads it as no structure (most heads apart)."""
    curve = noise_curve(heads=9, tokens=5, draws=256, restarts=5)
    assert 3 <= cluster_counts.kneedle(curve) <= 5
    assert cluster_counts.threshold(curve, 0.1) >= 7


def _brute_force(costs, shape, target, saving):
    best = None
    for counts in itertools.product(range(1, shape.heads + 1), repeat=shape.layers):
        if cluster_counts.saving_of(list(counts), shape, saving) >= target - 1e-12:
            value = (sum(max(0, costs[layer][k - 1]) for layer, k in enumerate(counts) if k < shape.heads), -sum(counts))
            best = min(best, (value, list(counts))) if best else (value, list(counts))
    return best


@pytest.mark.parametrize("saving", cluster_counts.SAVINGS)
def test_budget_allocation_is_the_brute_force_optimum(saving):
    shape = AttnShape(layers=4, heads=4, kv_heads=2, head_dim=8)
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        costs = (torch.rand(shape.layers, shape.heads, generator=gen) - 0.1).sort(dim=1, descending=True).values.tolist()
        for target in (0.0, 0.1, 0.25, 0.4):
            found = _brute_force(costs, shape, target, saving)
            if found is None:  # kv_bytes: V is always kept, so at most 25% here
                with pytest.raises(ChaiError, match="out of reach"):
                    cluster_counts.allocate(costs, shape, target, saving)
                continue
            counts = cluster_counts.allocate(costs, shape, target, saving)
            value = found[0]
            assert cluster_counts.saving_of(counts, shape, saving) >= target - 1e-12
            cost = sum(max(0, costs[layer][k - 1]) for layer, k in enumerate(counts) if k < shape.heads)
            assert cost == pytest.approx(value[0]) and -sum(counts) == value[1], (target, counts)
    with pytest.raises(ChaiError, match="out of reach"):
        cluster_counts.allocate(costs, shape, 0.9, saving)
    assert cluster_counts.allocate(costs, shape, 0.1, saving, first_layer=2)[:2] == [4, 4]


def test_consensus_groups_recover_blocks():
    together = torch.zeros(6, 6)
    for block in ([0, 3], [1, 2, 5], [4]):
        together[torch.tensor(block)[:, None], torch.tensor(block)] = 0.9
    assert consensus_groups(together.fill_diagonal_(1), 3) == [[0, 3], [1, 2, 5], [4]]
    assert consensus_groups(together, 6) == [[h] for h in range(6)]


def test_settings_reject_bad_rules():
    with pytest.raises(ChaiError, match="calibration.rule"):
        settings_of({"rule": "knee"})
    with pytest.raises(ChaiError, match="threshold"):
        settings_of({"threshold": 1.5})
    assert settings_of({"sensitivity": {"n_docs": 2}})["sensitivity"] == {"n_docs": 2, "batch_size": 16}


def test_calibration_finds_planted_groups(tiny_llama, corpus):
    model, tokenizer = tiny_llama
    artifact = calibrate(planted(model), tokenizer, settings_of(SMALL), model_name="tiny_llama")
    shape = AttnShape.of(model.config)
    assert artifact["shape"]["heads"] == shape.heads and artifact["n_docs"] == SMALL["n_docs"]
    assert artifact["elbow"]["chosen"] == [2] * shape.layers
    assert artifact["static_groups"] == [PLANTED] * shape.layers
    inertia = torch.tensor(artifact["elbow"]["inertia"])  # [L, H]
    assert inertia.shape == (shape.layers, shape.heads) and (inertia[:, 1:] < 1e-4 * inertia[:, :1]).all()
    corr = torch.tensor(artifact["correlation"])  # [L, H, H]
    assert torch.allclose(corr[:, 0, 2], torch.ones(shape.layers), atol=1e-6)  # same group: correlation 1
    assert torch.allclose(torch.diagonal(corr, dim1=1, dim2=2), torch.ones(shape.layers, shape.heads), atol=1e-6)
    importance = torch.tensor(artifact["head_importance"])
    assert importance.shape == (shape.layers, shape.heads) and (importance > 0).all()
    sizes = torch.tensor(artifact["cluster_sizes"])  # [L, H + 1]: per-document cluster sizes at the chosen count
    assert sizes[:, 3].sum() == sizes[:, 5].sum() == shape.layers * SMALL["n_docs"]
    assert artifact["rules"]["kneedle"] == [2] * shape.layers and artifact["noise"]["threshold"] >= 3
    # sensitivity: clustering within the planted groups (k >= 2) changes nothing; one cluster does
    delta = torch.tensor(artifact["sensitivity"]["delta_loss"])  # [L, H]
    assert delta.shape == (shape.layers, shape.heads) and (delta[:, 1:].abs() < 1e-5).all()
    assert (delta[:, 0].abs() > 100 * delta[:, 1:].abs().max()).all() and artifact["sensitivity"]["n_docs"] == 3
    # the random (unplanted) model has no two-group structure
    plain = calibrate(model, tokenizer, settings_of({**SMALL, "sensitivity": {"n_docs": 0}}), model_name="tiny_llama")
    assert plain["elbow"]["chosen"] != artifact["elbow"]["chosen"] and "sensitivity" not in plain


def test_counts_override_and_load_or_calibrate(tiny_llama, corpus, tmp_path):
    model, tokenizer = tiny_llama
    model = planted(model)
    cfg = OmegaConf.create({"calibration": {**SMALL, "counts": [3, 2, 1]}, "model": {"hf_id": "tiny"}})
    context = RunContext(cfg, tokenizer, "tiny_llama", None, str(tmp_path))
    artifact = load_or_calibrate(model, context)
    path = artifact_path(str(tmp_path), "tiny_llama")
    assert path.exists() and artifact["elbow"]["chosen"] == [3, 2, 1]
    assert artifact["elbow"]["rule"].startswith("override")
    assert [len(g) for g in artifact["static_groups"]] == [3, 2, 1]
    # a present artifact is loaded, not recomputed
    path.write_text(json.dumps({**artifact, "time_s": -1.0}))
    assert load_or_calibrate(model, context)["time_s"] == -1.0
    # methods read it by their count rule (the override fixes only the artifact's own counts): CHAI's counts,
    # CHAI-static's groups
    method = build_method({"name": "chai", "layer_clusters": "auto", "count_rule": "threshold"})
    method.prepare(model, context)
    assert method.describe()["clusters_per_layer"] == [2, 2, 2]
    budget = build_method({"name": "chai", "count_rule": "budget", "budget": 0.25, "budget_of": "qk_work"})
    budget.prepare(model, context)
    counts = [8 if c == "dense" else c for c in budget.describe()["clusters_per_layer"]]
    shape = AttnShape.of(model.config)
    assert counts == cluster_counts.allocate(artifact["sensitivity"]["delta_loss"], shape, 0.25, "qk_work")
    assert cluster_counts.saving_of(counts, shape, "qk_work") >= 0.25
    static = build_method({"name": "chai_static", "layer_clusters": "auto", "count_rule": "threshold"})
    static.prepare(model, context)
    assert static.describe()["example_groups"]["1"] == PLANTED
    with torch.no_grad(), static.applied(model):
        model(random_ids(1, 6, 1000))
    assert static.run_stats().clustering_calls == 0
    # another count cuts the co-association matrix: the planted groups split no further than needed
    other = build_method({"name": "chai_static", "layer_clusters": [1, 2, 2]})
    other.prepare(model, context)
    assert other.describe()["example_groups"] == {"0": [list(range(8))], "1": PLANTED, "2": PLANTED}
    # an artifact of another shape, or none with auto off, fails with one line
    path.write_text(json.dumps({**artifact, "shape": {**artifact["shape"], "heads": 4}}))
    with pytest.raises(ChaiError, match="rerun"):
        load_or_calibrate(model, context)
    path.unlink()
    off = RunContext(OmegaConf.create({"calibration": {"auto": False}}), tokenizer, "tiny_llama", None, str(tmp_path))
    with pytest.raises(ChaiError, match="mode=calibrate"):
        load_or_calibrate(model, off)


def test_mode_runner_writes_the_artifact(corpus, tmp_path):
    cfg = OmegaConf.create({
        "model": OmegaConf.to_container(compose_model("tiny_llama")),
        "calibration": SMALL, "device": "cpu", "seed": 0, "data_dir": None, "results_dir": str(tmp_path),
    })
    out = run(cfg, {})
    assert out["calibration"]["path"] == str(artifact_path(str(tmp_path), "tiny_llama"))
    saved = json.loads(artifact_path(str(tmp_path), "tiny_llama").read_text())
    assert saved["elbow"]["chosen"] == out["calibration"]["chosen"] and len(saved["correlation"]) == 3


def test_no_artifact_and_no_tokenizer_names_the_command_that_makes_it(tiny_llama, tmp_path):
    cfg = OmegaConf.create({"calibration": SMALL})
    command = f"`python run.py mode=calibrate model=tiny_llama results_dir={tmp_path} model.tokenizer=...`"
    with pytest.raises(ChaiError, match=re.escape(command)):
        load_or_calibrate(tiny_llama[0], RunContext(cfg, None, "tiny_llama", None, str(tmp_path)))

"""KV-head compression (chai/methods/kv_compress.py) on tiny random models: keeping every KV head is MHA; the RoPE
key fold equals scoring with keys reconstructed here from the activations; rank-deficient heads compress exactly;
K,V bytes are kept/total of MHA's (analytic, and measured from real caches); the converted model is a real GQA
model (config, StaticCache, SDPA); exit restores every tensor; bad settings fail in one line; the LoRA recovery
lowers the held-out loss, and a second build with the same settings reads it from its cache, bit for bit."""

import copy

import pytest
import torch
from transformers import DynamicCache

from chai.attention import AttnShape, kv_bytes
from chai.bench import CACHE_ARG
from chai.evaluate import measure_kv_bytes_per_token
from chai.methods import RunContext, build_method
from chai.methods._kv_compress_fit import input_grams
from chai.methods.dejavu_static import attention_modules
from tests.conftest import random_ids
from tests.helpers import assert_one_line_error

MERGES = ("meanpool", "svd_w", "svd_a")


def method_on(model, calibration_ids=None, **settings):
    """A kv_compress method fitted on `model`, svd_a on the input Grams of `calibration_ids` (random text)."""
    method = build_method({"name": "kv_compress", **settings})
    ids = calibration_ids if calibration_ids is not None else random_ids(4, 24, vocab=1000, seed=11)
    grams, tokens = input_grams(model, [(ids, torch.full((ids.shape[0],), ids.shape[1]))])
    method.fit(model, grams, tokens)
    return method


@torch.no_grad()
def logits(model, ids, method=None):
    if method is None:
        return model(ids).logits
    with method.applied(model):
        return model(ids).logits


def as_complex(w: torch.Tensor) -> torch.Tensor:
    """[..., D, in] head rows -> [..., D/2, in] complex: pair i is rows i and i + D/2 (transformers' rotate_half)."""
    half = w.shape[-2] // 2
    return torch.complex(w[..., :half, :], w[..., half:, :])


def from_complex(z: torch.Tensor) -> torch.Tensor:
    return torch.cat([z.real, z.imag], dim=-2)


@pytest.mark.parametrize("keys", ["rope_exact", "meanpool"])
@pytest.mark.parametrize("merge", MERGES)
@pytest.mark.parametrize("name", ["tiny_llama", "tiny_opt", "tiny_gqa"])
def test_keeping_every_kv_head_is_mha(name, merge, keys, request):
    model, _ = request.getfixturevalue(name)
    kept = AttnShape.of(model.config).kv_heads
    ids = random_ids(2, 16, vocab=1000)
    method = method_on(model, merge=merge, keys=keys, kv_heads=kept)
    torch.testing.assert_close(logits(model, ids, method), logits(model, ids), rtol=0, atol=2e-5)


@torch.no_grad()
def reconstructed_twin(model, ids, kept):
    """The unconverted model whose K and V projections yield the keys and values the fold reconstructs, computed
    here from the activations themselves (independently of the method): per adjacent group and frequency pair, the
    top eigenvector c of E[z z^H] (z: the group's complex pair values), each head's pair -> c_s c^H z; values:
    P P^T v with P the top head_dim eigenvectors of the group's E[v v^T]."""
    shape, acts = AttnShape.of(model.config), {}
    d, half, g = shape.head_dim, shape.head_dim // 2, shape.kv_heads // kept
    modules = attention_modules(model)
    hooks = [getattr(m, proj).register_forward_hook(
        lambda _, __, out, key=(i, proj): acts.__setitem__(key, out.reshape(-1, out.shape[-1]).double()))
        for i, m in modules.items() for proj in ("k_proj", "v_proj")]
    model(ids)
    for hook in hooks:
        hook.remove()
    twin = copy.deepcopy(model)
    for i, module in attention_modules(twin).items():
        for start in range(0, shape.kv_heads, g):
            cols = slice(start * d, (start + g) * d)
            k = acts[i, "k_proj"][:, cols].reshape(-1, g, d)
            z = torch.complex(k[..., :half], k[..., half:])  # [N, g, half]
            top = torch.linalg.eigh(torch.einsum("nsi,nti->ist", z, z.conj()))[1][..., -1]  # [half, g]
            projector = top[:, :, None] * top.conj()[:, None, :]  # [half, g, g]
            w = module.k_proj.weight.data[cols].double().reshape(g, d, -1)
            folded = torch.einsum("ist,tip->sip", projector.to(torch.complex128), as_complex(w))
            module.k_proj.weight.data[cols] = from_complex(folded).reshape(g * d, -1).float()
            v = acts[i, "v_proj"][:, cols]
            p = torch.linalg.eigh(v.T @ v)[1][:, -d:]
            module.v_proj.weight.data[cols] = (p @ p.T @ module.v_proj.weight.data[cols].double()).float()
    return twin


@pytest.mark.parametrize("name,kept", [("tiny_llama", 1), ("tiny_llama", 2), ("tiny_llama", 4), ("tiny_gqa", 1)])
def test_rope_fold_equals_scoring_with_reconstructed_keys(name, kept, request):
    model, _ = request.getfixturevalue(name)
    calibration, ids = random_ids(4, 24, vocab=1000, seed=11), random_ids(2, 20, vocab=1000, seed=5)
    method = method_on(model, calibration, kv_heads=kept, merge="svd_a")
    twin = reconstructed_twin(model, calibration, kept)
    folded = logits(model, ids, method)
    torch.testing.assert_close(folded, logits(twin, ids), rtol=0, atol=1e-4)
    assert (folded - logits(model, ids)).abs().max() > 1e-2  # the truncation did change the model


def make_rank_deficient(model, groups, rope: bool, seed=0):
    """A copy of `model` in which, per layer, the K heads of each group are per-pair complex multiples (RoPE) or
    linear maps (no RoPE) of one head, and the V heads linear maps of one: one head per group holds all."""
    model = copy.deepcopy(model)
    shape = AttnShape.of(model.config)
    d, gen = shape.head_dim, torch.Generator().manual_seed(seed)
    rows = lambda s: slice(s * d, (s + 1) * d)  # noqa: E731
    for module in attention_modules(model).values():
        k, v = module.k_proj.weight.data, module.v_proj.weight.data
        for group in groups:
            base = group[0]
            for s in group[1:]:
                if rope:
                    scale = torch.randn(d // 2, 2, generator=gen)
                    c = torch.complex(scale[:, 0], scale[:, 1])[:, None]
                    k[rows(s)] = from_complex(c * as_complex(k[rows(base)]))
                else:
                    k[rows(s)] = torch.randn(d, d, generator=gen) @ k[rows(base)]
                v[rows(s)] = torch.randn(d, d, generator=gen) @ v[rows(base)]
                for linear in (module.k_proj, module.v_proj):
                    if linear.bias is not None:
                        linear.bias.data[rows(s)] = torch.randn(d, generator=gen) * 0  # in the span: no own bias
    return model


@pytest.mark.parametrize("merge", ["svd_w", "svd_a"])
@pytest.mark.parametrize("name", ["tiny_llama", "tiny_opt"])
def test_rank_deficient_heads_compress_exactly(name, merge, request):
    base, _ = request.getfixturevalue(name)
    model = make_rank_deficient(base, [(0, 1, 2, 3), (4, 5, 6, 7)], rope=name == "tiny_llama")
    ids = random_ids(2, 16, vocab=1000, seed=2)
    method = method_on(model, kv_heads=2, merge=merge)
    torch.testing.assert_close(logits(model, ids, method), logits(model, ids), rtol=0, atol=5e-5)
    assert max(method.describe()["k_residual"] + method.describe()["v_residual"]) < 1e-9
    meanpool = method_on(model, kv_heads=2, merge="meanpool")
    assert (logits(model, ids, meanpool) - logits(model, ids)).abs().max() > 1e-2  # the test can fail


def test_similarity_grouping_finds_the_heads_that_share_a_subspace(tiny_llama):
    groups = [(0, 5), (1, 4), (2, 7), (3, 6)]
    model = make_rank_deficient(tiny_llama[0], groups, rope=True, seed=1)
    ids = random_ids(2, 16, vocab=1000, seed=2)
    method = method_on(model, kv_heads=4, grouping="similarity")
    assert method.describe()["groups"] == {str(i): [list(g) for g in sorted(groups)] for i in range(3)}
    torch.testing.assert_close(logits(model, ids, method), logits(model, ids), rtol=0, atol=5e-5)
    adjacent = method_on(model, kv_heads=4)
    assert (logits(model, ids, adjacent) - logits(model, ids)).abs().max() > 1e-3


@pytest.mark.parametrize("kept", [1, 2, 4])
@pytest.mark.parametrize("name", ["tiny_llama", "tiny_opt"])
def test_kv_bytes_are_kept_over_total_of_mha(name, kept, request):
    model, _ = request.getfixturevalue(name)
    method = method_on(model, kv_heads=kept, merge="svd_w")
    mha = build_method({"name": "mha"})
    dense = mha.kv_bytes_per_token(model.config, 4)["k"]  # 3 layers x 8 heads x 8 dims x 4 bytes
    assert dense == 768
    assert method.kv_bytes_per_token(model.config, 4) == {"k": dense * kept // 8, "v": dense * kept // 8}
    ids = random_ids(1, 16)
    measured = measure_kv_bytes_per_token(model, method, ids)  # the method's own cache (make_cache)
    assert measured["k"] == measured["v"] == dense * kept // 8
    if name == "tiny_llama":  # a real GQA model: transformers' own DynamicCache holds only the kept heads
        with torch.no_grad(), method.applied(model):
            cache = DynamicCache(config=model.config)
            model(ids, **{CACHE_ARG: cache}, use_cache=True)
        assert kv_bytes(cache) == {"k": 16 * dense * kept // 8, "v": 16 * dense * kept // 8}


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_opt"])
def test_decoding_with_the_cache_matches_one_forward(name, request):
    model, _ = request.getfixturevalue(name)
    ids = random_ids(1, 12, seed=3)
    method = method_on(model, kv_heads=2)
    cache = method.make_cache(model)
    with torch.no_grad(), method.applied(model):
        full = model(ids).logits
        steps = [model(ids[:, t : t + 1], **{CACHE_ARG: cache}, use_cache=True).logits for t in range(ids.shape[1])]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name,kept", [("tiny_llama", 2), ("tiny_gqa", 1)])
def test_converted_model_is_a_real_gqa_model(name, kept, request):
    model, _ = request.getfixturevalue(name)
    shape = AttnShape.of(model.config)
    method = method_on(model, kv_heads=kept)
    ids = random_ids(1, 10, vocab=1000, seed=4)
    with torch.no_grad(), method.applied(model):
        assert model.config.num_key_value_heads == kept and model.config._attn_implementation == "sdpa"
        for module in attention_modules(model).values():
            assert module.k_proj.out_features == module.v_proj.out_features == kept * shape.head_dim
            assert module.k_proj.weight.shape[0] == kept * shape.head_dim
            assert module.num_key_value_groups == shape.heads // kept
        full = model(ids).logits
        cache = method.static_cache(model, 1, 16)
        prefill = model(ids[:, :-1], **{CACHE_ARG: cache}, use_cache=True).logits
        step = model(ids[:, -1:], **{CACHE_ARG: cache}, use_cache=True).logits
        assert tuple(cache.layers[0].keys.shape) == (1, kept, 16, shape.head_dim)
    torch.testing.assert_close(torch.cat([prefill, step], dim=1), full, rtol=0, atol=1e-5)
    assert model.config.num_key_value_heads == shape.kv_heads


@pytest.mark.parametrize("name", ["tiny_llama", "tiny_opt", "tiny_gqa"])
def test_exit_restores_the_model_bit_for_bit(name, request):
    model, _ = request.getfixturevalue(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    features = [(m.k_proj.out_features, m.q_proj.out_features) for m in attention_modules(model).values()]
    kv_config = getattr(model.config, "num_key_value_heads", None)
    method = method_on(model, kv_heads=1, grouping="similarity")
    with pytest.raises(RuntimeError), method.applied(model):
        raise RuntimeError("inside")  # a failure inside the block still restores
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert features == [(m.k_proj.out_features, m.q_proj.out_features) for m in attention_modules(model).values()]
    assert getattr(model.config, "num_key_value_heads", None) == kv_config


def test_calibrates_on_c4_once_and_reads_the_artifact_back(tiny_llama, tmp_path):
    from omegaconf import OmegaConf

    from chai.paths import data_dir

    if not (data_dir() / "c4" / "c4_validation_2k.jsonl").exists():
        pytest.skip("no C4 calibration file in the data directory")
    model, tokenizer = tiny_llama
    cfg = OmegaConf.create({"calibration": {"n_docs": 3, "seq_len": 16, "batch_size": 2}})
    context = RunContext(cfg, tokenizer, "tiny_llama", None, str(tmp_path))
    first = build_method({"name": "kv_compress", "kv_heads": 2})
    first.prepare(model, context)
    assert (tmp_path / "calibration" / "tiny_llama.kv_grams.pt").exists()
    assert first.describe()["calibration_tokens"] == 48
    second = build_method({"name": "kv_compress", "kv_heads": 2})
    second.prepare(model, context)  # read back, not recomputed: same fit up to the stored float32 Gram
    ids = random_ids(1, 8, vocab=1000)
    torch.testing.assert_close(logits(model, ids, first), logits(model, ids, second), rtol=0, atol=1e-4)


@pytest.mark.parametrize("settings,pattern", [
    ({"merge": "svda"}, "unknown kv_compress merge 'svda'. Did you mean 'svd_a'"),
    ({"grouping": "adjacnt"}, "Did you mean 'adjacent'"),
    ({"keys": "rope"}, "unknown kv_compress keys"),
    ({"kv_heads": 0}, "kv_heads must be null or an integer >= 1"),
    ({"ratio": 1.5}, r"ratio must be a number in \(0, 1\]"),
    ({"colour": 1}, "has no setting colour"),
])
def test_bad_settings_fail_in_one_line(settings, pattern):
    assert_one_line_error(lambda: build_method({"name": "kv_compress", **settings}), pattern)


def test_a_count_that_does_not_divide_the_kv_heads_fails_before_loading(tiny_llama):
    model, _ = tiny_llama
    method = build_method({"name": "kv_compress", "kv_heads": 3})
    valid = r"must divide the model's 8 KV heads \(valid: 1, 2, 4, 8\)"
    assert_one_line_error(lambda: method.check_shape(model.config), valid)
    assert build_method({"name": "kv_compress"}).kept(model.config) == 4  # ratio 0.5
    three = type("Config", (), {"num_attention_heads": 9, "num_key_value_heads": 3, "hidden_size": 576,
                                "num_hidden_layers": 30})()
    assert build_method({"name": "kv_compress"}).kept(three) == 1  # SmolLM2 as shipped: 1.5 -> 1 of {1, 3}


def test_labels_state_the_heads_really_kept():
    from chai.methods import display_of

    settings = {"name": "kv_compress", "kv_heads": None, "ratio": 0.5, "grouping": "adjacent", "merge": "svd_a",
                "keys": "rope_exact"}
    assert display_of(settings)["label"] == "KV-compress svd_a 50% KV heads"
    assert display_of(settings, {"kv_heads": 3, "kv_heads_before": 9})["label"] == "KV-compress svd_a 3/9 KV heads"


def test_bench_runs_the_converted_model_on_its_dynamic_and_static_caches(tmp_path):
    """mode=bench, no runner naming the method: both cache paths hold a quarter of MHA's K,V at 2 of 8 KV heads."""
    from chai.cli import run_mode
    from chai.records import read_jsonl
    from tests.helpers import compose_cfg

    cfg = compose_cfg([f"results_dir={tmp_path}", "logger.wandb.mode=disabled", "device=cpu", "model=tiny_llama",
                       "mode=bench", "experiment_name=bench", "bench.batch_sizes=[1]", "bench.seq_lens=[12]",
                       "bench.new_tokens=3", "bench.bandwidth_bytes=1048576", "bench.warmup=0",
                       "bench.paths=[sdpa,method,method_static]", "method=kv_compress", "method.merge=meanpool",
                       "method.kv_heads=2"])
    run_mode(cfg, overrides=[])
    records = read_jsonl(tmp_path / "bench" / "runs.jsonl")
    cells = {c["bench"]["path"]: c for c in records if c.get("kind") == "bench_cell"}
    assert not any(c["error"] for c in cells.values())
    held = {path: c["bench"]["kv_bytes"] for path, c in cells.items()}
    for path in ("method", "method_static"):
        assert held[path]["measured_cache"] == held[path]["analytic"]
    assert held["method"]["measured_cache"] * 4 == held["sdpa"]["measured_cache"]


# Recovery (LoRA on the converted model). Text here: greedy continuations of a sharpened copy of tiny_llama (a
# random model's loss on real text says nothing); the C4 path is checked separately, with the data directory.
RECOVERY = {"kv_heads": 1, "recovery_steps": 8, "recovery_lr": 3e-3, "recovery_rank": 4, "recovery_batch": 16}


@torch.no_grad()
def greedy_text(model, n: int, length: int) -> torch.Tensor:
    ids = random_ids(n, 1, vocab=1000, seed=7)  # [n, 1] first tokens
    for _ in range(length - 1):
        ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def fingerprint(model) -> tuple:
    """What a leftover adapter would change: module types, parameter names and flags, the model's own attributes."""
    return ([type(m).__name__ for m in model.modules()],
            [(n, p.requires_grad) for n, p in model.named_parameters()], sorted(vars(model)))


@pytest.fixture(scope="module")
def recovered(tiny_llama):
    """(model, method, held-out batches, state before recovery): a sharpened tiny_llama, recovered on its own text."""
    from chai.methods._kv_compress_recovery import split_batches

    model = copy.deepcopy(tiny_llama[0])
    model.model.norm.weight.data *= 16  # peaked next-token distributions: text with structure to recover
    text = greedy_text(model, 96, 16)
    before = ({k: v.clone() for k, v in model.state_dict().items()}, fingerprint(model))
    method = method_on(model, text[:8], **RECOVERY)
    heldout, train = split_batches(list(text), 16, 16, pad=0)
    method.train_recovery(model, heldout, train, seed=0)
    return model, method, heldout, before


def test_recovery_off_changes_nothing(tiny_llama):
    model, _ = tiny_llama
    ids = random_ids(2, 16, vocab=1000, seed=2)
    plain = method_on(model, kv_heads=2)
    off = method_on(model, kv_heads=2, recovery_rank=2, recovery_lr=1.0, recovery_batch=3)  # steps 0: all moot
    assert torch.equal(logits(model, ids, off), logits(model, ids, plain))
    assert "recovery" not in off.describe() and off.variant(off.settings()) == plain.variant(plain.settings())


def test_recovery_lowers_the_held_out_loss_and_records_its_cost(recovered):
    from chai.methods._kv_compress_recovery import heldout_loss
    from chai.runners.record import method_facts

    model, method, heldout, _ = recovered
    facts = method_facts(method)
    cost = facts["method_info"]["recovery"]
    assert cost["steps"] == 8 and cost["tokens"] == 8 * 16 * 16 and 0 < cost["train_s"] <= cost["wall_s"]
    assert cost["heldout_loss_after"] < cost["heldout_loss_before"] - 0.05
    with torch.no_grad(), method.applied(model):  # the stored number is the model every later run applies
        assert heldout_loss(model, heldout) == cost["heldout_loss_after"]
    assert facts["display"]["label"].endswith("1/8 KV heads + LoRA 8 steps")


def test_recovery_leaves_no_adapter_and_exit_restores_the_originals(recovered):
    model, method, _, (state, marks) = recovered
    assert fingerprint(model) == marks  # no wrapper, peft attribute or changed requires_grad after training
    plain = method_on(model, kv_heads=1)
    with torch.no_grad(), plain.applied(model):
        converted = fingerprint(model)
    with torch.no_grad(), method.applied(model):
        assert fingerprint(model) == converted  # the same plain converted model, only its weights differ
        for module in attention_modules(model).values():
            assert not module._forward_hooks and not module.q_proj._forward_hooks
    after = model.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state)


def test_recovered_weights_differ_only_in_the_attention_projections(recovered):
    model, method, _, _ = recovered
    plain = method_on(model, kv_heads=1)
    with torch.no_grad(), plain.applied(model):
        converted = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad(), method.applied(model):
        changed = {k for k, v in model.state_dict().items() if not torch.equal(v, converted[k])}
    assert changed and all(k.split(".")[-2] in ("q_proj", "k_proj", "v_proj", "o_proj") for k in changed)


def test_recovery_refuses_shared_copies(tiny_opt):
    model, _ = tiny_opt
    method = method_on(model, kv_heads=2, recovery_steps=1)
    batch = [(random_ids(1, 8, vocab=1000), torch.tensor([8]))]
    assert_one_line_error(lambda: method.train_recovery(model, batch, iter(batch)), "no recovery where attention")


def test_recovery_reads_c4_documents_the_grams_never_saw(tiny_llama, tmp_path):
    from omegaconf import OmegaConf

    from chai.calibration import documents, settings_of
    from chai.methods._kv_compress_recovery import recovery_documents
    from chai.paths import data_dir

    if not (data_dir() / "c4" / "c4_validation_2k.jsonl").exists():
        pytest.skip("no C4 file in the data directory")
    model, tokenizer = tiny_llama
    calibration = settings_of({"n_docs": 3, "seq_len": 16, "batch_size": 2, "sensitivity": {"n_docs": 2}})
    docs, skipped = recovery_documents(tokenizer, calibration, calibration["corpus"], 12, 4)
    assert skipped == 5 and torch.equal(docs[0], documents(tokenizer, calibration, count=6)[5][:12])
    cfg = OmegaConf.create({"calibration": {"n_docs": 3, "seq_len": 16, "batch_size": 2}, "seed": 0})
    method = build_method({"name": "kv_compress", "kv_heads": 2, "merge": "svd_w", "recovery_steps": 2,
                           "recovery_batch": 2, "recovery_seq_len": 16, "recovery_heldout": 2})
    method.prepare(model, RunContext(cfg, tokenizer, "tiny_llama", None, str(tmp_path)))
    cost = method.describe()["recovery"]
    assert cost["documents_skipped"] == 0 and cost["documents_seen"] == 4 and cost["corpus"].startswith("c4/")


@pytest.mark.parametrize("settings,pattern", [
    ({"recovery_steps": -1}, "recovery_steps must be an integer >= 0"),
    ({"recovery_rank": 0}, "recovery_rank must be an integer >= 1"),
    ({"recovery_batch": 2.5}, "recovery_batch must be an integer >= 1"),
    ({"recovery_lr": 0}, "recovery_lr must be a number > 0"),
    ({"recovery_corpus": "wikitext2/wiki.test.raw"}, "recovery_corpus must be a .jsonl file"),
])
def test_bad_recovery_settings_fail_in_one_line(settings, pattern):
    assert_one_line_error(lambda: build_method({"name": "kv_compress", **settings}), pattern)


# The recovery cache: a sweep's later jobs read the adapters the first trained. Text: a small corpus written here
# (Grams and recovery read disjoint documents of it), so these run without the data directory.
CACHED = {"kv_heads": 2, "recovery_steps": 2, "recovery_batch": 2, "recovery_seq_len": 16, "recovery_heldout": 2,
          "recovery_corpus": "tiny.jsonl"}


@pytest.fixture(scope="module")
def recovery_dirs(tmp_path_factory):
    """(data directory with tiny.jsonl, results directory): one per module, so the cache is shared by its tests."""
    import json

    data = tmp_path_factory.mktemp("data")
    lines = [json.dumps({"text": " ".join(f"word{(7 * d + 3 * w) % 41}" for w in range(24))}) for d in range(16)]
    (data / "tiny.jsonl").write_text("\n".join(lines) + "\n")
    return str(data), str(tmp_path_factory.mktemp("results"))


def prepared(model_and_tokenizer, dirs, seed=0, calibration=None, **settings):
    """A kv_compress method prepared like a run's (svd_a Grams, recovery) on `dirs` = (data, results)."""
    from omegaconf import OmegaConf

    model, tokenizer = model_and_tokenizer
    calibration = {"corpus": "tiny.jsonl", "n_docs": 3, "seq_len": 16, "batch_size": 2, "sensitivity": {"n_docs": 0},
                   **(calibration or {})}
    cfg = OmegaConf.create({"calibration": calibration, "seed": seed})
    method = build_method({"name": "kv_compress", **CACHED, **settings})
    method.prepare(model, RunContext(cfg, tokenizer, "tiny_llama", *dirs))
    return method


def refuse_training(*args, **kwargs):
    raise AssertionError("trained again: the cached recovery was not read")


@pytest.fixture(scope="module")
def trained_once(tiny_llama, recovery_dirs):
    """The first build: trains the recovery and caches it."""
    method = prepared(tiny_llama, recovery_dirs)
    assert method.describe()["recovery"]["from_cache"] is False
    return method


def test_a_second_build_reads_the_cached_recovery(tiny_llama, recovery_dirs, trained_once, monkeypatch):
    from pathlib import Path

    monkeypatch.setattr("chai.methods._kv_compress_recovery.train_lora", refuse_training)
    second = prepared(tiny_llama, recovery_dirs)
    trained, read = trained_once.describe()["recovery"], second.describe()["recovery"]
    assert read == {**trained, "from_cache": True}  # steps, tokens, seconds and held-out losses of the training
    assert trained["steps"] == 2 and trained["heldout_loss_after"] != trained["heldout_loss_before"]
    ids = random_ids(2, 12, vocab=1000, seed=6)
    model = tiny_llama[0]
    assert torch.equal(logits(model, ids, second), logits(model, ids, trained_once))  # bit for bit
    fold_alone = prepared(tiny_llama, recovery_dirs, recovery_steps=0)
    assert not torch.equal(logits(model, ids, second), logits(model, ids, fold_alone))  # the adapters are in
    assert not list((Path(recovery_dirs[1]) / "calibration").glob("*.partial"))  # renamed into place, none left


@pytest.mark.parametrize("change", [{"recovery_rank": 2}, {"kv_heads": 4}, {"seed": 1}, {"calibration": {"n_docs": 4}}],
                         ids=lambda change: next(iter(change)))
def test_a_changed_setting_trains_again_and_keeps_the_first(tiny_llama, recovery_dirs, trained_once, monkeypatch,
                                                             change):
    from chai.methods import _kv_compress_recovery

    calls, train_lora = [], _kv_compress_recovery.train_lora

    def counted(*args, **kwargs):
        calls.append(args)
        return train_lora(*args, **kwargs)

    monkeypatch.setattr(_kv_compress_recovery, "train_lora", counted)
    changed = prepared(tiny_llama, recovery_dirs, **change)
    assert len(calls) == 1 and changed.describe()["recovery"]["from_cache"] is False
    monkeypatch.setattr(_kv_compress_recovery, "train_lora", refuse_training)
    again = prepared(tiny_llama, recovery_dirs)  # the first settings still find their own file
    assert again.describe()["recovery"] == {**trained_once.describe()["recovery"], "from_cache": True}

"""Model loading: tiny random models from configs, the GQA -> MHA expansion, the embedded SmolLM2."""

import pytest
import torch

from chai.attention import AttnShape
from chai.config import compose_model
from chai.models import expand_kv_heads, load_model
from tests.conftest import random_ids


def test_tiny_models_are_built_from_their_configs(tiny_llama, tiny_opt):
    assert AttnShape.of(tiny_llama[0].config) == AttnShape(3, 8, 8, 8)
    assert AttnShape.of(tiny_opt[0].config) == AttnShape(3, 8, 8, 8)
    assert tiny_llama[1] is not None  # borrowed SmolLM2 tokenizer


def test_random_init_is_reproducible():
    a, _ = load_model(compose_model("tiny_llama"), device="cpu", seed=3)
    b, _ = load_model(compose_model("tiny_llama"), device="cpu", seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("name,layers", [("tiny_opt", "model.decoder.layers"), ("tiny_llama", "model.layers")])
def test_spread_random_init_follows_its_device_map(name, layers):
    """The multi-GPU random build (OPT-66B over two GPUs), on the CPU: every parameter materialised where the map
    says, the output head still tied to the embedding, the model's own initialiser (norms at one), a finite
    forward. `_module_device` takes the longest matching prefix."""
    from chai.models import _module_device, _spread_random_model, architecture

    config = architecture(compose_model(name))
    device_map = {"": "cpu", layers: "cpu", f"{layers}.1": "cpu"}
    assert _module_device(f"{layers}.1.mlp.weight", device_map) == "cpu"
    assert _module_device(f"{layers}.12.x", {"": 0, layers: 1, f"{layers}.1": 2}) == 1
    model = _spread_random_model(config, torch.float32, seed=0, device_map=device_map)
    assert not any(p.is_meta for p in model.parameters())
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == config.tie_word_embeddings
    norms = [p for n, p in model.named_parameters() if "norm" in n and n.endswith("weight")]
    assert norms and all(torch.equal(p, torch.ones_like(p)) for p in norms)
    with torch.no_grad():
        assert torch.isfinite(model(random_ids(2, 6, config.vocab_size)).logits).all()


def test_paper_shapes_come_from_the_config_without_download():
    from chai.models import architecture

    assert AttnShape.of(architecture(compose_model("llama7b"))) == AttnShape(32, 32, 32, 128)
    assert AttnShape.of(architecture(compose_model("llama33b"))) == AttnShape(60, 52, 52, 128)
    assert AttnShape.of(architecture(compose_model("opt66b"))) == AttnShape(64, 72, 72, 128)


def test_expand_kv_heads_is_exactly_equivalent():
    cfg = compose_model("tiny_llama")
    cfg.arch.num_key_value_heads = 2
    model, _ = load_model(cfg, device="cpu", seed=0)
    expanded = expand_kv_heads(model)
    assert expanded.config.num_key_value_heads == 8
    ids = random_ids(2, 12)
    with torch.no_grad():
        torch.testing.assert_close(expanded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_smollm2_prefers_the_right_ending(smollm2, piqa_rows):
    model, tokenizer = smollm2
    assert AttnShape.of(model.config) == AttnShape(30, 9, 3, 64)

    def logprob(prompt, ending):
        ids = tokenizer(prompt + " " + ending, return_tensors="pt").input_ids
        start = len(tokenizer(prompt).input_ids)
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
        return logp[torch.arange(start - 1, ids.shape[1] - 1), ids[0, start:]].sum().item()

    rows = piqa_rows[:10]
    right = sum(
        logprob(f"Question: {r['goal']}\nAnswer:", r[f"sol{r['label'] + 1}"])
        > logprob(f"Question: {r['goal']}\nAnswer:", r[f"sol{2 - r['label']}"])
        for r in rows
    )
    assert right >= 7, f"SmolLM2 picked the right PIQA ending only {right}/10 times"

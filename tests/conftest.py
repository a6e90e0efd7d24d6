"""Shared fixtures: tiny random models built from configs, the embedded SmolLM2, real rows from the data dir.
Everything offline, CPU, float32."""

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")

from chai.config import compose_model  # noqa: E402
from chai.models import load_model  # noqa: E402
from chai.paths import data_dir  # noqa: E402


def _load(name: str, **overrides):
    cfg = compose_model(name)
    for key, value in overrides.items():
        cfg[key] = value
    return load_model(cfg, device="cpu", seed=0)


@pytest.fixture(scope="session")
def tiny_llama():
    """(model, tokenizer): 3 layers x 8 heads, head_dim 8, random weights."""
    return _load("tiny_llama")


@pytest.fixture(scope="session")
def tiny_opt():
    return _load("tiny_opt")


@pytest.fixture(scope="session", params=["tiny_llama", "tiny_opt"])
def tiny_model(request):
    """Each tiny architecture in turn: (model, tokenizer)."""
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="session")
def smollm2():
    """The embedded default model (real weights, 9 query heads over 3 KV heads)."""
    return _load("smollm2")


@pytest.fixture(scope="session")
def piqa_rows():
    """The first 20 real PIQA validation rows from the data directory."""
    path = data_dir() / "piqa" / "piqa_validation.jsonl"
    if not path.exists():
        pytest.skip(f"no data directory with {path}")
    with path.open() as f:
        return [json.loads(next(f)) for _ in range(20)]


def build_tiny_gqa(layers: int = 3, vocab: int = 1000):
    """A tiny random Llama with 8 query heads over 2 KV heads, head_dim 8 (SmolLM2's grouped layout, smaller)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "llama", hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=8,
        num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=256,
    )
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.set_attn_implementation("sdpa")
    return model.eval()


@pytest.fixture(scope="session")
def tiny_gqa():
    """(model, None): `build_tiny_gqa()` with 3 layers; ids below 1000."""
    return build_tiny_gqa(), None


def random_ids(batch: int, length: int, vocab: int = 49152, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=generator)

"""kv_compress's optional recovery: a short LoRA fine-tune (peft) of the converted model (the paper's recovery step).

Targets are the attention projections the conversion rewrote (q, k, v, o): they are where the fit's truncation
error lives, and adapting only them keeps the recovered model a plain converted model with the same shapes (the
K,V bytes do not change). Everything else stays frozen. After training the adapters are read out as factors
(scale * B [out, r], A [r, in]), peft's wrappers are unloaded without merging, and the method merges W + (scale B) A
into the converted weights each time it is applied; the original weights it saved are never touched.

Text: `corpus` under the data directory (default the C4 train head, a split the Grams never read). If it is the
calibration corpus, the documents the calibration and its sensitivity table read are skipped. The first
`heldout` documents are the held-out slice (loss before / after, and the uncompressed model's); training reads the
next steps x batch documents, cycling if the file has fewer.

Cache: training is the slow part (~40 s per run for SmolLM2 on an H200) and a sweep over tasks rebuilds the method
per job, so the factors and the training's facts are kept at results/calibration/<model>.<digest>.kv_recovery.pt,
digest = hash of the key (everything the adapters depend on, kv_compress.KVCompress.recovery_key). A file is used
only if its stored key equals the wanted one; it is written atomically, so parallel jobs never read half a file.
"""

import hashlib
import itertools
import json
import time
from pathlib import Path

import torch

from chai.methods._kv_compress_fit import save_atomically
from chai.methods.dejavu_static import attention_modules
from chai.paths import results_dir
from chai.sensitivity import padded_batches

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "out_proj")


def recovery_documents(tokenizer, calibration: dict, corpus: str, seq_len: int, count: int, data_dir=None):
    """(documents, skipped): `count` documents of `corpus` cut to `seq_len`, disjoint from the calibration's."""
    from chai.calibration import documents

    skipped = calibration["n_docs"] + calibration["sensitivity"]["n_docs"] if corpus == calibration["corpus"] else 0
    # the same length filter as calibration (feature_tokens), so document i here is document i there
    settings = {**calibration, "corpus": corpus, "seq_len": seq_len}
    docs = documents(tokenizer, settings, data_dir, count=skipped + count)[skipped:]
    return docs, skipped


def split_batches(docs: list, heldout: int, size: int, pad: int) -> tuple[list, object]:
    """(held-out batches, endless training batches): the first `heldout` documents, then the rest in a cycle."""
    test = list(padded_batches(docs[:heldout], size, pad))
    return test, itertools.cycle(list(padded_batches(docs[heldout:], size, pad)))


def token_loss(model, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the real tokens of right-padded `ids` [B, T]."""
    logits = model(ids.to(model.device), use_cache=False).logits.float()  # [B, T, V]
    targets = ids[:, 1:].to(logits.device)
    real = (torch.arange(ids.shape[1] - 1, device=logits.device)[None] < (lengths.to(logits.device) - 1)[:, None])
    losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets, reduction="none")
    return (losses * real).sum() / real.sum().clamp(min=1)


@torch.no_grad()
def heldout_loss(model, batches: list) -> float:
    """Token-weighted mean loss over `batches` of (ids, lengths)."""
    total = sum(float(token_loss(model, ids, n)) * int((n - 1).clamp(min=0).sum()) for ids, n in batches)
    return total / max(1, sum(int((n - 1).clamp(min=0).sum()) for _, n in batches))


def _target_names(model) -> list[str]:
    """Full module names of the attention projections (never an MLP layer that happens to share a name)."""
    prefix = {module: name for name, module in model.named_modules()}
    return [f"{prefix[m]}.{t}" for m in attention_modules(model).values() for t in TARGETS if hasattr(m, t)]


def train_lora(model, batches, steps: int, rank: int, alpha: float, lr: float, seed: int) -> tuple[dict, dict]:
    """LoRA on the attention projections of `model` (converted, in place) for `steps` AdamW steps over `batches`
    (an iterator of (ids, lengths)). Returns ({(layer, projection): (scale * B, A)}, facts); the model leaves with
    no adapter, wrapper, attribute or changed requires_grad."""
    from peft import LoraConfig, LoraModel

    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=_target_names(model), bias="none")
    with torch.random.fork_rng(devices=[model.device] if model.device.type == "cuda" else []):
        torch.manual_seed(seed)  # A's init: the same adapters on every run
        tuner = LoraModel(model, config, "recovery")
    was_training, tokens, started = model.training, 0, time.perf_counter()
    try:
        params = [p for name, p in model.named_parameters() if "lora_" in name]
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        model.train()  # no dropout in these models' attention; train() only for hooks that check the mode
        for ids, lengths in itertools.islice(batches, steps):
            with torch.enable_grad():  # a caller's no_grad (a runner's scope) must not silently skip training
                loss = token_loss(model, ids, lengths)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            optimizer.step()
            tokens += int(lengths.sum())
        factors = _factors(model)
    finally:
        model.train(was_training)
        tuner.unload()  # peft's wrappers out, base layers back, nothing merged
        if "peft_config" in vars(model):
            del model.peft_config
        for name, p in model.named_parameters():
            p.requires_grad_(trainable[name])
            p.grad = None
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    return factors, {"steps": steps, "tokens": tokens, "train_s": round(time.perf_counter() - started, 3),
                     "trained_parameters": sum(a.numel() + b.numel() for b, a in factors.values())}


def _factors(model) -> dict:
    """{(layer, projection): (scale * B [out, r], A [r, in]) float32} read from peft's adapters."""
    found = {}
    for layer, module in attention_modules(model).items():
        for name in TARGETS:
            wrapper = getattr(module, name, None)
            if wrapper is not None and hasattr(wrapper, "lora_A"):
                a = wrapper.lora_A["recovery"].weight.detach().float().clone()
                b = wrapper.lora_B["recovery"].weight.detach().float().clone() * wrapper.scaling["recovery"]
                found[layer, name] = (b, a)
    return found


def merged(weight: torch.Tensor, factor: tuple) -> torch.Tensor:
    """W + (scale B) A in float32, back in W's dtype and device: a new tensor, `weight` is not written."""
    b, a = (t.to(weight.device) for t in factor)
    return (weight.float() + b @ a).to(weight.dtype)


def cache_path(results: str | None, model_name: str, key: dict) -> Path:
    """Where the recovery of `key` is cached: one file per key, so different settings never share one."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return results_dir(results) / "calibration" / f"{model_name}.{digest}.kv_recovery.pt"


def load_cached(path: Path, key: dict) -> tuple[dict, dict] | None:
    """(factors, the training's facts) cached at `path` for `key`; None when there is none for it."""
    if not path.exists():
        return None
    saved = torch.load(path, map_location="cpu")  # merged() moves each factor to its weight's device
    if saved["key"] != key:  # a digest collision or an older layout: train, and overwrite it
        return None
    return {(layer, name): (b, a) for layer, name, b, a in saved["factors"]}, saved["facts"]


def save_cached(path: Path, key: dict, factors: dict, facts: dict) -> None:
    """The factors on the CPU (a run on another device reads them), as rows: plain types load with weights_only."""
    rows = [(layer, name, b.cpu(), a.cpu()) for (layer, name), (b, a) in sorted(factors.items())]
    save_atomically({"key": key, "factors": rows, "facts": facts}, path)

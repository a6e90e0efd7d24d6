"""What every mode runner does first: build the method (bad settings fail before any model loads), load the model
and its tokenizer, and prepare the method on them (offline artifacts: CHAI's calibration, DejaVu's head scores)."""

import json
from dataclasses import dataclass

import torch
from omegaconf import OmegaConf

from chai.errors import ChaiError
from chai.methods import Method, RunContext, build_method
from chai.models import load_model, load_tokenizer


@dataclass
class Setup:
    model: object
    tokenizer: object  # None when the model has none offline and the runner needs none (bench: random token ids)
    method: Method | None  # None for the modes that run the model alone (calibrate, membership)
    context: RunContext


# One model per process, kept for the next job of a Hydra multirun (methods undo themselves when removed). Only for a
# runner whose result cannot depend on the random state a fresh load leaves behind (bench: its own seeded inputs).
_KEPT: dict = {}


def setup(cfg, need_tokenizer: bool = True, with_method: bool = True, keep_model: bool = False) -> Setup:
    """The model of `cfg.model` (kept across multirun jobs with `keep_model`), its tokenizer (a one-line error when
    `need_tokenizer` and it has none offline), and `cfg.method` built and prepared (`with_method`)."""
    method = build_method(cfg.method) if with_method else None
    tokenizer = load_tokenizer(cfg.model)  # before the weights: what it lacks fails in one line, and fast
    if need_tokenizer and tokenizer is None:
        raise ChaiError(f"model '{cfg.model.name}' has no tokenizer offline: set model.tokenizer=smollm2 or a path.")
    if method is not None and tokenizer is not None:
        method.check_tokenizer(tokenizer)
    model = kept_model(cfg) if keep_model else load_model(model_only(cfg.model), cfg.device, cfg.seed)[0]
    # The tokenizer also lets a method make a missing offline artifact (CHAI's calibration) in any mode.
    context = RunContext(cfg, tokenizer, cfg.model.name, cfg.data_dir, cfg.results_dir)
    if method is not None:
        method.prepare(model, context)
    return Setup(model, tokenizer, method, context)


def model_only(model_cfg):
    """The model config with `tokenizer: none` (the loader then loads no tokenizer; `setup` loads it once)."""
    found = OmegaConf.create(OmegaConf.to_container(model_cfg, resolve=True))
    found.tokenizer = "none"
    return found


def kept_model(cfg):
    model_cfg = model_only(cfg.model)
    key = json.dumps([OmegaConf.to_container(model_cfg), cfg.device, cfg.seed], sort_keys=True)
    if key not in _KEPT:
        _KEPT.clear()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        _KEPT[key] = load_model(model_cfg, cfg.device, cfg.seed)[0]
    return _KEPT[key]


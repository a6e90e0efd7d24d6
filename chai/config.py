"""Config checks that run before any model loads: unknown group choices get one line with the valid names."""

import contextlib
import os
import sys

from omegaconf import OmegaConf

from chai.errors import did_you_mean, require
from chai.paths import CONF_DIR

GROUPS = ("method", "model", "task")
CHECKED = GROUPS + ("experiment",)
MODES = ("eval", "calibrate", "bench", "membership", "capacity")
INITS = ("pretrained", "random")
# `offline=true` sets these (run.py before anything imports huggingface_hub, which reads them once; models.offline_hub
# again around the run).
OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def choices(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def compose_model(name: str):
    """A model config by name, outside Hydra (e.g. a tiny model borrowing SmolLM2's tokenizer)."""
    if name not in choices("model"):
        raise did_you_mean("model", name, choices("model"))
    return OmegaConf.load(CONF_DIR / "model" / f"{name}.yaml")


@contextlib.contextmanager
def offline_hub():
    """Nothing waits on the network: hub and datasets lookups fail at once when a file is not local."""
    saved = {k: os.environ.get(k) for k in OFFLINE_ENV}
    os.environ.update({k: "1" for k in saved})
    try:
        yield
    finally:
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)


def check_init(model_cfg) -> None:
    require(model_cfg.init in INITS, f"model.init must be 'pretrained' or 'random', got '{model_cfg.init}'.")


def check_overrides(argv: list[str]) -> None:
    """Reject `method=typo` before Hydra prints its multi-line error (and before a multirun starts jobs)."""
    for arg in argv:
        key, sep, value = arg.lstrip("+~").partition("=")
        if not sep or key not in CHECKED + ("mode",) or "(" in value:  # leave sweep functions to Hydra
            continue
        valid = MODES if key == "mode" else choices(key)
        for item in value.split(","):  # multirun: method=mha,chai
            if item and item not in valid:
                raise did_you_mean(key, item, valid)


if __name__ == "__main__":  # pragma: no cover
    check_overrides(sys.argv[1:])

"""Test helpers shared across test files (not fixtures)."""

from hydra import compose, initialize_config_dir

from chai.paths import CONF_DIR


def compose_cfg(overrides: list[str]):
    """The config `python run.py <overrides>` would run, composed in-process."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def assert_one_line_error(make, pattern: str) -> None:
    """`make()` raises a ChaiError matching `pattern` whose message is one line (what run.py prints)."""
    import pytest

    from chai.errors import ChaiError

    with pytest.raises(ChaiError, match=pattern) as err:
        make()
    assert "\n" not in str(err.value)


def logits(model, ids, method=None):
    """The model's logits for `ids`, under `method` when given (applied only for this forward)."""
    import torch

    with torch.no_grad():
        if method is None:
            return model(ids).logits
        with method.applied(model):
            return model(ids).logits

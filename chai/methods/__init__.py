"""Method registry. A method is one module in this folder that decorates its class with `@register`, plus one
`conf/method/<name>.yaml`; nothing else names it."""

import importlib
import pkgutil

from chai.errors import ChaiError, did_you_mean
from chai.methods.base import Method, RunContext

METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls
    return cls


def _discover() -> None:
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")


def build_method(method_cfg) -> Method:
    """A validated method instance from a `conf/method/*.yaml` (its `name` picks the class)."""
    _discover()
    settings = dict(method_cfg)
    name = settings.pop("name")
    if name not in METHODS:
        raise did_you_mean("method", name, METHODS)
    fields = METHODS[name].__dataclass_fields__
    unknown = sorted(set(settings) - set(fields))
    if unknown:
        raise ChaiError(f"method '{name}' has no setting {', '.join(unknown)}. Valid: {', '.join(sorted(fields))}.")
    return METHODS[name](**settings)


def display_of(method_cfg: dict, facts: dict | None = None) -> dict | None:
    """How tables and figures show a method config (`Method.display`); None for a method not registered. A failed
    run has no facts: its display comes from its settings alone, so its record still names what it was."""
    _discover()
    settings = dict(method_cfg)
    cls = METHODS.get(settings.pop("name", None))
    return None if cls is None else cls.display(settings, facts)


__all__ = ["METHODS", "Method", "RunContext", "build_method", "display_of", "register"]

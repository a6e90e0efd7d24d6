"""A method's settings have one home: the fields of its dataclass in chai/methods/. Hydra gets them from there.

conf/method/<name>.yaml holds the method's `name` and only what differs from its dataclass; its defaults list
starts with `/method_defaults/<name>@_here_`, a config node registered here (Hydra's ConfigStore) from the
dataclass's fields. So `python run.py --cfg job method=chai` shows every setting, `method.num_clusters=4`
overrides one, and a misspelt setting is refused by Hydra, as before.

The fields are read from the source (Python's `ast`), not by importing the classes: the method modules import torch
(10-20 s), and Hydra composes the config before preflight's second-long checks. Only literal defaults
(`x: int = 3`, `field(default=...)`, `field(default_factory=list)`) are allowed, which is all a setting needs;
anything else is an error here, and tests/test_config.py checks that what is read equals `dataclasses.fields` of
every registered class.

Registered when `chai` is imported (chai/__init__.py): every place that composes conf/ imports chai first.
"""

import ast
from functools import cache
from pathlib import Path

METHODS_DIR = Path(__file__).resolve().parent / "methods"
GROUP = "method_defaults"  # ConfigStore group: conf/method/<name>.yaml lists /method_defaults/<name>@_here_
MISSING = "???"  # a field without a default: Hydra's mandatory value
FACTORIES = {"list": list, "dict": dict}  # field(default_factory=list): an empty list
CLASS_DICTS = ("missing_means", "moot_unless")  # literal dict class attributes read here (see `_class_attribute`)


def _default(node: ast.expr, where: str):
    """The literal default of a field: `= value`, `= field(default=value)` or `= field(default_factory=list)`."""
    if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "field":
        given = {k.arg: k.value for k in node.keywords}
        factory = getattr(given.get("default_factory"), "id", None)
        if factory in FACTORIES:
            return FACTORIES[factory]()
        if "default" not in given:
            raise ValueError(f"{where}: a setting's default must be a literal (field(default=...)), "
                             f"not {ast.unparse(node)}")
        node = given["default"]
    try:
        return ast.literal_eval(node)
    except ValueError:
        raise ValueError(f"{where}: a setting's default must be a literal, not {ast.unparse(node)}") from None


def _literal(node: ast.expr):
    try:
        return ast.literal_eval(node)
    except ValueError:  # not a literal: no method name this module can read (a registered method must have one)
        return None


def _is_setting(statement: ast.stmt) -> bool:
    """An annotated class attribute that is a dataclass field (not a ClassVar)."""
    return (isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)
            and not ast.unparse(statement.annotation).startswith(("ClassVar", "typing.ClassVar")))


def _named(statement: ast.stmt, name: str) -> bool:
    return (isinstance(statement, (ast.Assign, ast.AnnAssign)) and statement.value is not None
            and any(getattr(t, "id", None) == name
                    for t in (statement.targets if isinstance(statement, ast.Assign) else [statement.target])))


@cache
def _classes() -> dict[str, dict]:
    """{class name: {"method": its `name` or None, "bases": [...], "fields": {name: (where, default node)},
    "registered": bool}} of every top-level class in chai/methods/*.py."""
    found = {}
    for path in sorted(METHODS_DIR.glob("*.py")):
        for node in ast.parse(path.read_text(), filename=str(path)).body:
            if not isinstance(node, ast.ClassDef):
                continue
            info = {"method": None, "bases": [getattr(b, "id", None) for b in node.bases], "fields": {},
                    "registered": any(getattr(d, "id", None) == "register" for d in node.decorator_list)}
            for statement in node.body:
                if isinstance(statement, ast.Assign) and any(getattr(t, "id", None) == "name"
                                                             for t in statement.targets):
                    info["method"] = _literal(statement.value)
                elif (attribute := next((a for a in CLASS_DICTS if _named(statement, a)), None)) is not None:
                    info[attribute] = _literal(statement.value) or {}
                elif _is_setting(statement):
                    # kept unread: only a method's own fields (and its bases') must have literal defaults
                    where = f"{path.name}:{statement.lineno} {node.name}.{statement.target.id}"
                    info["fields"][statement.target.id] = (where, statement.value)
            found[node.name] = info
    return found


def _inherited(class_name: str, own) -> dict:
    """`own(info)` of a class merged over its bases' (dataclass order: a subclass overrides)."""
    info = _classes().get(class_name)
    if info is None:
        return {}
    merged = {}
    for base in reversed(info["bases"]):
        merged.update(_inherited(base, own))
    return {**merged, **own(info)}


def _fields(class_name: str) -> dict:
    """A class's fields with their defaults, inherited ones first."""
    def own(info):
        return {field: MISSING if value is None else _default(value, where)
                for field, (where, value) in info["fields"].items()}

    return _inherited(class_name, own)


@cache
def all_defaults() -> dict[str, dict]:
    """{method name: {setting: default}} for every registered method (`@register` in chai/methods/)."""
    return {info["method"]: _fields(name) for name, info in _classes().items()
            if info["registered"] and info["method"]}


def _class_attribute(name: str, attribute: str) -> dict:
    """A registered method's literal dict class attribute, merged over its bases'; {} when none declares it."""
    for class_name, info in _classes().items():
        if info["registered"] and info["method"] == name:
            return _inherited(class_name, lambda info: info.get(attribute, {}))
    return {}


def missing_means(name: str) -> dict:
    """{setting: value} for settings a method gained after records were made: what a record without the setting ran
    with (the class's `missing_means`, e.g. SparQ's `scope`: older records are the row-wise variant). Settings not
    listed meant their default."""
    return _class_attribute(name, "missing_means")


def moot_unless(name: str) -> dict:
    """{setting: (other setting, [its values where the setting matters])}: the class's `moot_unless`, e.g. CHAI's
    `budget` only matters under `count_rule=budget`."""
    return _class_attribute(name, "moot_unless")


def method_defaults(name: str) -> dict | None:
    """A registered method's settings at their defaults (without `name`); None for an unknown method."""
    found = all_defaults().get(name)
    return None if found is None else dict(found)


def register() -> None:
    """Store every method's defaults as the Hydra config node `method_defaults/<name>` (idempotent)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for name, defaults in all_defaults().items():
        store.store(group=GROUP, name=name, node={"name": MISSING, **defaults})  # the YAML sets `name`, first

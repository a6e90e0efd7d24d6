"""Records -> tidy pandas frames: one row per successful cell, the latest record per cell.

A cell is (model, method and its settings, task, limit) for accuracy, (model, method settings, batch, seq_len,
new_tokens, path, dtype) for the bench; re-running a cell appends a newer record, and the newest wins. How a method
is shown (label, order, colour) is the record's own `display`. Which records make "the" CHAI of a table, out of the
sweep points: those whose settings are what Hydra composes for the cell's overrides (`method_cell("method=chai")`),
a setting an older record lacks counting as its dataclass default.
"""

import json
import math
from functools import cache
from pathlib import Path

import pandas as pd
import yaml

from chai.method_defaults import method_defaults as dataclass_defaults, missing_means
from chai.paths import CONF_DIR
from chai.records import method_key, read_jsonl

REPORT_FILE = Path(__file__).with_name("report.yaml")
UNSHOWN_ORDER = 50  # a record without `display` (written before it existed, by hand): Method.order's default


ADHOC = "adhoc"  # conf/config.yaml's default experiment_name: runs nobody curated (results/adhoc/ is gitignored)


def load_records(results: Path, include_adhoc: bool = False) -> list[dict]:
    """Every complete record of every results/**/runs.jsonl, in file order; results/adhoc/ only when asked."""
    records = []
    for path in sorted(Path(results).glob("**/runs.jsonl")):
        if include_adhoc or path.relative_to(results).parts[0] != ADHOC:
            records.extend(r for r in read_jsonl(path) if isinstance(r, dict))  # a stray JSON value is no record
    return records


def load_calibrations(results: Path) -> dict[str, dict]:
    """{model name: artifact} from results/calibration/*.json (a torn or foreign JSON file is skipped)."""
    found = {}
    for path in sorted((Path(results) / "calibration").glob("*.json")):
        try:
            artifact = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(artifact, dict) and "elbow" in artifact:
            found[artifact.get("model", path.stem)] = artifact
    return found


@cache
def report_config() -> dict:
    """chai/report/report.yaml: the baseline, the tables' rows, the sweep figures."""
    return yaml.safe_load(REPORT_FILE.read_text())


@cache
def method_cell(overrides: str) -> dict | None:
    """The method config (name and every setting) `python run.py <overrides>` runs, composed by Hydra; None when
    the overrides name no method config (one since renamed)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    listed = overrides.split()
    if any(o.startswith("method=") and not (CONF_DIR / "method" / f"{o[7:]}.yaml").exists() for o in listed):
        return None
    if GlobalHydra.instance().is_initialized():  # inside a Hydra app (its config dir is conf/ too)
        return OmegaConf.to_container(compose(config_name="config", overrides=listed).method, resolve=True)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return OmegaConf.to_container(compose(config_name="config", overrides=listed).method, resolve=True)


def method_defaults(name: str) -> dict | None:
    """The settings `method=<name>` runs with (without `name`), or None when no config of that name exists."""
    found = method_cell(f"method={name}")
    return None if found is None else {k: v for k, v in found.items() if k != "name"}


def baseline() -> dict:
    """The baseline's method config (report.yaml `baseline`)."""
    return method_cell(f"method={report_config()['baseline']}")


def settings_of(record: dict) -> dict:
    return {k: v for k, v in record.get("config", {}).get("method", {}).items() if k != "name"}


def settings_key(settings: dict) -> str:
    return json.dumps(settings, sort_keys=True, default=str)


def display_of(record: dict) -> dict:
    """How the report shows the record's method: its `display`, else its name, unordered, no colour of its own."""
    shown = record.get("display") if isinstance(record.get("display"), dict) else {}
    method = str(record.get("method"))
    return {"label": shown.get("label") or method, "family": shown.get("family") or method,
            "order": shown.get("order", UNSHOWN_ORDER), "color": shown.get("color")}


def _cell_key(record: dict) -> str:
    """A record's method as a cell: name and the settings off their defaults (older records list fewer settings)."""
    return settings_key(method_key({"name": record.get("method"), **settings_of(record)}))


def model_shape(record: dict, calibrations: dict) -> tuple[int | None, int | None]:
    """(layers, heads) from the model's `arch`, else its calibration artifact."""
    arch = record.get("config", {}).get("model", {}).get("arch") or {}
    layers, heads = arch.get("num_hidden_layers"), arch.get("num_attention_heads")
    if (layers is None or heads is None) and record.get("model") in calibrations:
        shape = calibrations[record["model"]].get("shape", {})
        layers, heads = shape.get("layers"), shape.get("heads")
    return layers, heads


def attention_compute(record: dict, calibrations: dict) -> float:
    """Attention-score compute relative to the baseline (1.0), as the method reported it: its
    `method_info.attention_compute_fraction`, or the mean over layers of clusters/heads from its per-layer
    `clusters_per_layer` ("dense" for a layer left as MHA). NaN when it reported neither."""
    if record.get("method") == baseline()["name"]:
        return 1.0
    info = record.get("method_info") or {}
    if isinstance(info.get("attention_compute_fraction"), (int, float)):
        return float(info["attention_compute_fraction"])
    per_layer = info.get("clusters_per_layer")  # ints, "dense" (or None) for a layer left as MHA
    heads = model_shape(record, calibrations)[1]
    if isinstance(per_layer, list) and per_layer and heads:
        return sum(min(k, heads) if isinstance(k, int) else heads for k in per_layer) / (len(per_layer) * heads)
    return math.nan


def kv_layout(record: dict, calibrations: dict) -> dict:
    """The model's K,V layout: `expand_kv_heads` (a grouped-query model turned into its exact multi-head twin stores
    more K,V: a different memory axis, never mixed with the shipped layout), its KV heads when known (the model's
    `arch`, else its calibration artifact) and a name to title figures with."""
    model_cfg = record.get("config", {}).get("model", {}) or {}
    expanded = bool(model_cfg.get("expand_kv_heads"))
    arch = model_cfg.get("arch") or {}
    shape = (calibrations.get(record.get("model")) or {}).get("shape", {})
    heads = arch.get("num_attention_heads", shape.get("heads"))
    kv = heads if expanded else arch.get("num_key_value_heads", shape.get("kv_heads", heads))
    name = str(model_cfg.get("hf_id") or record.get("model")).split("/")[-1]
    return {"expand_kv_heads": expanded, "kv_heads": kv, "model_name": name}


def read_fraction(record: dict) -> float:
    """The share of its stored K,V a decode step reads: the method's `run_stats.kv_read_fraction`; else (records
    before it existed) 1 / the compression it measured; else 1 (it reads all it stores)."""
    stated = (record.get("run_stats") or {}).get("kv_read_fraction")
    if isinstance(stated, (int, float)) and not isinstance(stated, bool):
        return float(stated)
    measured = ((record.get("method_info") or {}).get("measured") or {}).get("compression")
    if isinstance(measured, (int, float)) and measured > 0:
        return 1.0 / measured
    return 1.0


def kept_fraction(record: dict) -> float:
    """The share of the tokens seen that an evicting cache kept over the run (`kept_tokens.kept_fraction`, in
    `run_stats.extra`, else `method_info`); NaN for a cache that keeps every token. Its `kv_bytes_per_token` comes
    from a probe that never evicts, so this share is what turns it into the bytes the cache held."""
    for source in ((record.get("run_stats") or {}).get("extra") or {}, record.get("method_info") or {}):
        kept = source.get("kept_tokens")
        if isinstance(kept, dict) and isinstance(kept.get("kept_fraction"), (int, float)):
            return float(kept["kept_fraction"])
    return math.nan


def _ok(record: dict) -> bool:
    return not record.get("error") and not record.get("oom")


def eval_frame(records: list[dict], calibrations: dict | None = None) -> pd.DataFrame:
    """One row per successful eval record (all of them; `latest` picks one per cell)."""
    calibrations = calibrations or {}
    rows = []
    for r in records:
        if r.get("mode") != "eval" or not _ok(r) or not isinstance(r.get("metrics"), dict):
            continue
        settings, task_cfg = settings_of(r), r.get("config", {}).get("task", {})
        kv = r.get("kv_bytes_per_token") or {}
        rows.append({
            "model": r.get("model"), "method": r.get("method"), "task": r.get("task"),
            "limit": task_cfg.get("limit"), "settings": settings, "settings_key": settings_key(settings),
            "cell": _cell_key(r), **display_of(r),
            **{m: r["metrics"].get(m, math.nan) for m in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr")},
            "n_examples": r.get("n_examples"),
            "kv_measured": (kv.get("measured") or {}).get("total", math.nan),
            "kv_analytic": (kv.get("analytic") or {}).get("total", math.nan),
            "read_fraction": read_fraction(r), "kept_fraction": kept_fraction(r), **kv_layout(r, calibrations),
            "items": r.get("items") if isinstance(r.get("items"), dict) else None,
            "compute": attention_compute(r, calibrations),
            "time": r.get("time"), "run_id": r.get("run_id"), "experiment": r.get("experiment"),
        })
    return _framed(rows, ("model", "expand_kv_heads", "method", "cell", "task", "limit"))


def bench_frame(records: list[dict]) -> pd.DataFrame:
    """One row per bench cell record (failed and OOM cells included, flagged: a figure can mark them)."""
    rows = []
    for r in records:
        b = r.get("bench")
        if not isinstance(b, dict) or "seq_len" not in b:
            continue
        kv = b.get("kv_bytes") or {}
        settings = settings_of(r)
        row = {
            "model": r.get("model"), "method": r.get("method"), "settings": settings,
            "settings_key": settings_key(settings), "cell": _cell_key(r), **display_of(r),
            "batch": b.get("batch"), "seq_len": b.get("seq_len"),
            "new_tokens": b.get("new_tokens"), "path": b.get("path"), "dtype": b.get("dtype"),
            "device": (r.get("device") or {}).get("name"),
            "oom": bool(b.get("oom") or r.get("oom")), "failed": bool(r.get("error") or b.get("error")),
            "time": r.get("time"), "run_id": r.get("run_id"),
        }
        for name in ("ttft_ms", "ttnt_ms"):
            stats = b.get(name) or {}
            for stat in ("median", "p10", "p90"):
                row[f"{name}_{stat}"] = stats.get(stat, math.nan)
        for name in ("analytic", "measured_cache", "allocator_peak"):
            row[f"kv_{name}"] = kv.get(name, math.nan)
        rows.append(row)
    keys = ("model", "method", "cell", "batch", "seq_len", "new_tokens", "path", "dtype", "device")
    return _framed(rows, keys)


def membership_frame(records: list[dict]) -> pd.DataFrame:
    """One row per successful membership record, the curves kept as lists."""
    rows = [
        {"model": r.get("model"), "time": r.get("time"), "run_id": r.get("run_id"),
         "settings_key": settings_key(r.get("config", {}).get("membership") or {}), **r["membership"]}
        for r in records
        if r.get("mode") == "membership" and _ok(r) and isinstance(r.get("membership"), dict)
    ]
    return _framed(rows, ("model", "settings_key"))


def _framed(rows: list[dict], keys: tuple) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    frame.attrs["keys"] = list(keys)
    return frame


def latest(frame: pd.DataFrame) -> pd.DataFrame:
    """The newest row of each cell (`frame.attrs['keys']`); ties keep the later line of the files."""
    if frame.empty:
        return frame
    keys = frame.attrs["keys"]
    when = pd.to_datetime(frame["time"], utc=True, errors="coerce", format="ISO8601")
    ordered = frame.assign(_when=when, _line=range(len(frame))).sort_values(["_when", "_line"], kind="stable")
    picked = ordered.groupby(keys, dropna=False, sort=False).tail(1).drop(columns=["_when", "_line"])
    picked.attrs["keys"] = keys
    return picked.reset_index(drop=True)


def matching(frame: pd.DataFrame, wanted: dict | None, vary: tuple = ()) -> pd.DataFrame:
    """Rows of the method config `wanted` (a `method_cell(...)`: name and settings) with those settings, apart from the
    keys in `vary`. A setting a record lacks (recorded before the method had it) counts as its dataclass default.
    None (a cell whose config is gone): no rows."""
    if wanted is None or frame.empty:
        return frame.iloc[0:0]
    name = wanted["name"]
    rows = frame[frame["method"] == name]
    defaults = {**(dataclass_defaults(name) or {}), **missing_means(name)}
    expected = {k: v for k, v in wanted.items() if k != "name" and k not in vary}
    if rows.empty or not expected:
        return rows
    keep = rows["settings"].map(lambda s: all(_same(s.get(k, defaults.get(k)), v) for k, v in expected.items()))
    return rows[keep.astype(bool)]


def _same(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b

"""DEJAVU-static: drop the least important attention heads of every layer, for every token alike.

DejaVu (Liu et al., ICML 2023, arXiv 2310.17157) predicts, per token, which heads matter and skips the rest; its
importance signal is the L2 norm of a head's output before the output projection. The paper's DejaVu rows used
DejaVu's *trained per-token predictor*. This is the **static variant**: the norms are averaged once over C4
calibration text (the calibration artifact's `head_importance`, [layers][heads]) and the same heads are dropped for
every input. It is a lower bound on what the contextual predictor achieves, not a reproduction of it.

Dropped heads are really gone: while applied, each pruned layer's Q/K/V projections keep only the rows of the kept
heads and the output projection only their input columns, so their Q/K/V are never computed, their K and V never
stored, and the cache (and `kv_bytes`) shrinks accordingly. On grouped-query models a query head is
dropped by its score and a KV head only when none of its query heads is kept.

Parameters
- sparsity: fraction of heads dropped per layer, in [0, 1); round(sparsity * heads) heads (half rounds up), at
  most heads - 1 so every layer keeps one. Heads come whole, so the share really dropped differs (SmolLM2's 9 heads:
  10/30/50% drop 1/3/5 heads, 11/33/56%); a run is labelled by the real share ("33% (3/9 heads)"), known once the
  method is prepared on the model; from settings alone (records written before) by the requested one.
- dense_layers: the first N layers are left untouched (CHAI keeps its first layers nearly dense: the
  dejavu_static_dense preset does the same here).
- head_scores: the [layers][heads] scores, or a path to a JSON file holding them under "head_importance" (e.g. the
  calibration artifact). Default None: `chai.calibration.load_or_calibrate` (computed on C4 when missing).
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import ListConfig
from torch import nn

from chai.attention import AttnShape, dense, to_output
from chai.errors import ChaiError, require
from chai.methods import register
from chai.methods.base import Method, RunContext

OUT_PROJ_NAMES = ("o_proj", "out_proj")


@dataclass(frozen=True)
class LayerPlan:
    """Kept heads of one pruned layer: query heads, KV heads, and for each kept query head the position of its KV
    head among the kept ones."""

    heads: tuple[int, ...]
    kv_heads: tuple[int, ...]
    kv_of_head: tuple[int, ...]


def dropped_heads(sparsity: float, heads: int) -> int:
    """Heads dropped in each pruned layer: round(sparsity * heads), half up, keeping at least one."""
    return min(heads - 1, math.floor(sparsity * heads + 0.5))


def plan_layers(scores: torch.Tensor, shape: AttnShape, sparsity: float, dense_layers: int) -> dict[int, LayerPlan]:
    """{layer: LayerPlan} for the layers that lose at least one head. scores: [L, H]."""
    dropped = dropped_heads(sparsity, shape.heads)
    kv_of_query = shape.kv_of_query().tolist()
    plans = {}
    for layer in range(dense_layers, shape.layers):
        if dropped == 0:
            break
        # Stable descending order: ties keep the lower head index, so the plan is deterministic.
        order = torch.argsort(scores[layer], descending=True, stable=True)
        heads = sorted(order[: shape.heads - dropped].tolist())
        kv_heads = sorted({kv_of_query[h] for h in heads})
        plans[layer] = LayerPlan(tuple(heads), tuple(kv_heads), tuple(kv_heads.index(kv_of_query[h]) for h in heads))
    return plans


def _rows(heads, head_dim: int) -> torch.Tensor:
    """Row indices of a projection's output that belong to `heads` (head h owns rows h*D .. h*D + D - 1)."""
    heads = torch.tensor(heads)
    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()


def attention_modules(model) -> dict[int, nn.Module]:
    """{layer_idx: attention module} for Llama- and OPT-style attention (q/k/v projections plus an output one)."""
    found = {}
    for module in model.modules():
        if hasattr(module, "q_proj") and hasattr(module, "layer_idx") and module.layer_idx is not None:
            found[module.layer_idx] = module
    return found


def read_scores(source) -> list:
    """A [layers][heads] list from a list or from a JSON file with a "head_importance" entry."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        require(path.exists(), f"dejavu_static: head_scores file {path} not found.")
        data = json.loads(path.read_text())
        require("head_importance" in data, f"dejavu_static: {path} has no 'head_importance' entry.")
        return data["head_importance"]
    return source


def score_tensor(rows, shape: AttnShape) -> torch.Tensor:
    """[layers][heads] scores as a float64 tensor [L, H], checked against the model's shape."""
    scores = torch.tensor([[float(x) for x in row] for row in rows], dtype=torch.float64)
    require(
        tuple(scores.shape) == (shape.layers, shape.heads),
        f"dejavu_static: head scores have shape {list(scores.shape)}, the model has "
        f"[{shape.layers}, {shape.heads}] (layers, heads).",
    )
    return scores


def _real_share(facts: dict, dense_layers: int) -> tuple[int, int] | None:
    """(heads dropped per pruned layer, heads) from a run's facts: stated (`pruned_heads`, `heads`), or for records
    written before, solved from the kept heads of a pruned layer and the attention-compute fraction (the first
    `dense_layers` layers whole, every later one pruned alike): f (d + p) H = d H + p (H - dropped)."""
    if "pruned_heads" in facts and "heads" in facts:
        return int(facts["pruned_heads"]), int(facts["heads"])
    pruned, kept = facts.get("pruned_layers"), facts.get("kept_heads")
    fraction = facts.get("attention_compute_fraction")
    if not pruned or not kept or not isinstance(fraction, (int, float)):
        return None
    p, k = len(pruned), len(next(iter(kept.values())))
    denominator = p - (1 - fraction) * (dense_layers + p)
    if denominator <= 0:
        return None
    heads = round(p * k / denominator)
    return heads - k, heads


def _dense_suffix(dense_layers) -> str:
    if not isinstance(dense_layers, int) or dense_layers <= 0:
        return ""
    return ", first layer dense" if dense_layers == 1 else f", first {dense_layers} layers dense"


@register
@dataclass
class DejaVuStatic(Method):
    """Static head pruning by DejaVu's head-output norm (the paper used DejaVu's trained per-token predictor)."""

    name = "dejavu_static"
    label, order, color = "DejaVu-static", 20, "tab:green"

    sparsity: float = 0.5  # fraction of each pruned layer's heads dropped
    dense_layers: int = 0
    head_scores: object = None  # None: head_importance of the calibration artifact; or a JSON path / [layers][heads]

    def __post_init__(self):
        self._plans: dict[int, LayerPlan] | None = None  # set by `prepare`
        self._saved: dict = {}  # while applied: the original projections of each pruned layer
        self._heads: tuple[int, int] | None = None  # (layers, heads) of the prepared model
        require(
            isinstance(self.sparsity, (int, float)) and not isinstance(self.sparsity, bool),
            f"dejavu_static: sparsity must be a number in [0, 1), got {self.sparsity!r}.",
        )
        require(0 <= self.sparsity < 1, f"dejavu_static: sparsity must be in [0, 1), got {self.sparsity}.")
        require(
            isinstance(self.dense_layers, int) and self.dense_layers >= 0,
            f"dejavu_static: dense_layers must be an integer >= 0, got {self.dense_layers!r}.",
        )
        require(
            self.head_scores is None or isinstance(self.head_scores, (str, Path, list, tuple, ListConfig)),
            "dejavu_static: head_scores must be null, a [layers][heads] list or a path to a JSON file.",
        )

    def check_shape(self, config) -> None:
        """dense_layers against the layers; given head scores against [layers, heads] (calibrated ones: in prepare)."""
        shape = AttnShape.of(config)
        require(
            self.dense_layers <= shape.layers,
            f"dejavu_static: dense_layers={self.dense_layers} exceeds the model's {shape.layers} layers.",
        )
        if self.head_scores is not None:
            score_tensor(read_scores(self.head_scores), shape)

    def prepare(self, model, context: RunContext | None = None) -> None:
        self.check_shape(model.config)  # before calibrating: a bad setting fails without the calibration pass
        shape = AttnShape.of(model.config)
        rows = read_scores(self.head_scores) if self.head_scores is not None else self._calibrated(model, context)
        self._plans = plan_layers(score_tensor(rows, shape), shape, self.sparsity, self.dense_layers)
        self._heads = (shape.layers, shape.heads)

    def _calibrated(self, model, context) -> list:
        try:
            from chai.calibration import load_or_calibrate
        except ModuleNotFoundError as err:
            if err.name != "chai.calibration":
                raise
            raise ChaiError(
                "dejavu_static: no calibration available (chai.calibration missing); "
                "pass method.head_scores=<artifact.json or [layers][heads] list>."
            ) from None
        return load_or_calibrate(model, context)["head_importance"]

    def _require_plans(self, model) -> dict[int, LayerPlan]:
        if self._plans is None:
            require(self.head_scores is not None, "dejavu_static: call prepare(model, context) before applying it.")
            self.prepare(model, None)
        return self._plans

    def attention(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        # query: [B, H_kept, T, D]; key, value: [B, Hkv_kept, Tk, D] (only the kept heads exist in this layer)
        plan = self._plans.get(module.layer_idx) if self._plans else None
        if plan is None:
            return dense(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
        if list(plan.kv_of_head) != list(range(key.shape[1])):
            # GQA: kept query heads no longer come in equal groups, so each one gets its own KV head explicitly.
            index = torch.tensor(plan.kv_of_head, device=key.device)
            key, value = key.index_select(1, index), value.index_select(1, index)
        out = nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, scale=scaling,
            is_causal=attention_mask is None and query.shape[2] > 1,
        )
        return to_output(out), None

    def kv_bytes(self, config, batch: int, tokens: int, dtype_bytes: int) -> dict:
        """Kept KV heads of every layer x head_dim x dtype bytes per token, for K and for V (needs `prepare`)."""
        require(self._plans is not None, "dejavu_static: call prepare(model) before kv_bytes.")
        shape = AttnShape.of(config)
        heads = sum(len(self._plans[i].kv_heads) if i in self._plans else shape.kv_heads for i in range(shape.layers))
        per_tensor = batch * tokens * heads * shape.head_dim * dtype_bytes
        return {"k": per_tensor, "v": per_tensor}

    @classmethod
    def variant(cls, settings: dict) -> str:
        """From settings alone (no head count): the requested share, "30% (requested)"."""
        sparsity = settings.get("sparsity")
        if not isinstance(sparsity, (int, float)):
            return ""
        return f"{sparsity * 100:.0f}% (requested)" + _dense_suffix(settings.get("dense_layers"))

    @classmethod
    def display(cls, settings: dict, facts: dict | None = None) -> dict:
        """With the run's facts (`describe()`, a record's method_info) the label states the share of heads really
        dropped, "33% (3/9 heads)"; from settings alone, the requested one."""
        shown = super().display(settings, facts)
        real = _real_share(facts or {}, settings.get("dense_layers") or 0)
        if real is not None:
            dropped, heads = real
            shown["label"] = (f"{shown['family']} {100 * dropped / heads:.0f}% ({dropped}/{heads} heads)"
                              + _dense_suffix(settings.get("dense_layers")))
        return shown

    def describe(self) -> dict:
        plans = self._plans or {}
        info = {
            "variant": "static (head scores averaged on calibration text; the paper used DejaVu's trained per-token "
            "predictor)",
            "pruned_layers": sorted(plans),
            "kept_heads": {str(i): list(p.heads) for i, p in plans.items()},
            "kept_kv_heads": {str(i): list(p.kv_heads) for i, p in plans.items()},
        }
        if self._heads is not None:
            layers, heads = self._heads
            dropped = dropped_heads(self.sparsity, heads)
            info.update(heads=heads, pruned_heads=dropped, pruned_fraction=dropped / heads)  # per pruned layer
            kept = sum(len(plans[i].heads) if i in plans else heads for i in range(layers))
            info["attention_compute_fraction"] = kept / (layers * heads)  # attention-score work relative to MHA
        return info

    def on_apply(self, model) -> None:
        plans = self._require_plans(model)
        shape = AttnShape.of(model.config)
        modules = attention_modules(model)
        for layer, plan in plans.items():
            self._saved[layer] = self._prune(modules[layer], plan, shape.head_dim)

    def _prune(self, module, plan: LayerPlan, head_dim: int) -> dict:
        """Slice one layer's projections to the kept heads; returns what `_restore` needs to undo it."""
        out_name = next(n for n in OUT_PROJ_NAMES if hasattr(module, n))
        q_rows, kv_rows = _rows(plan.heads, head_dim), _rows(plan.kv_heads, head_dim)
        saved = {"num_heads": getattr(module, "num_heads", None)}
        for name, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
            linear = getattr(module, name)
            saved[name] = (linear.weight, linear.bias, linear.out_features)
            linear.weight = nn.Parameter(linear.weight.detach()[rows.to(linear.weight.device)], requires_grad=False)
            if linear.bias is not None:
                linear.bias = nn.Parameter(linear.bias.detach()[rows.to(linear.bias.device)], requires_grad=False)
            linear.out_features = len(rows)
        out = getattr(module, out_name)
        saved[out_name] = (out.weight, out.bias, out.in_features)
        out.weight = nn.Parameter(out.weight.detach()[:, q_rows.to(out.weight.device)], requires_grad=False)
        out.in_features = len(q_rows)
        if saved["num_heads"] is not None:
            # OPT reshapes with `view(bsz, -1, self.num_heads, head_dim)`: it must see the kept count.
            module.num_heads = len(plan.heads)
        return saved

    def on_remove(self, model) -> None:
        modules = attention_modules(model)
        for layer, saved in self._saved.items():
            module = modules[layer]
            restore_projections(module, saved)
            if saved["num_heads"] is not None:
                module.num_heads = saved["num_heads"]
        self._saved = {}


def restore_projections(module, saved: dict) -> None:
    """Put back the q/k/v and output projections `saved` holds ({name: (weight, bias, size)}): the same tensors, and
    the size of the side the method changed (out_features of q/k/v, in_features of the output projection)."""
    for name in ("q_proj", "k_proj", "v_proj", *OUT_PROJ_NAMES):
        if name not in saved:
            continue
        linear = getattr(module, name)
        linear.weight, linear.bias, size = saved[name]
        if name in OUT_PROJ_NAMES:
            linear.in_features = size
        else:
            linear.out_features = size

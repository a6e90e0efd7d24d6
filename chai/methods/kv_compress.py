"""KV-head compression (Yu et al. 2024, "Effectively Compress KV Heads for LLM", arXiv 2406.07056): MHA -> GQA.

The KV heads of each layer are split into groups of g; each group's K heads (and separately its V heads) are
replaced by one head, a fit to the group fitted once, and the fit is folded into the query and output projections,
so the model becomes a plain grouped-query model with fewer KV heads (no new attention code).
- Values: new W_V = E @ stacked W_V (E = P^T, P the top head_dim principal directions of the group), and each
  query head's slice of W_O is multiplied by its head's block of P: exact up to the truncation.
- Keys without RoPE (OPT): the same fold, into each query head's rows of W_Q (and q bias).
- Keys under RoPE: a dense per-head map does not commute with RoPE. Our construction (the paper's own RoPE strategy
  was not available to us): RoPE multiplies each frequency pair (dims i and i + D/2, transformers' rotate_half) by a
  unit complex number, and per-pair complex scalars are the only per-head maps commuting with it; so per pair the
  new head is the top complex principal direction of the group's heads (rank-1 complex PCA of a g x g Hermitian
  Gram) and the conjugate coefficients fold into the query heads' same pair. Exact under RoPE up to truncation.
Calibration (svd_a): CHAI's offline documents (C4, `calibration.*` settings), one input Gram per layer, never the
eval tasks (chai/methods/_kv_compress_fit.py). Llama-style attention becomes a real GQA model while applied
(config.num_key_value_heads, k_proj/v_proj, the modules' num_key_value_groups); OPT's attention reshapes K with
the query-head count, so there each query head keeps a copy of its group's head in k_proj/v_proj and the cache
(`cache_layer`) stores one copy per group. Everything is put back on exit (the same tensors, bit for bit).

Parameters
- kv_heads: KV heads kept per layer (must divide the model's count); null: from `ratio`.
- ratio: kept share of KV heads when kv_heads is null: the divisor of the KV-head count nearest ratio x count
  (ties: fewer heads). SmolLM2 as shipped (3 KV heads) at 0.5 keeps 1; with expand_kv_heads (9) keeps 3.
- grouping: adjacent (the paper's default: heads s*g .. s*g + g - 1) | similarity (normalised cross-Gram, greedy).
- merge: meanpool (the GQA paper's initialisation: average the group's projections) | svd_w (principal directions
  of the stacked weights) | svd_a (of the activations on C4, the paper's).
- keys: rope_exact (the fold above; on a model without RoPE the plain dense fold) | meanpool (ablation).
- recovery_steps: AdamW steps of the optional LoRA recovery (the paper's step; 0 = off, the fit alone), trained once in
  `prepare` on text disjoint from the Grams' and merged into the converted q/k/v/o weights while applied
  (chai/methods/_kv_compress_recovery.py); recovery_rank, recovery_alpha (scale alpha/rank), recovery_lr,
  recovery_batch (documents per step), recovery_seq_len (tokens per document), recovery_heldout (documents for the
  loss before / after), recovery_corpus (a JSONL under the data directory; never an eval task). The trained adapters
  are cached beside the Grams (results/calibration/<model>.<digest>.kv_recovery.pt, keyed by `recovery_key`: the
  model and its layout, every setting above, the seed, the calibration settings), so the jobs of a sweep over tasks
  train once. The record's `recovery` fact holds the training's steps, tokens, seconds and held-out losses, and
  `from_cache` (true: this run read the adapters, the numbers are those of the run that trained them).
Limits: RoPE must be full-width (partial_rotary_factor 1) and in rotate_half layout; every layer is compressed
alike; OPT (shared copies) has no static-cache path and no recovery (an adapter per copy would make them differ).
"""

import time
from dataclasses import asdict, dataclass

import torch
from omegaconf import OmegaConf
from torch import nn
from transformers.cache_utils import DynamicLayer

from chai.attention import AttnShape
from chai.errors import did_you_mean, require
from chai.methods import register
from chai.methods import _kv_compress_fit as fitting
from chai.methods import _kv_compress_recovery as recovery
from chai.methods.base import Method, RunContext
from chai.methods.dejavu_static import OUT_PROJ_NAMES, attention_modules, restore_projections

MERGES = ("meanpool", "svd_w", "svd_a")
GROUPINGS = ("adjacent", "similarity")
KEYS = ("rope_exact", "meanpool")
PROJECTIONS = ("q_proj", "k_proj", "v_proj")


@dataclass(frozen=True)
class LayerPlan:
    """One layer's fit: the source KV heads of each new head, and per group (encoder, decoders) for K and for V."""

    groups: tuple[tuple[int, ...], ...]
    k: tuple  # per group: (E [D, g*D], R [g, D, D]) float64
    v: tuple


class SharedKVLayer(DynamicLayer):
    """Cache layer for attention that cannot take fewer KV heads (OPT): stores one copy of each group's head
    (`keep`: a source head per group) and hands attention every head's copy (`spread`: group of each head)."""

    def __init__(self, keep: list[int], spread: list[int]):
        super().__init__()
        self.keep, self.spread = torch.tensor(keep), torch.tensor(spread)

    def update(self, key_states, value_states, *args, **kwargs):
        keep = self.keep.to(key_states.device)
        keys, values = super().update(key_states.index_select(1, keep), value_states.index_select(1, keep))
        spread = self.spread.to(keys.device)
        return keys.index_select(1, spread), values.index_select(1, spread)


def _choice(setting: str, value, valid) -> None:
    if value not in valid:
        raise did_you_mean(f"kv_compress {setting}", value, valid)


def _has_rope(model) -> bool:
    return any(name.endswith("rotary_emb") for name, _ in model.named_modules())


@register
@dataclass
class KVCompress(Method):
    """MHA -> GQA by calibrated low-rank folding of each group's K and V heads (RoPE-exact keys)."""

    name = "kv_compress"
    custom_attention = False  # the converted model runs its own attention (SDPA), only with fewer KV heads
    label, order, color = "KV-compress", 30, "tab:purple"

    kv_heads: int | None = None
    ratio: float = 0.5
    grouping: str = "adjacent"
    merge: str = "svd_a"  # named `merge`, not `variant`: Method.variant() is the display hook
    keys: str = "rope_exact"
    recovery_steps: int = 0
    recovery_rank: int = 8
    recovery_alpha: float = 16.0
    recovery_lr: float = 1e-4
    recovery_batch: int = 8
    recovery_seq_len: int = 256
    recovery_heldout: int = 64
    recovery_corpus: str = "c4/c4_train00000_head1000.jsonl"  # C4's train split: the Grams read validation

    def __post_init__(self):
        require(self.kv_heads is None or (isinstance(self.kv_heads, int) and not isinstance(self.kv_heads, bool)
                                          and self.kv_heads >= 1),
                f"kv_compress: kv_heads must be null or an integer >= 1, got {self.kv_heads!r}.")
        require(isinstance(self.ratio, (int, float)) and not isinstance(self.ratio, bool) and 0 < self.ratio <= 1,
                f"kv_compress: ratio must be a number in (0, 1], got {self.ratio!r}.")
        _choice("grouping", self.grouping, GROUPINGS)
        _choice("merge", self.merge, MERGES)
        _choice("keys", self.keys, KEYS)
        for setting in ("recovery_steps", "recovery_rank", "recovery_batch", "recovery_seq_len", "recovery_heldout"):
            value, least = getattr(self, setting), 0 if setting == "recovery_steps" else 1
            require(isinstance(value, int) and not isinstance(value, bool) and value >= least,
                    f"kv_compress: {setting} must be an integer >= {least}, got {value!r}.")
        for setting in ("recovery_alpha", "recovery_lr"):
            value = getattr(self, setting)
            require(isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0,
                    f"kv_compress: {setting} must be a number > 0, got {value!r}.")
        require(isinstance(self.recovery_corpus, str) and self.recovery_corpus.endswith(".jsonl"),
                f"kv_compress: recovery_corpus must be a .jsonl file under the data directory, "
                f"got {self.recovery_corpus!r}.")
        self._plans: dict[int, LayerPlan] | None = None  # set by `prepare`
        self._saved: dict = {}  # while applied: what `on_remove` puts back
        self._facts: dict = {}
        self._shared = False  # set by `fit`: True where attention takes no fewer KV heads (OPT)
        self._lora: dict = {}  # set by `recover`: {(layer, projection): (scale * B, A)}, merged while applied

    def kept(self, config) -> int:
        """KV heads kept per layer on a model of `config`."""
        total = AttnShape.of(config).kv_heads
        return self.kv_heads if self.kv_heads is not None else fitting.nearest_divisor(total, self.ratio * total)

    def check_shape(self, config) -> None:
        shape, kept = AttnShape.of(config), self.kept(config)
        valid = [k for k in range(1, shape.kv_heads + 1) if shape.kv_heads % k == 0]
        require(kept in valid, f"kv_compress: kv_heads={kept} must divide the model's {shape.kv_heads} KV heads "
                f"(valid: {', '.join(map(str, valid))}).")
        rotary = getattr(config, "partial_rotary_factor", None)
        require(rotary in (None, 1, 1.0), f"kv_compress: partial RoPE (partial_rotary_factor={rotary}) is not "
                "supported: the key fold pairs every dimension.")
        require(shape.head_dim % 2 == 0, f"kv_compress: head_dim {shape.head_dim} must be even.")

    def prepare(self, model, context: RunContext | None = None) -> None:
        self.check_shape(model.config)  # before calibrating: a bad setting fails without the calibration pass
        self.fit(model, *(fitting.load_or_calibrate_grams(model, context) if self.merge == "svd_a" else ({}, 0)))
        if self.recovery_steps:
            self.recover(model, context)

    def recover(self, model, context: RunContext | None) -> None:
        """The LoRA recovery on the recovery corpus (see the module docstring), read from its cache when this exact
        recovery was trained before; the training's cost goes to the record either way."""
        from chai.calibration import settings_of

        require(context is not None and context.tokenizer is not None,
                "kv_compress: recovery needs a tokenizer (prepare(model, RunContext(...))).")
        calibration = settings_of(context.cfg.get("calibration") if context.cfg is not None else None)
        seed = int(context.cfg.get("seed", 0)) if context.cfg is not None else 0
        key = self.recovery_key(model, context, calibration, seed)
        path = recovery.cache_path(context.results_dir, context.model_name, key)
        cached = recovery.load_cached(path, key)
        if cached is not None:
            self._lora, facts = cached
            self._facts["recovery"] = {**facts, "from_cache": True}
            return
        self._train_on_corpus(model, context, calibration, seed)
        recovery.save_cached(path, key, self._lora, self._facts["recovery"])

    def recovery_key(self, model, context: RunContext, calibration: dict, seed: int) -> dict:
        """Everything the trained adapters depend on: the model (its config entry, K,V layout and dtype), every
        setting of this method (the fold's and the recovery's), the seed, and the calibration settings that pick
        the Grams' documents and the recovery's (the length filter, and the documents skipped on a shared corpus)."""
        model_cfg = context.cfg.get("model") if context.cfg is not None else None  # None: a model built by hand
        if OmegaConf.is_config(model_cfg):
            model_cfg = OmegaConf.to_container(model_cfg, resolve=True)
        return {
            "model": context.model_name, "model_cfg": model_cfg, "dtype": str(model.dtype),
            "shape": asdict(AttnShape.of(model.config)), "method": self.settings(), "seed": seed,
            "calibration": {**{k: calibration[k] for k in fitting.GRAM_KEYS},
                            "feature_tokens": calibration["feature_tokens"],
                            "sensitivity_docs": calibration["sensitivity"]["n_docs"]},
        }

    def _train_on_corpus(self, model, context: RunContext, calibration: dict, seed: int) -> None:
        """Train the recovery on `recovery_corpus` (documents the Grams never read) and record what it read."""
        count = self.recovery_heldout + self.recovery_steps * self.recovery_batch
        docs, skipped = recovery.recovery_documents(context.tokenizer, calibration, self.recovery_corpus,
                                                    self.recovery_seq_len, count, context.data_dir)
        require(len(docs) > self.recovery_heldout, f"kv_compress: {self.recovery_corpus} has {len(docs)} usable "
                f"documents after skipping {skipped}: fewer than recovery_heldout + 1.")
        pad = context.tokenizer.pad_token_id if context.tokenizer.pad_token_id is not None else 0
        heldout, train = recovery.split_batches(docs, self.recovery_heldout, self.recovery_batch, pad)
        self.train_recovery(model, heldout, train, seed)
        self._facts["recovery"].update(corpus=self.recovery_corpus, documents_skipped=skipped,
                                       documents_seen=min(len(docs) - self.recovery_heldout,
                                                          self.recovery_steps * self.recovery_batch),
                                       from_cache=False)

    def train_recovery(self, model, heldout: list, train, seed: int = 0) -> None:
        """LoRA on the converted model over `train` (endless (ids, lengths) batches); losses on `heldout`."""
        require(not self._shared, "kv_compress: no recovery where attention takes no fewer KV heads (OPT): "
                "an adapter per shared copy would make the copies differ.")
        self._lora, started = {}, time.perf_counter()
        uncompressed = recovery.heldout_loss(model, heldout)
        with self.applied(model):
            before = recovery.heldout_loss(model, heldout)
            self._lora, cost = recovery.train_lora(model, train, self.recovery_steps, self.recovery_rank,
                                                   self.recovery_alpha, self.recovery_lr, seed)
        with self.applied(model):  # the recovered model exactly as every later run applies it
            after = recovery.heldout_loss(model, heldout)
        self._facts["recovery"] = {**cost, "heldout_tokens": sum(int((n - 1).sum()) for _, n in heldout),
                                   "heldout_loss_uncompressed": uncompressed, "heldout_loss_before": before,
                                   "heldout_loss_after": after, "wall_s": round(time.perf_counter() - started, 3)}

    def fit(self, model, grams: dict, tokens: int = 0) -> None:
        """Plan every layer from input Grams {layer: [in+1, in+1]} (empty: from the weights alone)."""
        self.check_shape(model.config)
        shape = AttnShape.of(model.config)
        self._lora = {}  # adapters trained on an earlier fit do not fit this one
        size = shape.kv_heads // self.kept(model.config)  # source KV heads per group
        rope = _has_rope(model)
        self._plans, residuals = {}, {"k": [], "v": []}
        for layer, module in sorted(attention_modules(model).items()):
            self._plans[layer], errors = self._fit_layer(module, shape, grams.get(layer), rope, size)
            for name in residuals:
                residuals[name].append(errors[name])
        self._shared = not hasattr(attention_modules(model)[0], "num_key_value_groups")
        self._facts = {
            "kv_heads": self.kept(model.config), "kv_heads_before": shape.kv_heads, "rope": rope,
            "layout": "shared copies, one stored per group (attention takes no fewer KV heads)" if self._shared
            else "grouped-query (num_key_value_heads reduced)",
            "keys_fold": self._keys_fold(rope),
            "calibration_tokens": tokens,
            # share of the K / V energy (on the calibration data for svd_a, else the weights) each layer loses
            "k_residual": residuals["k"], "v_residual": residuals["v"],
        }
        if self.grouping == "similarity":
            self._facts["groups"] = {str(i): [list(g) for g in p.groups] for i, p in self._plans.items()}

    def _keys_fold(self, rope: bool) -> str:
        if self.merge == "meanpool" or self.keys == "meanpool":
            return "mean-pooled"
        return "per-pair complex rank-1 (RoPE-exact; our construction)" if rope else "dense (no RoPE)"

    def _fit_layer(self, module, shape: AttnShape, gram, rope: bool, size: int) -> tuple[LayerPlan, dict]:
        d, hkv = shape.head_dim, shape.kv_heads
        ak, av = fitting.augmented(module.k_proj), fitting.augmented(module.v_proj)
        # what the fit reads: the activations' Gram (svd_a) or the weights' own; errors and similarity are measured
        # on the data whenever it is given
        fit_on = gram if self.merge == "svd_a" else None
        ck, cv = fitting.head_gram(ak, fit_on), fitting.head_gram(av, fit_on)  # [Hkv*D, Hkv*D]
        seen = {"k": fitting.head_gram(ak, gram), "v": fitting.head_gram(av, gram)} if gram is not None else {"k": ck, "v": cv}
        if self.grouping == "similarity":
            groups = fitting.similarity_groups(seen["k"], seen["v"], hkv, size, d)
        else:
            groups = [tuple(range(start, start + size)) for start in range(0, hkv, size)]
        folds, errors = {"k": [], "v": []}, {"k": 0.0, "v": 0.0}
        for group in groups:
            rows = torch.cat([torch.arange(s * d, (s + 1) * d) for s in group])
            for name, c in (("k", ck), ("v", cv)):
                c = c[rows][:, rows]
                if self.merge == "meanpool" or (name == "k" and self.keys == "meanpool"):
                    fold = fitting.meanpool_fold(size, d)
                elif name == "k" and rope:
                    fold = fitting.rope_fold(c, size, d)
                else:
                    fold = fitting.dense_fold(c, size, d)
                folds[name].append(fold)
                errors[name] += fitting.residual(seen[name][rows][:, rows], *fold) / len(groups)
        return LayerPlan(tuple(groups), tuple(folds["k"]), tuple(folds["v"])), errors

    def _require_plans(self, model) -> dict[int, LayerPlan]:
        if self._plans is None:
            require(self.merge != "svd_a", "kv_compress: call prepare(model, context) before applying svd_a.")
            self.fit(model, {})
        return self._plans

    def on_apply(self, model) -> None:
        plans = self._require_plans(model)
        shape = AttnShape.of(model.config)
        kept = len(next(iter(plans.values())).groups)
        for layer, module in attention_modules(model).items():
            self._saved[layer] = self._convert(module, plans[layer], shape)
            self._merge_lora(layer, module)
            if not self._shared:
                module.num_key_value_groups = shape.heads // kept  # what transformers' SDPA path repeats K,V by
        if not self._shared:
            configs = {id(c): c for c in [model.config, *(m.config for m in attention_modules(model).values())]}
            self._saved["config"] = [(c, c.num_key_value_heads) for c in configs.values()]
            for config in configs.values():
                config.num_key_value_heads = kept

    def _convert(self, module, plan: LayerPlan, shape: AttnShape) -> dict:
        """Fold one layer's plan into its projections; returns what `on_remove` needs to undo it."""
        d, m = shape.head_dim, shape.heads // shape.kv_heads  # m: query heads per source KV head
        out_name = next(n for n in OUT_PROJ_NAMES if hasattr(module, n))
        aq, ak, av = (fitting.augmented(getattr(module, n)) for n in PROJECTIONS)  # [out, in+1] float64
        wo = getattr(module, out_name).weight.detach().double().cpu()  # [hidden, H*D]
        head = lambda a, s: a[s * d : (s + 1) * d]  # noqa: E731
        new_k, new_v, q_of, o_of, order, group_of = [], [], {}, {}, [], {}
        for n, group in enumerate(plan.groups):
            (ek, rk), (ev, rv) = plan.k[n], plan.v[n]
            new_k.append(ek @ torch.cat([head(ak, s) for s in group]))  # [D, in+1]: the group's one K head
            new_v.append(ev @ torch.cat([head(av, s) for s in group]))
            for idx, s in enumerate(group):
                group_of[s] = n
                for j in range(s * m, (s + 1) * m):
                    order.append(j)
                    q_of[j] = rk[idx].T @ head(aq, j)  # scores against the new head equal those against R k
                    o_of[j] = wo[:, j * d : (j + 1) * d] @ rv[idx]  # W_O reads R v
        if self._shared:  # every source head position keeps its group's head; query heads stay in place
            order = list(range(shape.heads))
            new_k = [new_k[group_of[s]] for s in range(shape.kv_heads)]
            new_v = [new_v[group_of[s]] for s in range(shape.kv_heads)]
        # GQA: new KV head n serves consecutive query heads, so the query heads are reordered group by group
        new = {"q_proj": torch.cat([q_of[j] for j in order]), "k_proj": torch.cat(new_k), "v_proj": torch.cat(new_v)}
        saved = {}
        for name, aug in new.items():
            linear = getattr(module, name)
            saved[name] = (linear.weight, linear.bias, linear.out_features)
            like = linear.weight
            linear.weight = nn.Parameter(aug[:, :-1].to(like.device, like.dtype), requires_grad=False)
            if linear.bias is not None:
                linear.bias = nn.Parameter(aug[:, -1].to(like.device, like.dtype), requires_grad=False)
            else:
                require(not aug[:, -1].any(), f"kv_compress: {name} has no bias but the fold made one.")
            linear.out_features = aug.shape[0]
        out = getattr(module, out_name)
        saved[out_name] = (out.weight, out.bias, out.in_features)
        out.weight = nn.Parameter(torch.cat([o_of[j] for j in order], 1).to(out.weight.device, out.weight.dtype),
                                  requires_grad=False)
        saved["num_key_value_groups"] = getattr(module, "num_key_value_groups", None)
        return saved

    def _merge_lora(self, layer: int, module) -> None:
        """Recovery's adapters into the converted weights: new Parameters, never the originals `_saved` holds."""
        for (at, name), factor in self._lora.items():
            if at == layer:
                linear = getattr(module, name)
                linear.weight = nn.Parameter(recovery.merged(linear.weight.detach(), factor), requires_grad=False)

    def on_remove(self, model) -> None:
        modules = attention_modules(model)
        for config, value in self._saved.pop("config", []):
            config.num_key_value_heads = value
        for layer, saved in self._saved.items():
            module = modules[layer]
            restore_projections(module, saved)
            if saved["num_key_value_groups"] is not None:
                module.num_key_value_groups = saved["num_key_value_groups"]
        self._saved = {}

    def cache_layer(self, layer_idx: int, config):
        plan = (self._plans or {}).get(layer_idx)
        if plan is None or not self._shared:
            return DynamicLayer()
        spread = [n for s in range(AttnShape.of(config).kv_heads) for n, g in enumerate(plan.groups) if s in g]
        return SharedKVLayer([g[0] for g in plan.groups], spread)

    def static_cache(self, model, batch_size: int, max_cache_len: int):
        """transformers' StaticCache (shaped by the K,V it first receives: the kept heads)."""
        from transformers import StaticCache

        require(not getattr(self, "_shared", False),
                "kv_compress: no static path for attention that takes no fewer KV heads (OPT).")
        return StaticCache(config=model.config, max_cache_len=max_cache_len)

    def kv_bytes(self, config, batch: int, tokens: int, dtype_bytes: int) -> dict:
        """Kept KV heads x layers x head_dim x dtype bytes per token, for K and for V (needs `prepare`)."""
        require(self._plans is not None, "kv_compress: call prepare(model) before kv_bytes.")
        shape = AttnShape.of(config)
        heads = sum(len(plan.groups) for plan in self._plans.values())
        per_tensor = batch * tokens * heads * shape.head_dim * dtype_bytes
        return {"k": per_tensor, "v": per_tensor}

    @classmethod
    def variant(cls, settings: dict) -> str:
        kept = settings.get("kv_heads")
        share = f"{kept} KV heads" if kept else f"{100 * (settings.get('ratio') or 0):.0f}% KV heads"
        keys = ", keys mean-pooled" if settings.get("keys") == "meanpool" else ""
        return f"{settings.get('merge', '')}{keys} {share}{cls._recovered(settings)}".strip()

    @staticmethod
    def _recovered(settings: dict) -> str:
        """The label's mark of a row after recovery, e.g. " + LoRA 200 steps"."""
        steps = settings.get("recovery_steps") or 0
        return f" + LoRA {steps} steps" if steps else ""

    @classmethod
    def display(cls, settings: dict, facts: dict | None = None) -> dict:
        """With the run's facts the label states the heads really kept, "svd_a 3/9 KV heads"."""
        shown = super().display(settings, facts)
        facts = facts or {}
        if "kv_heads" in facts and "kv_heads_before" in facts:
            keys = ", keys mean-pooled" if settings.get("keys") == "meanpool" else ""
            shown["label"] = (f"{shown['family']} {settings.get('merge', '')}{keys} "
                              f"{facts['kv_heads']}/{facts['kv_heads_before']} KV heads{cls._recovered(settings)}")
        return shown

    def describe(self) -> dict:
        return dict(self._facts)


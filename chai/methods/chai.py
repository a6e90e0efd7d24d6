"""CHAI: Clustered Head Attention (Agarwal et al., ICML 2024), as the paper describes it.

Heads of a layer whose attention scores look alike are clustered per request; for every clustered layer
softmax(QK^T) is computed only for one representative per cluster, every member reuses it with its own V, and
only the representatives' K stays in the cache (GQA: a KV head's K stays while some representative reads it).

Per request (online membership): the first `membership_tokens` tokens run as plain MHA; their causal
attention probabilities (one [m, m] map per head, lower triangle flattened) are the heads' features; the heads of
each clustered layer are clustered into that layer's count. Rows from m on use the representatives' scores. A
prompt shorter than m stays dense until its cache has seen m tokens (the first m queries are kept meanwhile);
without a cache such a forward is plain MHA. A left-padded batch (generation) clusters each row from its first m
real tokens, in the prefill (chai/generate.py). Variants: `chai_static` (grouping fixed offline), `chai_qkv` (members
also share V, Table 4), `random_groups` (Fig. 1). docs/chai.md lists every point where the released code differs.

Cluster counts: `num_clusters` (uniform, wins when set), else `layer_clusters`: a per-layer list, a preset from
conf/clusters/, or `auto`: read from the calibration artifact by `count_rule` (chai/cluster_counts.py): `threshold`
(inertia <= `threshold` x one-cluster inertia), `budget` (the least measured loss that saves `budget` of the K,V bytes
or of the score computations, `budget_of`), or `kneedle` (the paper's elbow). Layers before `first_clustered_layer`
stay dense.

The pieces: this file holds the settings and turns them into a `ChaiPlan` (`_chai_plan.py`: counts per layer, fixed
memberships, the settings the math reads); the clustered math is `_chai_attention.py`; the cache layers are
`_chai_layers.py` (dynamic) and `_chai_static.py` (static, captured decode). Layers and the attention function share
one `ChaiSession` (the plan, the handshake between a cache update and its attention call, the clustering log).
"""

from dataclasses import asdict, dataclass
from typing import ClassVar

import torch
from transformers.cache_utils import Cache, DynamicLayer, StaticLayer

from chai import cluster_counts
from chai.attention import AttnShape, dense, to_output
from chai.clustering import ALGOS, REPRESENTATIVES, Membership, labels_from_groups, random_labels, representatives
from chai.errors import ChaiError, did_you_mean, require
from chai.kernels import clustered_decode as kd
from chai.methods import register
from chai.methods._chai_attention import dynamic_attention
from chai.methods._chai_layers import ChaiLayer
from chai.methods._chai_plan import ChaiPlan, ChaiSession, ClusteringLog
from chai.methods._chai_static import ChaiStaticLayer
from chai.methods.base import Method, RunContext, RunStats
from chai.paths import CONF_DIR

FIRST_TOKENS = ("dense", "clustered")


def presets() -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / "clusters").glob("*.yaml"))


def load_preset(name: str) -> dict:
    from omegaconf import OmegaConf

    if name not in presets():
        raise did_you_mean("cluster preset", name, presets() + ["auto"])
    return OmegaConf.to_container(OmegaConf.load(CONF_DIR / "clusters" / f"{name}.yaml"))


@register
@dataclass
class Chai(Method):
    """CHAI with per-request (online) membership. Fields are the paper's hyperparameters; `conf/method/chai.yaml`."""

    name = "chai"
    label, order, color = "CHAI", 10, "tab:blue"
    membership: ClassVar[str] = "online"  # online | static (chai_static) | random (random_groups)
    missing_means: ClassVar[dict] = {"count_rule": "kneedle"}  # records made before the rules used the elbow
    # A rule's own knob means nothing under another rule: runs that differ only there are one run (one key).
    moot_unless: ClassVar[dict] = {"threshold": ("count_rule", ["threshold"]), "budget": ("count_rule", ["budget"]),
                                   "budget_of": ("count_rule", ["budget"])}
    # A layer with as many clusters as heads is MHA (every head its own representative), so it runs dense, as the
    # released lists mean it (the Dec 2024 list keeps 18 of LLaMA-7B's layers at 32). Tests switch it off to
    # check the clustered path itself at that no-op setting.
    full_layers_dense: ClassVar[bool] = True

    layer_clusters: list[int] | str | None = "auto"  # per-layer list | preset name (conf/clusters/) | auto
    num_clusters: int | None = None  # uniform count for layers >= first_clustered_layer; wins over layer_clusters
    first_clustered_layer: int = 0
    membership_tokens: int = 5  # m: the first m tokens decide the membership
    cluster_algo: str = "kmeans"  # kmeans (paper) | agglomerative (reference code: cosine, average linkage)
    representative: str = "first"  # first (lowest-index member, reference code) | medoid
    first_tokens: str = "dense"  # dense (paper: the first m rows run as MHA) | clustered (reference code)
    causal_features: bool = True  # False: features without the causal mask, as the reference code computes them
    share_values: bool = False  # True: CHAI-QKV, members also use the representative's V (Table 4)
    count_rule: str = "budget"  # layer_clusters=auto: budget | threshold | kneedle (chai/cluster_counts.py)
    threshold: float = 0.1  # threshold rule: inertia at most this share of the one-cluster inertia
    budget: float = 0.1  # budget rule: share of budget_of saved (0.1: within 2 points of MHA on full PIQA)
    budget_of: str = "kv_bytes"  # kv_bytes (K,V cache bytes) | qk_work (attention-score computations)

    def __post_init__(self):
        self._artifact: dict | None = None  # the calibration artifact, once `prepare` loaded it
        self._session: ChaiSession | None = None  # the plan in use, made by `prepare` or on first use
        self._log = ClusteringLog()  # what online clustering did, across plans
        if self.layer_clusters is not None and not isinstance(self.layer_clusters, str):
            try:
                self.layer_clusters = [int(c) for c in self.layer_clusters]
            except (TypeError, ValueError):
                raise ChaiError(f"method.layer_clusters must be ints, a preset or auto, not {self.layer_clusters}")
            require(all(c >= 1 for c in self.layer_clusters), "method.layer_clusters entries must be >= 1.")
        elif isinstance(self.layer_clusters, str) and self.layer_clusters != "auto":
            load_preset(self.layer_clusters)
        require(self.num_clusters is None or int(self.num_clusters) >= 1, "method.num_clusters must be >= 1.")
        require(self.layer_clusters is not None or self.num_clusters is not None,
                "CHAI needs cluster counts: set method.layer_clusters (list, preset or auto) or method.num_clusters.")
        require(int(self.membership_tokens) >= 1, "method.membership_tokens must be >= 1.")
        require(int(self.first_clustered_layer) >= 0, "method.first_clustered_layer must be >= 0.")
        require(self.membership == "online" or self.representative == "first",
                f"{self.name} has no per-request features to pick a medoid from: use method.representative=first.")
        require(0 < self.threshold < 1, f"method.threshold must be in (0, 1), got {self.threshold}.")
        require(0 <= self.budget < 1, f"method.budget must be in [0, 1), got {self.budget}.")
        for key, value, valid in (("count_rule", self.count_rule, cluster_counts.RULES),
                                  ("budget_of", self.budget_of, cluster_counts.SAVINGS),
                                  ("cluster_algo", self.cluster_algo, ALGOS),
                                  ("representative", self.representative, REPRESENTATIVES),
                                  ("first_tokens", self.first_tokens, FIRST_TOKENS)):
            if value not in valid:
                raise did_you_mean(f"method.{key}", value, valid)

    # --- the plan: counts per layer, fixed memberships -----------------------------------------------------------

    def prepare(self, model, context: RunContext | None = None) -> None:
        if self._needs_artifact():
            from chai.calibration import load_or_calibrate

            self._artifact = load_or_calibrate(model, context)
        self._session = ChaiSession(self.make_plan(model.config), self._log)
        kd.use_gpu_defaults(getattr(model, "device", torch.device("cpu")))  # the decode kernels' settings, this GPU's

    def _needs_artifact(self) -> bool:
        return self._counts_from_artifact() or self.membership == "static"

    def _counts_from_artifact(self) -> bool:
        return self.num_clusters is None and self.layer_clusters == "auto"

    def _session_for(self, config) -> ChaiSession:
        """The session of `config`'s shape: the one `prepare` made, or one made now for a method used without
        `prepare` (tests; anything whose counts or groups need no calibration artifact)."""
        if self._session is None or self._session.plan.shape != AttnShape.of(config):
            if self._needs_artifact() and self._artifact is None:
                raise ChaiError(f"method {self.name} needs the calibration artifact: call method.prepare(model, ctx).")
            self._session = ChaiSession(self.make_plan(config), self._log)
        return self._session

    def check_shape(self, config) -> None:
        """Cluster counts against the layers and heads, first_clustered_layer against the layers. Counts from the
        calibration artifact (`layer_clusters: auto`) are checked once `prepare` has loaded it."""
        shape = AttnShape.of(config)
        if not self._counts_from_artifact() or self._artifact is not None:
            counts, source = self._raw_counts(shape)
            require(len(counts) == shape.layers,
                    f"{source} gives {len(counts)} cluster counts but the model has {shape.layers} layers.")
            for layer, count in enumerate(counts):
                require(1 <= count <= shape.heads, f"{source}: layer {layer} asks for {count} clusters but has "
                        f"{shape.heads} heads: use 1..{shape.heads}.")
        require(self.first_clustered_layer < shape.layers,
                f"method.first_clustered_layer={self.first_clustered_layer} but the model has {shape.layers} layers.")

    def make_plan(self, config) -> ChaiPlan:
        """What the layers and the attention function run with on a model of `config`'s shape (checked first)."""
        self.check_shape(config)
        shape = AttnShape.of(config)
        raw, source = self._raw_counts(shape)
        counts = tuple(None if layer < self.first_clustered_layer or (self.full_layers_dense and c == shape.heads)
                       else c for layer, c in enumerate(raw))
        fixed = self._fixed_memberships(shape, counts) if self.membership != "online" else None
        return ChaiPlan(
            shape=shape, counts=counts, fixed=fixed, membership=self.membership, source=source,
            membership_tokens=self.membership_tokens, share_values=self.share_values, first_tokens=self.first_tokens,
            causal_features=self.causal_features, cluster_algo=self.cluster_algo, representative=self.representative)

    def _raw_counts(self, shape: AttnShape) -> tuple[list[int], str]:
        if self.num_clusters is not None:
            return [int(self.num_clusters)] * shape.layers, "method.num_clusters"
        if isinstance(self.layer_clusters, list):
            return self.layer_clusters, "method.layer_clusters"
        if self.layer_clusters == "auto":
            return cluster_counts.choose(self._artifact, shape, self.count_rule, self.threshold, self.budget,
                                         self.budget_of, self.first_clustered_layer)
        return load_preset(self.layer_clusters)["layers"], f"preset {self.layer_clusters}"

    def _fixed_memberships(self, shape: AttnShape, counts) -> dict[int, Membership]:
        """One-request memberships for static/random grouping, per clustered layer."""
        fixed = {}
        for layer, count in enumerate(counts):
            if count is not None:
                labels = self._fixed_labels(layer, count, shape)[None]  # [1, H]
                reps = representatives(None, labels, count, "first")  # [1, C]
                fixed[layer] = Membership.build(labels, reps, shape.groups, shape.kv_heads)
        return fixed

    def _fixed_labels(self, layer: int, count: int, shape: AttnShape) -> torch.Tensor:
        raise NotImplementedError  # chai_static and random_groups

    # --- the attention function ----------------------------------------------------------------------------------

    def attention(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        # query [B, H, Tq, D]; key/value [B, Hkv or S, Tk, D] as the cache returned them
        session = self._session_for(module.config)
        layer = session.take_updated(module.layer_idx, key)  # the CHAI cache layer just updated, or None
        if not session.plan.is_clustered(module.layer_idx):
            return dense(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
        scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
        if isinstance(layer, ChaiStaticLayer):
            return to_output(layer.attend(query, key, attention_mask, scaling)), None
        return dynamic_attention(session, layer, module, query, key, value, attention_mask, scaling, dropout, **kwargs)

    # --- cache, bytes, record --------------------------------------------------------------------------------------

    def cache_layer(self, layer_idx: int, config):
        session = self._session_for(config)
        return ChaiLayer(session, layer_idx) if session.plan.is_clustered(layer_idx) else DynamicLayer()

    def static_cache(self, model, batch_size: int, max_cache_len: int) -> Cache:
        """The fast decode path's cache (mode=bench, `method_static`): per clustered layer a `ChaiStaticLayer` with
        K for min(clusters, Hkv) KV heads (online; the exact kept count for a fixed membership), dense layers a
        transformers StaticLayer. Unpadded batches; online membership clusters in the first forward (the prompt,
        >= membership_tokens tokens). A decode step has no host sync and can be captured as a CUDA graph."""
        session = self._session_for(model.config)
        plan = session.plan
        return Cache(layers=[
            ChaiStaticLayer(session, layer, max_cache_len, batch_size, plan.kept_k_heads(layer))
            if plan.is_clustered(layer) else StaticLayer(max_cache_len=max_cache_len)
            for layer in range(plan.shape.layers)
        ])

    def kv_bytes(self, config, batch: int, tokens: int, dtype_bytes: int) -> dict:
        """K: representatives x head_dim x bytes per clustered layer and token (GQA: distinct KV heads they read,
        bounded by min(clusters, Hkv) for online membership), every KV head elsewhere. V: every KV head, or as K
        with share_values."""
        plan = self._session_for(config).plan
        per_head = batch * tokens * plan.shape.head_dim * dtype_bytes
        k = sum(plan.kept_k_heads(layer) for layer in range(plan.shape.layers)) * per_head
        v = k if plan.share_values else plan.shape.layers * plan.shape.kv_heads * per_head
        return {"k": k, "v": v}

    @property
    def last_memberships(self) -> dict[int, Membership]:
        """Layer -> the membership online clustering found last (every request of that forward's batch)."""
        return dict(self._log.last)

    def run_stats(self) -> RunStats:
        return RunStats(clustering_s=self._log.seconds, clustering_calls=self._log.calls,
                        decode_kernel=asdict(kd.DEFAULT))  # launch settings of the decode kernels (CUDA)

    @classmethod
    def variant(cls, settings: dict) -> str:
        """How the counts were set: uniform k, a released list by name, or the calibration rule with its knob.
        Records older than the rules (no `count_rule`) used the kneedle elbow over 32-token features."""
        preset = settings.get("layer_clusters")
        if settings.get("num_clusters") is not None:
            return f"k={settings['num_clusters']}"
        if isinstance(preset, str) and preset != "auto":
            return preset  # the released per-layer lists (llama7b_jul2024, ...) are different methods: name them
        if isinstance(preset, list):
            return "own list"
        rule = settings.get("count_rule")
        if rule is None:
            return "kneedle, 32-token features (old)"
        if rule == "budget":
            return f"budget {settings['budget']:.0%} {'K,V' if settings['budget_of'] == 'kv_bytes' else 'QK'}"
        return f"\u03c4={settings['threshold']}" if rule == "threshold" else "kneedle"

    def describe(self) -> dict:
        plan = self._session.plan if self._session is not None else None
        examples = plan.example_memberships(self._log.last) if plan is not None else sorted(self._log.last.items())
        return {
            "membership": self.membership,
            "counts_source": plan.source if plan is not None else None,
            "clusters_per_layer": ["dense" if c is None else c for c in (plan.counts if plan is not None else [])],
            "example_groups": {str(layer): m.groups(0) for layer, m in examples},
            "kept_kv_heads": {str(layer): m.kept_kv()[0] for layer, m in examples},
        }


@register
@dataclass
class ChaiStatic(Chai):
    """CHAI-static: one grouping per layer for every request, from the calibration artifact (the co-association
    consensus of the per-document K-Means groupings, at any count). No online clustering; all rows clustered."""

    name = "chai_static"
    label, order, color = "CHAI-static", 12, "tab:cyan"
    membership: ClassVar[str] = "static"

    def _fixed_labels(self, layer, count, shape):
        if "static_groups_by_count" in self._artifact:
            return labels_from_groups(self._artifact["static_groups_by_count"][layer][count - 1], shape.heads)
        groups = self._artifact["static_groups"][layer]
        require(len(groups) == count, f"the calibration artifact has static groups only at the elbow count "
                f"({len(groups)} in layer {layer}, not {count}): rerun python run.py mode=calibrate.")
        return labels_from_groups(groups, shape.heads)


@register
@dataclass
class ChaiQKV(Chai):
    """CHAI-QKV (Table 4 ablation): members reuse the representative's scores and V; K and V are stored only for
    the representatives."""

    name = "chai_qkv"
    label, order, color = "CHAI-QKV", 11, "tab:olive"  # before CHAI-static: the order of Table 2
    share_values: bool = True


@register
@dataclass
class RandomGroups(Chai):
    """Random head grouping with the same per-layer counts (the paper's Fig. 1 comparison): fixed per layer from
    `seed`, lowest-index member represents."""

    name = "random_groups"
    label, order, color = "Random groups", 16, "tab:gray"
    membership: ClassVar[str] = "random"
    seed: int = 0

    def _fixed_labels(self, layer, count, shape):
        return random_labels(shape.heads, count, torch.Generator().manual_seed(self.seed * 1000 + layer))

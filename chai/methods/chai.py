"""CHAI: Clustered Head Attention (Agarwal et al., ICML 2024), as the paper describes it.

Heads of a layer whose attention scores look alike are clustered per request; for every clustered layer
softmax(QK^T) is computed only for one representative per cluster, every member reuses it with its own V, and
only the representatives' K stays in the cache (GQA: a KV head's K stays while some representative reads it).

Per request (online membership): the first `membership_tokens` tokens run as plain MHA; their causal
attention probabilities (one [m, m] map per head, lower triangle flattened) are the heads' features; the heads of
each clustered layer are clustered into that layer's count. Rows from m on use the representatives' scores. A
prompt shorter than m stays dense until its cache has seen m tokens (the first m queries are kept meanwhile);
without a cache such a forward is plain MHA. Variants: `chai_static` (grouping fixed offline), `chai_qkv` (members
also share V, Table 4), `random_groups` (Fig. 1). docs/chai.md lists every point where the released code differs.

Cluster counts: `num_clusters` (uniform, wins when set), else `layer_clusters`: a per-layer list, a preset from
conf/clusters/, or `auto` (the elbow from `chai.calibrate`). Layers before `first_clustered_layer` stay dense.

The handshake with transformers: the cache is updated before the attention function runs (inside the attention
module), so `ChaiLayer.update` announces itself in `_announced[layer_idx]`; the attention function of that layer
takes it. No announcement (a plain DynamicCache, use_cache=False) means K and V arrived with every head and the
membership lives only for the current forward.
"""

import time
from dataclasses import asdict, dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, DynamicLayer, StaticLayer

from chai.attention import AttnShape, attention_probs, dense, repeat_heads, to_output
from chai.clustering import ALGOS, REPRESENTATIVES, Membership, cluster_heads, labels_from_groups, random_labels
from chai.clustering import causal_features, representatives
from chai.errors import ChaiError, did_you_mean, require
from chai.kernels import clustered_decode as kd
from chai.methods import register
from chai.methods._chai_static import ChaiStaticLayer, causal, clustered_rows, pick
from chai.methods.base import Method, RunContext
from chai.paths import CONF_DIR

FIRST_TOKENS = ("dense", "clustered")


def presets() -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / "clusters").glob("*.yaml"))


def load_preset(name: str) -> dict:
    from omegaconf import OmegaConf

    if name not in presets():
        raise did_you_mean("cluster preset", name, presets() + ["auto"])
    return OmegaConf.to_container(OmegaConf.load(CONF_DIR / "clusters" / f"{name}.yaml"))


class ChaiLayer(DynamicLayer):
    """A cache layer that keeps every K head until its layer's membership is known, then only the K of the KV heads
    representatives read (V too with `share_values`). keys [B, S, T, D] with S <= Hkv, values [B, Hkv or S, T, D]."""

    def __init__(self, method: "Chai", layer_idx: int):
        super().__init__()
        self.method, self.layer_idx = method, layer_idx
        self.membership: Membership | None = None
        self.queries: torch.Tensor | None = None  # [B, H, <m, D] first query rows, until the layer clusters
        self.past = 0
        self.returned = None

    def update(self, key_states, value_states, *args, **kwargs):
        self.past = self.get_seq_length()
        if self.membership is not None:
            key_states = pick(key_states, self.membership.kv_keep)  # [B, S, Tnew, D]
            if self.method.share_values:
                value_states = pick(value_states, self.membership.kv_keep)
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        self.returned = keys
        self.method._announced[self.layer_idx] = self
        return keys, values

    def first_queries(self, query: torch.Tensor, m: int) -> torch.Tensor | None:
        """Collect query rows of positions < m across forwards; [B, H, m, D] once all m are there."""
        have = 0 if self.queries is None else self.queries.shape[2]
        if have < m:
            rows = query[:, :, : m - have]
            self.queries = rows if self.queries is None else torch.cat([self.queries, rows], dim=2)
        return self.queries if self.queries.shape[2] >= m else None

    def compact(self, membership: Membership) -> None:
        """Drop the K (and with share_values the V) of heads no representative reads."""
        self.membership, self.queries = membership, None
        self.keys = pick(self.keys, membership.kv_keep)
        if self.method.share_values:
            self.values = pick(self.values, membership.kv_keep)

    def _rows(self, rows: torch.Tensor) -> None:
        if self.membership is not None:
            self.membership = self.membership.index(rows)
        if self.queries is not None:
            self.queries = self.queries[rows.to(self.queries.device)]

    def batch_repeat_interleave(self, repeats: int) -> None:
        batch = self.keys.shape[0] if self.is_initialized and self.keys.dim() == 4 else 0
        super().batch_repeat_interleave(repeats)
        self._rows(torch.arange(batch).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._rows(torch.as_tensor(indices))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._rows(beam_idx)

    def reset(self) -> None:
        super().reset()
        self.membership = self.queries = None


@register
@dataclass
class Chai(Method):
    """CHAI with per-request (online) membership. Fields are the paper's hyperparameters; `conf/method/chai.yaml`."""

    name = "chai"
    membership: ClassVar[str] = "online"  # online | static (chai_static) | random (random_groups)
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

    def __post_init__(self):
        self._announced: dict[int, ChaiLayer | ChaiStaticLayer] = {}
        self._mask_seen, self._mask_full = None, True
        self._config_id, self._counts, self._fixed, self._source = None, None, None, None
        self._artifact, self._seconds, self._calls, self._last = None, 0.0, 0, {}
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
        for key, value, valid in (("cluster_algo", self.cluster_algo, ALGOS),
                                  ("representative", self.representative, REPRESENTATIVES),
                                  ("first_tokens", self.first_tokens, FIRST_TOKENS)):
            if value not in valid:
                raise did_you_mean(f"method.{key}", value, valid)

    # --- setup: counts per layer, fixed memberships -------------------------------------------------------------

    def prepare(self, model, context: RunContext | None = None) -> None:
        if self._needs_artifact():
            from chai.calibrate import load_or_calibrate

            self._artifact = load_or_calibrate(model, context)
        self._setup(model.config)

    def _needs_artifact(self) -> bool:
        return self._counts_from_artifact() or self.membership == "static"

    def _counts_from_artifact(self) -> bool:
        return self.num_clusters is None and self.layer_clusters == "auto"

    def _ensure(self, config) -> None:
        if self._config_id != id(config):
            if self._needs_artifact() and self._artifact is None:
                raise ChaiError(f"method {self.name} needs the calibration artifact: call method.prepare(model, ctx).")
            self._setup(config)

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

    def _setup(self, config) -> None:
        self.check_shape(config)
        shape = AttnShape.of(config)
        counts, self._source = self._raw_counts(shape)
        self._shape = shape
        self._counts = [None if layer < self.first_clustered_layer or (self.full_layers_dense and c == shape.heads)
                        else c for layer, c in enumerate(counts)]
        self._fixed = self._fixed_memberships(shape) if self.membership != "online" else None
        self._config_id = id(config)

    def _raw_counts(self, shape: AttnShape) -> tuple[list[int], str]:
        if self.num_clusters is not None:
            return [int(self.num_clusters)] * shape.layers, "method.num_clusters"
        if isinstance(self.layer_clusters, list):
            return self.layer_clusters, "method.layer_clusters"
        if self.layer_clusters == "auto":
            if self.membership == "static":
                return [len(g) for g in self._artifact["static_groups"]], "calibration static_groups"
            return list(self._artifact["elbow"]["chosen"]), "calibration elbow"
        return load_preset(self.layer_clusters)["layers"], f"preset {self.layer_clusters}"

    def _fixed_memberships(self, shape: AttnShape) -> dict[int, Membership]:
        """One-request memberships for static/random grouping, per clustered layer."""
        fixed = {}
        for layer, count in enumerate(self._counts):
            if count is not None:
                labels = self._fixed_labels(layer, count, shape)[None]  # [1, H]
                reps = representatives(None, labels, count, "first")
                fixed[layer] = Membership.build(labels, reps, shape.groups, shape.kv_heads)
        return fixed

    def _fixed_labels(self, layer: int, count: int, shape: AttnShape) -> torch.Tensor:
        raise NotImplementedError  # chai_static and random_groups

    # --- the attention function ----------------------------------------------------------------------------------

    def attention(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        # query [B, H, Tq, D]; key/value [B, Hkv or S, Tk, D] as the cache returned them
        self._ensure(module.config)
        idx = module.layer_idx
        layer = self._announced.pop(idx, None)
        if layer is not None and layer.returned is not key:
            layer = None  # stale: that cache was updated without this attention function running
        if self._counts[idx] is None:
            return dense(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
        scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
        if isinstance(layer, ChaiStaticLayer):
            return to_output(layer.attend(query, key, attention_mask, scaling)), None
        tq, tk = query.shape[2], key.shape[2]
        past = layer.past if layer is not None else tk - tq
        mask = attention_mask if attention_mask is not None else causal(past, tq, tk, query.device)
        if layer is not None and layer.membership is not None:
            return to_output(self._clustered(query, key, value, mask, scaling, layer.membership, compact=True)), None
        membership = self._membership(idx, query, key, scaling, past, layer)
        if membership is None:  # fewer than m tokens so far: plain MHA, every K kept
            return dense(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
        out = self._first_clustered(query, key, value, mask, scaling, membership, past)
        if layer is not None:
            layer.compact(membership)
        return to_output(out), None

    def _first_clustered(self, query, key, value, mask, scaling, membership: Membership, past: int) -> torch.Tensor:
        """The forward that found the membership (every K head still there): rows before m as MHA (first_tokens=
        dense, online membership), the rest with the representatives' scores. Returns [B, H, Tq, D]."""
        tq = query.shape[2]
        online_dense = self.membership == "online" and self.first_tokens == "dense"
        n_dense = min(max(self.membership_tokens - past, 0), tq) if online_dense else 0
        parts = []
        if n_dense:
            parts.append(F.scaled_dot_product_attention(query[:, :, :n_dense], key, value, mask[..., :n_dense, :],
                                                        scale=scaling, enable_gqa=self._shape.groups > 1))
        if n_dense < tq:
            rest = (query[:, :, n_dense:], key, value, mask[..., n_dense:, :], scaling, membership)
            parts.append(self._clustered(*rest, compact=False))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)

    def _clustered(self, query, key, value, mask, scaling, m: Membership, compact: bool) -> torch.Tensor:
        """softmax(q k^T) of the representatives only, shared by every member, times each head's own V (or the
        representative's V with share_values). keys are compact ([B, S, T, D], read through rep_slot) or full
        ([B, Hkv, T, D], read through rep // groups). One unpadded decode token on CUDA: the Triton kernel; else
        `clustered_rows` (row blocks, no [B, C, Tq, Tk] float32 tensor). Returns [B, H, Tq, D]."""
        key_slot = m.rep_slot if compact else m.reps // self._shape.groups  # [B, C]
        value_slot = key_slot if self.share_values else None
        if query.shape[2] == 1 and kd._use_triton(query) and self._unpadded(mask):
            v_index = key_slot.gather(1, m.labels) if self.share_values else None
            return kd.clustered_decode_attention(query, key, value, m.labels, m.reps, scaling, k_index=key_slot,
                                                 v_index=v_index)
        return clustered_rows(query, key, value, mask, scaling, m.labels, m.reps, key_slot, value_slot)

    def _unpadded(self, mask) -> bool:
        """Whether a decode mask attends everywhere (one host sync per forward: every layer gets the same mask)."""
        if mask is None:
            return True
        if mask is not self._mask_seen:
            self._mask_seen, self._mask_full = mask, bool(mask.all())
        return self._mask_full

    def _membership(self, idx, query, key, scaling, past, layer) -> Membership | None:
        """This forward's membership for layer idx: fixed (static/random), or clustered from the first m tokens
        (None while fewer than m exist)."""
        batch = query.shape[0]
        if self._fixed is not None:
            return self._fixed[idx].index(torch.zeros(batch, dtype=torch.long))
        m = self.membership_tokens
        if layer is None and past > 0:
            raise ChaiError("CHAI decoding needs its own cache: pass past_key_values=method.make_cache(model).")
        if layer is not None:
            q_first = layer.first_queries(query, m)  # [B, H, m, D] once m tokens exist
        else:
            q_first = query[:, :, :m] if query.shape[2] >= m else None
        if q_first is None:
            return None
        started = time.perf_counter()
        k_first = repeat_heads(key[:, :, :m], self._shape.groups)  # [B, H, m, D]: all heads, before compaction
        mask = causal(0, m, m, query.device) if self.causal_features else None
        probs = attention_probs(q_first, k_first, mask, scaling)  # [B, H, m, m]
        if self.causal_features:
            features = causal_features(probs, m)
        else:
            features = probs.flatten(2)
        count = self._counts[idx]
        labels = cluster_heads(features, count, self.cluster_algo)
        reps = representatives(features, labels, count, self.representative)
        membership = Membership.build(labels, reps, self._shape.groups, self._shape.kv_heads)
        if features.is_cuda:
            torch.cuda.synchronize(features.device)
        self._seconds += time.perf_counter() - started
        self._calls += 1
        self._last[idx] = membership
        return membership

    # --- cache, bytes, record --------------------------------------------------------------------------------------

    def cache_layer(self, layer_idx: int, config):
        self._ensure(config)
        return ChaiLayer(self, layer_idx) if self._counts[layer_idx] is not None else DynamicLayer()

    def static_cache(self, model, batch_size: int, max_cache_len: int) -> Cache:
        """The fast decode path's cache (mode=bench, `method_static`): per clustered layer a `ChaiStaticLayer` with
        K for min(clusters, Hkv) KV heads (online; the exact kept count for a fixed membership), dense layers a
        transformers StaticLayer. Unpadded batches; online membership clusters in the first forward (the prompt,
        >= membership_tokens tokens). A decode step has no host sync and can be captured as a CUDA graph."""
        self._ensure(model.config)
        return Cache(layers=[
            StaticLayer(max_cache_len=max_cache_len) if count is None
            else ChaiStaticLayer(self, layer, max_cache_len, batch_size, self._kept_k_heads(layer))
            for layer, count in enumerate(self._counts)
        ])

    def _kept_k_heads(self, layer: int) -> int:
        count, kv = self._counts[layer], self._shape.kv_heads
        if count is None:
            return kv
        if self._fixed is not None:
            return self._fixed[layer].kept_kv()[0]
        return min(count, kv)  # GQA: an upper bound; the measured bytes say what the membership kept

    def kv_bytes_per_token(self, config, dtype_bytes: int) -> dict:
        """K: representatives x head_dim x bytes per clustered layer (GQA: distinct KV heads they read, bounded by
        min(clusters, Hkv) for online membership), every KV head elsewhere. V: every KV head, or as K with
        share_values. Batch 1."""
        self._ensure(config)
        per_head = self._shape.head_dim * dtype_bytes
        k = sum(self._kept_k_heads(layer) for layer in range(self._shape.layers)) * per_head
        v = k if self.share_values else self._shape.layers * self._shape.kv_heads * per_head
        return {"k": k, "v": v}

    def describe(self) -> dict:
        counts = self._counts or []
        return {
            "membership": self.membership,
            "counts_source": self._source,
            "clusters_per_layer": ["dense" if c is None else c for c in counts],
            "clustering_time_s": self._seconds,
            "clustering_calls": self._calls,
            "example_groups": {
                str(layer): m.groups(0) for layer, m in sorted((self._fixed or self._last).items())
            },
            "kept_kv_heads": {str(layer): m.kept_kv()[0] for layer, m in sorted((self._fixed or self._last).items())},
            "decode_kernel": asdict(kd.DEFAULT),  # launch settings of the decode kernels (CUDA)
        }


@register
@dataclass
class ChaiStatic(Chai):
    """CHAI-static: one grouping per layer for every request, from the calibration artifact (the co-association
    consensus of the per-document K-Means groupings, at any count). No online clustering; all rows clustered."""

    name = "chai_static"
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
    share_values: bool = True


@register
@dataclass
class RandomGroups(Chai):
    """Random head grouping with the same per-layer counts (the paper's Fig. 1 comparison): fixed per layer from
    `seed`, lowest-index member represents."""

    name = "random_groups"
    membership: ClassVar[str] = "random"
    seed: int = 0

    def _fixed_labels(self, layer, count, shape):
        return random_labels(shape.heads, count, torch.Generator().manual_seed(self.seed * 1000 + layer))

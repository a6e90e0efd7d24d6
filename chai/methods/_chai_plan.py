"""What CHAI's cache layers and its attention function share (helpers of `chai/methods/chai.py`).

`ChaiPlan` is what `Chai.prepare` (or the first use without it) decides for one model shape: cluster counts per
layer, fixed memberships (chai_static, random_groups) and the settings the clustered math reads. `ChaiSession` is
one plan in use: the plan, the cross-layer handshake, and the log of what clustering did (`ClusteringLog`, kept by
the method across plans). Both cache layers (`ChaiLayer`, `ChaiStaticLayer`) and the attention function are given
the session; none of them reads the method.
"""

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import torch

from chai.attention import AttnShape
from chai.clustering import Membership


@dataclass(frozen=True, eq=False)  # eq=False: memberships hold tensors, a plan is compared by identity
class ChaiPlan:
    """What CHAI runs with on one model shape (`Chai.make_plan`): fixed once made, a function of the settings, the
    shape and the calibration artifact only."""

    shape: AttnShape
    counts: tuple[int | None, ...]  # clusters per layer; None: the layer runs dense (MHA)
    fixed: Mapping[int, Membership] | None  # static/random: one-request membership per clustered layer; online: None
    membership: str  # online | static | random
    source: str  # where the counts came from (for the record): "method.num_clusters", "preset ...", ...
    membership_tokens: int  # m: the first m tokens decide an online membership
    share_values: bool  # CHAI-QKV: members also read the representative's V, only the kept V is stored
    first_tokens: str  # dense: rows before m run as MHA | clustered
    causal_features: bool  # clustering features: causal attention rows over the first m tokens (else full rows)
    cluster_algo: str  # kmeans | agglomerative
    representative: str  # first | medoid
    # Device copies of the fixed memberships (a cache, not a setting: `fixed` itself never changes).
    _on_device: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.fixed is not None:  # a read-only view: nothing changes a plan once it is made
            object.__setattr__(self, "fixed", MappingProxyType(dict(self.fixed)))

    def is_clustered(self, layer: int) -> bool:
        return self.counts[layer] is not None

    def fixed_membership(self, layer: int, batch: int, device: torch.device | None = None) -> Membership:
        """The fixed membership of `layer` for every request of a batch: labels [B, H], reps [B, C], ..., on
        `device` (default: where the plan made it, the CPU). The decode kernel reads it on the GPU, so each layer's
        copy is moved there once per device, not on every forward."""
        one = self.fixed[layer]
        if device is not None and one.labels.device != torch.device(device):
            key = (layer, str(device))
            if key not in self._on_device:
                self._on_device[key] = Membership(*(t.to(device) for t in (one.labels, one.reps, one.kv_keep,
                                                                             one.rep_slot)))
            one = self._on_device[key]
        return one.index(torch.zeros(batch, dtype=torch.long, device=one.labels.device))

    def kept_k_heads(self, layer: int) -> int:
        """KV heads whose K a layer stores: every one in a dense layer, the exact count with a fixed membership."""
        count, kv = self.counts[layer], self.shape.kv_heads
        if count is None:
            return kv
        if self.fixed is not None:
            return self.fixed[layer].kept_kv()[0]
        return min(count, kv)  # GQA: an upper bound; the measured bytes say what the membership kept

    def example_memberships(self, found: dict[int, Membership]) -> list[tuple[int, Membership]]:
        """(layer, membership) pairs for the record: the fixed ones, else those the last forwards found."""
        return sorted((self.fixed or found).items())


@dataclass
class ClusteringLog:
    """What online clustering did since the method was built (the method's `run_stats` and `describe`).

    Timing: on CUDA each clustering is bracketed by two events recorded on the stream, so timing it adds no host
    sync to the prefill; the events are read when `seconds` is (after the caller's own sync). On the CPU work is
    synchronous and `perf_counter` suffices."""

    calls: int = 0
    last: dict[int, Membership] = field(default_factory=dict)  # layer -> the latest membership found
    _seconds: float = 0.0  # resolved time
    _pending: list = field(default_factory=list)  # (start, end) CUDA events not yet read

    def start(self, device: torch.device):
        """A mark before one clustering: a recorded CUDA event, or perf_counter on the CPU."""
        if device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def record(self, layer: int, membership: Membership, started) -> None:
        """One clustering of `layer`, begun at mark `started` (`start`), ended now on the device's stream."""
        if isinstance(started, torch.cuda.Event):
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._pending.append((started, end))
        else:
            self._seconds += time.perf_counter() - started
        self.calls += 1
        self.last[layer] = membership

    @property
    def seconds(self) -> float:
        """Time spent clustering so far, on the device timeline (waits for the recorded events)."""
        for begin, end in self._pending:
            end.synchronize()
            self._seconds += begin.elapsed_time(end) / 1e3
        self._pending.clear()
        return self._seconds


class ChaiSession:
    """One plan in use by a model's caches and attention calls.

    Why a handshake: transformers updates the cache inside the attention module *before* it calls the attention
    function, and passes the function only the tensors `update` returned, not the cache layer. A CHAI layer whose
    keys are compact (or still waiting for m tokens) must be found again, so `update` announces itself here under
    its layer index and the attention function of that layer takes it (`take_updated`). Nothing announced (a plain
    DynamicCache, use_cache=False) means K and V arrived with every head and the membership lives for this forward.
    """

    def __init__(self, plan: ChaiPlan, log: ClusteringLog):
        self.plan, self.log = plan, log
        self._updated: dict[int, object] = {}  # layer index -> the cache layer updated last for it
        self._mask_seen, self._mask_full = None, True

    def announce(self, layer_idx: int, layer) -> None:
        self._updated[layer_idx] = layer

    def take_updated(self, layer_idx: int, key: torch.Tensor):
        """The cache layer that returned `key` for this layer, or None (no CHAI cache, or a stale announcement:
        that cache was updated without this attention function running)."""
        layer = self._updated.pop(layer_idx, None)
        return layer if layer is not None and layer.take_returned(key) else None

    def mask_is_full(self, mask: torch.Tensor | None) -> bool:
        """Whether a decode mask attends everywhere (one host sync per forward: every layer gets the same mask)."""
        if mask is None:
            return True
        if mask is not self._mask_seen:
            self._mask_seen, self._mask_full = mask, bool(mask.all())
        return self._mask_full

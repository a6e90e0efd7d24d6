"""SparQ attention (Ribar et al., "SparQ Attention: Bandwidth-Efficient LLM Inference", arXiv 2312.04985).

Per query, SparQ reads only part of the K,V cache:
1. keep the r components of q with the largest |q_i| and approximate the scores over all cached keys with them,
   s_hat = softmax(q[i] . K[:, i] / tau), tau = sqrt(D * ||q[i]||_1 / ||q||_1)  (in our terms: logits times
   `scaling / sqrt(||q[i]||_1 / ||q||_1)`, since the model's `scaling` is 1/sqrt(D), or 1.0 on OPT's pre-scaled q);
2. take the k positions with the largest s_hat (the last local_k = max(1, floor(k * local_fraction)) positions
   always included: the current one at least) and run exact softmax attention over them;
3. blend with the mean of all V by the approximate mass alpha = sum of s_hat over the chosen positions:
   y = alpha * y_topk + (1 - alpha) * mean(V)  (`reallocate_to_mean`).
Grouped-query models make one selection per KV head: components by the |q| summed over the heads of the group,
positions by the s_hat summed over them; each query head keeps its own temperature, softmax and alpha.

Which rows are sparse (`scope`). SparQ as published prefills the prompt densely and sparsifies generated tokens
only. lm-eval scores a request (context + continuation) in one forward; `scope: continuation` (the default) leaves
its prompt rows exactly dense (the model's own attention, bit-identical to MHA) and gives every continuation row
what token-by-token decoding with SparQ after a dense prefill would give it (a test checks this). The prompt ends
where `set_prompt_lengths` says (chai.evaluate tells it per request); without it a forward of several rows is a
prefill (dense) and a single row with a cache a decode step. `scope: all_rows` is the earlier row-wise simulation:
every row sparse whose allowed length exceeds k, except the first `dense_prefix` tokens.
Each row in scope gets its own selection among the positions the causal mask allows it and its own mean of V over
them; rows whose allowed length is <= k are exactly dense (alpha = 1). This is an accuracy simulation: it computes
full score matrices and saves no time; the bandwidth it would save is counted instead.

Parameters
- compression: c, the target ratio of bytes read per decode step, dense / SparQ (2, 4, 8, ...): r = round(D / c),
  as the authors' `get_r_k_for_compression_ratio` does.
- k: positions kept per decode step, fixed (the paper's 128, so contexts of <= 128 tokens run dense). k = null
  derives it per row, k = round(S / (2c)) with S the row's context, so that every row of a short lm-eval sequence
  reads ~1/c of dense: r*S + 2*k*D + D ~= 2*S*D / c (the row-wise variant's rule).
- r: explicit components kept (overrides the derived one; required when compression is null, as is k).
- local_fraction: share of k given to the most recent positions (local = floor(k / 4) in the paper's setting). The
  current position is always kept (the local window is at least 1), as in the paper, even where k / 4 < 1.
- scope, dense_prefix: see above (dense_prefix: the first tokens of every sequence stay dense).
- reallocate_to_mean: see step 3.
- store_k_twice: the authors' fast layout keeps a second, transposed copy of K so that both the r-column and the
  k-row reads are contiguous; counted in K memory (the cache really holds the copy). Results are unchanged.
- reference_context: the context length at which `describe` reports bytes per decode step. The bytes measured over
  the run count the rows in scope only (decode / continuation rows; those run dense count as dense) and go to the
  record as `run_stats().kv_read_fraction` (bytes read / dense bytes) and `describe()["measured"]`.

Bytes read per decode step, per layer and KV head (elements, times dtype bytes), at context length S:
dense 2*S*D; SparQ r*S (r columns of K) + 2*k*D (k rows of K and V) + D (the mean of V, when reallocating).
"""

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from transformers.cache_utils import DynamicLayer

from chai.attention import AttnShape, additive, dense, to_output
from chai.errors import require
from chai.methods import register
from chai.methods.base import Method, RunStats

ROW_CHUNK = 256  # query rows per block: bounds the [B, H, rows, Tk] score tensors on long sequences


class TwiceKLayer(DynamicLayer):
    """A dynamic cache layer that really holds a second copy of K (`store_k_twice`): `keys` is [B, Hkv, T, 2D] with
    the copy in its second half, and attention reads the first half. The authors keep the copy transposed for
    contiguous column reads; the layout changes neither the bytes held nor the results."""

    def update(self, key_states, value_states, *args, **kwargs):
        keys, values = super().update(torch.cat([key_states, key_states], dim=-1), value_states, *args, **kwargs)
        return keys[..., : key_states.shape[-1]], values


def choose_positions(score, allowed, k_rows, local_rows) -> torch.Tensor:
    """Per row, the `k_rows` best-scoring allowed positions, the last `local_rows` allowed ones always among them.

    score: [B, Hkv, Tq, Tk] (>= 0 where allowed); allowed: [B, 1, Tq, Tk] bool; k_rows, local_rows: [B, 1, Tq].
    Returns [B, Hkv, Tq, Tk] bool."""
    # from_end: 1 at a row's last allowed position, 2 at the one before, ... (works under left padding too)
    from_end = allowed.flip(-1).cumsum(-1).flip(-1)
    local = allowed & (from_end <= local_rows[..., None])
    score = torch.where(local, torch.inf, score).masked_fill(~allowed, -1.0)
    width = min(int(k_rows.max()), score.shape[-1])
    index = score.topk(width, dim=-1).indices  # sorted: rank j holds the (j+1)-th best
    keep = torch.arange(width, device=score.device) < k_rows[..., None]  # [B, 1, Tq, width]
    chosen = torch.zeros(score.shape, dtype=torch.bool, device=score.device)
    return chosen.scatter_(-1, index, keep.expand_as(index)) & allowed


def sparq_rows(query, key, value, allowed, scaling, r, k_rows, local_rows, sparse_rows, reallocate) -> torch.Tensor:
    """SparQ for every query row at once, in float32.

    query: [B, H, Tq, D]; key, value: [B, Hkv, Tk, D]; allowed: [B, 1, Tq, Tk] bool (the causal mask);
    k_rows, local_rows: [B, 1, Tq] positions kept / of them the most recent; sparse_rows: [B, 1, Tq] bool, False
    for rows computed exactly dense. Returns [B, H, Tq, D]."""
    batch, heads, rows, dim = query.shape
    kv_heads = key.shape[1]
    q = query.float().reshape(batch, kv_heads, heads // kv_heads, rows, dim)  # [B, Hkv, G, Tq, D]
    keys_t = key.float()[:, :, None].transpose(-1, -2)  # [B, Hkv, 1, D, Tk]
    tiny = torch.finfo(torch.float32).tiny

    # 1. The r largest |q| components, one choice per KV head (|q| summed over its query heads).
    abs_q = q.abs()
    top = abs_q.sum(2).topk(r, dim=-1).indices  # [B, Hkv, Tq, r]
    comps = torch.zeros(batch, kv_heads, rows, dim, dtype=torch.bool, device=q.device).scatter_(-1, top, True)
    comps = comps[:, :, None]  # [B, Hkv, 1, Tq, D]
    kept_l1 = (abs_q * comps).sum(-1, keepdim=True) / abs_q.sum(-1, keepdim=True).clamp_min(tiny)
    temperature = scaling / kept_l1.clamp_min(tiny).sqrt()  # [B, Hkv, G, Tq, 1]
    bias = additive(allowed[:, :, None], torch.float32)  # [B, 1, 1, Tq, Tk]
    s_hat = torch.softmax((q * comps) @ keys_t * temperature + bias, dim=-1)  # [B, Hkv, G, Tq, Tk]

    # 2. Exact attention over the top k positions of the summed approximate scores (dense rows: all allowed).
    chosen = choose_positions(s_hat.sum(2), allowed, k_rows, local_rows)
    chosen = torch.where(sparse_rows[..., None], chosen, allowed)[:, :, None]  # [B, Hkv, 1, Tq, Tk]
    probs = torch.softmax(q @ keys_t * scaling + additive(chosen, torch.float32), dim=-1)
    out = probs @ value.float()[:, :, None]  # [B, Hkv, G, Tq, D]

    # 3. Give the approximate mass of the positions left out to the mean of V over all allowed positions.
    if reallocate:
        alpha = torch.where(sparse_rows[:, :, None, :, None], (s_hat * chosen).sum(-1, keepdim=True), 1.0)
        mean = (allowed.float() @ value.float()) / allowed.sum(-1, keepdim=True).clamp_min(1)  # [B, Hkv, Tq, D]
        out = out * alpha + mean[:, :, None] * (1 - alpha)
    return out.reshape(batch, heads, rows, dim)


def allowed_positions(mask, query, key) -> torch.Tensor:
    """The boolean [B, 1, Tq, Tk] mask (True = attend); None means causal with the queries at the end."""
    if mask is None:
        rows, length = query.shape[2], key.shape[2]
        positions = torch.arange(length - rows, length, device=query.device)
        return (torch.arange(length, device=query.device) <= positions[:, None])[None, None]
    if mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min / 2


SCOPES = ("continuation", "all_rows")


def _integer(value, low) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


@register
@dataclass
class SparQ(Method):
    """SparQ attention on decode / continuation rows (see the module docstring for the algorithm and byte counts)."""

    name = "sparq"
    label, order, color = "SparQ", 30, "tab:purple"
    # records made before `scope` and `keep_current` ran every row sparse and did not force the current position
    missing_means: ClassVar[dict] = {"scope": "all_rows", "keep_current": False}

    compression: float | None = 8  # c: r = round(head_dim / c) (and k = round(S / (2c)) per row when k is null)
    r: int | None = None  # explicit r overrides the derived one
    k: int | None = 128  # positions kept per decode step (the paper's); null: derived per row from its context
    local_fraction: float = 0.25  # local_k = max(1, floor(k / 4)): the most recent positions always kept
    keep_current: bool = True  # local_k >= 1 (the paper's); false: floor(k / 4) may be 0 (the earlier row-wise runs)
    scope: str = "continuation"  # continuation: prompt rows dense (published); all_rows: every row (row-wise)
    reallocate_to_mean: bool = True
    dense_prefix: int = 0
    store_k_twice: bool = False  # the authors' fast layout: a second K copy, counted in K memory
    reference_context: int = 2048  # context length for the bytes-per-decode-step figures in the record

    def __post_init__(self):
        c = self.compression
        require(
            c is None or (isinstance(c, (int, float)) and not isinstance(c, bool) and c >= 1),
            f"sparq: compression must be null or a number >= 1, got {c!r}.",
        )
        require(self.r is None or _integer(self.r, 1), f"sparq: r must be an integer >= 1, got {self.r!r}.")
        require(self.k is None or _integer(self.k, 1), f"sparq: k must be an integer >= 1 or null, got {self.k!r}.")
        both = self.r is not None and self.k is not None
        require(c is not None or both, "sparq: set compression, or both r and k.")
        require(0 <= self.local_fraction <= 1, f"sparq: local_fraction must be in [0, 1], got {self.local_fraction}.")
        require(self.scope in SCOPES, f"sparq: scope must be one of {', '.join(SCOPES)}, got {self.scope!r}.")
        require(
            _integer(self.dense_prefix, 0), f"sparq: dense_prefix must be an integer >= 0, got {self.dense_prefix!r}."
        )
        require(
            _integer(self.reference_context, 1),
            f"sparq: reference_context must be an integer >= 1, got {self.reference_context!r}.",
        )
        self._shape: AttnShape | None = None  # the model's, known once prepared or applied
        self._dtype_bytes = 2
        self._counts = None  # rows in scope: [rows, bytes SparQ reads, bytes dense reads], over layers and KV heads
        self._prompt_lengths = None  # set_prompt_lengths: [B] prompt tokens per row of the next forwards

    def components(self, head_dim: int) -> int:
        """r: explicit, else round(D / compression), at least 1."""
        return self.r if self.r is not None else max(1, math.floor(head_dim / self.compression + 0.5))

    def budgets(self, n: torch.Tensor):
        """Per-row (k, local_k, sparse?) from n, the number of positions each row may attend to. n: [B, 1, Tq].
        local_k >= 1 with `keep_current`: the current position is always kept. Scope is applied by the caller."""
        if self.k is not None:
            k_rows = torch.full_like(n, self.k)
        else:
            k_rows = torch.floor(n.double() / (2 * self.compression) + 0.5).long().clamp_min(1)
        local_rows = torch.floor(k_rows.double() * self.local_fraction).long().clamp_min(int(self.keep_current))
        return k_rows, local_rows, (n > k_rows) & (n > self.dense_prefix)

    def in_scope(self, batch: int, rows: int, keys: int, device) -> torch.Tensor:
        """[B, 1, Tq] bool: the rows SparQ acts on. A row's position is the cached tokens before this forward plus
        its index in it (queries are the last Tq of the Tk keys)."""
        if self.scope == "all_rows":
            return torch.ones(batch, 1, rows, dtype=torch.bool, device=device)
        lengths = self._prompt_lengths
        if lengths is None:  # no word from the caller: a prefill is prompt, a single row a decode step
            return torch.full((batch, 1, rows), rows == 1, dtype=torch.bool, device=device)
        require(len(lengths) == batch, f"sparq: {len(lengths)} prompt lengths for a batch of {batch}.")
        positions = torch.arange(keys - rows, keys, device=device)
        return positions[None, None, :] >= lengths.to(device)[:, None, None]

    def check_shape(self, config) -> None:
        head_dim = AttnShape.of(config).head_dim
        require(self.components(head_dim) <= head_dim, f"sparq: r={self.r} exceeds the model's head_dim {head_dim}.")

    def _check(self, model) -> None:
        self.check_shape(model.config)
        self._shape = AttnShape.of(model.config)
        self._dtype_bytes = torch.finfo(model.dtype).bits // 8

    def prepare(self, model, context=None) -> None:
        self._check(model)

    def on_apply(self, model) -> None:
        self._check(model)

    def attention(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        # query: [B, H, Tq, D]; key, value: [B, Hkv, Tk, D] (the whole cache, current tokens included)
        scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
        batch, _, rows, _ = query.shape
        allowed = allowed_positions(attention_mask, query, key)
        n = allowed.sum(-1).expand(batch, -1, -1)  # [B, 1, Tq]; the mask may broadcast over the batch
        scope = self.in_scope(batch, rows, key.shape[2], query.device)
        k_rows, local_rows, sparse = self.budgets(n)
        sparse = sparse & scope
        self._count(n, k_rows, sparse, scope, query, key)
        if not bool(sparse.any()):
            return dense(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
        r = self.components(query.shape[-1])
        blocks = []
        for start in range(0, rows, ROW_CHUNK):
            part = slice(start, start + ROW_CHUNK)
            blocks.append(
                sparq_rows(
                    query[:, :, part], key, value, allowed[:, :, part], scaling, r, k_rows[..., part],
                    local_rows[..., part], sparse[..., part], self.reallocate_to_mean,
                )
            )
        out = to_output(torch.cat(blocks, dim=2).to(query.dtype))  # [B, Tq, H, D]
        if not bool(scope.all()):  # rows out of scope (the prompt) keep the model's own dense attention, bit for bit
            base = dense(module, query, key, value, attention_mask, scaling, dropout, **kwargs)[0]
            out = torch.where(scope[:, 0, :, None, None], out, base)
        return out, None

    def step_elements(self, n, k_rows, sparse, head_dim: int):
        """K,V elements one decode step reads per KV head: SparQ's and dense's. n, k_rows, sparse: tensors."""
        dense_elems = 2 * n * head_dim
        sparq = self.components(head_dim) * n + 2 * k_rows * head_dim + head_dim * self.reallocate_to_mean
        return torch.where(sparse, sparq, dense_elems), dense_elems

    def _count(self, n, k_rows, sparse, scope, query, key) -> None:
        """Add the rows in scope to the run's byte counts (a row in scope that runs dense counts as dense)."""
        moved, dense_elems = self.step_elements(n.double(), k_rows.double(), sparse, query.shape[-1])
        per_element = key.shape[1] * query.element_size()
        counts = torch.stack([scope.sum().double(), (moved * scope).sum() * per_element,
                              (dense_elems * scope).sum() * per_element])
        self._counts = counts if self._counts is None else self._counts + counts.to(self._counts.device)

    def kv_bytes(self, config, batch: int, tokens: int, dtype_bytes: int) -> dict:
        """Everything stays in the cache, dense; K twice with `store_k_twice`."""
        dense_bytes = super().kv_bytes(config, batch, tokens, dtype_bytes)
        return {"k": dense_bytes["k"] * (2 if self.store_k_twice else 1), "v": dense_bytes["v"]}

    def kv_bytes_read(self, config, batch: int, context: float, dtype_bytes: int) -> dict:
        """K,V bytes one decode step reads at `context` cached tokens (for the bench's roofline): r columns of K for
        every position + k full rows of K, k rows of V + the mean of V; dense when k >= context."""
        shape = AttnShape.of(config)
        n = torch.tensor([[[int(round(context))]]])
        k_rows, _, sparse = self.budgets(n)
        per = batch * shape.layers * shape.kv_heads * dtype_bytes
        n_, k_, d = float(n), float(k_rows), shape.head_dim
        if not bool(sparse):
            return {"k": n_ * d * per, "v": n_ * d * per}
        r = self.components(d)
        return {"k": (r * n_ + k_ * d) * per, "v": (k_ * d + d * self.reallocate_to_mean) * per}

    def cache_layer(self, layer_idx: int, config):
        return TwiceKLayer() if self.store_k_twice else DynamicLayer()

    @classmethod
    def variant(cls, settings: dict) -> str:
        """"8x (k=128)" (published: fixed k, prompt dense), "row-wise 8x" (k per row, every row sparse). A record
        written before `scope` existed ran the row-wise simulation (k derived per row, all rows): shown as such."""
        c, k, r = settings.get("compression"), settings.get("k"), settings.get("r")
        ratio = f"{c:g}x" if isinstance(c, (int, float)) else f"r={r}"
        budget = "" if k is None else f"k={k}"
        if settings.get("scope", "all_rows") == "all_rows":
            loose = "" if settings.get("keep_current", False) else ", current not forced"
            return f"row-wise {ratio}" + (f" ({budget}{loose})" if budget else (f" ({loose[2:]})" if loose else ""))
        return f"{ratio} ({budget or 'k per row'})"

    def _measured(self) -> dict | None:
        """Bytes read over the rows in scope so far, per decode step; None before any."""
        if self._counts is None or self._shape is None or float(self._counts[0]) == 0:
            return None
        rows, moved_total, dense_total = self._counts.tolist()
        steps = rows / self._shape.layers
        return {"steps": steps, "bytes_per_step": moved_total / steps, "dense_bytes_per_step": dense_total / steps,
                "compression": dense_total / moved_total, "read_fraction": moved_total / dense_total}

    def run_stats(self) -> RunStats:
        measured = self._measured()
        return RunStats(kv_read_fraction=measured["read_fraction"] if measured else None)

    def describe(self) -> dict:
        k_rule = f"k={self.k}" if self.k is not None else f"k=round(context/(2*{self.compression}))"
        info = {"k_rule": k_rule, "scope": self.scope}
        if self._shape is None:
            return info
        shape, context = self._shape, self.reference_context
        per_step = shape.layers * shape.kv_heads * self._dtype_bytes
        n = torch.tensor([[[float(context)]]])
        k_rows, _, sparse = self.budgets(n.long())
        moved, dense_elems = self.step_elements(n, k_rows.double(), sparse, shape.head_dim)
        info.update(
            r=self.components(shape.head_dim),
            k_at_reference=int(k_rows),
            reference_context=context,
            bytes_per_step=float(moved) * per_step,
            dense_bytes_per_step=float(dense_elems) * per_step,
            compression=float(dense_elems / moved),
        )
        measured = self._measured()
        if measured:
            info["measured"] = measured
        return info

"""Clustered decode attention (CHAI, Agarwal et al., ICML 2024): one query token per sequence, K stored only for
each cluster's representative head, V for every head; every head of a cluster uses the attention probabilities of
its representative:

    out[b, h] = softmax(q[b, rep(c(h))] . K_rep[b, c(h)]^T * scaling) @ V[b, h]

A decode step then reads C*S*D of K and H*S*D of V instead of 2*H*S*D. With one cluster per head (labels =
reps = arange(H)) it is plain multi-head decode attention.

`clustered_decode_attention` runs a split-K (flash-decoding) Triton kernel on CUDA, and under TRITON_INTERPRET=1 on
the CPU (how the tests check it); elsewhere it falls back to `clustered_attention_reference`, the pure-PyTorch
definition, which also handles any number of query tokens and a boolean mask (prefill).

Kernel layout (two streaming passes, then a merge): pass 1, one program per (cluster, split of the context, batch
row), reads the cluster's K once and writes its representative's scores, float32, one per key; pass 2, one program
per (head, split, batch row), reads its cluster's scores and its own V once and leaves the split's softmax
statistics and p @ V; a third small kernel merges the splits (log-sum-exp). A step thus reads each kept K head and
each V head once, plus 4 bytes of scores per key and head. Only the filled prefix of a static cache is read: the
split count follows the buffer length, and splits past `kv_len` run no tile. Nothing synchronises with the host and
every shape is fixed by the cache tensors, so the call can be captured in a CUDA graph; `kv_len` (a device tensor)
says how much of a static cache is filled. Under torch.compile the launch is one opaque custom op
(`chai::clustered_decode`), so a compiled decode step calls the kernels as they are.
"""

import contextlib
import dataclasses
import functools
import importlib.util
import json
import os

import torch

HAVE_TRITON = importlib.util.find_spec("triton") is not None


def default_indices(k_rep, v, labels, reps, k_index=None, v_index=None):
    """k_index [B, C]: the K entry (dim 1 of k_rep) each cluster reads, default arange(C); v_index [B, H]: the V
    head each query head reads, default h // (H / Hv) (GQA groups; plain h for MHA)."""
    batch, heads = labels.shape
    if k_index is None:
        k_index = torch.arange(reps.shape[1], device=reps.device).expand(batch, -1)
    if v_index is None:
        v_index = (torch.arange(heads, device=labels.device) // (heads // v.shape[1])).expand(batch, -1)
    return k_index, v_index


def clustered_attention_reference(q, k_rep, v, labels, reps, scaling, mask=None, kv_len=None, k_index=None,
                                  v_index=None):
    """q [B, H, Tq, D]; k_rep [B, Ck, S, D] (K of the kept heads); v [B, Hv, S, D]; labels [B, H] (cluster of each
    query head); reps [B, C] (the query head scoring each cluster); mask [B, 1, Tq, S] bool (True = attend) or
    None; kv_len: valid prefix of the cache ([] or [B] tensor, or int) or None; k_index, v_index: see
    `default_indices`. Returns [B, H, Tq, D] in v's dtype (float32 math)."""
    batch, heads, tq, dim = q.shape
    clusters, length = reps.shape[1], k_rep.shape[2]
    k_index, v_index = default_indices(k_rep, v, labels, reps, k_index, v_index)
    q_rep = q.gather(1, reps[:, :, None, None].expand(batch, clusters, tq, dim))  # [B, C, Tq, D]
    k_sel = k_rep.gather(1, k_index[:, :, None, None].expand(batch, clusters, length, dim))  # [B, C, S, D]
    scores = torch.matmul(q_rep.float(), k_sel.float().transpose(-1, -2)) * scaling  # [B, C, Tq, S]
    valid = torch.ones(1, 1, 1, length, dtype=torch.bool, device=q.device)
    if kv_len is not None:
        limit = torch.as_tensor(kv_len, device=q.device).reshape(-1, 1, 1, 1)
        valid = torch.arange(length, device=q.device) < limit
    if mask is not None:
        valid = valid & mask
    probs = torch.softmax(scores.masked_fill(~valid, float("-inf")), dim=-1)
    probs = probs.gather(1, labels[:, :, None, None].expand(batch, heads, tq, length))  # [B, H, Tq, S]
    v_sel = v.gather(1, v_index[:, :, None, None].expand(batch, heads, length, v.shape[-1]))  # [B, H, S, D]
    return torch.matmul(probs, v_sel.float()).to(v.dtype)


@functools.cache
def _kernel(name: str):
    """A Triton kernel, imported on first use: importing this module never imports triton (the interpreter
    must be switched on before triton's first import, and CPU-only installs have no triton)."""
    from chai.kernels import _clustered_decode_triton

    return getattr(_clustered_decode_triton, name)


def _use_triton(q: torch.Tensor) -> bool:
    return HAVE_TRITON and (q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Launch settings of the decode kernels: `block_s` keys per tile (None: 16384 / head_dim, 16..128), warps and
    pipeline stages of both passes, `target_programs` and `min_tiles` (see `split_plan`). The defaults are the
    fastest of `scripts/gpu_kernel_tune.py` on an H100 (LLaMA-7B layer shapes)."""

    block_s: int | None = 128
    num_warps: int = 4
    num_stages: int = 2
    target_programs: int = 16384
    min_tiles: int = 4

    def tile(self, block_d: int) -> int:
        return self.block_s or max(16, min(128, 16384 // block_d))


# Best settings of scripts/gpu_kernel_tune.py per GPU name; any other GPU runs KernelConfig(), the H100's best. H200
# (2026-12-02, results/bench/kernel_tune_h200.jsonl): fewer, longer splits; at batch 8 x 2048 with 4 clusters the
# kernel read 1.5-1.6 TB/s against 0.7-0.8 TB/s with the H100 settings, the same (3.6 TB/s) at 16 x 4096.
TUNED = {"NVIDIA H200": KernelConfig(block_s=128, num_warps=4, num_stages=1, target_programs=2048, min_tiles=4)}


def config_for(gpu_name: str | None) -> KernelConfig:
    """The launch settings for a GPU: the JSON object in CHAI_KERNEL_CONFIG if set (how the tuning script hands its
    best settings to a bench in the same session), else the tuned ones for that GPU, else KernelConfig()."""
    text = os.environ.get("CHAI_KERNEL_CONFIG")
    return KernelConfig(**json.loads(text)) if text else TUNED.get(gpu_name, KernelConfig())


DEFAULT = config_for(None)


def use_gpu_defaults(device: torch.device) -> KernelConfig:
    """Set DEFAULT for `device`'s GPU. Called eagerly when a method is prepared, so that a compiled decode step only
    reads the setting (asking the driver for the GPU's name inside a traced step would break the graph)."""
    global DEFAULT
    DEFAULT = config_for(torch.cuda.get_device_name(device) if device.type == "cuda" else None)
    return DEFAULT


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _index_rows(index, labels):
    """(tensor, batch stride) for an optional [B, n] index whose rows are contiguous (an expanded row keeps
    stride 0, no copy); None passes labels as a placeholder the kernel never reads."""
    if index is None:
        return labels, 0
    if index.dim() != 2 or index.stride(-1) != 1:
        index = index.contiguous()
    return index, index.stride(0)


def split_plan(batch: int, heads: int, length: int, block: int, target_programs: int = 8192, min_tiles: int = 2,
               max_splits: int = 64) -> tuple[int, int]:
    """(splits, tiles per split): at most about `target_programs` programs (batch * heads * splits; `heads`: programs
    per batch row and split), many waves of short programs so that the GPU's last wave is nearly full; at least
    `min_tiles` tiles per split so that the per-split partial results stay small next to the K/V a split reads,
    and at most `max_splits` splits (the merge kernel holds them all at once). The split length is the tile
    times a power of two, so a growing dynamic cache compiles only log2-many variants."""
    tiles = min_tiles
    while tiles * block < length and (batch * heads * -(-length // (tiles * block)) > target_programs
                                      or -(-length // (tiles * block)) > max_splits):
        tiles *= 2
    return -(-length // (tiles * block)), tiles


def clustered_decode_attention(q, k_rep, v, labels, reps, scaling: float, kv_len=None, k_index=None, v_index=None,
                               config: KernelConfig | None = None):
    """Decode attention with clustered heads. q [B, H, 1, D] (or [B, H, D]); k_rep [B, C, S, D]: K of each
    cluster's representative (or any kept-K layout, read through k_index [B, C]); v [B, H, S, D] (GQA: [B, Hv, S, D],
    read through v_index [B, H]); labels [B, H] int: cluster of each head; reps [B, C] int: the query head scoring
    each cluster; kv_len: valid cache length ([] or [B] tensor, or int; None = S); config: the kernels' launch
    settings (None: DEFAULT, the GPU's). Returns [B, H, 1, D] (or [B, H, D]) in v's dtype."""
    squeeze, config = q.dim() == 3, config or DEFAULT
    q4 = q[:, :, None] if squeeze else q
    if not _use_triton(q4):
        out = clustered_attention_reference(q4, k_rep, v, labels, reps, scaling, kv_len=kv_len, k_index=k_index,
                                            v_index=v_index)
        return out[:, :, 0] if squeeze else out
    length = k_rep.shape[2]
    if isinstance(kv_len, torch.Tensor):
        kv_t, kv_limit = kv_len.reshape(-1), length
    else:  # a constant length is a kernel argument, not a tensor
        kv_t, kv_limit = None, min(length, length if kv_len is None else int(kv_len))
    # Compiled: the custom op, opaque to the tracer. Eager: its function directly (the dispatcher's per-call cost
    # is host time that an eager decode step, launch-bound, pays in full).
    launch = torch.ops.chai.clustered_decode if torch.compiler.is_compiling() else _launch
    out = launch(q4[:, :, 0], k_rep, v, labels, reps, float(scaling), kv_t, kv_limit, k_index, v_index,
                 config.block_s or 0, config.num_warps, config.num_stages, config.target_programs, config.min_tiles)
    return out if squeeze else out[:, :, None]


def _launch(q: torch.Tensor, k_rep: torch.Tensor, v: torch.Tensor, labels: torch.Tensor,
            reps: torch.Tensor, scaling: float, kv_len: torch.Tensor | None, kv_limit: int,
            k_index: torch.Tensor | None, v_index: torch.Tensor | None, block_s: int, num_warps: int,
            num_stages: int, target_programs: int, min_tiles: int) -> torch.Tensor:
    """The launches of `clustered_decode_attention` (q [B, H, D] -> [B, H, D]); config fields as plain arguments
    (block_s 0 = None), so the op has a schema torch.compile can call."""
    config = KernelConfig(block_s or None, num_warps, num_stages, target_programs, min_tiles)
    # Triton launches on the current GPU: make it the tensors' one (a model spread over GPUs).
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        return _launch_on_device(q, k_rep, v, labels, reps, scaling, kv_len, kv_limit, k_index, v_index, config)


def _launch_on_device(q, k_rep, v, labels, reps, scaling, kv_len, kv_limit, k_index, v_index, config):
    batch, heads, dim = q.shape
    clusters, length = reps.shape[1], k_rep.shape[2]
    q, k_rep, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k_rep, v))
    labels, reps = labels.contiguous(), reps.contiguous()
    # Absent indices and lengths become kernel constants rather than tensors (no index tensors to build per step).
    k_idx, stride_kib = _index_rows(k_index, labels)
    v_idx, stride_vib = _index_rows(v_index, labels)
    kv_t, stride_kvl = labels, 0  # no length tensor: a placeholder the kernels never read
    if kv_len is not None:
        kv_t = kv_len.to(q.device)  # no copy when already on the device
        kv_t = kv_t.long() if kv_t.is_floating_point() else kv_t
        stride_kvl = 0 if kv_t.numel() == 1 else kv_t.stride(0)
    block_d = 1 << (dim - 1).bit_length()
    block_s = config.tile(block_d)
    common = dict(HEAD_DIM=dim, BLOCK_D=block_d, BLOCK_S=block_s, HAS_KVLEN=kv_len is not None,
                  DYNAMIC_LOOP=q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1",
                  num_warps=config.num_warps, num_stages=config.num_stages)
    c_splits, c_tiles = split_plan(batch, clusters, length, block_s, config.target_programs, 1)
    scores = torch.empty(batch, clusters, length, dtype=torch.float32, device=q.device)
    _kernel("rep_scores_kernel")[(clusters, c_splits, batch)](
        q, k_rep, reps, k_idx, kv_t, scores,
        q.stride(0), q.stride(1), k_rep.stride(0), k_rep.stride(1), k_rep.stride(2), stride_kib, stride_kvl,
        scores.stride(0), scores.stride(1), clusters, kv_limit, float(scaling),
        TILES=c_tiles, HAS_KIDX=k_index is not None, **common)
    splits, tiles = split_plan(batch, heads, length, block_s, config.target_programs, config.min_tiles)
    acc = torch.empty(batch, heads, splits, block_d, dtype=torch.float32, device=q.device)
    m = torch.empty(batch, heads, splits, dtype=torch.float32, device=q.device)
    lse = torch.empty_like(m)
    _kernel("shared_scores_values_kernel")[(heads, splits, batch)](
        scores, v, labels, v_idx, kv_t, acc, m, lse,
        scores.stride(0), scores.stride(1), v.stride(0), v.stride(1), v.stride(2), stride_vib, stride_kvl,
        heads, splits, max(1, heads // v.shape[1]), kv_limit,
        TILES=tiles, HAS_VIDX=v_index is not None, **common)
    out = torch.empty(batch, heads, dim, dtype=v.dtype, device=q.device)
    _kernel("merge_splits_kernel")[(batch * heads,)](
        acc, m, lse, out, out.stride(0), out.stride(1), heads, splits,
        HEAD_DIM=dim, BLOCK_D=block_d, BLOCK_SPLITS=_pow2(splits), num_warps=4,
    )
    return out


_clustered_decode = torch.library.custom_op("chai::clustered_decode", _launch, mutates_args=())


@_clustered_decode.register_fake
def _(q, k_rep, v, labels, reps, scaling, kv_len, kv_limit, k_index, v_index, block_s, num_warps, num_stages,
      target_programs, min_tiles):
    return q.new_empty(q.shape, dtype=v.dtype)

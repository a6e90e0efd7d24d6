"""Time CHAI's head clustering per prefill on the GPU: the fused K-Means kernel (one launch per layer) against the
torch path (`chai.clustering.kmeans`, host syncs at every Lloyd step), and check that both give the same labels.

Each layer clusters `--heads` heads of every request from attention-like features: causal softmax probabilities over
the first `--tokens` tokens (15 features for 5), heads in near-copy groups as in real layers. Times are CUDA-event
times of all `--layers` layers, i.e. ms per prefill, the median of `--reps` runs after a warm-up; the kernel's first
call (its compilation) is reported apart.

    PYTHONPATH=. python scripts/bench_kmeans.py                     # 32 layers x batch 1, 8, 16 x 32 heads, k = 4
    PYTHONPATH=. python scripts/bench_kmeans.py --batches 64 --k 18 --warps 4 8 16
"""

import argparse
import statistics
import sys
import time

import torch

from chai.clustering import causal_features, kmeans
from chai.kernels.fused_kmeans import HAVE_TRITON, fused_kmeans


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=32, help="layers per prefill (one clustering each)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 16], help="requests per prefill")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=5, help="tokens whose causal probabilities are the features")
    parser.add_argument("--k", type=int, default=4, help="clusters per layer")
    parser.add_argument("--reps", type=int, default=20, help="timed prefills per path (median reported)")
    parser.add_argument("--warps", type=int, nargs="+", default=[None], help="kernel warps to time (default: its own)")
    return parser.parse_args(argv)


def layer_features(layers: int, batch: int, heads: int, tokens: int, seed: int = 0) -> list[torch.Tensor]:
    """[B, H, tokens(tokens+1)/2] per layer on the GPU: heads in 8 groups of near copies (queries = the group's plus
    noise, shared keys), causal softmax over the first `tokens` tokens."""
    g = torch.Generator().manual_seed(seed)
    causal = torch.ones(tokens, tokens, dtype=torch.bool).tril()
    out = []
    for _ in range(layers):
        queries = torch.randn(batch, 8, tokens, 16, generator=g)[:, torch.arange(heads) % 8]
        q = queries + 0.1 * torch.randn(batch, heads, tokens, 16, generator=g)
        keys = torch.randn(batch, 1, tokens, 16, generator=g)
        probs = torch.softmax((q @ keys.transpose(-1, -2) / 4).masked_fill(~causal, float("-inf")), dim=-1)
        out.append(causal_features(probs, tokens).cuda())
    return out


def prefill_ms(cluster, features: list[torch.Tensor], reps: int) -> float:
    """Median CUDA-event time of clustering every layer once (one warm-up prefill first)."""
    for f in features:
        cluster(f)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for f in features:
            cluster(f)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main(argv=None) -> None:
    args = parse_args(argv)
    if not (torch.cuda.is_available() and HAVE_TRITON):
        sys.exit("bench_kmeans.py needs a CUDA GPU and triton: nothing timed.")
    t0 = time.perf_counter()
    fused_kmeans(layer_features(1, 1, args.heads, args.tokens)[0], args.k)
    torch.cuda.synchronize()
    print(f"{torch.cuda.get_device_name()}: first fused call (compile) {time.perf_counter() - t0:.2f} s; "
          f"{args.layers} layers x {args.heads} heads, k = {args.k}, features from {args.tokens} tokens")
    for batch in args.batches:
        features = layer_features(args.layers, batch, args.heads, args.tokens, seed=batch)
        torch_ms = prefill_ms(lambda f: kmeans(f, args.k)[0], features, args.reps)
        for warps in args.warps:
            fused_ms = prefill_ms(lambda f: fused_kmeans(f, args.k, num_warps=warps), features, args.reps)
            same = sum(int((fused_kmeans(f, args.k, num_warps=warps) == kmeans(f, args.k)[0]).all(1).sum())
                       for f in features)
            print(f"batch {batch:3d}, warps {warps or 'auto'}: fused {fused_ms:8.3f} ms, torch {torch_ms:8.3f} ms "
                  f"per prefill (x{torch_ms / fused_ms:.1f}); labels equal in {same}/{batch * args.layers} problems")


if __name__ == "__main__":
    main()

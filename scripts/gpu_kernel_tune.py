"""Launch settings of the clustered-decode kernel, chosen by measurement on the GPU at hand (LLaMA-7B layer shapes).

Times one decode step of attention for one layer (H = 32, D = 128, fp16, a static-cache-like buffer 16 tokens
longer than the filled length) with triton's do_bench (median, L2 flushed between runs) for
  - SDPA over full MHA K and V, unmasked (flash) and masked over a static buffer (the attention the fastest MHA
    decode runs: cuDNN on an H100);
  - the kernels at C = H (MHA through our kernels) and at the cluster counts of the released lists;
and reports achieved bandwidth (bytes the step must read / time). Stage 1 sweeps tile, warps and pipeline stages;
stage 2 the split target and tiles per split around the best few. Writes every measurement to
OUT/kernel_tune.jsonl and the best settings (highest geometric-mean bandwidth over the clustered cases) as JSON to
OUT/kernel_best.json, which `CHAI_KERNEL_CONFIG="$(cat OUT/kernel_best.json)"` hands to a bench.

    PYTHONPATH=. python scripts/gpu_kernel_tune.py --out "$OUT" --budget 240
"""

import argparse
import dataclasses
import itertools
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from chai.kernels import clustered_decode as kd

HEADS, DIM, SLACK = 32, 128, 16
SHAPES = [(8, 2048), (16, 4096)]  # (batch, filled length): the cells the targets name
CLUSTERS = [4, 18]  # the released 7B lists' late and middle layers


def case(batch, length, clusters, gen):
    """Inputs of one decode step: q [B, H, 1, D], K of the kept heads [B, C, L, D], V [B, H, L, D] in buffers of
    L = length + SLACK, labels with every cluster non-empty, reps = each cluster's first member."""
    cap, dev = length + SLACK, "cuda"
    q = torch.randn(batch, HEADS, 1, DIM, device=dev, dtype=torch.float16)
    k = torch.randn(batch, clusters, cap, DIM, device=dev, dtype=torch.float16)
    v = torch.randn(batch, HEADS, cap, DIM, device=dev, dtype=torch.float16)
    labels = torch.stack([torch.randperm(HEADS, generator=gen) % clusters for _ in range(batch)]).to(dev)
    reps = torch.stack([torch.stack([(row == c).nonzero()[0, 0] for c in range(clusters)]) for row in labels])
    slots = torch.arange(clusters, device=dev).expand(batch, -1)
    return dict(q=q, k_rep=k, v=v, labels=labels, reps=reps, kv_len=torch.tensor(length, device=dev), k_index=slots)


def step_bytes(batch, length, clusters):
    return 2 * batch * length * DIM * (clusters + HEADS)  # fp16 K of the kept heads + V of every head


def time_ms(fn):
    return do_bench(fn, warmup=10, rep=60, return_mode="median")


def sdpa_baseline(batch, length, masked=False):
    """SDPA over full K and V: unmasked (flash), or as a static cache calls it, over the whole buffer with a
    boolean mask hiding the unfilled slack (cuDNN's kernel on an H100)."""
    cap = length + SLACK if masked else length
    q = torch.randn(batch, HEADS, 1, DIM, device="cuda", dtype=torch.float16)
    k, v = (torch.randn(batch, HEADS, cap, DIM, device="cuda", dtype=torch.float16) for _ in range(2))
    mask = (torch.arange(cap, device="cuda") < length).expand(batch, 1, 1, cap) if masked else None
    ms = time_ms(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    return ms, step_bytes(batch, length, HEADS) / ms / 1e6


def measure(config, cases):
    """GB/s per case for one config (None where it failed to compile or launch)."""
    rates = []
    for (batch, length, clusters), inputs in cases.items():
        try:
            ms = time_ms(lambda: kd.clustered_decode_attention(**inputs, scaling=DIM**-0.5, config=config))
            rates.append(step_bytes(batch, length, clusters) / ms / 1e6)
        except Exception as error:  # a config the GPU cannot run (registers, shared memory): skip it
            print(f"  {config}: {type(error).__name__}: {str(error)[:120]}")
            return None
    return rates


def geomean(xs):
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def sweep(configs, cases, log, deadline):
    scored = []
    for config in configs:
        if time.time() > deadline:
            print("budget spent: stopping the sweep")
            break
        rates = measure(config, cases)
        if rates is None:
            continue
        row = {"config": dataclasses.asdict(config), "GBps": [round(r, 1) for r in rates],
               "geomean_GBps": round(geomean(rates), 1)}
        log.write(json.dumps(row) + "\n")
        log.flush()
        print(json.dumps(row))
        scored.append((row["geomean_GBps"], config))
    return sorted(scored, key=lambda s: -s[0])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--budget", type=float, default=240.0)
    parser.add_argument("--quick", action="store_true", help="a few settings around the default")
    args = parser.parse_args()
    deadline = time.time() + args.budget
    args.out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    cases = {(b, s, c): case(b, s, c, gen) for (b, s), c in itertools.product(SHAPES, CLUSTERS)}
    mha_cases = {(b, s, HEADS): case(b, s, HEADS, gen) for b, s in SHAPES}
    with open(args.out / "kernel_tune.jsonl", "w") as log:
        for (b, s), masked in itertools.product(SHAPES, (False, True)):
            ms, rate = sdpa_baseline(b, s, masked)
            row = {"sdpa_masked" if masked else "sdpa": [b, s], "ms": round(ms, 4), "GBps": round(rate, 1)}
            log.write(json.dumps(row) + "\n")
            print(json.dumps(row))
        kd.use_gpu_defaults(torch.device("cuda"))  # the settings this GPU runs today: the sweep starts from them
        print("default", kd.DEFAULT, measure(kd.DEFAULT, cases), "at C=H:", measure(kd.DEFAULT, mha_cases))
        grid = ([64, 128], [4], [1, 2]) if args.quick else ([32, 64, 128, 256], [2, 4, 8], [1, 2, 3])
        stage1 = [kd.DEFAULT] + [kd.KernelConfig(block_s=s, num_warps=w, num_stages=st)
                                 for s, w, st in itertools.product(*grid)]
        best = sweep(stage1, cases, log, deadline - args.budget * 0.35)
        stage2 = [dataclasses.replace(c, target_programs=t, min_tiles=m)
                  for _, c in best[:4] for t, m in itertools.product([1024, 2048, 4096, 16384], [1, 2, 4])]
        best = sorted(best + sweep(stage2, cases, log, deadline), key=lambda s: -s[0])
    top = best[0][1]
    print("best", top, best[0][0], "GB/s; at C=H:", measure(top, mha_cases))
    (args.out / "kernel_best.json").write_text(json.dumps(dataclasses.asdict(top)))


if __name__ == "__main__":
    main()

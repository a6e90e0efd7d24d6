"""Where a decode step's time goes: the kernels of one decode round of a bench path, from torch.profiler, summed per
kernel name. The path is set up exactly as mode=bench sets it up (chai.runners: setup, plan, Decoder); only the
profiler is added. Run on the GPU machine from the repository root (hydra importable):

    PYTHONPATH=/tmp/site:. python scripts/gpu_profile_step.py --batch 8 --seq 2048 \
        --run mha: --run chai_jul:method=chai,method.layer_clusters=llama7b_jul2024 > "$OUT/profile.txt"

Each --run is NAME:OVERRIDES (comma-separated Hydra overrides of conf/config.yaml; empty = the MHA baseline). A run
profiles its static path (`static_compiled` for MHA, `method_static` for a method) with the step captured as a CUDA
graph; with --compile the MHA baseline's step is also profiled compiled (inductor, reduce-overhead); with --dynamic
the dynamic-cache path instead (`sdpa` / `method`: eager steps, host time included); with --prefill the prompt's
forward (the TTFT, clustering included) instead of the decode round, kernels and host ops both. Prints, per run,
TTNT (or TTFT), the kernel count per step (per prefill), the summed kernel time, and the kernels taking most of it:

    PYTHONPATH=/tmp/site:. python scripts/gpu_profile_step.py --prefill --batch 8 --seq 4096 \
        --run mha: --run chai_jul:method=chai,method.layer_clusters=llama7b_jul2024
"""

import argparse
import collections
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from chai.methods import build_method
from chai.roofline import Allocator, Clock, percentiles
from chai.runners.bench import plan
from chai.runners.bench_measure import Decoder, set_attn
from chai.runners.bench_prompt import random_ids
from chai.runners.setup import setup


def config(overrides: list[str], args):
    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(str(conf), version_base="1.3"):
        return compose("config", [f"model={args.model}", "model.init=random", "mode=bench",
                                  f"bench.new_tokens={args.steps}", *overrides])


def kernel_table(prof, steps: int, top: int) -> str:
    totals, counts = collections.Counter(), collections.Counter()
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name] += event.device_time_total if hasattr(event, "device_time_total") else event.cuda_time
            counts[event.name] += 1
    total = sum(totals.values()) / steps / 1e3
    lines = [f"  kernels per step {sum(counts.values()) / steps:.0f}, kernel time per step {total:.3f} ms"]
    for name, us in totals.most_common(top):
        lines.append(f"  {us / steps / 1e3:8.3f} ms  {counts[name] / steps:5.1f}x  {name[:110]}")
    return "\n".join(lines)


def profile_path(name: str, kind: str, overrides: list[str], args) -> None:
    """Set up one path as the bench does, time one decode round, then profile another."""
    dynamic = kind == "dynamic"
    cfg = config(overrides, args)
    mine = cfg.method.name != cfg.bench.baseline_method
    path_name = ("method" if mine else "sdpa") if dynamic else ("method_static" if mine else "static_compiled")
    cfg = config([*overrides, f"bench.paths=[{path_name}]", *([] if dynamic else [f"bench.static_step={kind}"])],
                 args)
    ready = setup(cfg, need_tokenizer=False, keep_model=True)  # one model for every run of this process
    model, default_attn = ready.model, ready.model.config._attn_implementation
    baseline = build_method({"name": cfg.bench.baseline_method})
    baseline.prepare(model, ready.context)
    (path,), _ = plan(cfg, ready.method, baseline, default_attn)
    ids = random_ids(model, args.batch, args.seq, int(cfg.bench.input_seed))
    clock = Clock(model.device)
    on_gpu = model.device.type == "cuda"  # on a CPU (a rehearsal) the profiler sees the CPU side only
    activities = ([torch.profiler.ProfilerActivity.CUDA] if on_gpu else []) + (
        [torch.profiler.ProfilerActivity.CPU] if dynamic or not on_gpu else [])
    set_attn(model, path.attn)
    try:
        with torch.no_grad(), path.method.applied(model):
            decoder = Decoder(path, model, ids, cfg.bench, model.device, Allocator(model.device))
            token, ttft = decoder.prompt(clock)[:2]
            ms = decoder.decode(token, clock)
            print(f"== {name} [{path.name}, {decoder.kind if not dynamic else 'dynamic'}] B={args.batch} "
                  f"S={args.seq}: TTFT {ttft:.2f} ms, TTNT {percentiles(ms)['median']:.3f} ms", flush=True)
            if args.prefill:  # the prompt's forward, host ops too (a prefill launches eagerly)
                activities = [*activities, torch.profiler.ProfilerActivity.CPU]
            # A round of its own, so the profiler's cost stays out of the times above. Profiling the decode, the
            # prompt runs before the profiler starts: inside it, the prefill's kernels were divided among the steps.
            if not args.prefill:
                token = decoder.prompt(clock)[0]
            with torch.profiler.profile(activities=list(dict.fromkeys(activities))) as prof:
                if args.prefill:
                    decoder.prompt(clock)
                else:
                    decoder.decode(token, clock)  # bench.new_tokens steps (--steps)
        if dynamic or args.prefill:  # host time matters here: the CPU side of every op
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top), flush=True)
        print(kernel_table(prof, 1 if args.prefill else decoder.n, args.top), flush=True)
    finally:
        set_attn(model, default_attn)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="llama7b")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--top", type=int, default=18)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--dynamic", action="store_true", help="the dynamic-cache path, eager steps")
    parser.add_argument("--prefill", action="store_true", help="profile the prompt's forward, not the decode round")
    parser.add_argument("--run", action="append", default=[], help="NAME:OVERRIDES")
    args = parser.parse_args()
    graph = "cudagraph" if torch.cuda.is_available() else "eager"  # eager: rehearsing on a CPU
    for spec in args.run or ["mha:"]:
        name, _, joined = spec.partition(":")
        overrides = [o for o in joined.split(",") if o]
        is_mha = config(overrides, args).method.name == "mha"
        kinds = ["dynamic"] if args.dynamic else [graph] + (["compile"] if args.compile and is_mha else [])
        for kind in kinds:
            profile_path(name, kind, overrides, args)


if __name__ == "__main__":
    main()

"""Where a decode step's time goes: the kernels of one captured (CUDA graph) decode step of each static path, from
torch.profiler, summed per kernel name. Run on the GPU machine from the repository root (hydra importable):

    PYTHONPATH=/tmp/site:. python scripts/gpu_profile_step.py --batch 8 --seq 2048 \
        --run mha: --run chai_jul:method=chai,method.layer_clusters=llama7b_jul2024 > "$OUT/profile.txt"

Each --run is NAME:OVERRIDES (comma-separated Hydra overrides of conf/config.yaml; empty = the MHA baseline). Prints,
per run, the step's kernel count, the summed kernel time per step, and the kernels taking most of it. With
--compile, the MHA baseline's step is also timed compiled (inductor, reduce-overhead) next to the CUDA graph; with
--dynamic, the method's dynamic cache is profiled instead (eager steps, host time included).
"""

import argparse
import collections
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from chai import bench
from chai.methods import RunContext, build_method
from chai.roofline import Clock, percentiles


def config(overrides: list[str], model: str):
    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(str(conf), version_base="1.3"):
        return compose("config", [f"model={model}", "model.init=random", "mode=bench", *overrides])


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


def profile_run(name, overrides, args, model, ids):
    cfg = config(overrides, args.model)
    method = build_method(cfg.method)
    method.prepare(model, RunContext(cfg, None, cfg.model.name, cfg.data_dir, cfg.results_dir))
    graph = "cudagraph" if model.device.type == "cuda" else "eager"  # eager: rehearsing on a CPU
    kinds = [graph] + (["compile"] if args.compile and cfg.method.name == "mha" else [])
    kinds = ["dynamic"] if args.dynamic else kinds
    cfg.bench.new_tokens = args.steps + 4  # make_step warms up on up to 2 of the cache's spare slots
    for kind in kinds:
        with torch.no_grad(), method.applied(model):
            if kind == "dynamic":  # the method's own cache, eager steps (the bench's `method` path)
                cache = method.make_cache(model)
                token = bench.prefill(model, ids, cache)
                step = bench.EagerStep(model, cache)
            else:
                cache = method.static_cache(model, args.batch, args.seq + args.steps + 4)
                token = bench.prefill(model, ids, cache)
                step = bench.make_step(kind, model, cache, token, torch.full_like(token, args.seq), cfg.bench)
                cache.reset()
                token = bench.prefill(model, ids, cache)
            position = torch.full_like(token, args.seq)
            clock = Clock(model.device)
            ms = bench.decode_n_tokens(step, token, position, args.steps, clock)
            print(f"== {name} [{kind}] B={args.batch} S={args.seq}: TTNT {percentiles(ms)['median']:.3f} ms",
                  flush=True)
            if kind == "cudagraph":  # profiled on its own round: the profiler's own cost stays out of TTNT
                cache.reset()
                token = bench.prefill(model, ids, cache)
                torch.cuda.synchronize()
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                    bench.decode_n_tokens(step, token, position, args.steps, clock)
                print(kernel_table(prof, args.steps, args.top), flush=True)
            if kind == "dynamic":  # host time matters here: the CPU side of every op
                activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
                with torch.profiler.profile(activities=activities) as prof:
                    bench.decode_n_tokens(step, token, position + args.steps, args.steps, clock)
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top), flush=True)
                print(kernel_table(prof, args.steps, args.top), flush=True)
        del cache, step
        torch.cuda.empty_cache()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="llama7b")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--top", type=int, default=18)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--dynamic", action="store_true", help="the method's dynamic cache, eager steps")
    parser.add_argument("--run", action="append", default=[], help="NAME:OVERRIDES")
    args = parser.parse_args()
    model = bench.load(config([], args.model))
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=generator).to(model.device)
    for spec in args.run or ["mha:"]:
        name, _, overrides = spec.partition(":")
        profile_run(name, [o for o in overrides.split(",") if o], args, model, ids)


if __name__ == "__main__":
    main()

"""Where IG's time goes: per-step wall time (the prompt step vs later one-token steps) and a
torch.profiler table of one sample, on a random Phi-shaped model.

    python benchmarks/profile_ig.py --hidden 2560 --intermediate 10240 --device cuda --dtype bfloat16
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_attribution import add_model_args, build, random_inputs, sync  # noqa: E402

from utils.attribution import Attributor  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.set_defaults(prompt_len=18)
    p.add_argument("--label_len", type=int, default=6)
    p.add_argument("--ig_steps", type=int, default=20)
    p.add_argument("--batch_size", type=int, default=8192, help="token positions per pass")
    p.add_argument("--rows", type=int, default=25, help="profiler table rows")
    args = p.parse_args()
    model = build(args)
    prompt, label = random_inputs(args, seed=1, device=args.device)
    att = Attributor(model)
    run = lambda on_step=None: att.score_sample(prompt, label, gradients=False, ig_steps=args.ig_steps,  # noqa: E731
                                                ig_batch_size=args.batch_size, on_step=on_step)
    run()  # warm-up
    stamps = []

    def stamp():
        sync(args.device)
        stamps.append(time.perf_counter())

    sync(args.device)
    start = time.perf_counter()
    run(stamp)
    steps = [b - a for a, b in zip([start] + stamps[:-1], stamps)]
    print(f"IG-{args.ig_steps}, prompt {args.prompt_len} tokens, {args.label_len} steps: "
          f"prompt step {steps[0]:.3f} s, later steps {sum(steps[1:]) / max(len(steps) - 1, 1):.3f} s each "
          f"({', '.join(f'{s:.3f}' for s in steps[1:])})")
    if args.device.startswith("cuda"):
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    acts = [torch.profiler.ProfilerActivity.CPU]
    if args.device.startswith("cuda"):
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        run()
        sync(args.device)
    key = "cuda_time_total" if args.device.startswith("cuda") else "cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=args.rows))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()

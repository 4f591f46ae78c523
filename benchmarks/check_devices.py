"""CPU vs GPU, fp32 vs bf16, cached vs batched steps: the same scores and masked generations, compared
in one process on one random Phi-shaped model (the reference is the CPU, fp32, cached path).

    python benchmarks/check_devices.py --json devices.json     # needs a CUDA GPU
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_attribution import add_model_args, build, random_inputs, rel_err, report  # noqa: E402

from utils.attribution import Attributor  # noqa: E402
from utils.generation import masked_generate  # noqa: E402
from utils.masks import DEFAULT_RATIOS, keep_masks  # noqa: E402
from utils.sites import ATTN, MLP, SiteHooks, locate_units  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.set_defaults(layers=8, device="cuda")
    p.add_argument("--label_len", type=int, default=8)
    p.add_argument("--ig_steps", type=int, default=4)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    cpu_args = copy.copy(args)
    cpu_args.device, cpu_args.dtype = "cpu", "float32"
    cpu = build(cpu_args)
    gpu32 = copy.deepcopy(cpu).to(args.device)
    gpu16 = copy.deepcopy(cpu).to(args.device, torch.bfloat16)
    prompt, label = random_inputs(args, seed=3)

    ref = Attributor(cpu).score_sample(prompt, label, ig_steps=args.ig_steps)
    runs = {
        "cuda fp32 cached": Attributor(gpu32).score_sample(prompt.cuda(), label, ig_steps=args.ig_steps),
        "cuda fp32 batched": Attributor(gpu32).score_sample(prompt.cuda(), label, step_mode="batched"),
        "cuda bf16 cached": Attributor(gpu16).score_sample(prompt.cuda(), label, ig_steps=args.ig_steps),
        "cuda bf16 batched": Attributor(gpu16).score_sample(prompt.cuda(), label, step_mode="batched"),
    }
    res = {"model": f"Phi-shaped random: {args.layers} x {args.heads}, hidden {args.hidden}, "
                    f"intermediate {args.intermediate}", "device": torch.cuda.get_device_name(),
           "reference": "cpu fp32 cached", "max_rel_err": {}}
    for name, out in runs.items():
        res["max_rel_err"][name] = {k: rel_err(out[k], ref[k]) for k in out}

    layout = locate_units(cpu)
    g = torch.Generator().manual_seed(4)     # random scores, hence masks, the same for every device
    keep = {}
    for comp in (ATTN, MLP):
        scores = torch.rand(2, args.label_len, layout.num_layers, layout.units(comp), generator=g)
        keep[comp] = torch.cat([keep_masks(scores[m], DEFAULT_RATIOS) for m in range(2)])
    eos = [args.vocab + 1]
    outs = {}
    for name, model in (("cpu fp32", cpu), ("cuda fp32", gpu32), ("cuda bf16", gpu16)):
        with SiteHooks(model) as hooks:
            outs[name] = masked_generate(model, hooks, prompt, keep, eos)
    res["masked_generation_identical_to_cpu_fp32"] = {
        name: f"{sum(a == b for a, b in zip(outs[name], outs['cpu fp32']))}/{len(outs['cpu fp32'])}"
        for name in ("cuda fp32", "cuda bf16")}
    report(res, args)


if __name__ == "__main__":
    main()

"""The main.py sweep of one sample: every metric x deactivation ratio decoded as one batch (ours) against
decoding the masked runs one by one, side by side in one process on the same random Phi-shaped model,
prompt and masks.  Checks that both give the same tokens.

    python benchmarks/bench_sweep.py                                   # CPU, small model
    python benchmarks/bench_sweep.py --hidden 2560 --intermediate 10240 --device cuda --dtype bfloat16
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_attribution import add_model_args, build, report, sync  # noqa: E402

from utils.generation import masked_generate  # noqa: E402
from utils.masks import DEFAULT_RATIOS, keep_masks  # noqa: E402
from utils.sites import ATTN, MLP, SiteHooks, locate_units  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--tokens", type=int, default=20)
    p.add_argument("--metrics", type=int, default=5)
    p.add_argument("--json", default=None)
    args = p.parse_args()

    model = build(args)
    layout = locate_units(model)
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, args.vocab, (1, args.prompt_len), generator=g)
    keep = {}
    for comp in (ATTN, MLP):   # random scores per metric -> the masks of 10 ratios each
        scores = torch.rand(args.metrics, args.tokens, layout.num_layers, layout.units(comp), generator=g)
        keep[comp] = torch.cat([keep_masks(scores[m], DEFAULT_RATIOS) for m in range(args.metrics)])
    B = keep[ATTN].shape[0]
    no_eos = [args.vocab + 1]   # every run decodes all tokens: the same work on both sides
    with SiteHooks(model, layout) as hooks:
        masked_generate(model, hooks, prompt, {c: keep[c][:2] for c in keep}, no_eos)   # warm-up
        sync(args.device)
        t0 = time.perf_counter()
        batched = masked_generate(model, hooks, prompt, keep, no_eos)
        sync(args.device)
        t_batched = time.perf_counter() - t0
        t0 = time.perf_counter()
        single = [masked_generate(model, hooks, prompt, {c: keep[c][b:b + 1] for c in keep}, no_eos)[0]
                  for b in range(B)]
        sync(args.device)
        t_single = time.perf_counter() - t0
    same = sum(a == b for a, b in zip(batched, single))
    res = {"model": f"Phi-shaped random: {args.layers} x {args.heads}, hidden {args.hidden}, "
                    f"intermediate {args.intermediate}, {args.dtype}",
           "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
           "runs": B, "tokens_per_run": args.tokens, "batched_s": t_batched, "one_by_one_s": t_single,
           "speedup": t_single / t_batched, "identical_outputs": f"{same}/{B}"}
    report(res, args)


if __name__ == "__main__":
    main()

"""Fused attribution (gradient + gxo + magnitudes, heads + MLP, all layers from one forward/backward per
token) against the naive per-layer loop, side by side in one process on the same random Phi-shaped model
and the same random prompt/label.  Optionally IG (batched vs naive).

    python benchmarks/bench_attribution.py                       # CPU default: 32 layers x 32 heads
    python benchmarks/bench_attribution.py --hidden 2560 --intermediate 10240 --device cuda --dtype bfloat16

The naive side can be timed on a subset of layers (--naive_layers) and scaled to all layers; the output
says so when it is."""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))   # reference.py: test-only code
from transformers import PhiConfig, PhiForCausalLM  # noqa: E402

from reference import reference_scores  # noqa: E402
from utils.attribution import Attributor  # noqa: E402


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The Phi-shaped model and prompt both benchmarks build (CPU-sized defaults; Phi-2: --hidden 2560
    --intermediate 10240)."""
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=51200)
    p.add_argument("--prompt_len", type=int, default=24)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")


def build(args):
    torch.manual_seed(0)
    cfg = PhiConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                    num_hidden_layers=args.layers, num_attention_heads=args.heads, partial_rotary_factor=0.4,
                    max_position_embeddings=2048)
    with torch.device(args.device):
        model = PhiForCausalLM(cfg)
    return model.to(getattr(torch, args.dtype)).eval().requires_grad_(False)


def random_inputs(args, seed: int, device=None):
    """A random prompt ``[1, prompt_len]`` (on ``device``) and a random label of ``label_len`` token ids."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, args.vocab, (1, args.prompt_len), generator=g)
    label = torch.randint(0, args.vocab, (args.label_len,), generator=g).tolist()
    return (prompt if device is None else prompt.to(device)), label


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device, repeat=1):
    best = float("inf")
    for _ in range(repeat):
        sync(device)
        start = time.perf_counter()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best, out


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--label_len", type=int, default=6)
    p.add_argument("--step_mode", default="auto", help="ours: auto (batched on CUDA), cached or batched")
    p.add_argument("--step_batch_size", type=int, default=2048, help="token positions per pass")
    p.add_argument("--naive_layers", type=int, default=None, help="time the naive loop on this many layers and scale")
    p.add_argument("--ig_steps", type=int, default=0, help="also time IG with this many steps")
    p.add_argument("--ig_batch_size", type=int, default=2048, help="token positions per pass")
    p.add_argument("--repeat", type=int, default=3, help="best of N for the fused path")
    p.add_argument("--json", default=None, help="write the numbers here")
    args = p.parse_args()

    model = build(args)
    prompt, label = random_inputs(args, seed=1, device=args.device)
    att = Attributor(model)
    fused = lambda: att.score_sample(prompt, label, step_mode=args.step_mode,  # noqa: E731
                                     batch_size=args.step_batch_size)
    fused()  # warm-up
    # a subset of layers spread evenly over depth: a naive site's backward stops at its layer, so the
    # first layers alone would overstate the naive cost
    n = args.naive_layers or args.layers
    layers = sorted({round(i * (args.layers - 1) / max(n - 1, 1)) for i in range(n)})
    scale = args.layers / len(layers)

    t_fast, fast = timed(fused, args.device, args.repeat)
    t_slow, slow = timed(lambda: reference_scores(model, prompt, label, use_cache=True, layers=layers), args.device)
    t_slow_all = t_slow * scale
    err = max(rel_err(fast[k][:, layers], slow[k]) for k in slow)
    res = {"model": f"Phi-shaped random: {args.layers} layers x {args.heads} heads, hidden {args.hidden}, "
                    f"intermediate {args.intermediate}, vocab {args.vocab}, {args.dtype}",
           "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
           "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
           "torch": torch.__version__, "prompt_len": args.prompt_len, "tokens": args.label_len,
           "step_mode": args.step_mode,
           "fused_s": t_fast, "naive_s": t_slow_all, "naive_layers_timed": len(layers),
           "fused_ms_per_token": 1e3 * t_fast / args.label_len,
           "naive_ms_per_token": 1e3 * t_slow_all / args.label_len,
           "speedup": t_slow_all / t_fast, "max_rel_err_vs_naive": err}
    if args.ig_steps:
        t_ig, ig = timed(lambda: att.score_sample(prompt, label, gradients=False, ig_steps=args.ig_steps,
                                                  batch_size=args.ig_batch_size), args.device)
        t_ig_slow, ig_slow = timed(lambda: reference_scores(model, prompt, label, ig_steps=args.ig_steps,
                                                            use_cache=True, gradients=False, layers=layers),
                                   args.device)
        res.update(ig_steps=args.ig_steps, ig_batch_size=args.ig_batch_size, ig_fused_s=t_ig,
                   ig_naive_s=t_ig_slow * scale, ig_fused_s_per_token=t_ig / args.label_len,
                   ig_speedup=t_ig_slow * scale / t_ig,
                   ig_max_rel_err=max(rel_err(ig[k][:, layers], ig_slow[k]) for k in ig_slow))
    report(res, args)


def report(res: dict, args) -> None:
    """Add the peak GPU memory, print the numbers, and write them to --json if given."""
    if args.device.startswith("cuda"):
        res["peak_gpu_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    print(json.dumps(res, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()

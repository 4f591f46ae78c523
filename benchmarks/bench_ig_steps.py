"""IG of the later generation steps (t >= 1): the packed path (several steps' IG elements per pass, every
row reading its prefix of the sample's one shared KV cache) against one step per pass, side by side in
one process on a SmolLM2-shaped random Llama (hidden 576, 30 layers, 9 heads / 3 KV heads, intermediate
1536, vocab 49152).  Only steps t >= 1 are timed: the prompt step runs the same code in both paths.
Prints seconds per path and the largest relative difference of the two paths' IG gradients.

    python benchmarks/bench_ig_steps.py --prompt_len 400 --label_len 6 --ig_steps 4     # XSum-sized prompt
    python benchmarks/bench_ig_steps.py --prompt_len 50 --label_len 11 --ig_steps 4     # TruthfulQA-sized
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from utils.attribution import Attributor  # noqa: E402
from utils.cli import cli_entry  # noqa: E402
from utils.errors import PipelineError  # noqa: E402
from utils.models import resolve_device  # noqa: E402


def smollm2_shaped(device):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=4096,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).to(device).eval().requires_grad_(False)


def one_step_per_pass(att, prompt, labels, n_steps, budget):
    """IG of steps 1..T-1, each step's elements against the cache of the steps before it (timed part only;
    interleaved with the dense steps because the cache grows in place)."""
    res, cache, took = {}, None, 0.0
    for t in range(labels.shape[0]):
        inp = prompt if t == 0 else labels[t - 1:t].view(1, 1)
        if t:
            began = time.perf_counter()
            res[t] = att.ig.step(inp, labels[t:t + 1], cache, n_steps, budget)
            took += time.perf_counter() - began
        _, _, cache = att._dense_step(inp, labels[t:t + 1], cache, with_grad=False)
    return res, took


def packed(att, prompt, labels, n_steps, budget):
    # the dense steps again, not a saved cache: a cache object grows in place as the steps run
    cache = None
    for t in range(labels.shape[0]):                  # the dense steps first: their final cache is shared
        inp = prompt if t == 0 else labels[t - 1:t].view(1, 1)
        _, _, cache = att._dense_step(inp, labels[t:t + 1], cache, with_grad=False)
    began = time.perf_counter()
    res = att.ig.packed_steps(prompt.shape[1], labels, cache, n_steps, budget)
    return res, time.perf_counter() - began


@cli_entry
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt_len", type=int, default=400)
    p.add_argument("--label_len", type=int, default=6)
    p.add_argument("--ig_steps", type=int, default=4)
    p.add_argument("--batch_size", type=int, default=2048, help="token positions per pass (both paths)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if min(args.prompt_len, args.ig_steps, args.batch_size) < 1 or args.label_len < 2:
        raise PipelineError("--prompt_len, --ig_steps and --batch_size must be at least 1, --label_len at least 2")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    model = smollm2_shaped(device)
    g = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (1, args.prompt_len), generator=g).to(device)
    labels = torch.randint(0, vocab, (args.label_len,), generator=g).to(device)
    att = Attributor(model)
    slow, t_step = one_step_per_pass(att, prompt, labels, args.ig_steps, args.batch_size)
    fast, t_packed = packed(att, prompt, labels, args.ig_steps, args.batch_size)
    diff = max(((fast[t][k] - slow[t][k]).abs().max() / slow[t][k].abs().max().clamp_min(1e-30)).item()
               for t in slow for k in slow[t])
    row = {"prompt_len": args.prompt_len, "label_len": args.label_len, "ig_steps": args.ig_steps,
           "device": str(device), "threads": torch.get_num_threads(), "one_step_per_pass_s": round(t_step, 2),
           "packed_s": round(t_packed, 2), "speedup": round(t_step / t_packed, 2), "max_rel_diff": diff}
    print(json.dumps(row))
    if args.json:
        Path(args.json).write_text(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()

"""IG on the real model, today's path against the packed one, side by side in one process: the first N
TruthfulQA questions in the chat prompt format, their dense greedy labels (batched decoder), IG-n scores of
every sample with

  old: one generation step per pass (``ig_packed=False``) and ``--old_batch_size`` positions per pass
       (today's ``run_pipeline.py`` default, 2048);
  new: several steps' IG elements per pass (``ig_packed=True``) and ``--batch_size`` positions per pass
       (default: chosen from free device memory on CUDA, 2048 on a CPU);

plus the gradient + GxO + magnitude step (cached vs batched step mode).  Prints a table (seconds,
tokens/s, passes, peak GPU memory, largest relative difference new vs old) and writes JSON.  The old
path runs on the first ``--old_num_data`` samples only and is extrapolated to all tokens (marked ~), so
the whole command stays within a few minutes on one H200:

    python benchmarks/profile_ig.py --model_name /path/SmolLM2-135M-Instruct.Q4_1.gguf --device cuda \\
        --num_data 100 --json ig_profile.json
    python benchmarks/profile_ig.py --device cpu --num_data 3 --ig_steps 4 --old_num_data 3   # CPU quick start
    python benchmarks/profile_ig.py ... --profile 1      # also a torch.profiler table of sample 1 (new path)
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import add_model_flags, load_model_and_prompts, sync  # noqa: E402
from utils.attribution import DEFAULT_POSITION_BUDGET, Attributor  # noqa: E402
from utils.cli import cli_entry  # noqa: E402
from utils.labels import greedy_labels, label_batch_size  # noqa: E402
from utils.models import OFFLINE_MODEL, eos_token_ids  # noqa: E402

MODEL_NAME = OFFLINE_MODEL
DATASET = "truthfulqa-offline"
NUM_DATA = 100
IG_STEPS = 20
OLD_NUM_DATA = 15


class PassCounter:
    """Counts forward passes of the model (a forward pre-hook)."""

    def __init__(self, model):
        self.n = 0
        self.handle = model.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.n += 1


def run_mode(att, model, device, samples, **kwargs):
    """Score ``samples`` (list of (prompt tensor, label ids)); returns seconds, passes, scores."""
    counter = PassCounter(model)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    start, cpu = time.perf_counter(), time.process_time()
    out = [att.score_sample(p, lab, **kwargs) for p, lab in samples]
    sync(device)
    seconds = time.perf_counter() - start
    counter.handle.remove()
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
    else:   # a shared CPU: report process CPU seconds too (less sensitive to other load than wall time)
        peak = None
        print(f"  {len(samples)} samples: wall {seconds:.1f} s, process CPU {time.process_time() - cpu:.1f} s",
              flush=True)
    return seconds, counter.n, out, peak


def rel_err(new, old, key):
    return max(((a[key] - b[key]).abs().max() / b[key].abs().max().clamp_min(1e-30)).item()
               for a, b in zip(new, old) if b[key].numel())


@cli_entry
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(p, model_name=MODEL_NAME, dataset=DATASET, num_data=NUM_DATA)
    p.add_argument("--old_num_data", type=int, default=OLD_NUM_DATA, help="samples the old IG path runs")
    p.add_argument("--ig_steps", type=int, default=IG_STEPS)
    p.add_argument("--batch_size", type=int, default=None, help="new path: positions per pass (default: auto)")
    p.add_argument("--old_batch_size", type=int, default=DEFAULT_POSITION_BUDGET)
    p.add_argument("--skip_gradient", action="store_true", help="time IG only")
    p.add_argument("--profile", type=int, default=0, help="profile this many samples of the new IG path")
    p.add_argument("--rows", type=int, default=25, help="profiler table rows")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    loaded = load_model_and_prompts(args)
    device, model, tok, load_s = loaded.device, loaded.model, loaded.tokenizer, loaded.load_s
    prompts, budgets = loaded.prompts, loaded.budgets
    sync(device)
    t0 = time.perf_counter()
    labels = greedy_labels(model, prompts, budgets, eos_token_ids(model, tok), tok.pad_token_id,
                           batch_size=label_batch_size(model))
    sync(device)
    labels_s = time.perf_counter() - t0
    samples = [(torch.tensor([q], device=device), lab) for q, lab in zip(prompts, labels)]
    tokens = sum(map(len, labels))
    att = Attributor(model)
    run_mode(att, model, device, samples[:1], gradients=False, ig_steps=2, batch_size=args.batch_size,
             ig_packed=True)   # warm-up
    table, res = [], {}

    def add(name, seconds, passes, peak, n_samples, note=""):
        n_tok = sum(len(lab) for _, lab in samples[:n_samples])
        scale = tokens / max(n_tok, 1)
        table.append((name, seconds * scale, passes * scale, tokens / (seconds * scale), peak,
                      "~" if n_samples < len(samples) else "", note))
        res[name] = {"seconds_measured": seconds, "samples": n_samples, "tokens": n_tok, "passes": passes,
                     "seconds_all_tokens": seconds * scale, "peak_gpu_gib": peak, "note": note}

    k_old = min(args.old_num_data, len(samples))
    s_old, n_old, out_old, peak_old = run_mode(att, model, device, samples[:k_old], gradients=False,
                                               ig_steps=args.ig_steps, batch_size=args.old_batch_size,
                                               ig_packed=False)
    add(f"IG-{args.ig_steps} old (per step, {args.old_batch_size})", s_old, n_old, peak_old, k_old)
    s_new, n_new, out_new, peak_new = run_mode(att, model, device, samples, gradients=False,
                                               ig_steps=args.ig_steps, batch_size=args.batch_size,
                                               ig_packed=True)
    budget = att.position_budget(args.batch_size)
    err = max(rel_err(out_new[:k_old], out_old, f"ig_{c}") for c in ("attention", "mlp"))
    add(f"IG-{args.ig_steps} new (packed, {budget})", s_new, n_new, peak_new, len(samples),
        f"max rel. diff vs old {err:.1e}")
    if not args.skip_gradient:
        for mode in ("cached", "batched"):
            s, n, _, peak = run_mode(att, model, device, samples, gradients=True, step_mode=mode,
                                     batch_size=budget)
            add(f"gradient+gxo ({mode})", s, n, peak, len(samples))
    print(f"\n{args.model_name} ({args.dtype}) on {device}: {len(samples)} samples, {tokens} label tokens, "
          f"prompts {min(map(len, prompts))}-{max(map(len, prompts))} tokens; load {load_s:.1f} s, "
          f"labels (batched) {labels_s:.1f} s")
    print(f"{'step':<36}{'seconds':>10}{'passes':>9}{'tok/s':>9}{'peak GiB':>10}  note")
    for name, sec, passes, tps, peak, approx, note in table:
        pk = f"{peak:.1f}" if peak is not None else "-"
        print(f"{name:<36}{approx + f'{sec:.1f}':>10}{approx + f'{passes:.0f}':>9}{tps:>9.1f}{pk:>10}  {note}")
    print("(~: measured on the first samples, scaled to all label tokens)")
    if args.profile:
        acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                        if device.type == "cuda" else [])
        with torch.profiler.profile(activities=acts) as prof:
            run_mode(att, model, device, samples[:args.profile], gradients=False, ig_steps=args.ig_steps,
                     batch_size=args.batch_size, ig_packed=True)
        key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=args.rows))
    if args.json:
        info = {"model": args.model_name, "dtype": args.dtype, "device": str(device),
                "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
                "threads": torch.get_num_threads(), "torch": torch.__version__, "num_data": len(samples),
                "label_tokens": tokens, "ig_steps": args.ig_steps, "load_seconds": load_s,
                "labels_seconds": labels_s, "results": res}
        Path(args.json).write_text(json.dumps(info, indent=2) + "\n")


if __name__ == "__main__":
    main()

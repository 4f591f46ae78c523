"""IG's prompt step on the real model: its elements' earlier positions charged as whole positions against
the position budget (the code before 2026-11-29's change) against their real cost
(``IntegratedGradients.prompt_row_cost``), side by side in one process, alternating rounds.  Prints wall time,
decoder passes and the largest relative difference of the IG scores, and writes JSON:

    python benchmarks/bench_prompt_step.py                                 # CPU: the quick start's IG
    python benchmarks/bench_prompt_step.py --device cuda --num_data 20 --ig_steps 20
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
from common import add_model_flags, load_model_and_prompts  # noqa: E402
from utils.attribution import Attributor  # noqa: E402
from utils.cli import cli_entry  # noqa: E402
from utils.ig import IntegratedGradients  # noqa: E402
from utils.labels import greedy_labels, label_batch_size  # noqa: E402
from utils.models import OFFLINE_MODEL, eos_token_ids  # noqa: E402

MODEL_NAME = OFFLINE_MODEL
DATASET = "truthfulqa-offline"
NUM_DATA = 3          # the CPU quick start's IG samples
IG_STEPS = 4          # and its IG steps
ROUNDS = 2


def whole_positions(self, prompt_len: int) -> float:
    """The old charge: every position of a prompt-step element as one computed position."""
    return float(prompt_len)


def timed(att, samples, device, ig_steps, batch_size):
    passes = [0]
    handle = att.model.base_model.register_forward_pre_hook(lambda *_: passes.__setitem__(0, passes[0] + 1))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    try:
        out = [att.score_sample(p, lab, gradients=False, ig_steps=ig_steps, batch_size=batch_size)
               for p, lab in samples]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    finally:
        handle.remove()
    return time.perf_counter() - start, passes[0], out


@cli_entry
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(p, model_name=MODEL_NAME, dataset=DATASET, num_data=NUM_DATA, dtype=False)
    p.add_argument("--ig_steps", type=int, default=IG_STEPS)
    p.add_argument("--rounds", type=int, default=ROUNDS)
    p.add_argument("--batch_size", type=int, default=None, help="positions per pass (default: automatic)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    for flag in ("num_data", "ig_steps", "rounds"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be at least 1")
    loaded = load_model_and_prompts(args)
    device, model, tok, prompts, budgets = loaded.device, loaded.model, loaded.tokenizer, loaded.prompts, loaded.budgets
    labels = greedy_labels(model, prompts, budgets, eos_token_ids(model, tok), tok.pad_token_id,
                           batch_size=label_batch_size(model))
    samples = [(torch.tensor([q], device=device), lab) for q, lab in zip(prompts, labels)]
    att = Attributor(model)
    costed = IntegratedGradients.prompt_row_cost
    times, passes, outputs = {"whole": [], "costed": []}, {}, {}
    try:
        for _ in range(args.rounds):
            for name, cost in (("whole", whole_positions), ("costed", costed)):
                IntegratedGradients.prompt_row_cost = cost
                seconds, n, out = timed(att, samples, device, args.ig_steps, args.batch_size)
                times[name].append(seconds)
                passes[name], outputs[name] = n, out
                print(f"{name:>7}: {seconds:.2f} s, {n} passes", flush=True)
    finally:
        IntegratedGradients.prompt_row_cost = costed
    diff = max(((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-30)).item()
               for a, b in zip(outputs["costed"], outputs["whole"]) for k in b if b[k].numel())
    best = {k: min(v) for k, v in times.items()}
    result = {"device": str(device), "machine": platform.processor() or platform.machine(),
              "threads": torch.get_num_threads(), "model": args.model_name, "samples": len(samples),
              "prompt_lens": [int(p.shape[1]) for p, _ in samples], "ig_steps": args.ig_steps,
              "budget": att.position_budget(args.batch_size), "seconds": times, "passes": passes,
              "speedup_best": best["whole"] / best["costed"], "max_rel_diff": diff}
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

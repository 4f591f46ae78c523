"""Dense greedy labels, batch-1 ``generate`` (dense_label in tests/reference.py, the label step before
batching) against the batched decoder (utils.labels.greedy_labels), side by side on the same prompts:
wall time, tokens/s, and whether every label is identical.

    python benchmarks/bench_labels.py                                   # SmolLM2 (offline), 20 questions, CPU
    python benchmarks/bench_labels.py --num_data 100 --device cuda --json labels_bench.json
    python benchmarks/bench_labels.py --model_name /path/SmolLM2-135M-Instruct.Q4_1.gguf --device cuda

Exit status 1 when a batched label differs from its batch-1 label (the output names the samples)."""
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
from common import add_model_flags, load_model_and_prompts, sync  # noqa: E402
from reference import dense_label  # noqa: E402
from utils.cli import cli_entry  # noqa: E402
from utils.labels import greedy_labels, label_batch_size  # noqa: E402
from utils.models import OFFLINE_MODEL, eos_token_ids  # noqa: E402

MODEL_NAME = OFFLINE_MODEL
DATASET = "truthfulqa-offline"
NUM_DATA = 20


@cli_entry
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(p, model_name=MODEL_NAME, dataset=DATASET, num_data=NUM_DATA)
    p.add_argument("--batch_size", type=int, nargs="+", default=[None],
                   help="samples per batch (default: the device default, utils/labels.py); 1 outside fp32")
    p.add_argument("--skip_batch_one", action="store_true", help="time only the batched decoder")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    loaded = load_model_and_prompts(args)
    device, model, tok, load_s = loaded.device, loaded.model, loaded.tokenizer, loaded.load_s
    prompts, budgets = loaded.prompts, loaded.budgets
    eos = eos_token_ids(model, tok)
    greedy_labels(model, prompts[:2], [2, 2], eos, tok.pad_token_id, batch_size=2)  # warm-up
    rows = {}
    reference = None
    if not args.skip_batch_one:
        sync(device)
        t0 = time.perf_counter()
        reference = [dense_label(model, torch.tensor([q]), b, eos, tok.pad_token_id) for q, b in zip(prompts, budgets)]
        sync(device)
        rows["batch 1 (generate)"] = {"seconds": time.perf_counter() - t0, "tokens": sum(map(len, reference))}
    mismatches = {}
    for bs in args.batch_size:
        bs = label_batch_size(model, bs)
        sync(device)
        t0 = time.perf_counter()
        got = greedy_labels(model, prompts, budgets, eos, tok.pad_token_id, batch_size=bs)
        sync(device)
        rows[f"batched ({bs})"] = {"seconds": time.perf_counter() - t0, "tokens": sum(map(len, got))}
        if reference is not None:
            bad = [i for i in range(len(got)) if got[i] != reference[i]]
            mismatches[bs] = bad
            rows[f"batched ({bs})"]["equal_to_batch_1"] = not bad
            for i in bad:
                first = next((k for k, (a, b) in enumerate(zip(got[i], reference[i])) if a != b),
                             min(len(got[i]), len(reference[i])))
                print(f"batch {bs}: sample {i} differs from token {first}: "
                      f"{tok.decode(got[i])!r} vs {tok.decode(reference[i])!r}")
    print(f"\n{args.model_name} ({args.dtype}) on {device}, {len(prompts)} prompts "
          f"(length {min(map(len, prompts))}-{max(map(len, prompts))}), model load {load_s:.1f} s")
    print(f"{'decoder':<22}{'seconds':>9}{'tokens':>8}{'tokens/s':>10}  equal")
    for name, r in rows.items():
        eq = {True: "yes", False: "NO"}.get(r.get("equal_to_batch_1"), "-")
        print(f"{name:<22}{r['seconds']:>9.2f}{r['tokens']:>8}{r['tokens'] / r['seconds']:>10.1f}  {eq}")
    if args.json:
        info = {"model": args.model_name, "dtype": args.dtype, "device": str(device), "num_data": len(prompts),
                "torch": torch.__version__, "platform": platform.platform(), "load_seconds": load_s,
                "results": rows}
        Path(args.json).write_text(json.dumps(info, indent=2) + "\n")
    if any(mismatches.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()

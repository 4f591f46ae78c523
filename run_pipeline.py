"""Run every step in order, in one process (the model is loaded once):
folder_creation -> label_generation -> Mag_attention -> Mag_mlp -> attribution_attention (gradient gxo)
-> attribution_attention (ig) -> main (all metrics, figure).  Run again after a crash or Ctrl-C, it skips
the steps whose files are complete for this run (--redo: recompute them) and resumes the interrupted one
from its saved samples.

    python run_pipeline.py --offline                  # SmolLM2-135M-Instruct + TruthfulQA from wheels
    python run_pipeline.py                            # the paper's experiment: Phi-2, 100 questions, IG-20
"""
import argparse
import time

import attribution_attention
import folder_creation
import label_generation
import Mag_attention
import Mag_mlp
import main as sweep_main
from utils.cli import Parser
from utils.data import load_samples, samples_fingerprint
from utils.distributed import current_shard, lock_result_dir
from utils.errors import PipelineError, cli_entry
from utils.models import OFFLINE_MODEL, resolve_device, resolve_dtype
from utils.paths import ResultPaths, default_result_dir
from utils.prompts import PROMPT_FORMATS
from utils.provenance import LabelSet, labels_done, load_labels, scores_done
from utils.steps import validate_score_flags

MODEL_NAME = "microsoft/phi-2"
DATASET = "truthfulqa"
NUM_DATA = 100
N_STEPS = 20
BATCH_SIZE = 2048      # token positions per forward/backward (IG, batched steps); lower it if memory runs out
IG_NUM_DATA = None     # None: IG on every sample; fewer keeps IG affordable on a CPU
DTYPE = "float32"
PROMPT_FORMAT = "auto"  # auto: the chat template if the tokenizer has one, else "Instruct: ...\nOutput:" (phi)
DEVICE = "auto"
RESULT_DIR = None
# --offline: the laptop-CPU quick start (IG, the costly metric, on the first 3 samples with 4 steps)
OFFLINE = {"model_name": OFFLINE_MODEL, "dataset": "truthfulqa-offline", "num_data": 20, "ig_num_data": 3,
           "n_steps": 4}


def parse(argv=None):
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--offline", action="store_true", help=f"preset: {OFFLINE}")
    p.add_argument("--model_name", default=MODEL_NAME)
    p.add_argument("--dataset", default=DATASET)
    p.add_argument("--num_data", type=int, default=NUM_DATA)
    p.add_argument("--ig_num_data", type=int, default=IG_NUM_DATA)
    p.add_argument("--n_steps", type=int, default=N_STEPS)
    p.add_argument("--batch_size", type=int, default=BATCH_SIZE, help="attribution_attention.py --batch_size")
    p.add_argument("--skip_ig", action="store_true", help="leave IG out")
    p.add_argument("--redo", action="store_true", help="recompute steps whose files are already complete")
    p.add_argument("--dtype", default=DTYPE)
    p.add_argument("--prompt_format", default=PROMPT_FORMAT, choices=PROMPT_FORMATS)
    p.add_argument("--device", default=DEVICE)
    p.add_argument("--result_dir", default=RESULT_DIR)
    args = p.parse_args(argv)
    if args.offline:
        defaults = p.parse_args([])
        for key, value in OFFLINE.items():   # the preset fills what was not given explicitly
            if getattr(args, key) == getattr(defaults, key):
                setattr(args, key, value)
                if key == "ig_num_data" and args.num_data < value:   # e.g. --offline --num_data 2
                    args.ig_num_data = max(args.num_data, 1)
    return args


def validate(args) -> str:
    """Every step's flags, checked before any step runs; returns the fingerprint of the samples the labels
    must be made from (so an edited dataset file redoes the labels)."""
    resolve_dtype(args.dtype)
    resolve_device(args.device)
    if args.num_data < 1:
        raise PipelineError(f"--num_data must be at least 1 (got {args.num_data})")
    if args.ig_num_data is not None and not 1 <= args.ig_num_data <= args.num_data:
        raise PipelineError(f"--ig_num_data must be between 1 and --num_data {args.num_data} (got "
                            f"{args.ig_num_data}); leave it out to run IG on every sample")
    validate_score_flags(["gradient", "gxo"] if args.skip_ig else ["gradient", "gxo", "ig"],
                         n_steps=args.n_steps, batch_size=args.batch_size, step_mode="auto")
    return samples_fingerprint(load_samples(args.dataset, args.num_data))


def done_check(args, paths: ResultPaths, fingerprint: str):
    """Per step, a function telling whether its files are complete, readable and finite for this run
    (nothing is skipped with --redo).  Score steps compare against the labels on disk, so new labels redo
    everything after them; a damaged or non-finite file is recomputed."""
    if args.redo:
        return lambda name: False

    def scored(kinds, comps=("attention", "mlp"), num=None, n_steps=None):
        if not paths.labels.is_file():     # read when asked: the labels step may just have rewritten it
            return False
        try:
            labels: LabelSet = load_labels(paths.labels)
        except PipelineError:
            return False
        num = num or len(labels)
        return all(scores_done(paths.score(k, c), labels.run_id, num, n_steps) for k in kinds for c in comps)

    requested = {"model": args.model_name, "dataset": args.dataset, "num_data": args.num_data,
                 "dtype": args.dtype, "seed": label_generation.SEED, "prompt_format": args.prompt_format,
                 "samples_sha256": fingerprint}
    checks = {
        "labels": lambda: labels_done(paths.labels, requested),
        "head magnitudes": lambda: scored(["magnitude"], comps=("attention",)),
        "neuron magnitudes": lambda: scored(["magnitude"], comps=("mlp",)),
        "gradient + gxo": lambda: scored(["gradient", "gxo", "grad_norm"]),
        "integrated gradients": lambda: scored(["ig"], num=args.ig_num_data, n_steps=args.n_steps),
    }
    return lambda name: name in checks and checks[name]()


@cli_entry
def main(argv=None):
    args = parse(argv)
    fingerprint = validate(args)
    paths = ResultPaths(args.result_dir or default_result_dir(args.dataset))
    lock_result_dir(paths.root)   # held across every step (the steps take it again: re-entrant)
    where = ["--dataset", args.dataset, "--device", args.device]
    if args.result_dir:
        where += ["--result_dir", args.result_dir]
    steps = [
        ("folders", folder_creation.main, where),
        ("labels", label_generation.main, where + ["--model_name", args.model_name, "--num_data", str(args.num_data),
                                                   "--dtype", args.dtype, "--prompt_format", args.prompt_format]),
        ("head magnitudes", Mag_attention.main, where),
        ("neuron magnitudes", Mag_mlp.main, where),
        ("gradient + gxo", attribution_attention.main, where + ["--metric", "gradient", "gxo",
                                                                "--batch_size", str(args.batch_size)]),
    ]
    if not args.skip_ig:
        ig_where = where + (["--num_data", str(args.ig_num_data)] if args.ig_num_data is not None else [])
        steps.append(("integrated gradients", attribution_attention.main,
                      ig_where + ["--metric", "ig", "--n_steps", str(args.n_steps),
                                  "--batch_size", str(args.batch_size)]))
    steps.append(("sweep + figure", sweep_main.main, where + ["--metric_name", "all"]))
    say = print if current_shard().is_main else (lambda *a, **k: None)   # torchrun: the first process reports
    done = done_check(args, paths, fingerprint)
    start, took = time.time(), {}
    for i, (name, fn, step_argv) in enumerate(steps, 1):
        if done(name):
            say(f"\n[{i}/{len(steps)}] {name}: its files are complete for this run; skipped (--redo recomputes)")
            continue
        say(f"\n[{i}/{len(steps)}] {name}  ({time.time() - start:.0f}s so far)", flush=True)
        began = time.time()
        fn(step_argv)
        took[name] = time.time() - began
    say(f"\ndone in {time.time() - start:.0f}s: " + ", ".join(f"{n} {t:.0f}s" for n, t in took.items()))


if __name__ == "__main__":
    main()

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
from utils.provenance import labels_done, load_labels, scores_done
from utils.sweep import sweep_done
from utils.steps import validate_score_flags

# Each default has one home: the step script that uses it (edit it there and this driver follows).
MODEL_NAME = label_generation.MODEL_NAME
DATASET = label_generation.DATASET
NUM_DATA = label_generation.NUM_DATA
DTYPE = label_generation.DTYPE
PROMPT_FORMAT = label_generation.PROMPT_FORMAT
DEVICE = label_generation.DEVICE
RESULT_DIR = label_generation.RESULT_DIR
N_STEPS = attribution_attention.N_STEPS
BATCH_SIZE = attribution_attention.BATCH_SIZE
SOURCE = sweep_main.SOURCE
CALIB_NUM_DATA = sweep_main.CALIB_NUM_DATA
IG_NUM_DATA = None     # the driver's own: None runs IG on every sample; fewer keeps IG affordable on a CPU
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
    p.add_argument("--batch_size", type=int, default=BATCH_SIZE,
                   help="attribution_attention.py --batch_size (default: automatic)")
    p.add_argument("--source", nargs="+", default=SOURCE,
                   help="main.py --source: oracle prompt static or all (static also labels and scores "
                        "--calib_num_data calibration samples after the --num_data evaluated)")
    p.add_argument("--calib_num_data", type=int, default=CALIB_NUM_DATA, help="main.py --calib_num_data")
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


def sweep_argv(args, where: list[str]) -> list[str]:
    """main.py's command line: every metric whose files exist, on the first --num_data samples, from the
    requested mask sources (static calibrates on the labelled samples after them)."""
    argv = where + ["--metric_name", "all", "--num_data", str(args.num_data), "--source", *args.source]
    if args.calib_num_data is not None:
        argv += ["--calib_num_data", str(args.calib_num_data)]
    return argv


def label_count(args, sweep: dict) -> int:
    """Samples to label and score: the evaluated ones, plus the static source's calibration samples."""
    return args.num_data + (sweep["calib_num_data"] or 0)


def validate(args, where: list[str]) -> tuple[str, dict]:
    """Every step's flags, checked before any step runs; returns the fingerprint of the samples the labels
    must be made from (so an edited dataset file redoes the labels) and the sweep's request."""
    resolve_dtype(args.dtype)
    resolve_device(args.device)
    if args.num_data < 1:
        raise PipelineError(f"--num_data must be at least 1 (got {args.num_data})")
    sweep = sweep_main.sweep_settings(sweep_argv(args, where))    # --source, --calib_num_data
    total = label_count(args, sweep)
    if args.ig_num_data is not None and not 1 <= args.ig_num_data <= total:
        raise PipelineError(f"--ig_num_data must be between 1 and the {total} labelled samples (got "
                            f"{args.ig_num_data}); leave it out to run IG on every sample")
    validate_score_flags(["gradient", "gxo"] if args.skip_ig else ["gradient", "gxo", "ig"],
                         n_steps=args.n_steps, batch_size=args.batch_size, step_mode="auto")
    return samples_fingerprint(load_samples(args.dataset, total)), sweep


def done_check(args, paths: ResultPaths, fingerprint: str, sweep: dict):
    """Per step, a function telling whether its files are complete, readable and finite for this run
    (nothing is skipped with --redo).  Score steps compare against the labels on disk, so new labels redo
    everything after them; a damaged or non-finite file is recomputed."""
    if args.redo:
        return lambda name: False

    def current_labels():
        if not paths.labels.is_file():     # read when asked: the labels step may just have rewritten it
            return None
        try:
            return load_labels(paths.labels)
        except PipelineError:
            return None

    def scored(kinds, comps=("attention", "mlp"), num=None, n_steps=None):
        labels = current_labels()
        if labels is None:
            return False
        num = num or len(labels)
        return all(scores_done(paths.score(k, c), labels.run_id, num, n_steps) for k in kinds for c in comps)

    def swept():
        labels = current_labels()
        return labels is not None and sweep_done(paths, labels.run_id, sweep)

    requested = {"model": args.model_name, "dataset": args.dataset, "num_data": label_count(args, sweep),
                 "dtype": args.dtype, "seed": label_generation.SEED, "prompt_format": args.prompt_format,
                 "samples_sha256": fingerprint}
    checks = {
        "labels": lambda: labels_done(paths.labels, requested),
        "head magnitudes": lambda: scored(["magnitude"], comps=("attention",)),
        "neuron magnitudes": lambda: scored(["magnitude"], comps=("mlp",)),
        "gradient + gxo": lambda: scored(["gradient", "gxo", "grad_norm"]),
        "integrated gradients": lambda: scored(["ig"], num=args.ig_num_data, n_steps=args.n_steps),
        "sweep + figure": swept,
    }
    return lambda name: name in checks and checks[name]()


@cli_entry
def main(argv=None):
    args = parse(argv)
    where = ["--dataset", args.dataset, "--device", args.device]
    if args.result_dir:
        where += ["--result_dir", args.result_dir]
    fingerprint, sweep = validate(args, where)
    paths = ResultPaths(args.result_dir or default_result_dir(args.dataset))
    lock_result_dir(paths.root)   # held across every step (the steps take it again: re-entrant)
    batch = ["--batch_size", str(args.batch_size)] if args.batch_size is not None else []
    steps = [
        ("folders", folder_creation.main, where),
        ("labels", label_generation.main, where + ["--model_name", args.model_name,
                                                   "--num_data", str(label_count(args, sweep)),
                                                   "--dtype", args.dtype, "--prompt_format", args.prompt_format]),
        ("head magnitudes", Mag_attention.main, where),
        ("neuron magnitudes", Mag_mlp.main, where),
        ("gradient + gxo", attribution_attention.main, where + ["--metric", "gradient", "gxo", *batch]),
    ]
    if not args.skip_ig:
        ig_where = where + (["--num_data", str(args.ig_num_data)] if args.ig_num_data is not None else [])
        steps.append(("integrated gradients", attribution_attention.main,
                      ig_where + ["--metric", "ig", "--n_steps", str(args.n_steps), *batch]))
    steps.append(("sweep + figure", sweep_main.main, sweep_argv(args, where)))
    say = print if current_shard().is_main else (lambda *a, **k: None)   # torchrun: the first process reports
    done = done_check(args, paths, fingerprint, sweep)
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

"""Run every step in order, in one process (the model is loaded once):
folder_creation -> label_generation -> Mag_attention -> Mag_mlp -> attribution_attention (gradient gxo)
-> attribution_attention (ig) -> main (all metrics, figure).  Each step resumes where it stopped.

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
from utils.distributed import current_shard
from utils.models import OFFLINE_MODEL
from utils.prompts import PROMPT_FORMATS

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
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--offline", action="store_true", help=f"preset: {OFFLINE}")
    p.add_argument("--model_name", default=MODEL_NAME)
    p.add_argument("--dataset", default=DATASET)
    p.add_argument("--num_data", type=int, default=NUM_DATA)
    p.add_argument("--ig_num_data", type=int, default=IG_NUM_DATA)
    p.add_argument("--n_steps", type=int, default=N_STEPS)
    p.add_argument("--batch_size", type=int, default=BATCH_SIZE, help="attribution_attention.py --batch_size")
    p.add_argument("--skip_ig", action="store_true", help="leave IG out")
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
    return args


def main(argv=None):
    args = parse(argv)
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
        ig_where = where + (["--num_data", str(args.ig_num_data)] if args.ig_num_data else [])
        steps.append(("integrated gradients", attribution_attention.main,
                      ig_where + ["--metric", "ig", "--n_steps", str(args.n_steps),
                                  "--batch_size", str(args.batch_size)]))
    steps.append(("sweep + figure", sweep_main.main, where + ["--metric_name", "all"]))
    say = print if current_shard().is_main else (lambda *a, **k: None)   # torchrun: the first process reports
    start, took = time.time(), {}
    for i, (name, fn, step_argv) in enumerate(steps, 1):
        say(f"\n[{i}/{len(steps)}] {name}  ({time.time() - start:.0f}s so far)", flush=True)
        began = time.time()
        fn(step_argv)
        took[name] = time.time() - began
    say(f"\ndone in {time.time() - start:.0f}s: " + ", ".join(f"{n} {t:.0f}s" for n, t in took.items()))


if __name__ == "__main__":
    main()

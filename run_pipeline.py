"""Run every step in order, in one process (the model is loaded once):
folder_creation -> label_generation -> Mag_attention -> Mag_mlp -> attribution_attention (gradient gxo)
-> attribution_attention (ig) -> train_predictor (with --source predictor) -> main (every metric whose files
exist, figure).  Run again after a crash
or Ctrl-C, it skips the steps whose files are complete for this run (--redo: recompute them) and resumes
the interrupted one from its saved samples.

Every default is the step script's own constant (edit it there): a flag given here is passed on to the
steps that take it; a flag left out is left out of the steps' command lines too.

    python run_pipeline.py --offline                  # SmolLM2-135M-Instruct + TruthfulQA from wheels
    python run_pipeline.py                            # the paper's experiment: Phi-2, 100 questions, IG-20
"""
import time
from dataclasses import dataclass
from typing import Callable

import attribution_attention
import folder_creation
import label_generation
import Mag_attention
import Mag_mlp
import main as sweep_main
import train_predictor
from utils.data import load_samples, samples_fingerprint
from utils.cli import cli_entry
from utils.distributed import current_shard, lock_result_dir
from utils.errors import PipelineError
from utils.flags import HELP, Parser
from utils.models import OFFLINE_MODEL
from utils.prompts import PROMPT_FORMATS
from utils.predictor_training import predictors_done
from utils.provenance import labels_done, load_labels, scores_done
from utils.run import result_paths
from utils.sites import ATTN, COMPONENTS, MLP
from utils.sources import DEFAULT_CALIB_NUM_DATA, calibrated_sources, source_names
from utils.sweep import SweepRequest
from utils.sweep_results import sweep_done

IG_NUM_DATA = None     # the driver's own: None runs IG on every sample; fewer keeps IG affordable on a CPU
# --offline: the laptop-CPU quick start, a smoke test of every step sized to take under 2 minutes on 2 cores
# (IG, the costly metric, on the first sample with 4 steps; BENCHMARKS.md has the timings)
OFFLINE = {"model_name": OFFLINE_MODEL, "dataset": "truthfulqa-offline", "num_data": 8, "ig_num_data": 1,
           "n_steps": 4}


def build_parser() -> Parser:
    """Defaults are read from the step scripts when the parser is built (so an edited constant shows).
    Values are checked by the parsers of the steps they are passed to (:func:`plan`), not here."""
    def default(script, name, none_means=None):
        value = getattr(script, name)
        shown = none_means if value is None else " ".join(map(str, value)) if isinstance(value, list) else value
        return f"(default: {script.__name__}.py's {name}: {shown})"

    lg, aa = label_generation, attribution_attention
    p = Parser(__doc__)
    p.add_argument("--offline", action="store_true",
                   help="the quick-start preset: " + " ".join(f"--{k} {v}" for k, v in OFFLINE.items())
                        + " (flags given explicitly override it)")
    p.add_argument("--model_name", help=f"{HELP['model_name']} {default(lg, 'MODEL_NAME')}")
    p.add_argument("--dataset", help=f"{HELP['dataset']} {default(lg, 'DATASET')}")
    p.add_argument("--num_data", type=int,
                   help=f"label, score and evaluate the first N samples {default(lg, 'NUM_DATA')}")
    p.add_argument("--ig_num_data", type=int, default=IG_NUM_DATA,
                   help="integrated gradients on the first N samples only (default: this script's IG_NUM_DATA: "
                        f"{'every sample' if IG_NUM_DATA is None else IG_NUM_DATA})")
    p.add_argument("--n_steps", type=int,
                   help=f"integrated-gradients steps {default(aa, 'N_STEPS')}")
    p.add_argument("--batch_size", type=int,
                   help=f"token positions per forward/backward of the score steps "
                        f"{default(aa, 'BATCH_SIZE', 'automatic')}")
    calibrated = " and ".join(calibrated_sources())
    p.add_argument("--source", nargs="+",
                   help=f"main.py --source: {' '.join(source_names())} or all ({calibrated} also labels and "
                        "scores --calib_num_data calibration samples after the --num_data evaluated) "
                        f"{default(sweep_main, 'SOURCE')}")
    p.add_argument("--calib_num_data", type=int,
                   help=f"main.py --calib_num_data: {calibrated} calibration samples "
                        f"{default(sweep_main, 'CALIB_NUM_DATA', f'{DEFAULT_CALIB_NUM_DATA} with {calibrated}')}")
    p.add_argument("--skip_ig", action="store_true", help="leave integrated gradients out")
    p.add_argument("--redo", action="store_true", help="recompute steps whose files are already complete")
    p.add_argument("--dtype", help=f"{HELP['dtype']} {default(lg, 'DTYPE')}")
    p.add_argument("--prompt_format", choices=PROMPT_FORMATS,
                   help=f"{HELP['prompt_format']} {default(lg, 'PROMPT_FORMAT')}")
    p.add_argument("--device", help=f"{HELP['device']} {default(lg, 'DEVICE')}")
    p.add_argument("--result_dir", help=f"{HELP['result_dir']} {default(lg, 'RESULT_DIR', 'result/<dataset>')}")
    return p


def parse(argv=None):
    args = build_parser().parse_args(argv)
    if args.offline:
        for key, value in OFFLINE.items():   # the preset fills what was not given explicitly
            if getattr(args, key) is None:
                setattr(args, key, value)
                if key == "ig_num_data" and args.num_data < value:   # e.g. --offline --num_data 2
                    args.ig_num_data = args.num_data
    return args


class OnDisk:
    """What the done checks compare with: the run's files, the samples' fingerprint (an edited dataset
    file redoes the labels) and the sweep's request."""

    def __init__(self, paths, fingerprint: str, sweep: SweepRequest):
        self.paths, self.fingerprint, self.sweep = paths, fingerprint, sweep

    def labels(self):
        """The labels on disk, or None; read when asked: the labels step may just have rewritten them."""
        if not self.paths.labels.is_file():
            return None
        try:
            return load_labels(self.paths.labels)
        except PipelineError:
            return None


@dataclass
class Step:
    name: str
    script: object        # the step's module (its main runs the step)
    argv: list
    args: object          # what the step's own parser makes of argv: the settings it will run with
    # done(step, on_disk): its files are complete, readable and finite for this run.  Every step names
    # its own (no default), so a step cannot be added without saying when it is done.
    done: Callable[["Step", OnDisk], bool]

    def is_done(self, on_disk: OnDisk) -> bool:
        return self.done(self, on_disk)


# -- the done checks: score steps compare with the labels on disk, so new labels redo everything after
# them; a damaged or non-finite file is not done ------------------------------------------------------------
def never_done(step: Step, on_disk: OnDisk) -> bool:
    return False          # creating the folders is instant


def labels_done_for(step: Step, on_disk: OnDisk) -> bool:
    a = step.args
    requested = {"model": a.model_name, "dataset": a.dataset, "num_data": a.num_data, "dtype": a.dtype,
                 "seed": a.seed, "prompt_format": a.prompt_format, "samples_sha256": on_disk.fingerprint}
    return labels_done(on_disk.paths.labels, requested)


def scores_done_for(kinds: list[str], components=COMPONENTS):
    """The done check of a score step writing ``kinds`` x ``components`` (its own --num_data, --n_steps)."""
    def done(step: Step, on_disk: OnDisk) -> bool:
        labels = on_disk.labels()
        if labels is None:
            return False
        num = step.args.num_data or len(labels)
        n_steps = step.args.n_steps if "ig" in kinds else None
        return all(scores_done(on_disk.paths.score(k, c), labels.run_id, num, n_steps)
                   for k in kinds for c in components)
    return done


def predictors_done_for(step: Step, on_disk: OnDisk) -> bool:
    labels, a = on_disk.labels(), step.args
    return labels is not None and predictors_done(on_disk.paths, labels, train_predictor.metrics_of(a), a.num_data,
                                                  a.calib_num_data, a.cor_gxo_variant, train_predictor.settings_of(a))


def sweep_done_for(step: Step, on_disk: OnDisk) -> bool:
    labels = on_disk.labels()
    return labels is not None and sweep_done(on_disk.paths, labels.run_id, on_disk.sweep)


def given(args, *names) -> list[str]:
    """``--name value`` for each of ``names`` given to run_pipeline.py (flags left out stay out)."""
    out = []
    for name in names:
        value = getattr(args, name)
        if value is not None:
            out += [f"--{name}", *(map(str, value) if isinstance(value, list) else [str(value)])]
    return out


def plan(args) -> tuple[list[Step], SweepRequest]:
    """The steps with their command lines, each parsed and checked by the step's own parser (so every
    flag is checked before any step runs, and every step constant not overridden here applies), and the
    sweep's request."""
    where = given(args, "dataset", "result_dir", "device")
    num_data = args.num_data if args.num_data is not None else label_generation.NUM_DATA
    sweep_argv = where + ["--num_data", str(num_data)] + given(args, "source", "calib_num_data")
    sweep_args, request = sweep_main.parse(sweep_argv)
    total = num_data + (request.calib_num_data or 0)     # the calibration samples follow the evaluated
    label_argv = where + given(args, "model_name", "dtype", "prompt_format") + ["--num_data", str(total)]
    if args.ig_num_data is not None and not 1 <= args.ig_num_data <= total:
        raise PipelineError(f"--ig_num_data must be between 1 and the {total} labelled samples (got "
                            f"{args.ig_num_data}); leave it out to run IG on every sample")
    batch = given(args, "batch_size")
    folder = given(args, "dataset", "result_dir")
    steps = [Step("folders", folder_creation, folder, folder_creation.build_parser().parse_args(folder),
                  never_done),
             Step("labels", label_generation, label_argv, label_generation.build_parser().parse_args(label_argv),
                  labels_done_for),
             Step("head magnitudes", Mag_attention, where, Mag_attention.build_parser().parse_args(where),
                  scores_done_for(["magnitude"], (ATTN,))),
             Step("neuron magnitudes", Mag_mlp, where, Mag_mlp.build_parser().parse_args(where),
                  scores_done_for(["magnitude"], (MLP,)))]
    grad_argv = where + ["--metric", "gradient", "gxo", *batch]
    steps.append(Step("gradient + gxo", attribution_attention, grad_argv, attribution_attention.parse(grad_argv),
                      scores_done_for(["gradient", "gxo", "grad_norm"])))
    if not args.skip_ig:
        ig_argv = where + given(args, "n_steps") + ["--metric", "ig", *batch]
        if args.ig_num_data is not None:
            ig_argv += ["--num_data", str(args.ig_num_data)]
        steps.append(Step("integrated gradients", attribution_attention, ig_argv, attribution_attention.parse(ig_argv),
                          scores_done_for(["ig"])))
    if "predictor" in request.sources:
        pred_argv = where + ["--num_data", str(num_data), "--calib_num_data", str(request.calib_num_data)]
        steps.append(Step("predictors", train_predictor, pred_argv, train_predictor.build_parser().parse_args(pred_argv),
                          predictors_done_for))
    steps.append(Step("sweep + figure", sweep_main, sweep_argv, sweep_args, sweep_done_for))
    return steps, request


@cli_entry
def main(argv=None):
    args = parse(argv)
    steps, sweep = plan(args)
    labels_args = steps[1].args
    # the samples the labels must be made from (an edited dataset file redoes the labels)
    fingerprint = samples_fingerprint(load_samples(labels_args.dataset, labels_args.num_data))
    paths = result_paths(labels_args)
    lock_result_dir(paths.root)   # held across every step (the steps take it again: re-entrant)
    say = print if current_shard().is_main else (lambda *a, **k: None)   # torchrun: the first process reports
    on_disk = OnDisk(paths, fingerprint, sweep)
    start, took = time.time(), {}
    for i, step in enumerate(steps, 1):
        if not args.redo and step.is_done(on_disk):
            say(f"\n[{i}/{len(steps)}] {step.name}: its files are complete for this run; skipped (--redo recomputes)")
            continue
        say(f"\n[{i}/{len(steps)}] {step.name}  ({time.time() - start:.0f}s so far)", flush=True)
        began = time.time()
        step.script.main(step.argv)
        took[step.name] = time.time() - began
    say(f"\ndone in {time.time() - start:.0f}s: " + ", ".join(f"{n} {t:.0f}s" for n, t in took.items()))


if __name__ == "__main__":
    main()

"""Step 6 (optional): the attribution error.  For a few masked steps of each sample and a random subset of
units, zero each unit alone and record the real change of the step's loss; compare it with the removal
cost each metric predicts (Spearman rank correlation per metric and component, and a scatter figure)
-> result/<dataset>/attribution_error/{rows.json, summary.json, scatter.png, scatter.pdf}.
Needs labels.json and the score files (Mag_*.py, attribution_attention.py); resumes per sample."""
import label_generation   # DATASET, RESULT_DIR, DEVICE: one home, the step that makes the run
from utils.attribution_error import measure_attribution_error
from utils.cli import cli_entry
from utils.errors import PipelineError
from utils.flags import Parser, at_least_one, seed_flag, step_parser
from utils.metric_registry import studied_metrics
from utils.run import open_run
from utils.sweep import load_metric_scores

METRICS = ["all"]       # metrics with a removal cost (utils/metric_registry.py), or all (those whose files exist)
NUM_UNITS = 64          # units removed one at a time, per component, per measured step
STEPS = 4               # measured steps per sample (drawn from t >= 1; all of them if the label is shorter)
UNIT_SEED = 0           # draws the steps and units (per sample, so a resumed or sharded run draws the same)
BATCH_SIZE = 256        # removals per forward pass (each a batch row sharing the step's KV cache)
NUM_DATA = None         # None: every labelled sample


def build_parser() -> Parser:
    parser = step_parser(__doc__, label_generation, NUM_DATA)
    parser.add_argument("--metric_name", nargs="+", default=METRICS,
                        help=f"any of {' '.join(studied_metrics())}, or all")
    parser.add_argument("--num_units", type=at_least_one("--num_units"), default=NUM_UNITS,
                        help="units removed one at a time, per component, per measured step")
    parser.add_argument("--steps", type=at_least_one("--steps"), default=STEPS,
                        help="measured steps per sample (t >= 1)")
    parser.add_argument("--unit_seed", type=seed_flag("--unit_seed"), default=UNIT_SEED,
                        help="seed of the random steps and units")
    parser.add_argument("--batch_size", type=at_least_one("--batch_size"), default=BATCH_SIZE,
                        help="removals per forward pass")
    return parser


@cli_entry
def main(argv=None):
    args = build_parser().parse_args(argv)
    explicit = args.metric_name != ["all"]
    studied = studied_metrics()
    names = list(studied) if not explicit else args.metric_name
    unknown = [m for m in names if m not in studied]
    if unknown:
        raise PipelineError(f"unknown --metric_name {', '.join(unknown)}; choose from {', '.join(studied)} or all")
    run = open_run(args)
    per_metric, _ = load_metric_scores(run, names, explicit)   # (scores, metrics skipped for missing files)
    summary = measure_attribution_error(run, per_metric, num_units=args.num_units, num_steps=args.steps,
                                        seed=args.unit_seed, batch_size=args.batch_size)
    if summary is None:  # under torchrun, the first process reports
        return
    print(f"{'metric':<10} {'heads':>8} {'neurons':>8}   (Spearman: predicted removal cost vs real Δloss)")
    for metric, per in summary["correlation"].items():
        print(f"{metric:<10} {per['attention']['spearman']:>8.3f} {per['mlp']['spearman']:>8.3f}")
    print(f"{summary['rows']} removals; wrote {run.paths.root / 'attribution_error'}/rows.json, summary.json, "
          "scatter.png, scatter.pdf")


if __name__ == "__main__":
    main()

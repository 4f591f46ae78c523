"""Step 4c (before main.py --source predictor): train, per layer and component, a small predictor from the hidden
state entering the block to a metric's per-token keep-scores, on the calibration samples N .. N+M-1 (their
labels are the dense model's own greedy outputs: no human answer), hold out the last of them for recall@k,
and write result/<dataset>/predictor/<metric>.pt (and .json: recall@k per layer, cost).  METHOD §7b."""
import label_generation   # DATASET, RESULT_DIR, DEVICE: one home, the step that makes the run
from utils.cli import cli_entry
from utils.errors import PipelineError
from utils.flags import Parser, at_least, at_least_one, seed_flag, step_parser
from utils.metric_registry import COR_GXO_VARIANTS, check_metric_names, metric_names
from utils.predictor import PredictorSettings
from utils.predictor_training import RECALL_RATIOS, train_predictors
from utils.run import open_run
from utils.sources import DEFAULT_CALIB_NUM_DATA

METRIC_NAME = ["cor_gxo", "gxo", "magnitude"]   # metrics whose keep-scores the predictors learn
NUM_DATA = None           # N, the samples main.py evaluates (None: all labelled samples but the last M)
CALIB_NUM_DATA = DEFAULT_CALIB_NUM_DATA   # M, the calibration samples N .. N+M-1 (main.py's --calib_num_data)
COR_GXO_VARIANT = "paper"  # as main.py's
RANK = 64                 # the low-rank bottleneck: hidden -> RANK -> units
HIDDEN = 0                # 0: low-rank linear; > 0: a ReLU layer of this width after the bottleneck
EPOCHS = 40
LR = 3e-3
HELDOUT = 0.2             # share of the calibration samples (the last) held out for recall@k
SEED = 0


def _share(text) -> float:
    value = float(text)          # a ValueError becomes argparse's "invalid ... value" line
    if not 0.0 <= value < 1.0:
        raise PipelineError(f"--heldout must be in [0, 1) (got {text})")
    return value


def _positive(text) -> float:
    value = float(text)
    if not 0.0 < value < float("inf"):
        raise PipelineError(f"--lr must be a positive number (got {text})")
    return value


def build_parser() -> Parser:
    parser = step_parser(__doc__, label_generation, NUM_DATA)
    parser.add_argument("--metric_name", nargs="+", default=METRIC_NAME,
                        help=f"metrics to learn, any of {' '.join(metric_names())}")
    parser.add_argument("--calib_num_data", type=at_least_one("--calib_num_data"), default=CALIB_NUM_DATA,
                        help="M: train on samples N .. N+M-1 (N = --num_data), the samples main.py --source "
                             "predictor --calib_num_data M calibrates on")
    parser.add_argument("--cor_gxo_variant", default=COR_GXO_VARIANT, choices=COR_GXO_VARIANTS,
                        help="the cor_gxo formula the targets use (main.py's --cor_gxo_variant)")
    parser.add_argument("--rank", type=at_least_one("--rank"), default=RANK, help="the bottleneck's width")
    parser.add_argument("--hidden", type=at_least(0, "--hidden"), default=HIDDEN,
                        help="0: low-rank linear predictor; above 0: a ReLU layer of this width after the bottleneck")
    parser.add_argument("--epochs", type=at_least(1, "--epochs", maximum=100000), default=EPOCHS)
    parser.add_argument("--lr", type=_positive, default=LR, help="Adam's learning rate (cosine decay to 0)")
    parser.add_argument("--heldout", type=_share, default=HELDOUT,
                        help="share of the calibration samples (the last ones) held out for recall@k, in [0, 1)")
    parser.add_argument("--predictor_seed", type=seed_flag("--predictor_seed"), default=SEED,
                        help="initialisation and batch order")
    parser.add_argument("--redo", action="store_true", help="retrain metrics already trained from the same inputs")
    return parser


def metrics_of(args) -> list:
    names = check_metric_names(args.metric_name, metric_names())
    return list(metric_names()) if names == ["all"] else names


def settings_of(args) -> PredictorSettings:
    return PredictorSettings(rank=args.rank, hidden=args.hidden, epochs=args.epochs, lr=args.lr,
                             heldout=args.heldout, seed=args.predictor_seed)


@cli_entry
def main(argv=None):
    args = build_parser().parse_args(argv)
    metrics, settings = metrics_of(args), settings_of(args)
    num_data, args.num_data = args.num_data, None        # the run opens every labelled sample
    run = open_run(args)
    reports = train_predictors(run, metrics, num_data, args.calib_num_data, args.cor_gxo_variant, settings,
                               redo=args.redo)
    for m, rep in reports.items():
        recall = " ".join(f"{comp} " + "/".join(f"{v:.2f}" for v in entry.get("mean_recall", {}).values())
                          for comp, entry in rep["components"].items())
        print(f"{m}: held-out recall@k at p = {'/'.join(map(str, RECALL_RATIOS))}: {recall}; "
              f"{rep['cost']['parameters_share']:.1%} of the model's parameters")
    print(f"wrote {run.paths.predictor('x').parent}/")


if __name__ == "__main__":
    main()

"""Step 5: the sparsity sweep.  For each metric, mask source and deactivation ratio, mask the lowest-ranked
heads and neurons per layer, regenerate greedily, and compare with the dense label: BLEU, token
agreement, teacher-forced KL and perplexity, and the activation ratio -> result/<dataset>/res/both/
(JSON, CSV, tradeoff.png/.pdf).  Metrics (METHOD §4): see --metric_name; mask sources (METHOD §7): see
--source; quality measures: see --plot_metric."""
import label_generation   # DATASET, RESULT_DIR, DEVICE: one home, the step that makes the run
from utils.cli import cli_entry
from utils.flags import Parser, at_least, at_least_one, step_parser
from utils.masks import DEFAULT_RATIOS, parse_layers
from utils.metric_registry import COR_GXO_VARIANTS, metric_names
from utils.quality import MEASURES
from utils.run import open_run
from utils.sources import DEFAULT_CALIB_NUM_DATA, SOURCES, calibrated_sources, label_free_sources
from utils.sweep import SweepRequest, run_sweep, sweep_request
from utils.sweep_results import figure_stem

METRIC_NAME = ["all"]           # metrics of utils/metric_registry.py, or all (every one whose files exist)
SOURCE = ["oracle"]             # mask sources of utils/sources.py, or all
CALIB_NUM_DATA = None           # static source: calibration samples (None: DEFAULT_CALIB_NUM_DATA, 100)
PLOT_METRIC = ["bleu"]          # quality measures to plot, of utils/quality.py's MEASURES (one figure each)
RATIOS = list(DEFAULT_RATIOS)   # deactivation ratios p
MASK_LAYERS = None              # None: all layers; "0-23" reproduces the released pipeline on Phi-2
COR_GXO_VARIANT = "paper"       # paper: the formula of METHOD §4; released: the released code's
BATCH_SIZE = 0                  # masked generations per forward (0: all metrics x ratios of a sample)
SAMPLE_BATCH = 0                # samples decoded together (0: 8 on a GPU, 1 on a CPU; 1 when BATCH_SIZE is set)
NUM_DATA = None                 # None: every labelled sample


def build_parser() -> Parser:
    parser = step_parser(__doc__, label_generation, NUM_DATA)
    parser.add_argument("--metric_name", nargs="+", default=METRIC_NAME,
                        help=f"any of {' '.join(metric_names())}, or all (every metric whose score files exist)")
    parser.add_argument("--ratios", type=float, nargs="+", default=RATIOS,
                        help="deactivation ratios p, each in [0, 1) and given once")
    parser.add_argument("--mask_layers", default=MASK_LAYERS,
                        help="mask only these layers, e.g. 0-23 or 0,2,5-7 (default: all layers)")
    parser.add_argument("--cor_gxo_variant", default=COR_GXO_VARIANT, choices=COR_GXO_VARIANTS,
                        help="paper: the corrected GxO formula of METHOD §4; released: the released code's "
                             "per-head-mean version")
    parser.add_argument("--batch_size", type=int, default=BATCH_SIZE,
                        help="masked generations per forward pass (0: every metric, source and ratio of a "
                             "sample at once)")
    parser.add_argument("--sample_batch", type=at_least(0, "--sample_batch"), default=SAMPLE_BATCH,
                        help="samples decoded together in one batch (0: 8 on a GPU, where passes are "
                             "launch-bound, 1 on a CPU; a --batch_size above 0 decodes one sample at a time)")
    parser.add_argument("--source", nargs="+", default=SOURCE,
                        help="where the masks come from, any of "
                             + ", ".join(f"{s.name} ({s.help})" for s in SOURCES.values()) + ", or all")
    calibrated = " and ".join(calibrated_sources())
    parser.add_argument("--calib_num_data", type=at_least_one("--calib_num_data"), default=CALIB_NUM_DATA,
                        help=f"{calibrated} source: calibrate on samples N .. N+M-1 (N = --num_data; default "
                             f"{DEFAULT_CALIB_NUM_DATA} when {calibrated} is asked for)")
    parser.add_argument("--plot_metric", nargs="+", default=PLOT_METRIC,
                        help=f"quality measures on the y-axis of the trade-off figure, any of {' '.join(MEASURES)} "
                             "(bleu: tradeoff.png; others: tradeoff_<name>.png)")
    return parser


def request_of(args) -> SweepRequest:
    """The sweep a parsed command asks for (checked): what results.json records and sweep_done compares."""
    return sweep_request(args.metric_name, ratios=args.ratios, mask_layers=parse_layers(args.mask_layers),
                         variant=args.cor_gxo_variant, sources=args.source, num_data=args.num_data,
                         calib_num_data=args.calib_num_data, plot_metrics=args.plot_metric)


def parse(argv=None):
    """The parsed command line and the sweep it asks for, checked (run_pipeline.py checks this step's flags
    with it before any step runs, and passes the request to utils.sweep_results.sweep_done)."""
    args = build_parser().parse_args(argv)
    return args, request_of(args)


@cli_entry
def main(argv=None):
    args, request = parse(argv)     # bad flags fail here, before a model is loaded
    run = open_run(args)
    results = run_sweep(run, request, batch_size=args.batch_size, sample_batch=args.sample_batch)
    if results is None:  # under torchrun, the first process reports
        return
    width = max(10, *(len(k) for k in results["curves"]))
    print(f"{'metric':<{width}} " + " ".join(f"p={p:.1f}".rjust(13) for p in request.ratios))
    for key, curve in results["curves"].items():
        cells = " ".join(f"{pt['activation_ratio']:.2f}/{pt['bleu']:5.1f}".rjust(13) for pt in curve["points"])
        print(f"{key:<{width}} {cells}")
    label_free = ", ".join(f"metric@{s}" for s in label_free_sources())
    print(f"(cells: activation ratio / BLEU; {label_free}: the label-free mask sources)")
    figures = ", ".join(figure_stem(m) + ext for m in request.plot_metrics for ext in (".png", ".pdf"))
    print(f"wrote {run.paths.res}/results.json, results.csv, per_sample.json, {figures}")


if __name__ == "__main__":
    main()

"""Step 5: the sparsity sweep.  For each metric, mask source and deactivation ratio, mask the lowest-ranked
heads and neurons per layer, regenerate greedily, and compare with the dense label: BLEU, token
agreement, teacher-forced KL and perplexity, and the activation ratio -> result/<dataset>/res/both/
(JSON, CSV, tradeoff.png/.pdf).  Mask sources (METHOD §7): oracle (per token, against the dense label),
prompt (one mask per request from the prompt's step), static (one mask calibrated on samples
N .. N+M-1, N = --num_data, M = --calib_num_data)."""
from utils.cli import common_parser, open_run
from utils.errors import cli_entry
from utils.masks import COR_GXO_VARIANTS, DEFAULT_RATIOS, METRIC_NAMES, parse_layers
from utils.sources import SOURCES
from utils.sweep import PLOT_METRICS, figure_stem, run_sweep, sweep_request

METRIC_NAME = ["all"]           # any of magnitude gradient gxo snip cor_gxo ig wina, or all (those with files)
SOURCE = ["oracle"]             # any of oracle prompt static, or all
CALIB_NUM_DATA = None           # static source: calibration samples (None: 100 when static is asked for)
PLOT_METRIC = ["bleu"]          # y-axes to plot: bleu token_agreement kl ppl (one figure each)
RATIOS = list(DEFAULT_RATIOS)   # deactivation ratios p
MASK_LAYERS = None              # None: all layers; "0-23" reproduces the released pipeline on Phi-2
COR_GXO_VARIANT = "paper"       # paper: the formula of METHOD §4; released: the released code's
BATCH_SIZE = 0                  # masked generations per forward (0: all metrics x ratios of a sample)
DATASET = "truthfulqa"
RESULT_DIR = None
NUM_DATA = None                 # None: every labelled sample
DEVICE = "auto"


def build_parser():
    parser = common_parser(__doc__, {"dataset": DATASET, "result_dir": RESULT_DIR, "num_data": NUM_DATA,
                                     "device": DEVICE})
    parser.add_argument("--metric_name", nargs="+", default=METRIC_NAME,
                        help=f"{' '.join(METRIC_NAMES)} or all")
    parser.add_argument("--ratios", type=float, nargs="+", default=RATIOS)
    parser.add_argument("--mask_layers", default=MASK_LAYERS, help="e.g. 0-23 (default: all layers)")
    parser.add_argument("--cor_gxo_variant", default=COR_GXO_VARIANT, choices=COR_GXO_VARIANTS)
    parser.add_argument("--batch_size", type=int, default=BATCH_SIZE)
    parser.add_argument("--source", nargs="+", default=SOURCE, help=f"{' '.join(SOURCES)} or all")
    parser.add_argument("--calib_num_data", type=int, default=CALIB_NUM_DATA,
                        help="static source: calibrate on samples N .. N+M-1 (N = --num_data; default 100)")
    parser.add_argument("--plot_metric", nargs="+", default=PLOT_METRIC, choices=PLOT_METRICS,
                        help="y-axis of the trade-off figure (bleu: tradeoff.png; others: tradeoff_<name>.png)")
    return parser


def request_of(args) -> dict:
    """The sweep a parsed command asks for (checked): what results.json records and sweep_done compares."""
    return sweep_request(args.metric_name, ratios=args.ratios, mask_layers=parse_layers(args.mask_layers),
                         variant=args.cor_gxo_variant, sources=args.source, num_data=args.num_data,
                         calib_num_data=args.calib_num_data, plot_metrics=args.plot_metric)


def sweep_settings(argv=None) -> dict:
    """The request of a main.py command line without running it (run_pipeline.py passes it to
    utils.sweep.sweep_done to skip a finished sweep)."""
    return request_of(build_parser().parse_args(argv))


@cli_entry
def main(argv=None):
    args = build_parser().parse_args(argv)
    request = request_of(args)     # bad flags fail here, before a model is loaded
    explicit = request["metric_name"] != ["all"]
    names = list(METRIC_NAMES) if not explicit else request["metric_name"]
    run = open_run(args)
    results = run_sweep(run, names, explicit=explicit, ratios=request["ratios"],
                        mask_layers=parse_layers(args.mask_layers), variant=args.cor_gxo_variant, batch_size=args.batch_size, sources=request["sources"],
                        calib_num_data=args.calib_num_data, plot_metrics=request["plot_metrics"])
    if results is None:  # under torchrun, the first process reports
        return
    width = max(10, *(len(k) for k in results["curves"]))
    print(f"{'metric':<{width}} " + " ".join(f"p={p:.1f}".rjust(13) for p in request["ratios"]))
    for key, curve in results["curves"].items():
        cells = " ".join(f"{pt['activation_ratio']:.2f}/{pt['bleu']:5.1f}".rjust(13) for pt in curve["points"])
        print(f"{key:<{width}} {cells}")
    print("(cells: activation ratio / BLEU; metric@prompt and metric@static: the label-free mask sources)")
    figures = ", ".join(figure_stem(m) + ext for m in request["plot_metrics"] for ext in (".png", ".pdf"))
    print(f"wrote {run.paths.res}/results.json, results.csv, per_sample.json, {figures}")


if __name__ == "__main__":
    main()

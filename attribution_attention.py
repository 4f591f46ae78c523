"""Step 4: attribution scores of every attention head and MLP neuron per generated token
-> ig/{metric}_{attention,mlp}_list.pt (+ ig/grad_norm_*_list.pt, the per-layer gradient norms that
cor_gxo needs, whenever gradient or gxo is computed).

gradient and gxo for all layers come from one forward and one backward per token (ask for both at once:
--metric gradient gxo).  ig runs every (layer, component, alpha-step) of a token as one staggered batch
(an element joins at its own layer), split so that no pass computes more than --batch_size token
positions."""
import label_generation   # DATASET, RESULT_DIR, DEVICE: one home, the step that makes the run
from utils.attribution import SCORE_METRICS, STEP_MODES
from utils.cli import cli_entry
from utils.distributed import current_shard
from utils.errors import PipelineError
from utils.flags import Parser, at_least, at_least_one, step_parser
from utils.ig import MAX_IG_STEPS
from utils.run import open_run
from utils.sites import ATTN
from utils.steps import compute_scores

METRICS = ["gradient", "gxo"]   # any of gradient, gxo, ig
N_STEPS = 20                    # integrated-gradients steps (alpha_k = k / n)
BATCH_SIZE = None               # token positions per forward/backward (IG, batched steps); None: automatic
                                # (from free memory on a GPU, 2048 on a CPU); lower it if memory runs out
STEP_MODE = "auto"              # prefix (CPU): two passes per sample; batched (GPU): all steps at once
NUM_DATA = None                 # None: every labelled sample


def build_parser() -> Parser:
    parser = step_parser(__doc__, label_generation, NUM_DATA)
    parser.add_argument("--metric", nargs="+", default=METRICS, help=f"any of {', '.join(SCORE_METRICS)}")
    parser.add_argument("--n_steps", type=at_least(1, "--n_steps", maximum=MAX_IG_STEPS), default=N_STEPS,
                        help="integrated-gradients steps (alpha_k = k/n)")
    parser.add_argument("--batch_size", type=at_least_one("--batch_size", "; leave it out for the automatic size"),
                        default=BATCH_SIZE,
                        help="token positions one forward/backward computes (IG elements or batched steps are "
                             "packed up to it; default: automatic, from free GPU memory, 2048 on a CPU)")
    parser.add_argument("--step_mode", default=STEP_MODE, choices=STEP_MODES,
                        help="cached: one token per pass against the KV cache; prefix: the same arithmetic in "
                             "two passes (every step a row reading the shared dense cache; not with ig); batched: "
                             "all steps of a sample as one batch (not with ig); auto: batched for gradient/gxo on "
                             "CUDA, prefix on a CPU, cached for ig")
    return parser


def parse(argv=None):
    """The checked command line (run_pipeline.py checks this step's flags with it before any step runs)."""
    args = build_parser().parse_args(argv)
    unknown = [m for m in args.metric if m not in SCORE_METRICS]
    if unknown:
        raise PipelineError(f"unknown --metric {', '.join(unknown)}; choose from {', '.join(SCORE_METRICS)}")
    args.metric = [m for m in SCORE_METRICS if m in args.metric]
    if args.step_mode in ("batched", "prefix") and "ig" in args.metric:
        raise PipelineError(f"--step_mode {args.step_mode} does not run integrated gradients; use auto or cached "
                            "for ig")
    return args


@cli_entry
def main(argv=None):
    args = parse(argv)
    run = open_run(args)
    compute_scores(run, args.metric, ig_steps=args.n_steps, batch_size=args.batch_size, step_mode=args.step_mode)
    if current_shard().is_main:
        folder = run.paths.score(args.metric[0], ATTN).parent
        print(f"wrote {', '.join(args.metric)} scores for {run.num_data} samples under {folder}")


if __name__ == "__main__":
    main()

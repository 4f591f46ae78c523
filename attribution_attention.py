"""Step 4: attribution scores of every attention head and MLP neuron per generated token
-> ig/{metric}_{attention,mlp}_list.pt (+ ig/grad_norm_*_list.pt, the per-layer gradient norms that
cor_gxo needs, whenever gradient or gxo is computed).

gradient and gxo for all layers come from one forward and one backward per token (ask for both at once:
--metric gradient gxo).  ig runs every (layer, component, alpha-step) of a token as one staggered batch
(an element joins at its own layer), split so that no pass computes more than --batch_size token
positions."""
from utils.cli import common_parser, open_run
from utils.distributed import current_shard
from utils.errors import PipelineError, cli_entry
from utils.attribution import SCORE_METRICS, STEP_MODES
from utils.steps import compute_scores, validate_score_flags

METRICS = ["gradient", "gxo"]   # any of gradient, gxo, ig
N_STEPS = 20                    # integrated-gradients steps (alpha_k = k / n)
BATCH_SIZE = None               # token positions per forward/backward (IG, batched steps); None: automatic
                                # (from free memory on a GPU, 2048 on a CPU); lower it if memory runs out
STEP_MODE = "auto"              # cached: one token per pass (CPU); batched: all steps of a sample at once (GPU)
DATASET = "truthfulqa"
RESULT_DIR = None
NUM_DATA = None                 # None: every labelled sample
DEVICE = "auto"


@cli_entry
def main(argv=None):
    parser = common_parser(__doc__, {"dataset": DATASET, "result_dir": RESULT_DIR, "num_data": NUM_DATA,
                                     "device": DEVICE})
    parser.add_argument("--metric", nargs="+", default=METRICS, help="gradient, gxo and/or ig")
    parser.add_argument("--n_steps", type=int, default=N_STEPS, help="IG steps")
    parser.add_argument("--batch_size", type=int, default=BATCH_SIZE,
                        help="token positions one forward/backward computes (IG elements or batched steps are packed up to "
                             "it; default: automatic, from free GPU memory, 2048 on a CPU)")
    parser.add_argument("--step_mode", default=STEP_MODE, choices=STEP_MODES,
                        help="auto: batched for gradient/gxo on CUDA, cached otherwise")
    args = parser.parse_args(argv)
    unknown = [m for m in args.metric if m not in SCORE_METRICS]
    if unknown:
        raise PipelineError(f"unknown --metric {', '.join(unknown)}; choose from {', '.join(SCORE_METRICS)}")
    kinds = [m for m in SCORE_METRICS if m in args.metric]
    validate_score_flags(kinds, n_steps=args.n_steps, batch_size=args.batch_size, step_mode=args.step_mode)
    run = open_run(args)
    compute_scores(run, kinds, ig_steps=args.n_steps, ig_batch_size=args.batch_size, step_mode=args.step_mode,
                   producer=f"attribution_attention.py --metric {' '.join(kinds)}")
    if current_shard().is_main:
        print(f"wrote {', '.join(kinds)} scores for {run.num_data} samples under {run.paths.root / 'ig'}")


if __name__ == "__main__":
    main()

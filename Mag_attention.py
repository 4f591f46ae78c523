"""Step 3a: head magnitudes ||x_h|| per generated token -> magnitude/magnitude_attention_list.pt."""
import label_generation   # DATASET, RESULT_DIR, DEVICE: one home, the step that makes the run
from utils.cli import cli_entry
from utils.distributed import current_shard
from utils.flags import Parser, add_location_flags, add_run_flags
from utils.run import open_run
from utils.sites import ATTN
from utils.steps import compute_scores

NUM_DATA = None     # None: every labelled sample


def build_parser() -> Parser:
    parser = Parser(__doc__)
    add_location_flags(parser, dataset=label_generation.DATASET, result_dir=label_generation.RESULT_DIR)
    add_run_flags(parser, num_data=NUM_DATA, device=label_generation.DEVICE)
    return parser


@cli_entry
def main(argv=None):
    run = open_run(build_parser().parse_args(argv))
    compute_scores(run, ["magnitude"], components=(ATTN,))
    if current_shard().is_main:
        print(f"wrote {run.paths.score('magnitude', ATTN)}")


if __name__ == "__main__":
    main()

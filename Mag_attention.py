"""Step 3a: head magnitudes ||x_h|| per generated token -> magnitude/magnitude_attention_list.pt."""
from utils.cli import common_parser, open_run
from utils.errors import cli_entry
from utils.sites import ATTN
from utils.steps import compute_scores

DATASET = "truthfulqa"
RESULT_DIR = None   # None: result/<dataset>
NUM_DATA = None     # None: every labelled sample
DEVICE = "auto"


@cli_entry
def main(argv=None):
    args = common_parser(__doc__, {"dataset": DATASET, "result_dir": RESULT_DIR, "num_data": NUM_DATA,
                                   "device": DEVICE}).parse_args(argv)
    run = open_run(args)
    compute_scores(run, ["magnitude"], components=(ATTN,), producer="Mag_attention.py")
    print(f"wrote {run.paths.magnitude(ATTN)}")


if __name__ == "__main__":
    main()

"""Step 3b: MLP neuron magnitudes |x_j| per generated token -> magnitude/magnitude_mlp_list.pt."""
from utils.cli import common_parser, open_run
from utils.errors import cli_entry
from utils.sites import MLP
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
    compute_scores(run, ["magnitude"], components=(MLP,), producer="Mag_mlp.py")
    print(f"wrote {run.paths.magnitude(MLP)}")


if __name__ == "__main__":
    main()

"""Step 3b: MLP neuron magnitudes |x_j| per generated token -> magnitude/magnitude_mlp_list.pt."""
import label_generation   # DATASET, RESULT_DIR, DEVICE: one home, the step that makes the run
from utils.cli import cli_entry
from utils.flags import Parser, step_parser
from utils.sites import MLP
from utils.steps import magnitude_step

NUM_DATA = None     # None: every labelled sample


def build_parser() -> Parser:
    return step_parser(__doc__, label_generation, NUM_DATA)


@cli_entry
def main(argv=None):
    magnitude_step(build_parser().parse_args(argv), MLP)


if __name__ == "__main__":
    main()

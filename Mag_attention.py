"""Step 3a: head magnitudes ||x_h|| per generated token -> magnitude/magnitude_attention_list.pt."""
from utils.errors import cli_entry
from utils.sites import ATTN
from utils.steps import magnitude_step

DATASET = "truthfulqa"
RESULT_DIR = None   # None: result/<dataset>
NUM_DATA = None     # None: every labelled sample
DEVICE = "auto"


@cli_entry
def main(argv=None):
    defaults = {"dataset": DATASET, "result_dir": RESULT_DIR, "num_data": NUM_DATA, "device": DEVICE}
    magnitude_step(ATTN, "Mag_attention.py", __doc__, defaults, argv)


if __name__ == "__main__":
    main()

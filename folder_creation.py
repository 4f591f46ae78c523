"""Step 1: create result/<dataset>/{ig,magnitude,res/both}."""
import label_generation   # DATASET, RESULT_DIR, DEVICE: one home, the step that makes the run
from utils.cli import cli_entry
from utils.flags import Parser, add_location_flags
from utils.run import result_paths
from utils.steps import create_folders


def build_parser() -> Parser:
    parser = Parser(__doc__)
    add_location_flags(parser, dataset=label_generation.DATASET, result_dir=label_generation.RESULT_DIR)
    return parser


@cli_entry
def main(argv=None):
    paths = result_paths(build_parser().parse_args(argv))
    create_folders(paths)
    print(f"created {', '.join(str(f) for f in paths.folders())}")


if __name__ == "__main__":
    main()

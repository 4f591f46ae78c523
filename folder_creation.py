"""Step 1: create result/<dataset>/{ig,magnitude,res/both}."""
from utils.cli import common_parser, result_paths
from utils.errors import cli_entry
from utils.steps import create_folders

DATASET = "truthfulqa"   # truthfulqa (hub), truthfulqa-offline, or a .json/.jsonl/.csv path
RESULT_DIR = None        # None: result/<dataset>


@cli_entry
def main(argv=None):
    args = common_parser(__doc__, {"dataset": DATASET, "result_dir": RESULT_DIR}).parse_args(argv)
    paths = result_paths(args)
    create_folders(paths)
    print(f"created {', '.join(str(f) for f in paths.folders())}")


if __name__ == "__main__":
    main()

"""Step 2: the dense model's greedy answer to each question (at most as many tokens as the reference
answer) -> result/<dataset>/labels.json.  Resumes where an interrupted run stopped.  Run with other
settings (model, dataset or its content, --num_data, ...) it redoes the labels, saying so first, and moves
the replaced run's scores and results to result/<dataset>/previous_runs/<run_id>/."""
from utils.cli import cli_entry
from utils.flags import Parser, add_label_flags, add_location_flags
from utils.run import result_paths
from utils.steps import generate_labels

MODEL_NAME = "microsoft/phi-2"   # the paper's; hub id, local folder, .gguf path, or an offline model
                                 # (smollm2-135m-instruct: the quick start's, no network needed)
DATASET = "truthfulqa"           # truthfulqa (hub), truthfulqa-offline, xsum, or a file path
NUM_DATA = 100
DTYPE = "float32"
SEED = 0
PROMPT_FORMAT = "auto"           # auto: the chat template if the tokenizer has one, else phi / base
DEVICE = "auto"
RESULT_DIR = None                # None: result/<dataset>
# DATASET, RESULT_DIR and DEVICE are every step's defaults: the later steps import them from here


def build_parser() -> Parser:
    parser = Parser(__doc__)
    add_location_flags(parser, dataset=DATASET, result_dir=RESULT_DIR)
    add_label_flags(parser, model_name=MODEL_NAME, num_data=NUM_DATA, device=DEVICE, dtype=DTYPE, seed=SEED,
                    prompt_format=PROMPT_FORMAT)
    return parser


@cli_entry
def main(argv=None):
    args = build_parser().parse_args(argv)
    paths = result_paths(args)
    labels = generate_labels(paths, model_name=args.model_name, dataset=args.dataset, num_data=args.num_data,
                             device=args.device, dtype=args.dtype, seed=args.seed, prompt_format=args.prompt_format)
    if labels is None:  # under torchrun, the first process writes and reports
        return
    lengths = [len(ids) for ids in labels.label_ids]
    print(f"wrote {paths.labels}: {len(lengths)} labels, {sum(lengths)} tokens "
          f"(prompt format {labels.settings['prompt_format']})")


if __name__ == "__main__":
    main()

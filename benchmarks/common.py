"""What the benchmarks that run a real model on real questions share: their flags, and the model with the
questions' prompts loaded and timed."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from utils.data import load_samples  # noqa: E402
from utils.models import load_model_and_tokenizer, resolve_device, resolve_dtype  # noqa: E402
from utils.prompts import label_inputs, resolve_prompt_format  # noqa: E402


def add_model_flags(parser, *, model_name: str, dataset: str, num_data: int, dtype: bool = True) -> None:
    """``--model_name``, ``--dataset``, ``--num_data``, ``--device`` (and ``--dtype``)."""
    parser.add_argument("--model_name", default=model_name)
    parser.add_argument("--dataset", default=dataset)
    parser.add_argument("--num_data", type=int, default=num_data)
    parser.add_argument("--device", default="auto")
    if dtype:
        parser.add_argument("--dtype", default="float32")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Loaded:
    device: torch.device
    model: torch.nn.Module
    tokenizer: object
    load_s: float           # seconds the model took to load
    prompts: list           # token ids of each sample's prompt, in the model's own format
    budgets: list           # each sample's label budget (its reference answer's token length)


def load_model_and_prompts(args) -> Loaded:
    """The model of ``args.model_name`` (float32 unless ``args.dtype``) and the prompts of the first
    ``args.num_data`` samples of ``args.dataset``."""
    device = resolve_device(args.device)
    began = time.perf_counter()
    model, tok = load_model_and_tokenizer(args.model_name, device, resolve_dtype(getattr(args, "dtype", "float32")))
    load_s = time.perf_counter() - began
    prompts, budgets = label_inputs(tok, load_samples(args.dataset, args.num_data), resolve_prompt_format("auto", tok))
    return Loaded(device, model, tok, load_s, prompts, budgets)

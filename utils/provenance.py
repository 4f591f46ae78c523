"""What produced each file, so that a later step refuses to combine files from different runs.

``labels.json`` holds the run's settings and a ``run_id`` (a hash of the settings and the label token
ids).  Every score file ``X.pt`` has a ``X.meta.json`` beside it naming the ``run_id`` it was computed
from; the ``.pt`` itself stays exactly the released pipeline's layout (a list of float32 tensors)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import PipelineError
from .io import read_json, write_json, write_torch
from .models import resolve_dtype

PROVENANCE_KEYS = ("model", "dataset", "prompt_format", "dtype", "seed")


def run_id_of(settings: dict, label_ids: list[list[int]]) -> str:
    blob = json.dumps({"settings": settings, "labels": label_ids}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@dataclass
class LabelSet:
    path: Path
    settings: dict
    run_id: str
    texts: list[str]
    label_ids: list[list[int]]
    prompt_ids: list[list[int]]
    sample_ids: list[str]
    questions: list[str]

    def __len__(self) -> int:
        return len(self.texts)

    def describe(self) -> str:
        s = self.settings
        return f"model {s['model']}, dataset {s['dataset']}, {len(self)} samples, {s['dtype']}"


def load_labels(path: Path) -> LabelSet:
    if not path.is_file():
        raise PipelineError(f"no labels at {path}: run label_generation.py first "
                            "(with the same --dataset / --result_dir)")
    try:
        data = read_json(path)
        return LabelSet(path=path, settings=data["settings"], run_id=data["run_id"], texts=data["labels"],
                        label_ids=data["label_token_ids"], prompt_ids=data["prompt_token_ids"],
                        sample_ids=data["sample_ids"], questions=data["questions"])
    except (KeyError, TypeError, json.JSONDecodeError):
        raise PipelineError(f"{path} is not a labels file of this pipeline; rerun label_generation.py") from None


def dtype_name(dtype: str) -> str:
    """The name a run records for a ``--dtype`` (aliases resolved: fp32 -> float32)."""
    return str(resolve_dtype(dtype)).replace("torch.", "")


def first_mismatch(requested: dict, settings: dict):
    """The first ``(key, wanted, recorded)`` where ``requested`` contradicts a run's ``settings``; None if
    they agree.  A None request asks nothing; prompt_format auto matches what it resolved to."""
    for key, want in requested.items():
        if want is None or (key == "prompt_format" and want == "auto"):
            continue
        if key == "dtype":
            want = dtype_name(want)
        if str(want) != str(settings.get(key)):
            return key, want, settings.get(key)
    return None


def check_requested(requested: dict, labels: LabelSet) -> None:
    """Flags the user gave explicitly must agree with the run that made the labels."""
    mismatch = first_mismatch({key: requested.get(key) for key in PROVENANCE_KEYS}, labels.settings)
    if mismatch is not None:
        key, want, have = mismatch
        raise PipelineError(f"--{'model_name' if key == 'model' else key} {want} differs from the run that "
                            f"made {labels.path} ({key} = {have}); drop the flag to use the labels' "
                            "setting, or rerun label_generation.py with it")


def meta_path(path: Path) -> Path:
    return path.with_name(path.name[:-len(".pt")] + ".meta.json")


def write_scores(path: Path, tensors: list, meta: dict) -> None:
    """Write a score list and its provenance (the meta goes last: a crash in between leaves no meta,
    which readers report as a file to regenerate)."""
    for i, t in enumerate(tensors):
        if not torch.isfinite(t).all():
            raise PipelineError(f"non-finite scores for sample {i} in {path.name}; the model overflowed "
                                "(try --dtype float32) and nothing was written")
    meta_path(path).unlink(missing_ok=True)
    write_torch(path, tensors)
    write_json(meta_path(path), meta)


def load_scores(path: Path, labels: LabelSet, expected_shape, producer: str) -> list:
    """Read a score list and check it belongs to ``labels`` and fits the model.

    ``expected_shape(T)`` gives the shape sample with T label tokens must have; ``producer`` names the
    command that writes the file (for the error message)."""
    if not path.is_file():
        raise PipelineError(f"missing {path}: run {producer} first")
    meta_file = meta_path(path)
    if not meta_file.is_file():
        raise PipelineError(f"{path} has no provenance file ({meta_file.name}); rerun {producer}")
    meta = read_json(meta_file)
    if meta.get("run_id") != labels.run_id:
        raise PipelineError(f"{path} was computed from other labels (run {meta.get('run_id')}, "
                            f"{meta.get('settings', {}).get('model')}) than {labels.path} (run {labels.run_id}, "
                            f"{labels.settings['model']}); rerun {producer}")
    tensors = torch.load(path, weights_only=True)
    if not isinstance(tensors, list) or len(tensors) > len(labels):
        raise PipelineError(f"{path} does not hold one tensor per labelled sample; rerun {producer}")
    for i, t in enumerate(tensors):
        want = tuple(expected_shape(len(labels.label_ids[i])))
        if tuple(t.shape) != want:
            raise PipelineError(f"{path}: sample {i} has shape {tuple(t.shape)}, but this model and label need "
                                f"{want}; the file belongs to another model: rerun {producer}")
        if not torch.isfinite(t).all():
            raise PipelineError(f"{path}: sample {i} holds non-finite scores; rerun {producer} "
                                "(with --dtype float32 if it overflowed)")
    return tensors


# -- is a step already done? (run_pipeline.py skips finished steps when run again) ------------------------
def labels_done(path: Path, requested: dict) -> bool:
    """``labels.json`` is complete and was made with ``requested`` (model, dataset, num_data, dtype, seed,
    prompt_format; a prompt_format of auto matches whatever it resolved to)."""
    if not path.is_file():
        return False
    try:
        have = read_json(path)["settings"]
    except (KeyError, TypeError, json.JSONDecodeError):
        return False
    return first_mismatch(requested, have) is None


def scores_done(path: Path, run_id: str, num_samples: int, n_steps: int | None = None) -> bool:
    """``path`` (a score file) is complete, from the run ``run_id``, for ``num_samples`` samples (and, for
    IG, ``n_steps`` steps)."""
    meta_file = meta_path(path)
    if not (path.is_file() and meta_file.is_file()):
        return False
    meta = read_json(meta_file)
    return (meta.get("run_id") == run_id and meta.get("num_samples") == num_samples
            and (n_steps is None or meta.get("n_steps") == n_steps))

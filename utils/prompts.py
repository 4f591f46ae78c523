"""The sample as the model expects it.

Two wrappers (``--prompt_format``): ``chat``, the tokenizer's chat template (one user turn plus the
generation prompt), for instruction-tuned models that have one; ``phi``, the plain base-model format
``Instruct: ...\\nOutput:`` (Phi-2's documented QA format, no few-shot examples), for models without a
chat template (Phi-2, Gemma-3-270M base).  ``auto`` picks ``chat`` when the tokenizer has a template.

Two tasks (``Sample.task``): a TruthfulQA question goes in as it is (these prompts are unchanged from
earlier runs, byte for byte); an XSum article is cut to its first ``ARTICLE_TOKEN_BUDGET`` tokens (at a
token boundary of the model's own tokenizer) and preceded by ``SUMMARY_INSTRUCTION``.
"""
from __future__ import annotations

import torch

from .data import QA_TASK, SUMMARY_TASK, Sample
from .errors import PipelineError

PROMPT_FORMATS = ("auto", "phi", "chat", "base")

# XSum articles run to 1,000+ tokens.  384 article tokens + the instruction/template (< 40) + a label as
# long as the reference summary (XSum summaries: one sentence, < 90 tokens) stay below 512, the smallest
# sliding window of the models we run (Gemma-3-270M), and keep CPU runs affordable.  The lead paragraphs
# of a BBC article carry its one-sentence summary, so the cut loses little.
ARTICLE_TOKEN_BUDGET = 384
SUMMARY_INSTRUCTION = "Summarize the following article in one sentence."


def resolve_prompt_format(prompt_format: str, tokenizer, model_type: str | None = None) -> str:
    """The format a run uses.  ``model_type``: the model config's (``phi``, ``gemma3_text``, ...)."""
    if prompt_format not in PROMPT_FORMATS:
        raise PipelineError(f"unknown --prompt_format {prompt_format!r}; choose {', '.join(PROMPT_FORMATS)}")
    if prompt_format == "auto":
        if getattr(tokenizer, "chat_template", None):
            return "chat"
        return "phi" if model_type is None or model_type.startswith("phi") else "base"
    if prompt_format == "chat" and not getattr(tokenizer, "chat_template", None):
        raise PipelineError("--prompt_format chat, but this tokenizer has no chat template; use phi")
    return prompt_format


def truncate_article(tokenizer, article: str, budget: int = ARTICLE_TOKEN_BUDGET) -> str:
    """The article's first ``budget`` tokens (no special tokens), as text; shorter articles unchanged."""
    ids = tokenizer(article, add_special_tokens=False)["input_ids"]
    if len(ids) <= budget:
        return article
    return tokenizer.decode(ids[:budget], skip_special_tokens=True).rstrip()


def prompt_text(tokenizer, sample: Sample | str, prompt_format: str) -> str:
    """The prompt as text (for ``chat``: the user turn's content)."""
    task = QA_TASK if isinstance(sample, str) else sample.task
    text = sample if isinstance(sample, str) else sample.question
    if task == QA_TASK:
        return f"Question: {text}\nAnswer:" if prompt_format == "base" else text
    if task == SUMMARY_TASK:
        article = truncate_article(tokenizer, text)
        if prompt_format == "base":
            return f"Article: {article}\nSummary:"
        return f"{SUMMARY_INSTRUCTION}\n\n{article}"
    raise PipelineError(f"unknown task {task!r} of sample {sample.id}")


def prompt_ids(tokenizer, sample: Sample | str, prompt_format: str) -> torch.Tensor:
    """Token ids ``[1, P]`` of the prompt for one sample (a bare string is a question; ``prompt_format``
    already resolved)."""
    text = prompt_text(tokenizer, sample, prompt_format)
    if prompt_format == "base":
        return torch.tensor([tokenizer(text)["input_ids"]], dtype=torch.long)
    if prompt_format == "chat":
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                            add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):  # newer tokenizers return a BatchEncoding
            ids = ids["input_ids"]
        ids = list(ids[0]) if ids and isinstance(ids[0], list) else list(ids)
    else:
        ids = tokenizer(f"Instruct: {text}\nOutput:")["input_ids"]
    return torch.tensor([ids], dtype=torch.long)


def label_inputs(tokenizer, samples, prompt_format: str) -> tuple[list[list[int]], list[int]]:
    """Each sample's prompt ids and its label budget (METHOD §2: the reference answer's token count)."""
    prompts = [prompt_ids(tokenizer, sample, prompt_format)[0].tolist() for sample in samples]
    budgets = [len(tokenizer(sample.reference, add_special_tokens=False)["input_ids"]) for sample in samples]
    return prompts, budgets

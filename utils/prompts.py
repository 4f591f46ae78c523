"""The question as the model expects it: ``Instruct: ...\\nOutput:`` for base models (Phi-2), the chat
template for models that have one."""
from __future__ import annotations

import torch

from .errors import PipelineError

PROMPT_FORMATS = ("auto", "phi", "chat")


def resolve_prompt_format(prompt_format: str, tokenizer) -> str:
    if prompt_format not in PROMPT_FORMATS:
        raise PipelineError(f"unknown --prompt_format {prompt_format!r}; choose {', '.join(PROMPT_FORMATS)}")
    if prompt_format == "auto":
        return "chat" if getattr(tokenizer, "chat_template", None) else "phi"
    if prompt_format == "chat" and not getattr(tokenizer, "chat_template", None):
        raise PipelineError("--prompt_format chat, but this tokenizer has no chat template; use phi")
    return prompt_format


def prompt_ids(tokenizer, question: str, prompt_format: str) -> torch.Tensor:
    """Token ids ``[1, P]`` of the prompt for one question (``prompt_format`` already resolved)."""
    if prompt_format == "chat":
        ids = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                            add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):  # newer tokenizers return a BatchEncoding
            ids = ids["input_ids"]
        ids = list(ids[0]) if ids and isinstance(ids[0], list) else list(ids)
    else:
        ids = tokenizer(f"Instruct: {question}\nOutput:")["input_ids"]
    return torch.tensor([ids], dtype=torch.long)

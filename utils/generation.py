"""Greedy generation: dense labels (``transformers``' own ``generate``) and masked generation, all
sparsity levels and metrics of one sample decoded together as one batch."""
from __future__ import annotations

import torch

from .kv_cache import cache_argument_name, cache_with_room, forward_kwargs, output_cache
from .sites import ATTN, MLP, SiteHooks


def strip_at_eos(ids: list[int], eos_ids) -> list[int]:
    eos = set(eos_ids)
    for i, tok in enumerate(ids):
        if tok in eos:
            return ids[:i]
    return ids


@torch.no_grad()
def dense_label(model, prompt_ids: torch.Tensor, max_new_tokens: int, eos_ids, pad_id: int) -> list[int]:
    """The dense model's greedy continuation (at most ``max_new_tokens``, EOS and after removed)."""
    device = next(model.parameters()).device
    prompt_ids = prompt_ids.to(device)
    out = model.generate(input_ids=prompt_ids, attention_mask=torch.ones_like(prompt_ids),
                         max_new_tokens=max_new_tokens, min_new_tokens=0, do_sample=False, num_beams=1,
                         temperature=None, top_p=None, top_k=None, repetition_penalty=None,
                         eos_token_id=list(eos_ids), pad_token_id=pad_id)
    return strip_at_eos(out[0, prompt_ids.shape[1]:].tolist(), eos_ids)


@torch.no_grad()
def masked_generate(model, hooks: SiteHooks, prompt_ids: torch.Tensor, keep: dict, eos_ids,
                    max_new_tokens: int | None = None) -> list[list[int]]:
    """Greedy generation of ``B`` masked variants of one prompt at once.

    ``keep[comp]``: bool ``[B, T, L, units]``; step t's mask applies to the unit outputs step t computes.
    Step 0 (the prompt and first token) runs dense, once, and its cache is shared by all variants; steps
    at or past T run dense.  Each variant stops at EOS (EOS and after removed)."""
    device = next(model.parameters()).device
    B, T = keep[ATTN].shape[:2]
    max_new_tokens = T if max_new_tokens is None else max_new_tokens
    if max_new_tokens == 0:
        return [[] for _ in range(B)]
    cache_name = cache_argument_name(model)
    eos = torch.tensor(sorted(set(eos_ids)), device=device)
    out = model(**forward_kwargs(cache_name, prompt_ids.to(device)))
    first = out.logits[:, -1].argmax(-1)                        # step 0: dense, shared by all
    cache = cache_with_room(output_cache(out), B, max_new_tokens)   # steps write in place, no copy per step
    tokens = [first.expand(B)]
    done = torch.isin(tokens[0], eos)
    for t in range(1, max_new_tokens):
        if bool(done.all()):
            break
        masks = None
        if t < T:
            masks = {ATTN: keep[ATTN][:, t].to(device), MLP: keep[MLP][:, t].to(device)}
        with hooks.settings(masks=masks):
            out = model(**forward_kwargs(cache_name, tokens[-1][:, None], cache))
        cache = output_cache(out)
        nxt = out.logits[:, -1].argmax(-1)
        tokens.append(nxt)
        done = done | torch.isin(nxt, eos)
    ids = torch.stack(tokens, dim=1).tolist()
    return [strip_at_eos(row, eos_ids) for row in ids]

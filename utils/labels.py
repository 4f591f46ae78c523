"""Dense greedy labels of many samples decoded as one batch (METHOD §2), equal to batch-1 greedy decoding.

Batch-1 ``generate`` runs one sample at a time, so a small model spends its time on per-step overhead.
Here the prompts of a batch are left-padded to a common length (an attention mask hides the pad slots
and explicit ``position_ids`` give every real token the position it has in its own unpadded sequence),
every sample keeps its own token budget, and a sample leaves the batch (its rows of the KV cache are
dropped) as soon as it emits EOS or reaches its budget, so the batch shrinks instead of decoding pads.

Exactness: a masked pad slot contributes exactly zero to attention, so in fp32 the batched logits
differ from batch-1 ones only by summation order inside the kernels (~1e-6 relative); the labels are
equal unless two logits tie that closely (tests check equality on tiny models and on the real SmolLM2).
Half precision rounds ~1000x coarser, so :func:`label_batch_size` keeps batch 1 for it.
"""
from __future__ import annotations

import inspect

import torch

from .errors import PipelineError
from .io import note
from .kv_cache import cache_argument_name, forward_kwargs, map_cache_, output_cache, sliding_window

LABEL_BATCH_SIZE = 16        # samples decoded together on a CPU (the arithmetic grows with the batch there)
CUDA_LABEL_BATCH_SIZE = 64   # on a GPU a step costs about the same for 1 or 64 rows: decode many at once


def label_batch_size(model, requested: int | None = None) -> int:
    """Samples decoded per batch: ``requested``, else the device's default; always 1 outside fp32, where a
    padded, batched pass rounds differently enough to change greedy tokens (labels must equal batch-1
    greedy decoding, so bf16/fp16 labels decode one sample at a time)."""
    param = next(model.parameters())
    if param.dtype != torch.float32:
        return 1
    if requested:
        return max(1, int(requested))
    return CUDA_LABEL_BATCH_SIZE if param.device.type == "cuda" else LABEL_BATCH_SIZE


def position_limit(model) -> int | None:
    """The token positions the model has (``max_position_embeddings``; GPT-2 calls it ``n_positions``), or None."""
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(model.config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def fit_positions(model, name: str, samples, prompts: list[list[int]], budgets: list[int]) -> list[int]:
    """The label budgets cut so that prompt + label fits the model's positions (past them, learned position
    embeddings fail with an IndexError, rotary ones were never trained); a prompt that leaves no room for
    one label token is refused, naming the sample."""
    limit = position_limit(model)
    if limit is None:
        return list(budgets)
    for sample, prompt in zip(samples, prompts):
        if len(prompt) >= limit:
            raise PipelineError(f"sample {sample.id}: its prompt is {len(prompt)} tokens, but {name} has {limit} "
                                "positions (prompt and answer together); use a dataset of shorter questions or a "
                                "model with more positions")
    fitted = [min(b, limit - len(p)) for b, p in zip(budgets, prompts)]
    cut = [s.id for s, b, f in zip(samples, budgets, fitted) if f < b]
    if cut:
        note(f"{len(cut)} label(s) cut to fit {name}'s {limit} positions (sample {', '.join(map(str, cut[:5]))})")
    return fitted


@torch.no_grad()
def greedy_labels(model, prompts: list[list[int]], budgets: list[int], eos_ids, pad_id: int | None, *,
                  batch_size: int = LABEL_BATCH_SIZE) -> list[list[int]]:
    """Greedy continuation of every prompt (at most ``budgets[i]`` new tokens, EOS and after removed),
    decoded ``batch_size`` prompts at a time (one at a time outside fp32); in the order of ``prompts``."""
    if len(prompts) != len(budgets):
        raise ValueError(f"{len(prompts)} prompts but {len(budgets)} budgets")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1 (got {batch_size})")
    batch_size = label_batch_size(model, batch_size)     # 1 outside fp32 (see there)
    out: list[list[int]] = [[] for _ in prompts]
    todo = [i for i in range(len(prompts)) if budgets[i] > 0]
    # similar lengths together: less padding, and the batch's budgets end at similar times
    todo.sort(key=lambda i: (len(prompts[i]), budgets[i]))
    window = sliding_window(model)
    for start in range(0, len(todo), batch_size):
        group = todo[start:start + batch_size]
        longest = max(len(prompts[i]) + budgets[i] for i in group)
        if window is not None and longest > window and len({len(prompts[i]) for i in group}) > 1:
            # a sliding window counts cache slots, pads included: padding would narrow a row's window
            batches = [[i] for i in group]
        else:
            batches = [group]
        for rows in batches:
            for i, ids in zip(rows, _decode([prompts[i] for i in rows], [budgets[i] for i in rows],
                                            model, eos_ids, pad_id)):
                out[i] = ids
    return out


def _decode(prompts, budgets, model, eos_ids, pad_id) -> list[list[int]]:
    device = next(model.parameters()).device
    cache_name = cache_argument_name(model)
    keep_last = "logits_to_keep" in inspect.signature(model.forward).parameters
    B, width = len(prompts), max(len(p) for p in prompts)
    pad = 0 if pad_id is None else int(pad_id)
    ids = torch.full((B, width), pad, dtype=torch.long)
    mask = torch.zeros(B, width, dtype=torch.long)
    for b, prompt in enumerate(prompts):
        ids[b, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[b, width - len(prompt):] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    eos = torch.tensor(sorted(set(eos_ids)), dtype=torch.long, device=device)
    budget = torch.tensor(budgets, dtype=torch.long, device=device)
    live = torch.arange(B, device=device)                 # which samples the batch rows still hold
    tokens: list[list[int]] = [[] for _ in range(B)]
    cache, step = None, 0
    while True:
        kwargs = forward_kwargs(cache_name, ids, cache)
        kwargs.update(attention_mask=mask, position_ids=positions)
        if keep_last:   # the prompt step's other positions need no logits (the vocabulary is large)
            kwargs["logits_to_keep"] = 1
        out = model(**kwargs)
        cache = output_cache(out)
        nxt = out.logits[:, -1].argmax(-1)
        step += 1
        stop = torch.isin(nxt, eos) | (budget[live] <= step)
        for b, tok, s in zip(live.tolist(), nxt.tolist(), stop.tolist()):
            if not (s and tok in set(eos_ids)):
                tokens[b].append(tok)
        if bool(stop.all()):
            break
        if bool(stop.any()):           # finished samples leave the batch
            keep = (~stop).nonzero().squeeze(-1)
            live, nxt, mask, positions = live[keep], nxt[keep], mask[keep], positions[keep]
            map_cache_(cache, lambda t, _: t.index_select(0, keep))
        ids = nxt[:, None]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        positions = positions[:, -1:] + 1
    return tokens

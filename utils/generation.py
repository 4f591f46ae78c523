"""Greedy generation of masked variants (the sweep, METHOD §5): all sparsity levels and metrics of one
sample decoded together as one batch (on a GPU, several samples' batches together:
:func:`masked_generate_many`).  The labels themselves come from :mod:`utils.labels` (many samples as one
batch), checked against batch-1 ``generate`` (``dense_label`` in tests/reference.py)."""
from __future__ import annotations

import contextlib

import torch

from .kv_cache import (cache_argument_name, cache_with_room, forward_kwargs, layer_key_values, output_cache,
                       sliding_window, stacked_cache)
from .memory import free_memory_budget
from .sites import ATTN, MLP, SiteHooks


def strip_at_eos(ids: list[int], eos_ids) -> list[int]:
    eos = set(eos_ids)
    for i, tok in enumerate(ids):
        if tok in eos:
            return ids[:i]
    return ids


@torch.no_grad()
def prompt_state(model, prompt_ids: torch.Tensor):
    """Step 0 of every masked variant of a prompt: the dense model's first greedy token (``[1]``) and the
    prompt's cache (batch 1).  The sweep computes it once per sample for decoding and the KL pass."""
    device = next(model.parameters()).device
    out = model(**forward_kwargs(cache_argument_name(model), prompt_ids.to(device)))
    return out.logits[:, -1].argmax(-1), output_cache(out)


@torch.no_grad()
def masked_generate(model, hooks: SiteHooks, prompt_ids: torch.Tensor, keep: dict, eos_ids,
                    max_new_tokens: int | None = None, state=None) -> list[list[int]]:
    """Greedy generation of ``B`` masked variants of one prompt at once.

    ``keep[comp]``: bool ``[B, T, L, units]``; step t's mask applies to the unit outputs step t computes.
    Step 0 (the prompt and first token) runs dense, once, and its cache is shared by all variants; steps
    at or past T run dense.  Each variant stops at EOS (EOS and after removed).  ``state``: the prompt's
    :func:`prompt_state`, when the caller already has it."""
    device = next(model.parameters()).device
    B, T = keep[ATTN].shape[:2]

    def step(t, live):
        masks = None
        if t < T:
            masks = {ATTN: keep[ATTN][:, t].to(device), MLP: keep[MLP][:, t].to(device)}
        return hooks.settings(masks=masks)

    return _greedy(model, prompt_ids, B, T if max_new_tokens is None else max_new_tokens, eos_ids, state, step)


@torch.no_grad()
def token_masked_generate(model, masker, prompt_ids: torch.Tensor, variant, ratio, eos_ids, max_new_tokens: int,
                          state=None) -> tuple[list[list[int]], torch.Tensor, torch.Tensor]:
    """Greedy generation of ``B`` variants of one prompt whose masks a per-token masker
    (utils/token_masks.py) chooses inside every step t >= 1: row b uses the masker's variant ``variant[b]`` at
    ratio ``ratio[b]``.  Step 0 runs dense, as for :func:`masked_generate`.  Returns the tokens (EOS and after
    removed) and, per row, the parameter weight kept and the total weight over the steps that row computed
    before its EOS (float64 ``[B]`` each: the activation ratio's numerator and denominator)."""
    B = len(variant)
    counter = _KeptCounter(masker, B)
    state = state if state is not None else prompt_state(model, prompt_ids)    # dense: before the rows are set
    with masker.rows(variant, ratio):
        ids = _greedy(model, prompt_ids, B, max_new_tokens, eos_ids, state, counter.step)
    return ids, counter.kept, counter.total


class _KeptCounter:
    """Per row, the weight a per-token masker kept and the full weight, over the steps each row computes
    before its EOS (``step`` wraps each decode step)."""

    def __init__(self, masker, rows: int):
        self.masker = masker
        self.kept = torch.zeros(rows, dtype=torch.float64)
        self.steps = torch.zeros(rows, dtype=torch.float64)

    @contextlib.contextmanager
    def step(self, t, live):
        yield
        alive = live.cpu().double()
        self.kept.add_(self.masker.take_kept().cpu() * alive)
        self.steps.add_(alive)

    @property
    def total(self) -> torch.Tensor:
        return self.steps * self.masker.layout.num_layers * self.masker.layer_weight()


def _greedy(model, prompt_ids, B: int, max_new_tokens: int, eos_ids, state, step) -> list[list[int]]:
    """The greedy loop of ``B`` variants of one prompt: step 0 dense (``state`` or :func:`prompt_state`), then
    each step t runs inside ``step(t, live)`` (``live``: bool ``[B]``, the rows not yet at EOS)."""
    if max_new_tokens == 0:
        return [[] for _ in range(B)]
    device = next(model.parameters()).device
    cache_name = cache_argument_name(model)
    eos = torch.tensor(sorted(set(eos_ids)), device=device)
    first, prompt_cache = state if state is not None else prompt_state(model, prompt_ids)   # step 0: dense
    cache = cache_with_room(prompt_cache, B, max_new_tokens)   # steps write in place, no copy per step
    tokens = [first.expand(B)]
    done = torch.isin(tokens[0], eos)
    for t in range(1, max_new_tokens):
        if bool(done.all()):
            break
        with step(t, ~done):
            out = model(**forward_kwargs(cache_name, tokens[-1][:, None], cache))
        cache = output_cache(out)
        nxt = out.logits[:, -1].argmax(-1)
        tokens.append(nxt)
        done = done | torch.isin(nxt, eos)
    ids = torch.stack(tokens, dim=1).tolist()
    return [strip_at_eos(row, eos_ids) for row in ids]


def can_generate_many(model, prompt_lengths, max_new_tokens) -> bool:
    """Whether :func:`masked_generate_many` can decode these samples together: the padded layout (longest
    prompt + most new tokens) must stay inside a sliding window, where one exists, so no layer drops a
    position (the per-sample path handles longer sequences)."""
    window = sliding_window(model)
    return window is None or max(prompt_lengths) + max(max_new_tokens) < window


def cache_bytes_per_position(cache) -> int:
    """Bytes one row's keys and values take per position, over every layer of ``cache``."""
    return sum(2 * k.shape[1] * k.shape[3] * k.element_size() for k, _ in layer_key_values(cache))


def decode_groups(sizes, budget: int | None) -> list[list[int]]:
    """Consecutive groups of samples to decode together: ``sizes[s]`` = (rows, longest sequence, bytes per
    row and position) of sample s; a group's padded cache (all its rows x its longest sequence) stays
    within ``budget`` bytes (None: no limit).  A sample alone is always a group, whatever its size."""
    groups, rows, longest = [], 0, 0
    for s, (n, length, per_position) in enumerate(sizes):
        if groups and budget is not None and (rows + n) * max(longest, length) * per_position > budget:
            groups.append([])
            rows, longest = 0, 0
        if not groups:
            groups.append([])
        groups[-1].append(s)
        rows, longest = rows + n, max(longest, length)
    return groups


def decode_memory_budget(device) -> int | None:
    """Bytes the padded caches of samples decoded together may take: a quarter of the GPU's free memory
    (the rest for the pass's activations and the KL pass); None (no limit) on a CPU, which decodes one
    sample at a time by default."""
    return free_memory_budget(device, 1 / 4)


@torch.no_grad()
def masked_generate_many(model, hooks: SiteHooks, states, keeps: list[dict], eos_ids,
                         max_new_tokens: list[int]) -> list[list[list[int]]]:
    """:func:`masked_generate` for several samples in one batch: the same greedy tokens, fewer passes.

    ``states``: each sample's :func:`prompt_state`; ``keeps``: each sample's masks (``[B_s, T_s, L, units]``,
    steps at or past T_s dense); ``max_new_tokens``: each sample's.  The samples' prompt caches are
    left-padded to the longest and hidden by the attention mask, and every row gets its own sample's
    positions, so each row computes what it would alone (up to float rounding of the padded attention:
    near-tied greedy choices can differ; ``tests/test_generation.py`` compares with one sample at a time).
    Returns, per sample, its variants' tokens (EOS and after removed)."""
    device = next(model.parameters()).device
    counts = [k[ATTN].shape[0] for k in keeps]
    ones = {comp: torch.ones(keeps[0][comp].shape[2:], dtype=torch.bool, device=device) for comp in (ATTN, MLP)}

    def step(t, live):
        masks = {comp: torch.cat([k[comp][:, t].to(device) if t < k[comp].shape[1]
                                  else ones[comp].expand(b, *ones[comp].shape)
                                  for k, b in zip(keeps, counts)]) for comp in (ATTN, MLP)}
        return hooks.settings(masks=masks)

    return _greedy_many(model, states, counts, eos_ids, max_new_tokens, step)


@torch.no_grad()
def token_masked_generate_many(model, masker, states, rows: list[tuple[list, list]], eos_ids,
                               max_new_tokens: list[int]):
    """:func:`token_masked_generate` for several samples in one batch (as :func:`masked_generate_many`):
    ``rows[s]`` = (variants, ratios) of sample s's rows.  Returns, per sample, (tokens, kept, total)."""
    counts = [len(v) for v, _ in rows]
    variant = [v for vs, _ in rows for v in vs]
    ratio = [p for _, ps in rows for p in ps]
    counter = _KeptCounter(masker, len(variant))
    with masker.rows(variant, ratio):
        ids = _greedy_many(model, states, counts, eos_ids, max_new_tokens, counter.step)
    kept, total = counter.kept, counter.total
    out, start = [], 0
    for s, b in enumerate(counts):
        out.append((ids[s], kept[start:start + b], total[start:start + b]))
        start += b
    return out


def _greedy_many(model, states, counts: list[int], eos_ids, max_new_tokens: list[int], step):
    """The greedy loop of several samples' variants in one padded batch (:func:`masked_generate_many`); each
    step t runs inside ``step(t, live)``, ``live`` the rows not yet at EOS or at their sample's limit."""
    device = next(model.parameters()).device
    N = max(max_new_tokens)
    if N == 0:
        return [[[] for _ in range(b)] for b in counts]
    cache_name = cache_argument_name(model)
    eos = torch.tensor(sorted(set(eos_ids)), device=device)
    cache, lengths = stacked_cache([c for _, c in states], counts, N)
    width = max(lengths)
    sample_of = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts)).to(device)
    pad = width - torch.tensor(lengths, device=device)[sample_of]             # [R] padding positions
    attention = (torch.arange(width + N, device=device)[None] >= pad[:, None]).long()   # [R, width + N]
    position = torch.tensor(lengths, device=device)[sample_of]               # the next token's position
    limit = torch.tensor(max_new_tokens, device=device)[sample_of]
    tokens = [torch.cat([first.expand(b) for (first, _), b in zip(states, counts)])]
    done = torch.isin(tokens[0], eos) | (limit <= 1)
    for t in range(1, N):
        if bool(done.all()):
            break
        kwargs = forward_kwargs(cache_name, tokens[-1][:, None], cache)
        kwargs.update(attention_mask=attention[:, :width + t], position_ids=(position + t - 1)[:, None])
        with step(t, ~done):
            out = model(**kwargs)
        cache = output_cache(out)
        nxt = out.logits[:, -1].argmax(-1)
        tokens.append(nxt)
        done = done | torch.isin(nxt, eos) | (limit <= t + 1)
    ids = torch.stack(tokens, dim=1).tolist()
    rows, start = [], 0
    for b, n in zip(counts, max_new_tokens):
        rows.append([strip_at_eos(row[:n], eos_ids) for row in ids[start:start + b]])
        start += b
    return rows

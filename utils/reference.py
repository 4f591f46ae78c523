"""Slow, obviously-correct references for the tests and benchmarks.

The naive attribution loop handles one site (one layer's heads or MLP neurons) at a time: a forward
pre-hook replaces the site's input at the step's positions by a fresh leaf tensor ``alpha * x``, one
forward and one backward give dLoss/d(that leaf).  With ``use_cache=False`` every step recomputes the
whole sequence (prompt + label[:t]) and the leaf covers only the positions step t would compute, which
checks the fast path's KV-cache handling independently; with ``use_cache=True`` it runs one token per
step against a copy of the dense cache, the way the released pipeline's loop would.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .attribution import ig_from_gradients, unit_scores
from .kv_cache import cache_argument_name, forward_kwargs, output_cache, repeated_cache
from .sites import ATTN, COMPONENTS, ModelLayout, locate_units


def _site_module(layout: ModelLayout, comp: str, layer: int):
    return layout.attn_out[layer] if comp == ATTN else layout.mlp_down[layer]


def _forward_logits(model, ids, cache, cache_name):
    return model(**forward_kwargs(cache_name, ids, cache, use_cache=cache is not None)).logits[0, -1].float()


def _site_gradient(model, layout, comp, layer, ids, target, alpha, first_step, cache, cache_name):
    """dLoss/dx at the last position of one site, with that site scaled by ``alpha`` at the positions
    this step computes and everything else dense."""
    holder = {}

    def hook(module, args):
        x = args[0]
        start = 0 if (first_step or cache is not None) else x.shape[1] - 1
        leaf = (alpha * x[:, start:]).detach().requires_grad_(True)
        holder["leaf"] = leaf
        return (torch.cat([x[:, :start], leaf], dim=1),) + tuple(args[1:])

    handle = _site_module(layout, comp, layer).register_forward_pre_hook(hook)
    try:
        with torch.enable_grad():
            step_cache = repeated_cache(cache, 1) if cache is not None else None
            logits = _forward_logits(model, ids, step_cache, cache_name)
            F.cross_entropy(logits[None], target).backward()
    finally:
        handle.remove()
    return holder["leaf"].grad[0, -1]


def _dense_outputs(model, layout, ids, cache, cache_name):
    """Dense unit outputs at the last position of every site (and the cache after this step)."""
    xs, handles = {c: [None] * layout.num_layers for c in COMPONENTS}, []
    for comp in COMPONENTS:
        for layer in range(layout.num_layers):
            def hook(module, args, comp=comp, layer=layer):
                xs[comp][layer] = args[0][0, -1].detach()
            handles.append(_site_module(layout, comp, layer).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            out = model(**forward_kwargs(cache_name, ids, cache, use_cache=cache is not None))
    finally:
        for h in handles:
            h.remove()
    return xs, (output_cache(out) if cache is not None else None)


def reference_scores(model, prompt_ids, label_ids, *, ig_steps: int = 0, use_cache: bool = False,
                     gradients: bool = True, layers=None) -> dict:
    """The per-layer, per-step loop.  ``layers`` restricts the sites scored (benchmarks time a subset);
    the returned tensors then hold only those layers, in order."""
    layout = locate_units(model)
    layers = list(range(layout.num_layers)) if layers is None else list(layers)
    cache_name = cache_argument_name(model)
    device = next(model.parameters()).device
    prompt_ids = prompt_ids.to(device)
    labels = torch.tensor(label_ids, dtype=torch.long, device=device)
    rows = []
    cache = None
    from transformers import DynamicCache  # only the cached variant needs it
    if use_cache:
        cache = DynamicCache()
    for t in range(len(label_ids)):
        if use_cache:
            ids = prompt_ids if t == 0 else labels[t - 1:t].view(1, 1)
        else:
            ids = torch.cat([prompt_ids, labels[:t].view(1, -1)], dim=1)
        target = labels[t:t + 1]
        # gradients first: they run on copies of the cache as it stands before this step
        grads, igs = {}, {}
        for comp in COMPONENTS:
            for layer in layers:
                args = (model, layout, comp, layer, ids, target)
                more = (t == 0, cache if (use_cache and t > 0) else None, cache_name)
                if gradients:
                    grads[(comp, layer)] = _site_gradient(*args, 1.0, *more)
                if ig_steps:
                    total = sum(_site_gradient(*args, k / ig_steps, *more).float()
                                for k in range(1, ig_steps + 1))
                    igs[(comp, layer)] = total / ig_steps
        xs, new_cache = _dense_outputs(model, layout, ids, cache if use_cache else None, cache_name)
        if use_cache:
            cache = new_cache
        row = {}
        for comp in COMPONENTS:
            per = [unit_scores(comp, xs[comp][l], grads.get((comp, l)), layout.head_dim) for l in layers]
            for key in per[0]:
                row[f"{key}_{comp}"] = torch.stack([p[key] for p in per])
            if ig_steps:
                row[f"ig_{comp}"] = torch.stack([ig_from_gradients(comp, xs[comp][l], igs[(comp, l)],
                                                                   layout.head_dim) for l in layers])
        rows.append(row)
    return {key: torch.stack([r[key] for r in rows]).float().cpu() for key in rows[0]}

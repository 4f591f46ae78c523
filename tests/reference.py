"""Slow, obviously-correct references: test-only code (the tests, benchmarks/bench_attribution.py and
benchmarks/bench_labels.py use it; the pipeline never does), so it lives with the tests.

Independent of the code it checks: nothing here comes from ``utils.attribution``, ``utils.masks`` or
``utils.kv_cache``; the score formulas are written out again from METHOD §3, one head at a time, and the
model's modules are found with ``utils.sites.locate_units`` only (which layer modules exist, no hooks).

The naive attribution loop handles one site (one layer's heads or MLP neurons) at a time: a forward
pre-hook replaces the site's input at the step's positions by a fresh leaf tensor ``alpha * x``, one
forward and one backward give dLoss/d(that leaf).  With ``use_cache=False`` every step recomputes the
whole sequence (prompt + label[:t]) and the leaf covers only the positions step t would compute, which
checks the fast path's KV-cache handling independently; with ``use_cache=True`` it runs one token per
step against a deep copy of the dense cache, the way the released pipeline's loop would.
"""
from __future__ import annotations

import copy
import inspect

import torch
import torch.nn.functional as F

from utils.generation import strip_at_eos
from utils.sites import ATTN, COMPONENTS, ModelLayout, locate_units


# -- METHOD §3, written out per head ------------------------------------------------------------------
def head_slices(width: int, head_dim: int) -> list[slice]:
    """Head h owns dims [h·d, (h+1)·d) of the attention output before the output projection."""
    return [slice(h * head_dim, (h + 1) * head_dim) for h in range(width // head_dim)]


def reference_unit_scores(comp: str, x: torch.Tensor, g: torch.Tensor | None, head_dim: int) -> dict:
    """magnitude, gradient, GxO and the site's gradient norm from ``x`` and ``g`` (both ``[W]``).

    Heads: ‖x_h‖₂, (1/d)·Σ_i g_h,i, (1/d)·Σ_i g_h,i·x_h,i; neurons: |x_j|, g_j, g_j·x_j;
    grad_norm: sqrt(Σ g²) over the whole site."""
    x = x.double()
    g = None if g is None else g.double()
    if comp == ATTN:
        parts = head_slices(x.shape[0], head_dim)
        out = {"magnitude": torch.stack([torch.sqrt((x[s] ** 2).sum()) for s in parts])}
        if g is not None:
            out["gradient"] = torch.stack([g[s].sum() / head_dim for s in parts])
            out["gxo"] = torch.stack([(g[s] * x[s]).sum() / head_dim for s in parts])
    else:
        out = {"magnitude": torch.abs(x)}
        if g is not None:
            out["gradient"] = g.clone()
            out["gxo"] = g * x
    if g is not None:
        out["grad_norm"] = torch.sqrt((g ** 2).sum())
    return out


def reference_ig(comp: str, x: torch.Tensor, grads_along_path: list[torch.Tensor], head_dim: int) -> torch.Tensor:
    """IG with n = len(grads_along_path) steps: x ⊙ (1/n)·Σ_k g(α_k), then the per-head mean of dims."""
    n = len(grads_along_path)
    avg = sum(g.double() for g in grads_along_path) / n
    prod = x.double() * avg
    if comp == ATTN:
        return torch.stack([prod[s].sum() / head_dim for s in head_slices(prod.shape[0], head_dim)])
    return prod


# -- the naive loop -----------------------------------------------------------------------------------
def _site_module(layout: ModelLayout, comp: str, layer: int):
    return layout.attn_out[layer] if comp == ATTN else layout.mlp_down[layer]


def _cache_kwarg(model) -> str:
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params and "past_key_values" not in params else "past_key_values"


def _run(model, ids, cache):
    """One forward pass; returns (logits at the last position, the cache it produced or None)."""
    kwargs = {"input_ids": ids, "use_cache": cache is not None}
    if cache is not None:
        kwargs[_cache_kwarg(model)] = cache
    out = model(**kwargs)
    new_cache = None
    if cache is not None:
        new_cache = out.get("cache") if hasattr(out, "get") else None
        new_cache = new_cache if new_cache is not None else out.past_key_values
    return out.logits[0, -1].float(), new_cache


def _site_gradient(model, layout, comp, layer, ids, target, alpha, first_step, cache):
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
            step_cache = copy.deepcopy(cache) if cache is not None else None
            logits, _ = _run(model, ids, step_cache)
            F.cross_entropy(logits[None], target).backward()
    finally:
        handle.remove()
    return holder["leaf"].grad[0, -1]


def _dense_outputs(model, layout, ids, cache):
    """Dense unit outputs at the last position of every site (and the cache after this step)."""
    xs, handles = {c: [None] * layout.num_layers for c in COMPONENTS}, []
    for comp in COMPONENTS:
        for layer in range(layout.num_layers):
            def hook(module, args, comp=comp, layer=layer):
                xs[comp][layer] = args[0][0, -1].detach()
            handles.append(_site_module(layout, comp, layer).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            _, new_cache = _run(model, ids, cache)
    finally:
        for h in handles:
            h.remove()
    return xs, new_cache


def reference_scores(model, prompt_ids, label_ids, *, ig_steps: int = 0, use_cache: bool = False,
                     gradients: bool = True, layers=None) -> dict:
    """The per-layer, per-step loop.  ``layers`` restricts the sites scored (benchmarks time a subset);
    the returned tensors then hold only those layers, in order."""
    layout = locate_units(model)
    layers = list(range(layout.num_layers)) if layers is None else list(layers)
    device = next(model.parameters()).device
    prompt_ids = prompt_ids.to(device)
    labels = torch.tensor(label_ids, dtype=torch.long, device=device)
    rows = []
    cache = None
    if use_cache:
        from transformers import DynamicCache
        cache = DynamicCache(config=model.config)
    for t in range(len(label_ids)):
        if use_cache:
            ids = prompt_ids if t == 0 else labels[t - 1:t].view(1, 1)
        else:
            ids = torch.cat([prompt_ids, labels[:t].view(1, -1)], dim=1)
        target = labels[t:t + 1]
        step_cache = cache if (use_cache and t > 0) else None
        # gradients first: they run on copies of the cache as it stands before this step
        grads, paths = {}, {}
        for comp in COMPONENTS:
            for layer in layers:
                args = (model, layout, comp, layer, ids, target)
                if gradients:
                    grads[(comp, layer)] = _site_gradient(*args, 1.0, t == 0, step_cache)
                if ig_steps:
                    paths[(comp, layer)] = [_site_gradient(*args, k / ig_steps, t == 0, step_cache)
                                            for k in range(1, ig_steps + 1)]
        xs, new_cache = _dense_outputs(model, layout, ids, cache if use_cache else None)
        if use_cache:
            cache = new_cache
        row = {}
        for comp in COMPONENTS:
            per = [reference_unit_scores(comp, xs[comp][l], grads.get((comp, l)), layout.head_dim) for l in layers]
            for key in per[0]:
                row[f"{key}_{comp}"] = torch.stack([p[key] for p in per])
            if ig_steps:
                row[f"ig_{comp}"] = torch.stack([reference_ig(comp, xs[comp][l], paths[(comp, l)], layout.head_dim)
                                                 for l in layers])
        rows.append(row)
    return {key: torch.stack([r[key] for r in rows]).float().cpu() for key in rows[0]}


# -- dense greedy labels, one sample at a time --------------------------------------------------------------
@torch.no_grad()
def dense_label(model, prompt_ids: torch.Tensor, max_new_tokens: int, eos_ids, pad_id: int) -> list[int]:
    """The dense model's greedy continuation by ``transformers``' own ``generate``, batch 1 (at most
    ``max_new_tokens``, EOS and after removed): what the batched label step (utils/labels.py) must equal."""
    device = next(model.parameters()).device
    prompt_ids = prompt_ids.to(device)
    out = model.generate(input_ids=prompt_ids, attention_mask=torch.ones_like(prompt_ids),
                         max_new_tokens=max_new_tokens, min_new_tokens=0, do_sample=False, num_beams=1,
                         temperature=None, top_p=None, top_k=None, repetition_penalty=None,
                         eos_token_id=list(eos_ids), pad_token_id=pad_id)
    return strip_at_eos(out[0, prompt_ids.shape[1]:].tolist(), eos_ids)

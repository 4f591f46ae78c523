"""The few KV-cache operations the pipeline needs, across ``transformers`` versions.

A generation step t > 0 runs one token against the cache of earlier steps.  Attribution needs the
cache detached from the step's autograd graph, and batched passes (IG chunks, masked generations of
one sample) need the dense cache repeated along the batch dimension.
"""
from __future__ import annotations

import inspect

import torch


def cache_argument_name(model) -> str:
    """``transformers`` renamed ``past_key_values`` to ``cache`` in 5.2x; use what this version takes."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params and "past_key_values" not in params else "past_key_values"


def forward_kwargs(cache_name: str, input_ids, cache=None, use_cache: bool = True) -> dict:
    """Keyword arguments of one forward pass, passing ``cache`` under this version's argument name."""
    kwargs = {"input_ids": input_ids, "use_cache": use_cache}
    if cache is not None:
        kwargs[cache_name] = cache
    return kwargs


def output_cache(outputs):
    """The cache a forward pass returned (``cache`` in newer ``transformers``, else ``past_key_values``)."""
    cache = outputs.get("cache") if hasattr(outputs, "get") else None
    return cache if cache is not None else outputs.past_key_values


def map_cache_(cache, fn) -> None:
    """Apply ``fn`` to every key and value tensor of ``cache`` in place."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        for layer in layers:
            if getattr(layer, "keys", None) is not None and torch.is_tensor(layer.keys):
                layer.keys = fn(layer.keys)
                layer.values = fn(layer.values)
        return
    cache.key_cache = [fn(k) for k in cache.key_cache]
    cache.value_cache = [fn(v) for v in cache.value_cache]


def detach_cache_(cache) -> None:
    """Cut the cache off the autograd graph of the step that filled it."""
    map_cache_(cache, lambda t: t.detach())


def repeated_cache(cache, batch):
    """A new cache holding ``batch`` copies of a batch-1 cache (the original is left as it is).

    ``batch`` may also be a list with one count per layer (IG's staggered batch grows with depth)."""
    new = cache.__class__.__new__(cache.__class__)
    new.__dict__.update(cache.__dict__)

    def repeat(t: torch.Tensor, layer: int) -> torch.Tensor:
        count = batch[layer] if isinstance(batch, (list, tuple)) else batch
        return t.detach().repeat_interleave(count, dim=0)

    layers = getattr(cache, "layers", None)
    if layers is not None:
        new.layers = []
        for i, layer in enumerate(layers):
            copy = layer.__class__.__new__(layer.__class__)
            copy.__dict__.update(layer.__dict__)
            if getattr(layer, "keys", None) is not None and torch.is_tensor(layer.keys):
                copy.keys, copy.values = repeat(layer.keys, i), repeat(layer.values, i)
            new.layers.append(copy)
    else:
        new.key_cache = [repeat(k, i) for i, k in enumerate(cache.key_cache)]
        new.value_cache = [repeat(v, i) for i, v in enumerate(cache.value_cache)]
    return new

"""The few KV-cache operations the pipeline needs, across ``transformers`` versions.

A generation step t > 0 runs one token against the cache of earlier steps.  Attribution needs the
cache detached from the step's autograd graph, and batched passes (IG chunks, masked generations of
one sample) need the dense cache repeated along the batch dimension.

Sliding-window layers (Gemma-3) arrive as ``DynamicSlidingWindowLayer`` objects, which keep only the last
window - 1 keys/values plus a running length (``cumulative_length``) that sets the next step's mask.
``repeated_cache`` copies each layer object with all of its state and replaces only the tensors, so a
copy continues exactly like the original; ``tests/test_sliding_window.py`` checks every cached path
against no-cache recomputation on sequences longer than the window.
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
    """Replace every key and value tensor ``t`` of layer ``i`` of ``cache`` by ``fn(t, i)``, in place."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        for i, layer in enumerate(layers):
            if getattr(layer, "keys", None) is not None and torch.is_tensor(layer.keys):
                layer.keys = fn(layer.keys, i)
                layer.values = fn(layer.values, i)
        return
    cache.key_cache = [fn(k, i) for i, k in enumerate(cache.key_cache)]
    cache.value_cache = [fn(v, i) for i, v in enumerate(cache.value_cache)]


def detach_cache_(cache) -> None:
    """Cut the cache off the autograd graph of the step that filled it."""
    map_cache_(cache, lambda t, _: t.detach())


def _layer_copies(cache):
    """A new cache of the same kind whose layer objects (or key/value lists) are shallow copies of the
    original's, so replacing their tensors leaves the original as it is."""
    new = cache.__class__.__new__(cache.__class__)
    new.__dict__.update(cache.__dict__)
    layers = getattr(cache, "layers", None)
    if layers is not None:
        new.layers = []
        for layer in layers:
            copy = layer.__class__.__new__(layer.__class__)
            copy.__dict__.update(layer.__dict__)
            new.layers.append(copy)
    else:
        new.key_cache, new.value_cache = list(cache.key_cache), list(cache.value_cache)
    return new


def repeated_cache(cache, batch):
    """A new cache holding ``batch`` copies of a batch-1 cache (the original is left as it is).

    ``batch`` may also be a list with one count per layer (IG's staggered batch grows with depth)."""
    new = _layer_copies(cache)
    counts = batch if isinstance(batch, (list, tuple)) else None
    map_cache_(new, lambda t, i: t.detach().repeat_interleave(batch if counts is None else counts[i], dim=0))
    return new


def mapped_cache(cache, fn):
    """A new cache of the same kind whose layer ``i`` holds ``fn(t, i)`` for each key and value tensor ``t``
    of ``cache`` (the original is left as it is).  IG's packed passes build each row's own cache prefix."""
    new = _layer_copies(cache)
    map_cache_(new, fn)
    for layer in getattr(new, "layers", None) or []:
        # sliding-window layers count the positions seen; fn may change the length (untruncated caches only)
        if hasattr(layer, "cumulative_length") and torch.is_tensor(getattr(layer, "keys", None)):
            layer.cumulative_length = int(layer.keys.shape[-2])
    return new

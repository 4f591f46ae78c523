"""The few KV-cache operations the pipeline needs, across ``transformers`` versions.

A generation step t > 0 runs one token against the cache of earlier steps.  Attribution needs the
cache detached from the step's autograd graph, and batched passes (IG chunks, masked generations of
one sample) need the dense cache repeated along the batch dimension.

Sliding-window layers (Gemma-3) arrive as ``DynamicSlidingWindowLayer`` objects, which keep only the last
window - 1 keys/values plus a running length (``cumulative_length``) that sets the next step's mask.
``repeated_cache`` copies each layer object with all of its state and replaces only the tensors, so a
copy continues exactly like the original; ``tests/test_sliding_window.py`` checks every cached path
against no-cache recomputation on sequences longer than the window.

Packed IG passes (utils/ig.py) run many rows of one sample, each a single new token that must
see its own prefix of the sample's final cache.  Copying that prefix into every row made a row cost ~100
computed positions with a 400-token prompt; ``shared_prefix_attention`` instead reads the one cache from
every row (grouped-query einsums, a per-row length mask), registered in transformers' AttentionInterface
and switched on by ``shared_prefix_pass`` for the duration of a pass.  ``tests/test_ig_prefix.py``
checks it against the stock attention with a real cache per row.
"""
from __future__ import annotations

import contextlib
import inspect

import torch

from .architecture import sliding_window  # noqa: F401  (callers import it from here: the caches' constraint)


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


def _room_layer_class():
    """``DynamicLayer`` that appends into preallocated room instead of concatenating (see :func:`cache_with_room`)."""
    global _RoomLayer
    if _RoomLayer is None:
        from transformers.cache_utils import DynamicLayer

        class RoomLayer(DynamicLayer):
            def update(self, key_states, value_states, *args, **kwargs):
                n, m = self.keys.shape[-2], key_states.shape[-2]
                if n + m > self.room_keys.shape[-2]:          # out of room: grow as DynamicLayer does
                    return super().update(key_states, value_states, *args, **kwargs)
                self.room_keys[:, :, n:n + m] = key_states
                self.room_values[:, :, n:n + m] = value_states
                self.keys, self.values = self.room_keys[:, :, :n + m], self.room_values[:, :, :n + m]
                return self.keys, self.values

        _RoomLayer = RoomLayer
    return _RoomLayer


_RoomLayer = None


def cache_with_room(cache, batch: int, room: int):
    """Like :func:`repeated_cache` (``batch`` copies of a batch-1 cache), but each plain ``DynamicLayer``
    gets ``room`` more positions allocated up front, so a decoding step writes its keys and values in place
    instead of copying the whole cache (``torch.cat``) at every step and layer.  A layer's keys and values
    are views of the first positions of its buffer, holding the same numbers as the concatenated ones; the
    attention reads them as it would the concatenation.  Other layer kinds (sliding windows) and legacy
    caches are repeated as :func:`repeated_cache` does."""
    if getattr(cache, "layers", None) is None:
        return repeated_cache(cache, batch)
    from transformers.cache_utils import DynamicLayer

    new = _layer_copies(cache)
    for layer in new.layers:
        if not torch.is_tensor(getattr(layer, "keys", None)):
            continue
        if type(layer) is not DynamicLayer:
            layer.keys = layer.keys.detach().repeat_interleave(batch, dim=0)
            layer.values = layer.values.detach().repeat_interleave(batch, dim=0)
            continue
        # the batch copies go straight into the room buffer (one copy, not a repeat and then a copy)
        buffers = []
        for t in (layer.keys.detach(), layer.values.detach()):
            room_t = t.new_empty(t.shape[0] * batch, t.shape[1], t.shape[2] + room, t.shape[3])
            room_t[:, :, :t.shape[2]] = t if t.shape[0] == 1 else t.repeat_interleave(batch, dim=0)
            buffers.append(room_t)
        _give_room(layer, buffers, layer.keys.shape[2])
    return new


def _give_room(layer, buffers, n: int) -> None:
    """Turn a plain ``DynamicLayer`` into a room layer over ``buffers`` (keys, values), its first ``n``
    positions filled: later steps write into the buffers in place."""
    layer.__class__ = _room_layer_class()
    layer.room_keys, layer.room_values = buffers
    layer.keys, layer.values = buffers[0][:, :, :n], buffers[1][:, :, :n]


def stacked_cache(caches, counts, room: int):
    """One cache for the rows of several samples: sample s's batch-1 cache repeated ``counts[s]`` times,
    every sample left-padded with zeros to the longest (``width`` positions), with ``room`` more positions
    allocated for decoding (as :func:`cache_with_room`).  Returns ``(cache, lengths)``: sample s holds
    ``lengths[s]`` positions, after ``width - lengths[s]`` of padding the caller's attention mask must hide.

    Each layer must hold every position of its sample (no sliding window cut yet: the caller checks
    :func:`sliding_window`); a sliding-window layer's running length is set to ``width`` so its next
    step's mask covers the padded layout."""
    from transformers.cache_utils import DynamicLayer

    if any(getattr(c, "layers", None) is None for c in caches):
        raise ValueError("stacked_cache needs layered caches (transformers >= 4.56)")
    lengths = [max(layer.keys.shape[-2] for layer in c.layers if torch.is_tensor(getattr(layer, "keys", None)))
               for c in caches]
    width = max(lengths)
    pads = [width - n for n in lengths]
    new = _layer_copies(caches[0])
    for i, layer in enumerate(new.layers):
        if not torch.is_tensor(getattr(layer, "keys", None)):
            continue
        plain = type(layer) is DynamicLayer
        buffers = []
        for kind in ("keys", "values"):
            parts = [getattr(c.layers[i], kind).detach() for c in caches]
            if any(t.shape[-2] != n for t, n in zip(parts, lengths)):
                raise ValueError("stacked_cache: a layer holds fewer positions than its sample (sliding window)")
            b, h, _, d = parts[0].shape
            out = parts[0].new_zeros(sum(counts), h, width + (room if plain else 0), d)
            row = 0
            for t, k, pad in zip(parts, counts, pads):
                out[row:row + k, :, pad:width] = t
                row += k
            buffers.append(out)
        if plain:
            _give_room(layer, buffers, width)
        else:
            layer.keys, layer.values = buffers
            if hasattr(layer, "cumulative_length"):
                layer.cumulative_length = width
    return new, lengths


def layer_key_values(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``[(keys, values)]`` of every layer of ``cache`` (``[batch, kv_heads, positions, head_dim]`` each)."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return [(layer.keys, layer.values) for layer in layers]
    return list(zip(cache.key_cache, cache.value_cache))


# -- attention of one new token per row against a prefix every row shares --------------------------------
PREFIX_ATTENTION = "shared_prefix"   # the name it is registered under in transformers' AttentionInterface
_active: list = []                   # the running pass's SharedPrefix (a stack, so nesting restores the outer)


class SharedPrefix:
    """What the attention of a packed IG pass reads: one sample's dense cache, shared by all rows.

    ``cache``: the sample's cache after its last dense step (batch 1); row r of the pass sees its first
    ``lengths[r]`` positions (``[rows]``, on the device), ``width`` = the largest of them.  Each layer's
    keys/values are cut to ``width`` once and detached: the cache is a constant of the pass."""

    def __init__(self, cache, lengths: torch.Tensor, width: int):
        self.kv = [(k[0, :, :width].detach(), v[0, :, :width].detach()) for k, v in layer_key_values(cache)]
        if any(k.shape[-2] < width for k, _ in self.kv):
            # a sliding-window layer keeps only its last window - 1 positions (callers check can_pack_ig)
            raise ValueError(f"the shared cache holds fewer than the {width} positions a row needs")
        self.lengths = lengths
        self.width = width
        self.calls = 0      # attention calls that read it: the caller checks every layer did


def shared_prefix_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                            softcap=None, **kwargs):
    """Attention of each row's one new token to [its prefix of the shared cache] + [its own key/value].

    ``query`` ``[n, heads, 1, d]``, ``key``/``value`` ``[n, kv_heads, 1, d]`` (rotary and norms applied by
    the module; no cache object, so nothing was concatenated).  The prefix stays ``[kv_heads, S, d]``: query
    heads are grouped onto their KV head (head h reads KV head h // group, as ``repeat_kv`` orders them), so
    no row ever holds a copy of it.  Positions at or beyond a row's length are masked out, which is exactly
    the cache that row's generation step ran against.  ``attention_mask`` is ignored (the model builds none
    for an unregistered mask implementation, and one query per row needs no causal mask); ``softcap`` is
    applied when the module passes one, as the stock eager function does; no dropout (eval only)."""
    if dropout:
        raise ValueError("the shared-prefix attention runs in eval mode only (no dropout)")
    state = _active[-1]
    state.calls += 1
    keys, values = state.kv[module.layer_idx]
    n, heads, q_len, d = query.shape
    kv_heads = keys.shape[0]
    if q_len != 1 or key.shape[2] != 1:
        raise ValueError("the shared-prefix attention takes one new token per row")
    if scaling is None:
        scaling = d ** -0.5
    q = query.reshape(n, kv_heads, heads // kv_heads, d)
    k_own, v_own = key[:, :, 0], value[:, :, 0]                               # [n, kv_heads, d]
    scores = torch.cat([torch.einsum("nkgd,ksd->nkgs", q, keys.to(q.dtype)),
                        torch.einsum("nkgd,nkd->nkg", q, k_own)[..., None]], dim=-1) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    # the staggered batch runs the first n rows at this layer: their lengths are the first n
    hidden = torch.arange(state.width + 1, device=q.device)[None] >= state.lengths[:n, None]
    hidden[:, -1] = False                                                     # the row's own token
    scores = scores.masked_fill(hidden[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)  # float32 like the eager path
    out = torch.einsum("nkgs,ksd->nkgd", probs[..., :-1], values.to(q.dtype)) + probs[..., -1:] * v_own[:, :, None]
    return out.reshape(n, 1, heads, d), None


def _register() -> None:
    from transformers import AttentionInterface
    if PREFIX_ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(PREFIX_ATTENTION, shared_prefix_attention)


@contextlib.contextmanager
def shared_prefix_pass(model, prefix: SharedPrefix):
    """While active, every attention module of ``model`` runs :func:`shared_prefix_attention` against
    ``prefix``: each config the model's modules read is switched to it and restored afterwards, even on an
    error (transformers dispatches on ``config._attn_implementation`` at every call, so nothing else
    changes).  Run the model with no cache, ``use_cache=False`` and explicit ``position_ids``."""
    _register()
    configs = {id(c): c for c in (getattr(m, "config", None) for m in model.modules())
               if c is not None and hasattr(c, "_attn_implementation_internal")}
    saved = {key: c._attn_implementation_internal for key, c in configs.items()}
    _active.append(prefix)
    try:
        for c in configs.values():
            c._attn_implementation_internal = PREFIX_ATTENTION
        yield
    finally:
        for key, c in configs.items():
            c._attn_implementation_internal = saved[key]
        _active.pop()

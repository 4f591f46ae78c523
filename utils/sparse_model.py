"""A sparse model view: the masked heads and neurons physically removed, so a decode step reads and
multiplies only the kept weights.  Its outputs equal zero-masking the same units (``SiteHooks.masks``).

- Heads: the kept query heads' rows of the query projection (and bias), the kept KV groups' rows of the
  key and value projections, the kept heads' columns of the output projection.  A KV group is kept while
  any of its query heads is.  HF attention needs the same number of query heads for every KV head
  (``num_key_value_groups``), so each kept group is padded up to the largest kept count with removed
  heads of that group whose output-projection columns are zero: they run, but add exactly nothing.
- Neurons: rows of the gate and up projections (a plain MLP's first projection, and its bias), columns of
  the down projection.  ``utils/architecture.py`` names these modules for each family.
- A layer with no kept head (neuron) keeps one whose output columns are zero: exact, and every layer
  keeps a KV cache entry, so cache layer indexing is unchanged.
- Unchanged modules (embeddings, norms, rotary, lm_head, output biases) are the dense model's own
  objects, not copies: for a ``static`` mask the dense model can be dropped and only the kept weights
  stay; for a per-request (``prompt``) mask the same call gathers the kept slices (index_select) from the
  dense weights once per request.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from .architecture import (decoder_layers, layer_modules, mlp_input_names, qkv_names, set_head_counts,
                           set_intermediate_size, spell_mlp_inputs, spell_qkv)
from .errors import PipelineError
from .sites import ATTN, MLP, locate_units


@dataclass
class LayerPlan:
    """Which dense units one sparse layer holds, in the sparse layer's order."""
    q_heads: torch.Tensor      # long [Hs]: dense query head of each sparse head (kept heads + padding)
    head_live: torch.Tensor    # bool [Hs]: False = padding (its output columns are zero)
    kv_heads: torch.Tensor     # long [KVs]: dense KV heads kept
    neurons: torch.Tensor      # long [Is]
    neuron_live: torch.Tensor  # bool [Is]

    @property
    def groups(self) -> int:
        """Query heads per kept KV head (the layer's num_key_value_groups)."""
        return len(self.q_heads) // len(self.kv_heads)


@dataclass
class SparsePlan:
    layers: list
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate: int


def plan_layer(keep_heads: torch.Tensor, keep_neurons: torch.Tensor, num_kv_heads: int) -> LayerPlan:
    """Plan one layer from bool ``keep_heads [H]`` and ``keep_neurons [I]``."""
    keep_heads = keep_heads.detach().to("cpu", torch.bool)
    keep_neurons = keep_neurons.detach().to("cpu", torch.bool)
    H = keep_heads.numel()
    g = H // num_kv_heads
    per_group = keep_heads.view(num_kv_heads, g)
    counts = per_group.sum(1)
    width = int(counts.max())
    q, live, kv = [], [], []
    if width == 0:                       # no kept head: one dead head of group 0
        q, live, kv = [0], [False], [0]
    for grp in range(num_kv_heads):
        if width == 0 or counts[grp] == 0:
            continue
        kept = (per_group[grp].nonzero().flatten() + grp * g).tolist()
        pad = ((~per_group[grp]).nonzero().flatten() + grp * g).tolist()[:width - len(kept)]
        kv.append(grp)
        q += kept + pad
        live += [True] * len(kept) + [False] * len(pad)
    neurons = keep_neurons.nonzero().flatten()
    neuron_live = torch.ones(len(neurons), dtype=torch.bool)
    if len(neurons) == 0:                # no kept neuron: one dead neuron
        neurons, neuron_live = torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.bool)
    return LayerPlan(q_heads=torch.tensor(q, dtype=torch.long), head_live=torch.tensor(live),
                     kv_heads=torch.tensor(kv, dtype=torch.long), neurons=neurons, neuron_live=neuron_live)


def make_plan(model: nn.Module, keep: dict) -> SparsePlan:
    """``keep[ATTN]``: bool ``[L, H]``, ``keep[MLP]``: bool ``[L, I]``."""
    layout = locate_units(model)
    L, H, I = layout.num_layers, layout.num_heads, layout.intermediate
    heads, neurons = keep[ATTN], keep[MLP]
    if tuple(heads.shape) != (L, H) or tuple(neurons.shape) != (L, I):
        raise PipelineError(f"keep masks must be [L, H] = [{L}, {H}] and [L, I] = [{L}, {I}]; got "
                            f"{list(heads.shape)} and {list(neurons.shape)}")
    if H % layout.num_kv_heads:
        raise PipelineError(f"{H} query heads do not split into {layout.num_kv_heads} KV groups")
    layers = [plan_layer(heads[l], neurons[l], layout.num_kv_heads) for l in range(L)]
    return SparsePlan(layers=layers, num_heads=H, num_kv_heads=layout.num_kv_heads, head_dim=layout.head_dim,
                      intermediate=I)


def shallow_clone(model: nn.Module) -> nn.Module:
    """A new module tree whose container modules are copies (their own child/hook dictionaries) and
    whose leaf modules (no children: Linear, Embedding, norms, rotary) are the original objects.
    Replacing a child of the clone leaves the original model untouched, and nothing big is copied."""
    def clone(module: nn.Module) -> nn.Module:
        if not module._modules:
            return module
        new = copy.copy(module)
        for key, value in module.__dict__.items():       # own dicts/sets: _modules, _parameters, hooks
            if isinstance(value, dict):
                new.__dict__[key] = copy.copy(value)
            elif isinstance(value, set):
                new.__dict__[key] = set(value)
        for name, child in module._modules.items():
            if child is not None:
                new._modules[name] = clone(child)
        return new
    return clone(model)


def make_linear(weight: torch.Tensor, bias) -> nn.Linear:
    """An ``nn.Linear`` holding ``weight`` (and ``bias``: a tensor, or an existing Parameter to share)."""
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        lin.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias, requires_grad=False)
    return lin


def _rows(lin: nn.Linear, idx: torch.Tensor) -> nn.Linear:
    idx = idx.to(lin.weight.device)
    bias = None if lin.bias is None else lin.bias.index_select(0, idx)
    return make_linear(lin.weight.index_select(0, idx), bias)


def _cols(lin: nn.Linear, idx: torch.Tensor, live: torch.Tensor) -> nn.Linear:
    weight = lin.weight.index_select(1, idx.to(lin.weight.device))
    if not bool(live.all()):
        weight[:, ~live.to(weight.device)] = 0      # padding / placeholder units add exactly nothing
    return make_linear(weight, lin.bias)                # the output bias is unchanged: shared


def _head_index(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()


def _projection_names(layer: nn.Module, index: int):
    """The layer's modules, its q/k/v names and its MLP's (input names, down name); one-line errors for
    projections sparse_model cannot slice."""
    found = layer_modules(layer, index)
    where = f"decoder layer {index} ({type(layer).__name__})"
    qkv = qkv_names(found.attention)
    if qkv is None:
        raise PipelineError(f"sparse_model needs separate {spell_qkv()} Linear modules; {where} "
                            f"({type(found.attention).__name__}) has none")
    mlp_in = mlp_input_names(found.mlp, found.mlp_down_name)
    if mlp_in is None:
        raise PipelineError(f"sparse_model supports MLPs of {spell_mlp_inputs()} Linear modules; {where} has "
                            f"{type(found.mlp).__name__}")
    return found, qkv, mlp_in


def sparse_model(model: nn.Module, keep: dict, *, share_unchanged: bool = True):
    """A new model of the same class in which layer l keeps only the heads ``keep[ATTN][l]`` (bool
    ``[L, H]``) and neurons ``keep[MLP][l]`` (bool ``[L, I]``).  Works with ``generate`` and with
    Dynamic/Static caches (each cache layer sizes itself from its first keys).  Returns
    ``(sparse, plan)``; ``plan`` (a :class:`SparsePlan`) is what :func:`sparse_cache` needs.

    ``share_unchanged``: embeddings, norms and lm_head are the dense model's own modules (default);
    False makes the sparse model fully independent (a deep copy)."""
    plan = make_plan(model, keep)
    sparse = shallow_clone(model)
    hd = plan.head_dim
    with torch.no_grad():
        for l, (layer, lp) in enumerate(zip(decoder_layers(sparse), plan.layers)):
            found, (q, k, v), mlp_in = _projection_names(layer, l)
            attn, mlp = found.attention, found.mlp
            q_idx, kv_idx = _head_index(lp.q_heads, hd), _head_index(lp.kv_heads, hd)
            setattr(attn, q, _rows(getattr(attn, q), q_idx))
            setattr(attn, k, _rows(getattr(attn, k), kv_idx))
            setattr(attn, v, _rows(getattr(attn, v), kv_idx))
            live = lp.head_live.repeat_interleave(hd)
            setattr(attn, found.attn_out_name, _cols(found.attn_out, q_idx, live))
            set_head_counts(attn, len(lp.q_heads), len(lp.kv_heads))
            for name in mlp_in:
                setattr(mlp, name, _rows(getattr(mlp, name), lp.neurons))
            setattr(mlp, found.mlp_down_name, _cols(found.mlp_down, lp.neurons, lp.neuron_live))
            set_intermediate_size(mlp, len(lp.neurons))
    if not share_unchanged:
        sparse = copy.deepcopy(sparse)
    return sparse, plan


def sparse_cache(cache, plan: SparsePlan):
    """Hand a dense cache (e.g. of a dense prefill) over to the sparse model: a new cache object whose
    layer l holds only the KV heads ``plan.layers[l].kv_heads`` (the dense cache is left as it is).
    Padded query heads share their group's KV head, so no KV head is duplicated."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise PipelineError("sparse_cache needs a transformers Cache with .layers (transformers >= 4.56)")
    new = copy.copy(cache)
    new.layers = []
    for layer, lp in zip(layers, plan.layers):
        copy_ = copy.copy(layer)
        keys = getattr(layer, "keys", None)
        if torch.is_tensor(keys) and keys.numel() > 0:
            idx = lp.kv_heads.to(keys.device)
            copy_.keys = keys.index_select(1, idx)
            copy_.values = layer.values.index_select(1, idx)
            if isinstance(getattr(layer, "num_heads", None), int):
                copy_.num_heads = len(idx)
            if hasattr(layer, "max_cache_len") and not torch.compiler.is_compiling():
                # a static layer's tensors must keep fixed addresses for CUDA graphs
                torch._dynamo.mark_static_address(copy_.keys)
                torch._dynamo.mark_static_address(copy_.values)
            ctr = getattr(layer, "cumulative_length", None)
            if torch.is_tensor(ctr):
                copy_.cumulative_length = ctr.clone()     # static layers count in place: not shared
        new.layers.append(copy_)
    return new


def unique_params(module: nn.Module) -> list:
    """The module's parameters, a tensor shared by several modules (tied embeddings) once."""
    seen, out = set(), []
    for p in module.parameters():
        key = (p.data_ptr(), p.numel()) if p.device.type != "meta" else id(p)
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def weight_bytes(model: nn.Module) -> dict:
    """Bytes of the model's parameters, each tensor once (tied embeddings count once): ``total``,
    ``embeddings`` (input embeddings and lm_head) and ``rest`` (everything else)."""
    total = sum(p.numel() * p.element_size() for p in unique_params(model))
    emb_mods = [m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None]
    emb = {(p.data_ptr(), p.numel()): p.numel() * p.element_size() for m in emb_mods for p in m.parameters()}
    embeddings = sum(emb.values())
    return {"total": total, "embeddings": embeddings, "rest": total - embeddings}


def kept_share(plan: SparsePlan) -> dict:
    """Share of heads and neurons kept (live units only, padding excluded), over all layers."""
    heads = sum(int(lp.head_live.sum()) for lp in plan.layers)
    neurons = sum(int(lp.neuron_live.sum()) for lp in plan.layers)
    L = len(plan.layers)
    return {"heads": heads / (L * plan.num_heads), "neurons": neurons / (L * plan.intermediate),
            "padded_heads": sum(int((~lp.head_live).sum()) for lp in plan.layers)}

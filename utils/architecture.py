"""The one place that knows how model families name their modules and config fields.

Everything else asks this module: where a decoder layer's attention block, its output projection (whose
input holds the heads), its MLP and the MLP's down projection (whose input holds the neurons) are; the
separate query/key/value and gate/up projections that ``sparse_model`` slices and ``fuse_projections``
concatenates; the input width and [out, in] weight view of a projection (GPT-2's ``Conv1D`` stores its
weight as [in, out]); the layer, head and KV-head counts; the sliding window.

A new family is one :class:`Family` entry in :data:`FAMILIES` plus a tiny builder in ``tests/conftest.py``.
Lookups go role by role: each role takes the first of its names, in table order, that the module has.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import PipelineError


@dataclass(frozen=True)
class Family:
    """How one family names the modules of a decoder layer (children of the layer, then of its blocks).
    ``qkv`` and ``mlp_in`` list separate ``nn.Linear`` projections in the order the stock forward calls
    them (``fuse_projections`` relies on it); empty where the family fuses them into one module."""
    name: str
    models: str                     # which transformers models use these names
    attention: str                  # the attention block
    attn_out: str                   # its output projection: the input holds the heads, concatenated
    mlp: str                        # the MLP block
    mlp_down: str                   # its down projection: the input holds the neurons
    gate: str | None = None         # the gate projection of a gated MLP (None: a plain MLP)
    qkv: tuple[str, ...] = ()       # query, key, value projections
    mlp_in: tuple[str, ...] = ()    # the projections whose output rows are the neurons


_QKV = ("q_proj", "k_proj", "v_proj")

# Order matters: a role's names are tried in table order (the first the module has wins) and an error lists
# them in that order.
FAMILIES = (
    Family("llama", "Llama, Mistral, Qwen2/3, Gemma 1-3", attention="self_attn", attn_out="o_proj",
           mlp="mlp", mlp_down="down_proj", gate="gate_proj", qkv=_QKV, mlp_in=("gate_proj", "up_proj")),
    Family("phi", "Phi-1, Phi-1.5, Phi-2", attention="self_attn", attn_out="dense", mlp="mlp", mlp_down="fc2",
           qkv=_QKV, mlp_in=("fc1",)),
    # Conv1D projections ([in, out] weights) and one fused c_attn: located and hooked, never sliced or fused
    Family("gpt2", "GPT-2", attention="attn", attn_out="c_proj", mlp="mlp", mlp_down="c_proj"),
    # fused qkv_proj and gate_up_proj: located and hooked, never sliced or fused
    Family("phi3", "Phi-3", attention="self_attn", attn_out="o_proj", mlp="mlp", mlp_down="down_proj",
           gate="gate_up_proj"),
    Family("llama4", "Llama-4 text and Jamba dense layers", attention="self_attn", attn_out="o_proj",
           mlp="feed_forward", mlp_down="down_proj", gate="gate_proj", qkv=_QKV, mlp_in=("gate_proj", "up_proj")),
)

# Further names each role accepts after the families' names, none of them used by a tested family: GPT-J and
# CodeGen call their projections attn.out_proj and mlp.fc_out; the rest are names other layouts give these
# roles.  locate_units has always accepted them, so they stay.
_OTHER_NAMES = {"attention": ("attention", "self_attention"), "attn_out": ("out_proj",), "mlp": (),
                "mlp_down": ("w2", "fc_out"), "gate": ("w1",)}


def _role_names(role: str) -> tuple[str, ...]:
    names = [getattr(family, role) for family in FAMILIES] + list(_OTHER_NAMES[role])
    return tuple(dict.fromkeys(n for n in names if n))      # first occurrence wins: table order


ATTENTION_NAMES = _role_names("attention")
ATTN_OUT_NAMES = _role_names("attn_out")
MLP_NAMES = _role_names("mlp")
MLP_DOWN_NAMES = _role_names("mlp_down")
GATE_NAMES = _role_names("gate")

# the modules fuse_projections adds next to the projections it concatenates
FUSED_QKV = "qkv_proj"
FUSED_GATE_UP = "gate_up_proj"


# ---- config -------------------------------------------------------------------------------------------

def text_config(model: nn.Module):
    """The config that describes the decoder (a multimodal model keeps it in ``text_config``)."""
    return getattr(model.config, "text_config", None) or model.config


def _config_value(config, *names, default=None):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def _num_layers(config):
    return _config_value(config, "num_hidden_layers", "n_layer", "num_layers")


@dataclass(frozen=True)
class Shape:
    """The decoder's sizes as its config gives them."""
    layers: int
    heads: int
    hidden: int
    head_dim: int
    kv_heads: int                   # KV heads (grouped-query attention: fewer than ``heads``)


def model_shape(model: nn.Module) -> Shape:
    """The decoder's sizes; a config that lacks the layer, head or hidden count is a one-line error."""
    config = text_config(model)
    layers = _num_layers(config)
    heads = _config_value(config, "num_attention_heads", "n_head")
    hidden = _config_value(config, "hidden_size", "n_embd", "d_model")
    if not (layers and heads and hidden):
        raise PipelineError(f"unsupported architecture {type(model).__name__}: its config lacks the "
                            "number of layers, heads or the hidden size")
    return Shape(layers=layers, heads=heads, hidden=hidden,
                 head_dim=_config_value(config, "head_dim", default=None) or hidden // heads,
                 kv_heads=_config_value(config, "num_key_value_heads", default=heads))


def sliding_window(model: nn.Module) -> int | None:
    """The attention window of the model's sliding-window layers (None: no such layer).  Such a layer's
    cache keeps only its last window - 1 positions, which the batched and shared-cache paths must respect."""
    config = text_config(model)
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if window is None or (types is not None and "sliding_attention" not in types):
        return None
    return int(window)


# ---- modules ------------------------------------------------------------------------------------------

def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks: the module list as long as the config's layer count (found without
    reading unit widths, so it works on sparse models, whose layers differ in width)."""
    n_layers = _num_layers(text_config(model))
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers and n_layers > 0:
            return module
    raise PipelineError(f"unsupported architecture {type(model).__name__}: found no list of "
                        f"{n_layers} decoder layers")


def _first_child(module: nn.Module, names, what: str, where: str) -> tuple[str, nn.Module]:
    for name in names:
        child = getattr(module, name, None)
        if isinstance(child, nn.Module):
            return name, child
    raise PipelineError(f"unsupported architecture: no {what} in {where} (looked for {', '.join(names)}; "
                        f"it has {', '.join(n for n, _ in module.named_children())})")


@dataclass
class LayerModules:
    """One decoder layer's blocks and unit sites, with the names they have in their parents."""
    attention_name: str
    attention: nn.Module
    attn_out_name: str
    attn_out: nn.Module
    mlp_name: str
    mlp: nn.Module
    mlp_down_name: str
    mlp_down: nn.Module
    gated: bool                     # the MLP has a gate projection


def layer_modules(layer: nn.Module, index: int) -> LayerModules:
    """Find the blocks and unit sites of decoder layer ``index``; a missing one is a one-line error
    naming the names looked for and the children the module has."""
    where = f"decoder layer {index} ({type(layer).__name__})"
    attn_name, attn = _first_child(layer, ATTENTION_NAMES, "attention module", where)
    out_name, out = _first_child(attn, ATTN_OUT_NAMES, "attention output projection", f"{where}.{attn_name}")
    mlp_name, mlp = _first_child(layer, MLP_NAMES, "MLP module", where)
    down_name, down = _first_child(mlp, MLP_DOWN_NAMES, "MLP down projection", f"{where}.{mlp_name}")
    gated = any(isinstance(getattr(mlp, n, None), nn.Module) for n in GATE_NAMES)
    return LayerModules(attention_name=attn_name, attention=attn, attn_out_name=out_name, attn_out=out,
                        mlp_name=mlp_name, mlp=mlp, mlp_down_name=down_name, mlp_down=down, gated=gated)


def _all_linear(module: nn.Module, names) -> bool:
    return all(isinstance(getattr(module, n, None), nn.Linear) for n in names)


def qkv_names(attention: nn.Module) -> tuple[str, ...] | None:
    """The names of the attention block's separate query, key and value ``nn.Linear`` projections
    (None: it has none, e.g. GPT-2's and Phi-3's fused ones)."""
    return next((f.qkv for f in FAMILIES if f.qkv and _all_linear(attention, f.qkv)), None)


def mlp_input_names(mlp: nn.Module, down_name: str) -> tuple[str, ...] | None:
    """The names of the MLP's separate ``nn.Linear`` projections whose output rows are the neurons
    feeding the ``nn.Linear`` down projection ``down_name``: (gate, up) or (fc1,).  None: not such an MLP."""
    return next((f.mlp_in for f in FAMILIES
                 if f.mlp_in and f.mlp_down == down_name and _all_linear(mlp, f.mlp_in + (f.mlp_down,))), None)


def gate_up_names(mlp: nn.Module) -> tuple[str, ...] | None:
    """The names of a gated MLP's separate gate and up ``nn.Linear`` projections (None: a plain MLP, or
    one that fuses them)."""
    return next((f.mlp_in for f in FAMILIES if f.gate and f.mlp_in and _all_linear(mlp, f.mlp_in)), None)


def spell_qkv() -> str:
    """The separate q/k/v projection names, for messages."""
    return " or ".join(dict.fromkeys("/".join(f.qkv) for f in FAMILIES if f.qkv))


def spell_mlp_inputs() -> str:
    """The MLPs whose neurons can be sliced, for messages."""
    return " or ".join(dict.fromkeys("/".join(f.mlp_in + (f.mlp_down,)) for f in FAMILIES if f.mlp_in))


def set_head_counts(attention: nn.Module, heads: int, kv_heads: int) -> None:
    """Set the head counts the stock attention forwards read (the rest come from tensor shapes)."""
    attention.num_key_value_groups = heads // kv_heads
    for name, value in (("num_heads", heads), ("num_attention_heads", heads), ("num_key_value_heads", kv_heads)):
        if isinstance(getattr(attention, name, None), int):
            setattr(attention, name, value)


def set_intermediate_size(mlp: nn.Module, size: int) -> None:
    """Keep the MLP's own record of its width (where it has one) equal to its sliced projections."""
    if isinstance(getattr(mlp, "intermediate_size", None), int):
        mlp.intermediate_size = size


# ---- projection weights -------------------------------------------------------------------------------

def _stores_in_out(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"      # GPT-2's Conv1D stores its weight as [in, out]


def weight_out_in(module: nn.Module):
    """The projection's weight as [out, in], one column per input (a view: Conv1D's is transposed)."""
    return module.weight.t() if _stores_in_out(module) else module.weight


def input_width(module: nn.Module) -> int:
    """How many inputs the projection takes."""
    if isinstance(module, nn.Linear):
        return module.in_features
    weight = getattr(module, "weight", None)
    if weight is not None and weight.dim() == 2:
        return weight_out_in(module).shape[1]
    raise PipelineError(f"unsupported architecture: cannot read the input width of {type(module).__name__}")


def block_projections(layer: nn.Module, index: int) -> dict:
    """``{"<block>.<name>": module}``: every projection (a child with a 2-D weight: ``nn.Linear`` or GPT-2's
    ``Conv1D``) of decoder layer ``index``'s attention and MLP blocks, in the order the blocks declare them.
    These are the weight matrices a unit's parameters are counted in (METHOD §5) and whose input channels
    ``teal`` thresholds (METHOD §7); norms and rotary tables have no 2-D weight and are left out."""
    found = layer_modules(layer, index)
    out = {}
    for block_name, block in ((found.attention_name, found.attention), (found.mlp_name, found.mlp)):
        for name, child in block.named_children():
            weight = getattr(child, "weight", None)
            if isinstance(weight, torch.Tensor) and weight.dim() == 2:
                out[f"{block_name}.{name}"] = child
    return out


def block_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden state an attention or MLP block was called with (positionally or as ``hidden_states``)."""
    return args[0] if args else kwargs["hidden_states"]

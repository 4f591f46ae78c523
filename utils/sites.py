"""Where the units live: the input of each layer's attention output projection (heads) and of its MLP
down projection (neurons), found on the stock ``transformers`` modules and reached with forward
pre-hooks.  One :class:`SiteHooks` object can, per forward pass, mask units, scale whole components
(integrated gradients), record the dense unit outputs at the last position, and add zero "probes" there
whose gradients are dLoss/d(unit output)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from .errors import PipelineError

ATTN = "attention"
MLP = "mlp"
COMPONENTS = (ATTN, MLP)

_ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention")
_ATTN_OUT_NAMES = ("o_proj", "dense", "c_proj", "out_proj")
_MLP_NAMES = ("mlp", "feed_forward")
_MLP_DOWN_NAMES = ("down_proj", "fc2", "c_proj", "w2", "fc_out")
_GATE_NAMES = ("gate_proj", "gate_up_proj", "w1")


def _config_get(config, *names, default=None):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def _first_child(module: nn.Module, names, what: str, where: str) -> tuple[str, nn.Module]:
    for name in names:
        child = getattr(module, name, None)
        if isinstance(child, nn.Module):
            return name, child
    raise PipelineError(f"unsupported architecture: no {what} in {where} (looked for {', '.join(names)}; "
                        f"it has {', '.join(n for n, _ in module.named_children())})")


def _in_features(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.in_features
    weight = getattr(module, "weight", None)
    if weight is not None and weight.dim() == 2:  # GPT-2's Conv1D stores [in, out]
        return weight.shape[0] if type(module).__name__ == "Conv1D" else weight.shape[1]
    raise PipelineError(f"unsupported architecture: cannot read the input width of {type(module).__name__}")


@dataclass
class ModelLayout:
    """Where the units are and how big everything is."""
    attn_out: list            # per layer, the module whose input holds the head outputs
    mlp_down: list            # per layer, the module whose input holds the MLP neurons
    num_heads: int
    head_dim: int
    intermediate: int
    hidden: int
    num_kv_heads: int
    gated_mlp: bool
    decoder_layers: nn.ModuleList | None = None   # the blocks themselves (IG lets batch rows join at one)

    @property
    def num_layers(self) -> int:
        return len(self.attn_out)

    def units(self, component: str) -> int:
        return self.num_heads if component == ATTN else self.intermediate


def _decoder_layers(model: nn.Module, n_layers: int) -> nn.ModuleList:
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers and n_layers > 0:
            return module
    raise PipelineError(f"unsupported architecture {type(model).__name__}: found no list of "
                        f"{n_layers} decoder layers")


def locate_units(model: nn.Module) -> ModelLayout:
    config = model.config
    config = getattr(config, "text_config", None) or config
    n_layers = _config_get(config, "num_hidden_layers", "n_layer", "num_layers")
    n_heads = _config_get(config, "num_attention_heads", "n_head")
    hidden = _config_get(config, "hidden_size", "n_embd", "d_model")
    if not (n_layers and n_heads and hidden):
        raise PipelineError(f"unsupported architecture {type(model).__name__}: its config lacks the "
                            "number of layers, heads or the hidden size")
    layers = _decoder_layers(model, n_layers)
    attn_out, mlp_down, gated = [], [], False
    for idx, layer in enumerate(layers):
        where = f"decoder layer {idx} ({type(layer).__name__})"
        attn_name, attn = _first_child(layer, _ATTN_NAMES, "attention module", where)
        _, out = _first_child(attn, _ATTN_OUT_NAMES, "attention output projection", f"{where}.{attn_name}")
        mlp_name, mlp = _first_child(layer, _MLP_NAMES, "MLP module", where)
        _, down = _first_child(mlp, _MLP_DOWN_NAMES, "MLP down projection", f"{where}.{mlp_name}")
        gated = any(isinstance(getattr(mlp, n, None), nn.Module) for n in _GATE_NAMES)
        attn_out.append(out)
        mlp_down.append(down)
    head_dim = _config_get(config, "head_dim", default=None) or hidden // n_heads
    width = _in_features(attn_out[0])
    if width != n_heads * head_dim:
        raise PipelineError(f"unsupported architecture: the attention output projection takes {width} "
                            f"inputs, not heads x head_dim = {n_heads} x {head_dim}")
    return ModelLayout(attn_out=attn_out, mlp_down=mlp_down, num_heads=n_heads, head_dim=head_dim,
                       intermediate=_in_features(mlp_down[0]), hidden=hidden,
                       num_kv_heads=_config_get(config, "num_key_value_heads", default=n_heads),
                       gated_mlp=gated, decoder_layers=layers)


class SiteHooks:
    """Forward pre-hooks on every unit site.  Set the attributes below before a forward pass:

    - ``masks[comp]``: tensor ``[B, L, units]`` multiplying each unit at every position (None: no
      masking), or ``[B, K, L, units]``: one mask per position for the last K positions of the pass,
      the earlier ones dense (a teacher-forced sequence with each generation step's own mask);
    - ``scales[comp]``: float tensor ``[B, L]`` scaling a layer's whole component (None: no scaling); a
      layer that sees fewer rows (IG's staggered batch) uses the first ones;
    - ``record``: keep the unmodified unit outputs at the last position in ``recorded[comp][l]``;
    - ``probe``: add a zero leaf tensor at the last position of every site, in ``probes[comp][l]``,
      so ``torch.autograd.grad(loss, probes)`` gives dLoss/d(unit output) there;
    - ``positions``: long tensor ``[B]``: record and probe at this position of each batch element
      instead of the last one (all generation steps of a sample teacher-forced as one batch).
    """

    def __init__(self, model: nn.Module, layout: ModelLayout | None = None):
        self.layout = layout or locate_units(model)
        self.masks = {ATTN: None, MLP: None}
        self.scales = {ATTN: None, MLP: None}
        self.record = False
        self.probe = False
        self.positions = None
        self.recorded = {c: [None] * self.layout.num_layers for c in COMPONENTS}
        self.probes = {c: [None] * self.layout.num_layers for c in COMPONENTS}
        self._handles = []
        for comp, modules in ((ATTN, self.layout.attn_out), (MLP, self.layout.mlp_down)):
            for layer, module in enumerate(modules):
                self._handles.append(module.register_forward_pre_hook(self._make_hook(comp, layer)))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()

    def reset(self) -> None:
        self.masks = {ATTN: None, MLP: None}
        self.scales = {ATTN: None, MLP: None}
        self.record = False
        self.probe = False
        self.positions = None

    @contextlib.contextmanager
    def settings(self, masks=None, scales=None, record=False, probe=False, positions=None):
        """Apply settings for the passes inside the block, then restore the plain dense model."""
        self.masks = dict(masks or {ATTN: None, MLP: None})
        self.scales = dict(scales or {ATTN: None, MLP: None})
        self.record, self.probe, self.positions = record, probe, positions
        try:
            yield self
        finally:
            self.reset()

    def all_probes(self) -> list[torch.Tensor]:
        return [p for c in COMPONENTS for p in self.probes[c]]

    def _make_hook(self, comp: str, layer: int):
        layout = self.layout

        def hook(module, args):
            x = args[0]
            mask, scale = self.masks[comp], self.scales[comp]
            if not (mask is not None or scale is not None or self.record or self.probe):
                return None
            rows = torch.arange(x.shape[0], device=x.device)
            pos = (self.positions.to(x.device) if self.positions is not None
                   else torch.full_like(rows, x.shape[1] - 1))        # default: the last position
            if self.record:
                self.recorded[comp][layer] = x[rows, pos].detach()
            if mask is not None and mask.dim() == 4:               # per position: the last K positions
                m = mask[:, :, layer].to(x.device, x.dtype)
                if comp == ATTN:
                    m = m.repeat_interleave(layout.head_dim, dim=-1)
                K = m.shape[1]
                x = torch.cat([x[:, :x.shape[1] - K], x[:, x.shape[1] - K:] * m], dim=1)
            elif mask is not None:
                m = mask[:, layer].to(x.dtype)
                if comp == ATTN:
                    m = m.repeat_interleave(layout.head_dim, dim=-1)
                x = x * m[:, None, :]
            if scale is not None:
                x = x * scale[:x.shape[0], layer].to(x.dtype)[:, None, None]
            if self.probe:
                probe = torch.zeros(x.shape[0], x.shape[-1], dtype=x.dtype, device=x.device,
                                    requires_grad=True)
                self.probes[comp][layer] = probe
                x = x.index_put((rows, pos), probe, accumulate=True)   # out of place: autograd sees it
            return (x,) + tuple(args[1:])

        return hook

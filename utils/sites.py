"""Where the units live: the input of each layer's attention output projection (heads) and of its MLP
down projection (neurons), found on the stock ``transformers`` modules (``utils/architecture.py`` knows
their names) and reached with forward pre-hooks.  One :class:`SiteHooks` object can, per forward pass, mask units, scale whole components
(integrated gradients), record the dense unit outputs at the last position, and add zero "probes" there
whose gradients are dLoss/d(unit output)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from .architecture import decoder_layers, input_width, layer_modules, model_shape
from .errors import PipelineError

ATTN = "attention"
MLP = "mlp"
COMPONENTS = (ATTN, MLP)


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


def locate_units(model: nn.Module) -> ModelLayout:
    """The unit sites of every decoder layer; an architecture the adapter does not know is a one-line error."""
    shape = model_shape(model)
    layers = decoder_layers(model)
    found = [layer_modules(layer, idx) for idx, layer in enumerate(layers)]
    width = input_width(found[0].attn_out)
    if width != shape.heads * shape.head_dim:
        raise PipelineError(f"unsupported architecture: the attention output projection takes {width} "
                            f"inputs, not heads x head_dim = {shape.heads} x {shape.head_dim}")
    return ModelLayout(attn_out=[m.attn_out for m in found], mlp_down=[m.mlp_down for m in found],
                       num_heads=shape.heads, head_dim=shape.head_dim, intermediate=input_width(found[0].mlp_down),
                       hidden=shape.hidden, num_kv_heads=shape.kv_heads, gated_mlp=found[-1].gated,
                       decoder_layers=layers)


class HookSet:
    """Forward pre-hooks registered on a model, removed together (``remove``, or leaving a ``with`` block)."""

    def __init__(self):
        self._handles = []

    def _hook(self, module, fn, with_kwargs: bool = False) -> None:
        self._handles.append(module.register_forward_pre_hook(fn, with_kwargs=with_kwargs))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


class SiteHooks(HookSet):
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
        super().__init__()
        for comp, modules in ((ATTN, self.layout.attn_out), (MLP, self.layout.mlp_down)):
            for layer, module in enumerate(modules):
                self._hook(module, self._make_hook(comp, layer))

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

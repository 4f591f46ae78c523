"""Masks chosen per token, inside the masked forward, without the label (METHOD §7b): hooks that decide, at
every position a pass computes, each batch row's keep-masks from what the masked model itself has computed
at that position.  A pass through such hooks computes only masked positions (the dense prompt runs before:
``utils.generation.prompt_state``), so every position it sees is masked.

Each batch row is one variant: which of the masker's variants it uses (a metric, or a predictor trained on
one) and its deactivation ratio.  The maskers also count, per row, the parameter weight kept at the positions
of each pass (``take_kept``), for the activation ratio (METHOD §5).

:class:`OnlineMasker` (``online``) ranks each unit by its magnitude (or WINA score) at the current token;
``utils/predictor.py`` and ``utils/teal.py`` hold the other two per-token sources."""
from __future__ import annotations

import contextlib
import math

import torch

from .architecture import block_input, decoder_layers, layer_modules
from .masks import UnitWeights, output_weight_norms
from .sites import ATTN, MLP, HookSet, ModelLayout


def ratio_index(ratio: torch.Tensor, count: int) -> torch.Tensor:
    """Per row, the index into a layer's ``count`` ascending keep-scores of its threshold: ``min(floor(p·c),
    c-1)``, the rule of :func:`utils.masks.keep_masks` (the 1e-9 makes 0.7·10 give 7)."""
    return torch.clamp(torch.floor(ratio.double() * count + 1e-9).long(), max=count - 1)


def top_share(scores: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """Bool keep-mask ``[B, S, c]``: per row b and position, keep every unit scoring at least the element at
    index ``min(floor(p_b·c), c-1)`` of its ascending scores (ties keep; p = 0 keeps all)."""
    index = ratio_index(ratio, scores.shape[-1]).to(scores.device)
    ordered = scores.sort(dim=-1).values
    threshold = ordered.gather(-1, index.view(-1, 1, 1).expand(-1, scores.shape[1], 1))
    return scores >= threshold


class TokenMasker(HookSet):
    """The shared machinery: hook registration, the rows of the current passes and the kept-weight count.
    Subclasses register their hooks in ``_attach`` (through :meth:`_hook`) and count with :meth:`_count`."""

    uses_label = False

    def __init__(self, model, layout: ModelLayout, weights: UnitWeights, selected: torch.Tensor, variants: list):
        self.model, self.layout, self.weights = model, layout, weights
        self.selected = [bool(s) for s in selected]        # [L]: the masked layers
        self.variants = list(variants)                     # what a row's variant index names (for messages)
        self.variant = self.ratio = None                   # [B] each, while rows are set
        self._kept = None
        super().__init__()
        self._attach()

    # -- what subclasses provide ------------------------------------------------------------------------
    def _attach(self) -> None:
        raise NotImplementedError

    def describe(self) -> dict:
        """What the masker is, for the results' settings."""
        return {"variants": self.variants}

    # -- rows and counting ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def rows(self, variant, ratio):
        """Mask the passes inside the block: row b uses variant ``variant[b]`` at deactivation ratio
        ``ratio[b]``; the kept weight starts from zero."""
        device = next(self.model.parameters()).device
        self.variant = torch.as_tensor(variant, dtype=torch.long, device=device)
        self.ratio = torch.as_tensor(ratio, dtype=torch.float64, device=device)
        self._kept = torch.zeros(len(self.variant), dtype=torch.float64, device=device)
        try:
            yield self
        finally:
            self.variant = self.ratio = None

    @property
    def active(self) -> bool:
        return self.variant is not None

    def take_kept(self) -> torch.Tensor:
        """``[B]`` float64: the parameter weight each row kept at the positions computed since the last call
        (or since :meth:`rows`), every layer counted (unmasked layers in full); then zero again."""
        kept, self._kept = self._kept, torch.zeros_like(self._kept)
        return kept

    def layer_weight(self) -> float:
        return self.weights.layer_total

    def _count(self, weight: torch.Tensor) -> None:
        """Add ``[B, S]`` kept weight (summed over positions)."""
        self._kept += weight.sum(-1).double()



class UnitMasker(TokenMasker):
    """Per-token top-k of heads and neurons at the unit sites (METHOD §1), from keep-scores each subclass
    computes in :meth:`scores`.  A layer that is not masked keeps everything and counts in full."""

    def _attach(self) -> None:
        for comp, modules in ((ATTN, self.layout.attn_out), (MLP, self.layout.mlp_down)):
            for layer, module in enumerate(modules):
                self._hook(module, self._site_hook(comp, layer))

    def scores(self, comp: str, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Keep-scores ``[B, S, units]`` of every row from the site's input ``x`` ``[B, S, width]``."""
        raise NotImplementedError

    def _site_hook(self, comp: str, layer: int):
        layout, per_unit = self.layout, self.weights.head if comp == ATTN else self.weights.neuron

        def hook(module, args):
            if not self.active:
                return None
            x = args[0]
            units = layout.units(comp)
            if not self.selected[layer]:
                self._count(torch.full(x.shape[:2], units * per_unit, device=x.device))
                return None
            keep = top_share(self.scores(comp, layer, x), self.ratio)            # [B, S, units]
            self._count(keep.sum(-1) * per_unit)
            m = keep.to(x.dtype)
            if comp == ATTN:
                m = m.repeat_interleave(layout.head_dim, dim=-1)
            return (x * m,) + tuple(args[1:])

        return hook


ONLINE_METRICS = ("magnitude", "wina")


class OnlineMasker(UnitMasker):
    """``online`` (METHOD §7b, after CATS and WINA): each unit's magnitude at the current token (a head's
    ``‖x_h‖₂``, a neuron's ``|x_j|``), times its output weights' norm for ``wina``, computed in the masked
    forward itself; the top share per layer is kept."""

    def __init__(self, model, layout, weights, selected, metrics: list):
        bad = [m for m in metrics if m not in ONLINE_METRICS]
        if bad:
            raise ValueError(f"online masks rank by {' or '.join(ONLINE_METRICS)}, not {', '.join(bad)}")
        self.norms = output_weight_norms(layout) if "wina" in metrics else None
        self.is_wina = torch.tensor([m == "wina" for m in metrics])
        super().__init__(model, layout, weights, selected, metrics)

    def scores(self, comp, layer, x):
        if comp == ATTN:
            mag = x.reshape(*x.shape[:2], self.layout.num_heads, self.layout.head_dim).float().norm(dim=-1)
        else:
            mag = x.float().abs()
        if self.norms is None:
            return mag
        wina = mag * self.norms[comp][layer].to(mag.device)
        return torch.where(self.is_wina.to(mag.device)[self.variant].view(-1, 1, 1), wina, mag)


def block_input_hooks(masker: TokenMasker, fn) -> None:
    """Register ``fn(comp, layer, hidden)`` on every layer's attention and MLP block input (the hidden state
    entering the block, after its norm), called only while the masker has rows."""
    for layer, block in enumerate(decoder_layers(masker.model)):
        found = layer_modules(block, layer)
        for comp, module in ((ATTN, found.attention), (MLP, found.mlp)):
            def hook(module, args, kwargs, comp=comp, layer=layer):
                if masker.active:
                    fn(comp, layer, block_input(args, kwargs))
                return None
            masker._hook(module, hook, with_kwargs=True)


def kept_units(ratio: float, count: int) -> int:
    """Units a per-layer top share keeps at deactivation ratio ``ratio`` when no scores tie."""
    return count - min(int(math.floor(ratio * count + 1e-9)), count - 1)

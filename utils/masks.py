"""From scores to masks (METHOD §4-5): ranking per metric, per-step per-layer thresholds, and the
activation ratio weighted by the parameters each unit uses."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .architecture import weight_out_in
from .errors import PipelineError
from .sites import ATTN, MLP, ModelLayout
from .units import head_sum

METRIC_NAMES = ("magnitude", "gradient", "gxo", "snip", "cor_gxo", "ig", "wina")
COR_GXO_VARIANTS = ("paper", "released")
DEFAULT_RATIOS = tuple(k / 10 for k in range(10))


def files_needed(metric_name: str) -> list[str]:
    """Score kinds (as in the file names) a metric's ranking reads."""
    return {"magnitude": ["magnitude"], "gradient": ["gradient"], "gxo": ["gxo"], "snip": ["gxo"],
            "ig": ["ig"], "cor_gxo": ["gxo", "magnitude", "grad_norm", "gradient"],
            "wina": ["magnitude"]}[metric_name]


def ranking(metric_name: str, comp: str, s: dict, head_dim: int, variant: str = "paper") -> torch.Tensor:
    """Keep-scores ``[T, L, units]`` (higher = keep) of one component from its score tensors ``s``
    (keys: magnitude, gradient, gxo, ig ``[T, L, units]``; grad_norm ``[T, L]``; for wina also
    out_norm ``[L, units]``, from :func:`output_weight_norms`)."""
    if metric_name == "magnitude":
        return s["magnitude"]
    if metric_name == "wina":
        if "out_norm" not in s:
            raise PipelineError("the wina metric needs the output projections' column norms (out_norm)")
        # WINA's weight-informed magnitude: what the unit can add to the residual stream
        return s["magnitude"] * s["out_norm"].to(s["magnitude"].device, s["magnitude"].dtype)
    if metric_name in ("gradient", "gxo", "ig"):
        return -s[metric_name]  # -score: first-order estimate of the loss increase on removal
    if metric_name == "snip":
        return s["gxo"].abs()
    if metric_name == "cor_gxo":
        if variant not in COR_GXO_VARIANTS:
            raise PipelineError(f"unknown --cor_gxo_variant {variant!r}; choose {', '.join(COR_GXO_VARIANTS)}")
        if variant == "released" and comp == ATTN:
            # the released code: per-head means, with the norm of the per-head mean gradients
            return -s["gxo"] + 0.5 * s["magnitude"] * s["gradient"].norm(dim=-1, keepdim=True)
        # -g·x (summed over the head's dims) plus half the paper's bound on the inter-layer error
        return -head_sum(comp, s["gxo"], head_dim) + 0.5 * s["magnitude"] * s["grad_norm"][..., None]
    raise PipelineError(f"unknown metric {metric_name!r}; choose one of {', '.join(METRIC_NAMES)}")


def output_weight_norms(layout: ModelLayout) -> dict:
    """``{comp: float32 [L, units]}``: per neuron j, ||W_down[:, j]||_2; per head h, the Frobenius norm of
    the output projection's block of columns ``h*d .. (h+1)*d - 1`` (what ``wina`` weighs magnitudes by)."""
    out = {}
    for comp, modules in ((ATTN, layout.attn_out), (MLP, layout.mlp_down)):
        rows = []
        for module in modules:
            w = weight_out_in(module).detach().float()    # [out, in] whatever the module stores
            per_input = (w ** 2).sum(dim=0)
            if comp == ATTN:
                per_input = per_input.view(layout.num_heads, layout.head_dim).sum(-1)
            rows.append(per_input.sqrt())
        out[comp] = torch.stack(rows).cpu()
    return out


def check_ratios(ratios) -> list[float]:
    """The deactivation ratios as floats, each in [0, 1) and given once (a repeated ratio would count its
    samples twice in the per-ratio averages)."""
    ratios = [float(p) for p in ratios]
    if not ratios:
        raise PipelineError("--ratios is empty; give at least one deactivation ratio, e.g. --ratios 0.0 0.5")
    for p in ratios:
        if not 0.0 <= p < 1.0:
            raise PipelineError(f"deactivation ratio {p} is outside [0, 1)")
    repeated = sorted({p for p in ratios if ratios.count(p) > 1})
    if repeated:
        raise PipelineError(f"--ratios repeats {', '.join(map(str, repeated))}; give each ratio once")
    return ratios


def keep_masks(scores: torch.Tensor, ratios) -> torch.Tensor:
    """Boolean keep-masks ``[R, ..., c]``: for each ratio p, threshold = the element at index
    floor(p·c) of the ascending scores along the last dim; keep every unit scoring >= it (ties keep)."""
    c = scores.shape[-1]
    ordered = scores.sort(dim=-1).values
    masks = []
    for p in check_ratios(ratios):
        index = min(int(math.floor(p * c + 1e-9)), c - 1)  # +1e-9: 0.7*10 must give 7, not 6.999…
        masks.append(scores >= ordered[..., index:index + 1])
    return torch.stack(masks)


@dataclass(frozen=True)
class UnitWeights:
    """Parameters each head and each neuron uses: a head its slices of q, k, v (shared k/v divided
    among the heads of a group) and of the output projection; a neuron its up (and gate) row and down
    column.  Weight matrices only, no biases."""
    head: float
    neuron: float
    num_heads: int
    intermediate: int

    @property
    def layer_total(self) -> float:
        return self.head * self.num_heads + self.neuron * self.intermediate

    @property
    def head_share(self) -> float:
        return self.head * self.num_heads / self.layer_total

    def as_dict(self) -> dict:
        return {"per_head": self.head, "per_neuron": self.neuron, "heads_share": self.head_share,
                "neurons_share": 1 - self.head_share}


def unit_weights(layout: ModelLayout) -> UnitWeights:
    hd, hidden = layout.head_dim, layout.hidden
    kv_share = layout.num_kv_heads / layout.num_heads
    head = hidden * hd * (1 + 2 * kv_share) + hd * hidden
    neuron = hidden * (2 if layout.gated_mlp else 1) + hidden
    return UnitWeights(head=float(head), neuron=float(neuron), num_heads=layout.num_heads,
                       intermediate=layout.intermediate)


def layer_selection(mask_layers, num_layers: int) -> torch.Tensor:
    """Boolean ``[L]``: which layers are masked (None: all)."""
    selected = torch.zeros(num_layers, dtype=torch.bool)
    if mask_layers is None:
        selected[:] = True
        return selected
    for layer in mask_layers:
        if not 0 <= layer < num_layers:
            raise PipelineError(f"--mask_layers names layer {layer}, but the model has layers 0-{num_layers - 1}")
        selected[layer] = True
    return selected


def parse_layers(text: str | None):
    """'0-23' or '0,1,5-7' -> list of ints; None/'all' -> None."""
    if text is None or text == "all":
        return None
    out = []
    try:
        for part in text.split(","):
            if "-" in part:
                lo, hi = part.split("-")
                lo, hi = int(lo), int(hi)
                if hi < lo:  # 1-0 would silently mask nothing
                    raise PipelineError(f"--mask_layers {text!r}: the range {part} is empty; write it low-high, "
                                        f"e.g. {hi}-{lo}")
                out.extend(range(lo, hi + 1))
            else:
                out.append(int(part))
    except ValueError:
        raise PipelineError(f"cannot read --mask_layers {text!r}; write e.g. 0-23 or 0,2,5-7") from None
    repeated = sorted({layer for layer in out if out.count(layer) > 1})
    if repeated:
        raise PipelineError(f"--mask_layers {text!r} names layer {', '.join(map(str, repeated))} more than once; "
                            "name each layer once")
    return out


def apply_layer_selection(masks: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """Unmasked layers keep every unit.  ``masks``: ``[..., L, c]``."""
    return masks | ~selected.to(masks.device)[:, None]


def kept_weight(keep: dict, weights: UnitWeights) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept, total) parameter weight over the masked steps t >= 1 and all layers, per leading index.

    ``keep[comp]``: bool ``[..., T, L, units]`` with unmasked layers already all True."""
    heads = keep[ATTN][..., 1:, :, :].sum(dim=(-1, -2, -3)).double() * weights.head
    neurons = keep[MLP][..., 1:, :, :].sum(dim=(-1, -2, -3)).double() * weights.neuron
    steps, layers = keep[ATTN].shape[-3] - 1, keep[ATTN].shape[-2]
    total = max(steps, 0) * layers * weights.layer_total
    return heads + neurons, torch.full_like(heads, float(total))

"""From scores to masks (METHOD §4-5): ranking per metric (each metric declared in utils/metric_registry.py),
per-step per-layer thresholds, and the activation ratio weighted by the parameters each unit uses."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .architecture import weight_out_in
from .errors import PipelineError
from .metric_registry import get_metric
from .sites import ATTN, MLP, ModelLayout

DEFAULT_RATIOS = tuple(k / 10 for k in range(10))


def ranking(metric_name: str, comp: str, s: dict, head_dim: int, variant: str = "paper") -> torch.Tensor:
    """Keep-scores ``[T, L, units]`` (higher = keep) of one component from its score tensors ``s``
    (keys: the metric's score kinds, ``[T, L, units]``, grad_norm ``[T, L]``; for a metric that needs
    weights also out_norm ``[L, units]``, from :func:`output_weight_norms`): the metric's declared
    keep-score (utils/metric_registry.py)."""
    return get_metric(metric_name).keep(comp, s, head_dim, variant)


@dataclass(frozen=True)
class RankInputs:
    """What a ranking needs besides the score files, in one object: the head width (per-head sums), the
    cor_gxo variant and, where a metric needs weights, the output projections' norms ``{comp: [L, units]}``."""
    head_dim: int
    variant: str = "paper"
    out_norms: dict | None = None

    @classmethod
    def of(cls, layout: ModelLayout, metrics, variant: str = "paper") -> "RankInputs":
        """For ``metrics`` on the model of ``layout``: the weight norms only when one of them needs them."""
        weights = any(get_metric(m).needs_weights for m in metrics)
        return cls(layout.head_dim, variant, output_weight_norms(layout) if weights else None)

    def rank(self, metric_name: str, comp: str, s: dict) -> torch.Tensor:
        """:func:`ranking` of one component's score tensors ``s`` (the metric's kinds)."""
        if get_metric(metric_name).needs_weights and self.out_norms is not None:
            s = {**s, "out_norm": self.out_norms[comp]}
        return ranking(metric_name, comp, s, self.head_dim, self.variant)


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

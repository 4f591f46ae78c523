"""The metrics, each declared once (METHOD §4): the score kinds its ranking reads, its keep-score, the removal
cost it predicts for the attribution-error study, its label and plot style, and whether it needs the model's
weights.  The sweep, the mask sources, the figures, the attribution-error study and every script's
``--metric_name`` read this registry; no other module lists metric names.

A new metric that ranks from existing score files is one :class:`Metric` in :data:`METRICS` below (or, from
outside, one :func:`register_metric` call); one that needs a score kind of its own also needs the kind's
declaration (``utils.artifacts.KINDS``) and its computation (utils/attribution.py)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .errors import PipelineError
from .sites import ATTN
from .units import head_sum

COR_GXO_VARIANTS = ("paper", "released")

# keep(comp, scores, head_dim, variant) -> keep-scores [T, L, units] (higher = keep).  ``scores``: the
# metric's score kinds of one component ([T, L, units]; grad_norm [T, L]) and, for a metric that needs
# weights, ``out_norm`` [L, units] (utils.masks.output_weight_norms).
KeepScore = Callable[[str, dict, int, str], torch.Tensor]


@dataclass(frozen=True)
class RemovalCost:
    """How the attribution-error study reads a metric's prediction of the loss increase when one unit is
    removed: its keep-score, summed over a head's dims where the score is a per-head mean."""
    column: int                   # the study lists its metrics (tables, figure columns) in this order
    per_head_sum: bool = False    # times d gives the head's summed first-order term (gradient, gxo, ig)

    def of(self, comp: str, keep: torch.Tensor, head_dim: int) -> torch.Tensor:
        return head_sum(comp, keep, head_dim) if self.per_head_sum else keep


@dataclass(frozen=True)
class Metric:
    name: str
    kinds: tuple                  # the score kinds (utils.artifacts.KINDS) its ranking reads
    keep: KeepScore               # its keep-score (METHOD §4)
    label: str                    # the figures' legend
    color: str                    # the figures' line colour and marker
    marker: str
    removal_cost: RemovalCost | None = None   # None: the attribution-error study leaves it out
    needs_weights: bool = False   # its ranking also reads the output projections' norms (``out_norm``)


def _negated(kind: str) -> KeepScore:
    # -score: the first-order estimate of the loss increase on removal, as a keep-score
    return lambda comp, s, head_dim, variant: -s[kind]


def _magnitude(comp, s, head_dim, variant):
    return s["magnitude"]


def _snip(comp, s, head_dim, variant):
    return s["gxo"].abs()


def _wina(comp, s, head_dim, variant):
    if "out_norm" not in s:
        raise PipelineError("the wina metric needs the output projections' column norms (out_norm)")
    # WINA's weight-informed magnitude: what the unit can add to the residual stream
    return s["magnitude"] * s["out_norm"].to(s["magnitude"].device, s["magnitude"].dtype)


def _cor_gxo(comp, s, head_dim, variant):
    if variant not in COR_GXO_VARIANTS:
        raise PipelineError(f"unknown --cor_gxo_variant {variant!r}; choose {', '.join(COR_GXO_VARIANTS)}")
    if variant == "released" and comp == ATTN:
        # the released code: per-head means, with the norm of the per-head mean gradients
        return -s["gxo"] + 0.5 * s["magnitude"] * s["gradient"].norm(dim=-1, keepdim=True)
    # -g·x (summed over the head's dims) plus half the paper's bound on the inter-layer error
    return -head_sum(comp, s["gxo"], head_dim) + 0.5 * s["magnitude"] * s["grad_norm"][..., None]


# declaration order is the order of the sweep's curves, result rows and legends
METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("magnitude", ("magnitude",), _magnitude, "Magnitude", "tab:gray", "o", RemovalCost(4)),
    Metric("gradient", ("gradient",), _negated("gradient"), "Gradient", "tab:orange", "v",
           RemovalCost(3, per_head_sum=True)),
    Metric("gxo", ("gxo",), _negated("gxo"), "GxO", "tab:blue", "s", RemovalCost(0, per_head_sum=True)),
    Metric("snip", ("gxo",), _snip, "SNIP |GxO|", "tab:purple", "^"),
    Metric("cor_gxo", ("gxo", "magnitude", "grad_norm", "gradient"), _cor_gxo, "Corrected GxO", "tab:red", "D",
           RemovalCost(1)),
    Metric("ig", ("ig",), _negated("ig"), "Integrated gradients", "tab:green", "P",
           RemovalCost(2, per_head_sum=True)),
    Metric("wina", ("magnitude",), _wina, "WINA", "tab:brown", "X", needs_weights=True),
)}


def register_metric(metric: Metric) -> Metric:
    """Add a metric after the built-in ones (a plug-in, or a test's toy metric); its name must be new."""
    if metric.name in METRICS or metric.name == "all":
        raise PipelineError(f"a metric named {metric.name!r} is already declared; give the new one another name")
    METRICS[metric.name] = metric
    return metric


def unregister_metric(name: str) -> None:
    """Remove a metric :func:`register_metric` added."""
    METRICS.pop(name, None)


def metric_names() -> tuple:
    """Every declared metric, in declaration order."""
    return tuple(METRICS)


def get_metric(name: str) -> Metric:
    if name not in METRICS:
        raise PipelineError(f"unknown metric {name!r}; choose one of {', '.join(METRICS)}")
    return METRICS[name]


def studied_metrics() -> tuple:
    """The metrics whose removal-cost prediction the attribution-error study checks, in its column order."""
    studied = [m for m in METRICS.values() if m.removal_cost is not None]
    return tuple(m.name for m in sorted(studied, key=lambda m: m.removal_cost.column))


def check_metric_names(names, choices, flag: str = "--metric_name") -> list[str]:
    """``names`` as given on the command line: ``["all"]``, or metrics of ``choices`` each named once."""
    names = list(names)
    if names == ["all"]:
        return names
    unknown = [m for m in names if m not in choices]
    if unknown:
        raise PipelineError(f"unknown {flag} {', '.join(unknown)}; choose from {', '.join(choices)} or all")
    repeated = sorted({m for m in names if names.count(m) > 1})
    if repeated:
        raise PipelineError(f"{flag} repeats {', '.join(repeated)}; give each metric once")
    return names

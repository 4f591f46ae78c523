"""The ``teal`` source (METHOD §7b, after TEAL): per token, the *input channels* of every projection of the
attention and MLP blocks whose magnitude is below a threshold are zeroed, so the projection reads only the
weight columns of the channels kept.  Thresholds are calibrated per layer and projection on the calibration
samples' dense activations to the target share (uniform allocation: the same deactivation ratio p for every
projection).  With ``wina`` the channel's score is its magnitude times the norm of the projection's weight
column (WINA's criterion); with ``magnitude`` it is the magnitude alone (TEAL's)."""
from __future__ import annotations

import contextlib

import torch
from tqdm.auto import tqdm

from .architecture import block_projections, decoder_layers, weight_out_in
from .kv_cache import cache_argument_name, forward_kwargs
from .token_masks import TokenMasker

TEAL_METRICS = ("magnitude", "wina")
CALIB_VALUES = 2 ** 19     # channel scores kept per projection for its quantiles (a seeded random subset)


def projections(model) -> list:
    """Per layer, ``[(name, module)]`` of its block projections (utils.architecture.block_projections)."""
    return [list(block_projections(layer, i).items()) for i, layer in enumerate(decoder_layers(model))]


def column_norms(module) -> torch.Tensor:
    """``[in]``: the norm of each input channel's weight column."""
    return weight_out_in(module).detach().float().norm(dim=0)


def channel_scores(x: torch.Tensor, norms: torch.Tensor | None) -> torch.Tensor:
    """A projection input's channel scores: ``|x|``, times the column norms for wina."""
    s = x.float().abs()
    return s if norms is None else s * norms.to(s.device)


@torch.no_grad()
def calibrate_thresholds(model, samples: list, metrics: list, ratios, seed: int = 0) -> torch.Tensor:
    """``[V, R, L, P]`` thresholds: for metric v, ratio p, layer l and projection j, the element at index
    ``floor(p·n)`` of the ascending channel scores of projection j's input over every channel of every
    masked position (steps t >= 1) of the calibration ``samples`` (``(prompt_ids, label_ids)`` pairs), the dense
    model teacher-forced; ``-inf`` at p = 0 (keep all).  At most ``CALIB_VALUES`` scores per projection are
    used: a seeded uniform subset, the same share of every sample's."""
    bad = [m for m in metrics if m not in TEAL_METRICS]
    if bad:
        raise ValueError(f"teal masks score channels by {' or '.join(TEAL_METRICS)}, not {', '.join(bad)}")
    device = next(model.parameters()).device
    layers = projections(model)
    width = {id(mod): weight_out_in(mod).shape[1] for per in layers for _, mod in per}
    positions = sum(max(len(label) - 1, 0) for _, label in samples)
    g = torch.Generator().manual_seed(seed)
    collected = [[[[] for _ in per] for per in layers] for _ in metrics]
    norms = [[column_norms(mod) for _, mod in per] for per in layers]
    current = {}

    def make_hook(layer, j, module):
        rate = min(1.0, CALIB_VALUES / max(1, positions * width[id(module)]))

        def hook(mod, args):
            x = args[0][0, current["start"]:]                       # the masked positions of this sample
            for v, metric in enumerate(metrics):
                s = channel_scores(x, norms[layer][j] if metric == "wina" else None).flatten().cpu()
                take = int(round(rate * s.numel()))
                if take < s.numel():
                    s = s[torch.randperm(s.numel(), generator=g)[:take]]
                collected[v][layer][j].append(s)
        return hook

    handles = [mod.register_forward_pre_hook(make_hook(layer, j, mod))
               for layer, per in enumerate(layers) for j, (_, mod) in enumerate(per)]
    try:
        for prompt, label in tqdm(samples, desc="teal calibration", unit="sample", leave=False):
            if len(label) < 2:
                continue
            current["start"] = len(prompt)
            ids = torch.tensor([prompt + label[:-1]], device=device)
            model(**forward_kwargs(cache_argument_name(model), ids, use_cache=False))
    finally:
        for h in handles:
            h.remove()
    ratios = [float(p) for p in ratios]
    P = max(len(per) for per in layers)
    out = torch.full((len(metrics), len(ratios), len(layers), P), float("-inf"))
    for v in range(len(metrics)):
        for layer, per in enumerate(layers):
            for j in range(len(per)):
                values = torch.cat(collected[v][layer][j]).sort().values
                if not len(values):
                    continue
                for r, p in enumerate(ratios):
                    if p > 0:
                        out[v, r, layer, j] = values[min(int(p * len(values) + 1e-9), len(values) - 1)]
    return out


class TealMasker(TokenMasker):
    """Zero, per row and position, the input channels of every block projection scoring below the row's
    threshold (``thresholds[variant, ratio index, layer, projection]``).  A projection's kept weight is its
    kept channels times its output width; a layer's total is every projection's weight, which is the weight of
    all its heads and neurons (METHOD §5), so the activation ratio is the share of weight columns read."""

    def __init__(self, model, layout, weights, selected, metrics: list, thresholds: torch.Tensor, ratios):
        self.thresholds = thresholds.to(next(model.parameters()).device)
        self.ratio_values = [float(p) for p in ratios]
        self.metric_is_wina = torch.tensor([m == "wina" for m in metrics])
        super().__init__(model, layout, weights, selected, metrics)

    @contextlib.contextmanager
    def rows(self, variant, ratio):
        lookup = {p: i for i, p in enumerate(self.ratio_values)}
        given = [float(p) for p in torch.as_tensor(ratio, dtype=torch.float64).tolist()]
        unknown = sorted(set(given) - set(lookup))
        if unknown:
            raise ValueError(f"teal thresholds were calibrated for ratios {self.ratio_values}, not {unknown}")
        with super().rows(variant, ratio):
            self.ratio_rows = torch.tensor([lookup[p] for p in given], device=self.ratio.device)
            yield self

    def _attach(self) -> None:
        for layer, per in enumerate(projections(self.model)):
            for j, (_, module) in enumerate(per):
                self._hook(module, self._input_hook(layer, j, module))

    def _input_hook(self, layer: int, j: int, module):
        norms = column_norms(module)
        out_width = weight_out_in(module).shape[0]

        def hook(mod, args):
            if not self.active:
                return None
            x = args[0]
            if not self.selected[layer]:
                self._count(torch.full(x.shape[:2], float(x.shape[-1] * out_width), device=x.device))
                return None
            wina = self.metric_is_wina.to(x.device)[self.variant].view(-1, 1, 1)
            mag = channel_scores(x, None)
            scores = torch.where(wina, mag * norms.to(x.device), mag)
            threshold = self.thresholds[self.variant, self.ratio_rows, layer, j].view(-1, 1, 1)
            keep = scores >= threshold                                            # [B, S, in]
            self._count(keep.sum(-1).double() * out_width)
            return (x * keep.to(x.dtype),) + tuple(args[1:])

        return hook

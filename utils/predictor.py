"""The ``predictor`` source (METHOD §7b), the revised paper's deployment path: per layer and component, a small
low-rank network from the hidden state entering the block (the attention block's input for heads, the MLP's
for neurons) to the per-token keep-scores of a metric, trained offline on the calibration samples' stored
scores (whose labels are the dense model's own greedy outputs: no human answer), and used at inference to keep
the top-scoring units of each layer at each token.

The target of a token and layer is the metric's keep-score ranks scaled to [0, 1] (0 the lowest unit, 1 the
highest): only the order matters to a top-k mask, and ranks put every token, layer and metric on one scale.
The loss is their mean squared error."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .kv_cache import cache_argument_name, forward_kwargs
from .sites import COMPONENTS, ModelLayout
from .token_masks import UnitMasker, block_input_hooks, kept_units


@dataclass(frozen=True)
class PredictorSettings:
    rank: int = 64               # the low-rank bottleneck's width
    hidden: int = 0              # 0: low-rank linear (h -> rank -> units); > 0: a ReLU layer of this width after it
    epochs: int = 40
    batch_tokens: int = 512
    lr: float = 3e-3
    heldout: float = 0.2         # the share of calibration samples (the last ones) held out for recall@k
    seed: int = 0


class Predictor(nn.Module):
    """All layers' predictors of one component and one metric, as stacked weights (one batched product per
    layer): standardise the input with the training data's mean and spread, then ``[d -> rank (-> hidden,
    ReLU) -> units]``."""

    def __init__(self, layers: int, d: int, units: int, settings: PredictorSettings):
        super().__init__()
        r, w = settings.rank, settings.hidden
        g = torch.Generator().manual_seed(settings.seed)

        def init(*shape):
            return nn.Parameter(torch.randn(*shape, generator=g) / math.sqrt(shape[-2]))

        self.register_buffer("mean", torch.zeros(layers, d))
        self.register_buffer("scale", torch.ones(layers, d))
        self.down = init(layers, d, r)
        self.mid = init(layers, r, w) if w else None
        self.up = init(layers, w or r, units)
        self.bias = nn.Parameter(torch.zeros(layers, units))

    def forward(self, h: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """``h`` ``[N, L, d]`` (every layer) -> ``[N, L, units]``; with ``layer``, ``h`` ``[N, d]`` -> ``[N, units]``."""
        sl = slice(None) if layer is None else layer
        z = (h - self.mean[sl]) / self.scale[sl]
        if layer is None:
            z = torch.einsum("nld,ldr->nlr", z, self.down)
            if self.mid is not None:
                z = torch.relu(torch.einsum("nlr,lrw->nlw", z, self.mid))
            return torch.einsum("nlr,lru->nlu", z, self.up) + self.bias
        z = z @ self.down[layer]
        if self.mid is not None:
            z = torch.relu(z @ self.mid[layer])
        return z @ self.up[layer] + self.bias[layer]

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())


def rank_targets(scores: torch.Tensor) -> torch.Tensor:
    """``[N, L, c]`` keep-scores -> their ranks along the units scaled to [0, 1] (ties by position)."""
    c = scores.shape[-1]
    ranks = scores.argsort(dim=-1).argsort(dim=-1).float()
    return ranks / max(c - 1, 1)


def recall_at(pred: torch.Tensor, true: torch.Tensor, ratio: float) -> torch.Tensor:
    """``[L]``: mean over tokens of |predicted kept ∩ oracle kept| / k, k the units a top share keeps at
    ``ratio`` (both sets the k highest; ``pred``, ``true`` ``[N, L, c]``)."""
    k = kept_units(ratio, true.shape[-1])
    p = torch.zeros_like(true, dtype=torch.bool).scatter_(-1, pred.topk(k, dim=-1).indices, True)
    t = torch.zeros_like(true, dtype=torch.bool).scatter_(-1, true.topk(k, dim=-1).indices, True)
    return (p & t).sum(-1).float().mean(0) / k


@torch.no_grad()
def block_inputs(model, layout: ModelLayout, prompt_ids: list, label_ids: list) -> dict:
    """``{comp: float32 [T-1, L, d]}``: the hidden state entering each layer's attention (heads) and MLP
    (neurons) block at the positions of steps 1..T-1 of one sample (the dense model teacher-forced on
    prompt + label[:T-1]; step t computes position P-1+t)."""
    from .token_masks import TokenMasker

    P, T = len(prompt_ids), len(label_ids)
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids + label_ids[:T - 1]], device=device)
    found = {c: [None] * layout.num_layers for c in COMPONENTS}

    class _Recorder(TokenMasker):
        def _attach(self):
            block_input_hooks(self, lambda comp, layer, h: found[comp].__setitem__(layer, h[0, P:].float().cpu()))

    recorder = _Recorder(model, layout, None, [True] * layout.num_layers, [])
    try:
        with recorder.rows([0], [0.0]):
            model(**forward_kwargs(cache_argument_name(model), ids, use_cache=False))
    finally:
        recorder.remove()
    return {c: torch.stack(found[c], dim=1) for c in COMPONENTS}


def fit(x: torch.Tensor, y: torch.Tensor, train: torch.Tensor, settings: PredictorSettings,
        desc: str = "") -> Predictor:
    """Train one component's predictor on the tokens ``train`` (bool ``[N]``) of ``x`` ``[N, L, d]`` ->
    ``y`` ``[N, L, units]`` (rank targets), with Adam on mini-batches, seeded."""
    N, L, d = x.shape
    model = Predictor(L, d, y.shape[-1], settings)
    xt, yt = x[train], y[train]
    model.mean.copy_(xt.mean(0))
    model.scale.copy_(xt.std(0).clamp_min(1e-6))
    opt = torch.optim.Adam(model.parameters(), lr=settings.lr)
    g = torch.Generator().manual_seed(settings.seed)
    steps = settings.epochs * max(1, math.ceil(len(xt) / settings.batch_tokens))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    with torch.enable_grad(), tqdm(total=settings.epochs, desc=desc, unit="epoch", leave=False) as bar:
        for _ in range(settings.epochs):
            order = torch.randperm(len(xt), generator=g)
            for s in range(0, len(xt), settings.batch_tokens):
                idx = order[s:s + settings.batch_tokens]
                loss = ((model(xt[idx]) - yt[idx]) ** 2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
    return model.eval().requires_grad_(False)


def predictor_cost(predictors: dict, model_params: int) -> dict:
    """Parameters and multiply-adds per token of one metric's predictors, absolute and as a share of the
    model's parameters (a decode step's multiply-adds are about its parameter count)."""
    params = sum(p.parameter_count() for p in predictors.values())
    per_token = sum(p.down.numel() + (p.mid.numel() if p.mid is not None else 0) + p.up.numel()
                    for p in predictors.values())
    return {"parameters": params, "parameters_share": params / model_params,
            "multiply_adds_per_token": per_token, "flops_share": per_token / model_params}


def save_predictors(path, predictors: dict, record: dict) -> None:
    """One metric's trained predictors ``{comp: Predictor}`` with what they were made from (``record``: the
    labels' run_id, the metric, its cor_gxo variant, the calibration samples, the settings and the score
    files read), written atomically."""
    from .io import write_torch

    state = {c: {"state": p.state_dict(), "layers": p.mean.shape[0], "d": p.mean.shape[1],
                 "units": p.bias.shape[1]} for c, p in predictors.items()}
    write_torch(path, {"record": record, "predictors": state})


def read_predictors(path) -> tuple[dict, dict]:
    """``(record, {comp: Predictor})`` from :func:`save_predictors`'s file; a damaged file raises ValueError."""
    try:
        saved = torch.load(path, weights_only=True)
        record = saved["record"]
        settings = PredictorSettings(**record["settings"])
        out = {}
        for comp in COMPONENTS:
            entry = saved["predictors"][comp]
            p = Predictor(entry["layers"], entry["d"], entry["units"], settings)
            p.load_state_dict(entry["state"])
            out[comp] = p.eval().requires_grad_(False)
    except Exception as err:      # whatever a damaged file makes torch.load or the state dict raise
        raise ValueError(f"{type(err).__name__}") from None
    return record, out


class PredictorMasker(UnitMasker):
    """``predictor`` (METHOD §7b): at each block's input the row's predictor scores the block's units; the
    unit site then keeps the top share per layer.  ``predictors[v]``: ``{comp: Predictor}`` of variant v."""

    def __init__(self, model, layout, weights, selected, metrics: list, predictors: list):
        self.predictors = [{c: p[c].to(next(model.parameters()).device) for c in COMPONENTS} for p in predictors]
        self._pending = {c: [None] * layout.num_layers for c in COMPONENTS}
        super().__init__(model, layout, weights, selected, metrics)

    def _attach(self) -> None:
        block_input_hooks(self, self._predict)
        super()._attach()

    def _predict(self, comp: str, layer: int, h: torch.Tensor) -> None:
        if not self.selected[layer]:
            return
        flat = h.reshape(-1, h.shape[-1]).float()
        out = torch.stack([p[comp](flat, layer) for p in self.predictors])        # [V, B*S, units]
        out = out.view(len(self.predictors), h.shape[0], h.shape[1], -1)
        rows = torch.arange(h.shape[0], device=h.device)
        self._pending[comp][layer] = out[self.variant, rows]                     # [B, S, units]

    def scores(self, comp, layer, x):
        scores, self._pending[comp][layer] = self._pending[comp][layer], None
        return scores

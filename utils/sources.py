"""Where a mask's scores come from (METHOD §7): ``oracle`` (per token, against the dense label),
``prompt`` (one mask per request from the prompt's step alone) and ``static`` (one mask for every input,
calibrated on other samples)."""
from __future__ import annotations

import torch

from .artifacts import score_key
from .errors import PipelineError
from .masks import files_needed, keep_masks, output_weight_norms, ranking
from .sites import COMPONENTS

SOURCES = ("oracle", "prompt", "static")
DEFAULT_CALIB_NUM_DATA = 100   # calibration samples of the static source (indices N .. N+M-1)


def parse_sources(names) -> list[str]:
    """``--source`` values -> the sources in canonical order; ``all`` means all three."""
    names = list(names)
    if "all" in names:
        return list(SOURCES)
    unknown = [n for n in names if n not in SOURCES]
    if unknown:
        raise PipelineError(f"unknown --source {', '.join(unknown)}; choose from {', '.join(SOURCES)} or all")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise PipelineError(f"--source repeats {', '.join(repeated)}; give each source once")
    return [s for s in SOURCES if s in names]


def curve_key(metric: str, source: str) -> str:
    """The name of a (metric, source) curve in the result files: the bare metric for ``oracle`` (today's
    names), ``metric@source`` otherwise."""
    return metric if source == "oracle" else f"{metric}@{source}"


def source_keep_masks(source: str, rank: torch.Tensor, ratios, static_rank: torch.Tensor | None = None):
    """Bool keep-masks ``[R, T, L, units]`` of one component and sample from its per-step keep-scores
    ``rank`` ``[T, L, units]``: per step (oracle), from step 0's row for every step (prompt), or from the
    calibrated mean ``static_rank`` ``[L, units]`` for every step (static).  Step 0 itself always runs
    dense (masked generation never masks it), so its row only matters to the oracle's bookkeeping."""
    T = rank.shape[0]
    if source == "oracle":
        return keep_masks(rank, ratios)
    if source == "prompt":
        base = rank[:1]
    elif source == "static":
        base = static_rank[None].to(rank.device)
    else:
        raise PipelineError(f"unknown source {source!r}; choose from {', '.join(SOURCES)}")
    return keep_masks(base, ratios).expand(-1, T, -1, -1)


def static_keep_scores(per_metric: dict, metric: str, samples, head_dim: int, variant: str = "paper",
                       out_norm: dict | None = None) -> dict:
    """``{comp: [L, units]}``: the metric's keep-score (METHOD §4) averaged over every step of every
    calibration sample in ``samples`` (token-weighted: each step counts once)."""
    out = {}
    for comp in COMPONENTS:
        total, steps = None, 0
        for i in samples:
            s = {kind: lst[i] for kind, lst in per_metric[comp].items()}
            if out_norm is not None:
                s["out_norm"] = out_norm[comp]
            rank = ranking(metric, comp, s, head_dim, variant).double()
            part = rank.sum(0)
            total = part if total is None else total + part
            steps += rank.shape[0]
        if not steps:
            raise PipelineError(f"the calibration samples {list(samples)} have no label tokens; calibrate on "
                                "other samples (--num_data / --calib_num_data)")
        out[comp] = (total / steps).float()
    return out


def prompt_scores(model, prompt_ids: torch.Tensor, metric: str, *, variant: str = "paper", ig_steps: int = 0,
                  batch_size: int | None = 2048, attributor=None) -> dict:
    """The ``prompt`` source's keep-scores ``{comp: [L, units]}`` of one request, computed live from the
    prompt alone: one dense forward over the prompt, the target being the model's own greedy next token
    (argmax of the dense logits), one backward (``ig_steps`` IG passes for ``ig``); then the ranking of
    METHOD §4.  No label is used.  Equal to the t = 0 rows of the stored per-token scores, whose target
    label[0] is that same greedy token."""
    from .attribution import Attributor

    kinds = files_needed(metric)
    if "ig" in kinds and ig_steps < 1:
        raise PipelineError("the ig metric needs ig_steps >= 1 (the IG steps of its score files)")
    device = next(model.parameters()).device
    prompt_ids = prompt_ids.to(device)
    with torch.no_grad():
        target = int(model(input_ids=prompt_ids, use_cache=False).logits[0, -1].argmax())
    own = attributor is None
    attributor = attributor or Attributor(model)
    try:
        raw = attributor.score_sample(prompt_ids, [target], gradients=bool({"gradient", "gxo", "grad_norm"} & set(kinds)),
                                      ig_steps=ig_steps if "ig" in kinds else 0, batch_size=batch_size,
                                      step_mode="cached")
    finally:
        if own:
            attributor.close()
    norms = output_weight_norms(attributor.layout) if metric == "wina" else None
    out = {}
    for comp in COMPONENTS:
        s = {kind: raw[score_key(kind, comp)] for kind in kinds}
        if norms is not None:
            s["out_norm"] = norms[comp]
        out[comp] = ranking(metric, comp, s, attributor.layout.head_dim, variant)[0]
    return out

"""Where a mask comes from (METHOD §7), each source declared once in :data:`SOURCES`.  From the stored score
files: ``oracle`` (per token, against the dense label), ``prompt`` (one mask per request from the prompt's
step alone) and ``static`` (one mask for every input, calibrated on other samples).  Chosen per token inside
the masked forward, without the label (METHOD §7b): ``online`` (the units' own magnitudes), ``predictor``
(trained on the calibration samples' scores) and ``teal`` (input channels below calibrated thresholds).  The
sweep, run_pipeline.py, the figures and the ``--help`` texts read the declarations; a new source is one
:class:`Source` plus its ``keep_scores`` function or its masker builder (utils/token_sources.py)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .artifacts import KINDS, score_key
from .errors import PipelineError
from .masks import RankInputs, keep_masks
from .metric_registry import get_metric
from .sites import COMPONENTS
from . import token_sources

DEFAULT_CALIB_NUM_DATA = 100   # calibration samples of a source that needs them (indices N .. N+M-1)

# keep_scores(rank, calibrated) -> the keep-scores a source thresholds: ``[T, L, units]`` (one mask per step)
# or ``[1, L, units]`` (one mask for every step).  ``rank``: one sample's per-step keep-scores ``[T, L, units]``;
# ``calibrated``: the mean keep-score ``[L, units]`` over the calibration samples (None unless the source
# needs calibration).
SourceScores = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]


@dataclass(frozen=True)
class Source:
    name: str
    keep_scores: SourceScores | None   # None: a per-token source, whose masks its ``masker`` chooses
    help: str                      # main.py's --help: where its masks come from
    title: str                     # the trade-off figure's panel title
    linestyle: str                 # its lines in the speed figure
    uses_label: bool = False       # its masks read the dense label's per-token scores (so no deployment runs it)
    needs_calibration: bool = False   # it reads samples N .. N+M-1 (--calib_num_data): their mean keep-score
                                      # (static), their activations (teal) or predictors trained on them
    masker: Callable | None = None    # per token: builds the hooks that choose masks in the forward
                                      # (utils/token_sources.py); None: masks from the stored scores

    @property
    def per_token(self) -> bool:
        return self.masker is not None


def _per_step(rank, calibrated):
    return rank


def _prompt_step(rank, calibrated):
    # step 0 scores the prompt alone (its target is the model's own greedy token): what a request has
    return rank[:1]


def _calibrated(rank, calibrated):
    return calibrated[None].to(rank.device)


# declaration order is the order of the sweep's curves (sources outer, metrics inner) and of the panels
SOURCES: dict[str, Source] = {s.name: s for s in (
    Source("oracle", _per_step, "per token, against the dense label", "oracle (per token, dense label)", "-",
           uses_label=True),
    Source("prompt", _prompt_step, "one mask per request from the prompt's step", "prompt (one mask per request)",
           "--"),
    Source("static", _calibrated, "one mask calibrated on samples N .. N+M-1, N = --num_data, M = --calib_num_data",
           "static (calibrated, one mask)", ":", needs_calibration=True),
    Source("online", None, "per token: each unit's magnitude (or WINA score) in the masked forward itself, top share "
           "per layer", "online (per token, own magnitudes)", "-.", masker=token_sources.online),
    Source("predictor", None, "per token: a predictor on the hidden state entering the block, trained by "
           "train_predictor.py on samples N .. N+M-1", "predictor (per token, trained)", (0, (3, 1, 1, 1, 1, 1)),
           needs_calibration=True, masker=token_sources.predictor),
    Source("teal", None, "per token: every projection's input channels below a threshold calibrated on samples "
           "N .. N+M-1 (TEAL)", "teal (per token, input channels)", (0, (5, 2)), needs_calibration=True,
           masker=token_sources.teal),
)}


def register_source(source: Source) -> Source:
    """Add a source after the built-in ones (a plug-in, or a test's toy source); its name must be new."""
    if source.name in SOURCES or source.name == "all":
        raise PipelineError(f"a mask source named {source.name!r} is already declared; give the new one another name")
    SOURCES[source.name] = source
    return source


def unregister_source(name: str) -> None:
    """Remove a source :func:`register_source` added."""
    SOURCES.pop(name, None)


def source_names() -> tuple:
    return tuple(SOURCES)


def get_source(name: str) -> Source:
    if name not in SOURCES:
        raise PipelineError(f"unknown source {name!r}; choose from {', '.join(SOURCES)}")
    return SOURCES[name]


def calibrated_sources() -> tuple:
    """The sources that need calibration samples (--calib_num_data)."""
    return tuple(s.name for s in SOURCES.values() if s.needs_calibration)


def label_free_sources() -> tuple:
    """The sources a deployment can run (they need no label)."""
    return tuple(s.name for s in SOURCES.values() if not s.uses_label)


def parse_sources(names) -> list[str]:
    """``--source`` values -> the sources in declaration order; ``all`` means every one."""
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
    """The name of a (metric, source) curve in the result files: the bare metric for ``oracle`` (the names
    of the sweeps from before the label-free sources), ``metric@source`` otherwise."""
    return metric if source == "oracle" else f"{metric}@{source}"


def source_keep_masks(source: str, rank: torch.Tensor, ratios, calibrated: torch.Tensor | None = None):
    """Bool keep-masks ``[R, T, L, units]`` of one component and sample from its per-step keep-scores
    ``rank`` ``[T, L, units]``, thresholding what the source declares: per step (oracle), step 0's row for
    every step (prompt), or the calibrated mean ``calibrated`` ``[L, units]`` for every step (static).  Step 0
    itself always runs dense (masked generation never masks it), so its row only matters to the oracle's
    bookkeeping."""
    base = get_source(source).keep_scores(rank, calibrated)
    return keep_masks(base, ratios).expand(-1, rank.shape[0], -1, -1)


def calibrated_keep_scores(per_metric: dict, metric: str, samples, inputs: RankInputs) -> dict:
    """``{comp: [L, units]}``: the metric's keep-score (METHOD §4) averaged over every step of every
    calibration sample in ``samples`` (token-weighted: each step counts once)."""
    out = {}
    for comp in COMPONENTS:
        total, steps = None, 0
        for i in samples:
            s = {kind: lst[i] for kind, lst in per_metric[comp].items()}
            rank = inputs.rank(metric, comp, s).double()
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

    kinds = get_metric(metric).kinds
    passes = {KINDS[kind].computed_by for kind in kinds}
    if "ig" in passes and ig_steps < 1:
        raise PipelineError(f"the {metric} metric needs ig_steps >= 1 (the IG steps of its score files)")
    device = next(model.parameters()).device
    prompt_ids = prompt_ids.to(device)
    with torch.no_grad():
        target = int(model(input_ids=prompt_ids, use_cache=False).logits[0, -1].argmax())
    own = attributor is None
    attributor = attributor or Attributor(model)
    try:
        raw = attributor.score_sample(prompt_ids, [target], gradients="backward" in passes,
                                      ig_steps=ig_steps if "ig" in passes else 0, batch_size=batch_size,
                                      step_mode="cached")
    finally:
        if own:
            attributor.close()
    inputs = RankInputs.of(attributor.layout, [metric], variant)
    return {comp: inputs.rank(metric, comp, {kind: raw[score_key(kind, comp)] for kind in kinds})[0]
            for comp in COMPONENTS}

"""How the sweep builds the per-token mask sources (METHOD §7b) for a run: which of the requested metrics each
can use, and its masker (utils/token_masks.py) with what it was calibrated or trained on.

Each builder is ``build(run, request, metrics, selected, weights) -> (masker or None, metrics it covers)``;
``request`` is the sweep's :class:`utils.sweep.SweepRequest` with the run's ``num_data``."""
from __future__ import annotations

import sys

from .artifacts import PREDICTOR_SCRIPT
from .errors import PipelineError
from .fingerprint import sha256_file
from .metric_registry import get_metric
from .predictor import PredictorMasker, read_predictors
from .sites import COMPONENTS
from .teal import TEAL_METRICS, TealMasker, calibrate_thresholds
from .token_masks import ONLINE_METRICS, OnlineMasker


def _note(text: str) -> None:
    print(f"note: {text}", file=sys.stderr)


def _usable(source: str, metrics: list, allowed, why: str) -> list:
    usable = [m for m in metrics if m in allowed]
    left = [m for m in metrics if m not in allowed]
    if left:
        _note(f"--source {source} {why}; no {source} curve for {', '.join(left)}")
    return usable


def online(run, request, metrics, selected, weights):
    usable = _usable("online", metrics, ONLINE_METRICS, f"ranks by {' or '.join(ONLINE_METRICS)} only")
    if not usable:
        return None, []
    return OnlineMasker(run.model, run.layout, weights, selected, usable), usable


def calibration_range(request) -> tuple[int, int]:
    """The calibration samples N .. N+M-1 (N: the evaluated samples, M: --calib_num_data)."""
    return request.num_data, request.num_data + request.calib_num_data


def teal(run, request, metrics, selected, weights):
    usable = _usable("teal", metrics, TEAL_METRICS, f"scores input channels by {' or '.join(TEAL_METRICS)} only")
    if not usable:
        return None, []
    lo, hi = calibration_range(request)
    labels = run.labels
    samples = [(labels.prompt_ids[i], labels.label_ids[i]) for i in range(lo, hi)]
    thresholds = calibrate_thresholds(run.model, samples, usable, request.ratios)
    return TealMasker(run.model, run.layout, weights, selected, usable, thresholds, request.ratios), usable


def score_identity(run, metric: str) -> dict:
    """What a predictor records of the score files it was trained on (their content's sha256), to notice
    that they were rewritten."""
    out = {}
    for comp in COMPONENTS:
        for kind in get_metric(metric).kinds:
            path = run.paths.score(kind, comp)
            out[str(path.relative_to(run.paths.root))] = sha256_file(path)
    return out


def predictor_record(run, metric: str, variant: str, lo: int, hi: int, settings: dict) -> dict:
    """What a metric's predictors are made from: what :func:`load_predictor` compares."""
    return {"run_id": run.labels.run_id, "metric": metric,
            "cor_gxo_variant": variant if metric == "cor_gxo" else None,
            "calibration_samples": [lo, hi - 1], "settings": settings, "score_files": score_identity(run, metric)}


def load_predictor(run, request, metric: str) -> dict:
    """``{comp: Predictor}`` of ``metric`` trained for this run and calibration range; a missing, damaged or
    stale file is a one-line error naming the command that retrains it."""
    lo, hi = calibration_range(request)
    path = run.paths.predictor(metric)
    fix = (f"run {PREDICTOR_SCRIPT} --num_data {lo} --calib_num_data {hi - lo} --metric_name {metric}"
           + (f" --cor_gxo_variant {request.cor_gxo_variant}" if metric == "cor_gxo" else ""))
    if not path.is_file():
        raise PipelineError(f"no trained predictor for {metric} ({path} is missing); {fix}")
    try:
        record, predictors = read_predictors(path)
    except ValueError as err:
        raise PipelineError(f"{path} is damaged (cannot be read: {err}); {fix}") from None
    wanted = predictor_record(run, metric, request.cor_gxo_variant, lo, hi, record.get("settings"))
    why = {"run_id": lambda have, want: f"for other labels (run {have}, these are run {want})",
           "metric": lambda have, want: f"for the metric {have}",
           "cor_gxo_variant": lambda have, want: f"with --cor_gxo_variant {have}",
           "calibration_samples": lambda have, want: f"on samples {have} (this sweep calibrates on {want})",
           "score_files": lambda have, want: "on score files that have been rewritten since"}
    for key, say in why.items():
        if record.get(key) != wanted[key]:
            raise PipelineError(f"{path} was trained {say(record.get(key), wanted[key])}; {fix}")
    layout = run.layout
    for comp in COMPONENTS:
        p = predictors[comp]
        if (p.mean.shape[0], p.bias.shape[1]) != (layout.num_layers, layout.units(comp)):
            raise PipelineError(f"{path} was trained for another model shape; {fix}")
    return predictors


def predictor(run, request, metrics, selected, weights):
    """The metrics with a trained predictor get a curve; a missing one is a note naming the command that
    trains it (the sweep refuses a request left with no curve at all), a stale or damaged one an error."""
    found, names, missing = [], [], []
    for m in metrics:
        if not run.paths.predictor(m).is_file():
            missing.append(m)
            continue
        found.append(load_predictor(run, request, m))
        names.append(m)
    lo, hi = calibration_range(request)
    train = f"{PREDICTOR_SCRIPT} --num_data {lo} --calib_num_data {hi - lo} --metric_name"
    if missing:
        _note(f"--source predictor: no trained predictor for {', '.join(missing)} in "
              f"{run.paths.predictor('x').parent}, so no curve for them ({train} {' '.join(missing)} trains them)")
    if not names:
        return None, []
    return PredictorMasker(run.model, run.layout, weights, selected, names, found), names


def build_maskers(sources, make) -> tuple[dict, dict]:
    """``({source: masker}, {source: the metrics it covers})`` from ``make(source) -> (masker or None,
    covered)`` for each of ``sources``.  A masker holds forward hooks on the model: if building one fails,
    those already built are removed before the error goes on, so no hook outlives the failure."""
    maskers, covered = {}, {}
    try:
        for src in sources:
            masker, covered[src] = make(src)
            if masker is not None:
                maskers[src] = masker
    except BaseException:
        for masker in maskers.values():
            masker.remove()
        raise
    return maskers, covered

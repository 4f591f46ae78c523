"""The predictor step (train_predictor.py, METHOD §7b): for each metric, the calibration samples' hidden states
entering every block and their stored per-token keep-scores -> per-layer predictors, their held-out recall@k
and their cost -> ``predictor/<metric>.pt`` and ``.json``."""
from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from .artifacts import SCORES_SCRIPT, score
from .errors import PipelineError
from .io import read_json, write_json
from .masks import RankInputs
from .metric_registry import get_metric
from .predictor import (PredictorSettings, block_inputs, fit, predictor_cost, rank_targets, read_predictors,
                        recall_at, save_predictors)
from .provenance import load_scores
from .sites import COMPONENTS
from .sparse_model import unique_params
from .token_sources import predictor_record

RECALL_RATIOS = (0.3, 0.5, 0.7)   # the deactivation ratios whose kept sets recall@k is reported for


def calibration_bounds(labels, num_data: int | None, calib_num_data: int) -> tuple[int, int]:
    """Samples ``lo .. hi-1`` to train on: after the ``num_data`` the sweep evaluates (default: all but the
    last ``calib_num_data`` labelled samples)."""
    lo = len(labels) - calib_num_data if num_data is None else num_data
    if lo < 1 or lo + calib_num_data > len(labels):
        raise PipelineError(f"the predictors train on samples N .. N+M-1 after the N evaluated ones (N = --num_data, "
                            f"M = --calib_num_data {calib_num_data}), but {labels.path} holds {len(labels)}; give "
                            f"--num_data N >= 1 with N + M <= {len(labels)}, or relabel more samples")
    return lo, lo + calib_num_data


def _scores(run, metric: str, hi: int) -> dict:
    """``{comp: {kind: list of tensors}}`` of the metric's score files, holding at least ``hi`` samples."""
    out = {}
    for comp in COMPONENTS:
        for kind in get_metric(metric).kinds:
            a = score(kind, comp)
            lst = load_scores(run.paths.score(kind, comp), run.labels, a.expected_shape(run.layout), a.producer)
            if len(lst) < hi:
                raise PipelineError(f"{run.paths.score(kind, comp)} holds {len(lst)} samples, but the predictors "
                                    f"train on samples up to {hi - 1}; rerun {a.producer} --num_data {hi}")
            out.setdefault(comp, {})[kind] = lst
    return out


def collect_features(run, lo: int, hi: int) -> tuple[dict, torch.Tensor]:
    """``({comp: [N, L, d]}, sample index of each token [N])``: the block inputs of every masked step
    (t >= 1) of samples lo .. hi-1."""
    feats, owner = {c: [] for c in COMPONENTS}, []
    labels = run.labels
    for i in tqdm(range(lo, hi), desc="block inputs", unit="sample", leave=False):
        if len(labels.label_ids[i]) < 2:
            continue
        got = block_inputs(run.model, run.layout, labels.prompt_ids[i], labels.label_ids[i])
        for c in COMPONENTS:
            feats[c].append(got[c])
        owner += [i] * got[COMPONENTS[0]].shape[0]
    if not owner:
        raise PipelineError(f"samples {lo}..{hi - 1} have no label of two or more tokens, so no masked step to train "
                            "on; calibrate on other samples")
    return {c: torch.cat(feats[c]) for c in COMPONENTS}, torch.tensor(owner)


def targets(run, metric: str, lo: int, hi: int, variant: str) -> dict:
    """``{comp: [N, L, units]}``: the metric's keep-scores (METHOD §4) at steps t >= 1 of samples lo .. hi-1,
    as ranks scaled to [0, 1]."""
    per = _scores(run, metric, hi)
    inputs = RankInputs.of(run.layout, [metric], variant)
    out = {}
    for comp in COMPONENTS:
        rows = [inputs.rank(metric, comp, {k: lst[i] for k, lst in per[comp].items()})[1:]
                for i in range(lo, hi) if len(run.labels.label_ids[i]) >= 2]
        out[comp] = rank_targets(torch.cat(rows).float())
    return out


def train_metric(run, metric: str, feats: dict, owner: torch.Tensor, lo: int, hi: int, variant: str,
                 settings: PredictorSettings) -> tuple[dict, dict]:
    """One metric's predictors and report (held-out recall@k per layer, losses, cost)."""
    y = targets(run, metric, lo, hi, variant)
    n_train = max(1, int(round((hi - lo) * (1 - settings.heldout))))
    train = owner < lo + n_train
    held = ~train
    predictors, report = {}, {"components": {}}
    for comp in COMPONENTS:
        p = fit(feats[comp], y[comp], train, settings, desc=f"{metric} {comp}")
        predictors[comp] = p
        entry = {}
        if bool(held.any()):
            with torch.no_grad():
                pred = p(feats[comp][held])
            entry["heldout_mse"] = float(((pred - y[comp][held]) ** 2).mean())
            entry["recall"] = {str(r): [round(float(v), 4) for v in recall_at(pred, y[comp][held], r)]
                               for r in RECALL_RATIOS}
            entry["mean_recall"] = {str(r): round(sum(v) / len(v), 4) for r, v in entry["recall"].items()}
        report["components"][comp] = entry
    model_params = sum(t.numel() for t in unique_params(run.model))
    report.update(cost=predictor_cost(predictors, model_params),
                  tokens={"train": int(train.sum()), "heldout": int(held.sum())},
                  samples={"train": [lo, lo + n_train - 1], "heldout": [lo + n_train, hi - 1] if hi > lo + n_train
                           else None})
    return predictors, report


def up_to_date(path, record: dict) -> bool:
    """The file holds predictors made from exactly ``record`` (resume: a finished metric is not retrained)."""
    if not path.is_file():
        return False
    try:
        have, _ = read_predictors(path)
    except ValueError:
        return False
    return have == record and path.with_suffix(".json").is_file()


def predictors_done(paths, labels, metrics: list[str], num_data: int | None, calib_num_data: int, variant: str,
                    settings: PredictorSettings) -> bool:
    """Every metric's predictors are on disk, made from exactly these labels, score files and settings
    (run_pipeline.py's done check)."""
    from types import SimpleNamespace

    try:
        lo, hi = calibration_bounds(labels, num_data, calib_num_data)
        run = SimpleNamespace(labels=labels, paths=paths)
        return all(up_to_date(paths.predictor(m), predictor_record(run, m, variant, lo, hi, vars(settings)))
                   for m in metrics)
    except (PipelineError, OSError):
        return False


def train_predictors(run, metrics: list[str], num_data: int | None, calib_num_data: int, variant: str,
                     settings: PredictorSettings, redo: bool = False) -> dict:
    """Train and write every metric's predictors (a metric already trained from the same inputs is kept);
    returns ``{metric: report}``."""
    lo, hi = calibration_bounds(run.labels, num_data, calib_num_data)
    records = {}
    for m in metrics:
        try:
            records[m] = predictor_record(run, m, variant, lo, hi, vars(settings))
        except FileNotFoundError:
            raise PipelineError(f"the {m} predictor trains on {m}'s score files, which are missing; run "
                                f"{SCORES_SCRIPT if m != 'magnitude' else 'Mag_attention.py and Mag_mlp.py'} "
                                "first") from None
    todo = [m for m in metrics if redo or not up_to_date(run.paths.predictor(m), records[m])]
    for m in metrics:
        if m not in todo:
            print(f"{m}: trained for these inputs already; kept ({run.paths.predictor(m)})")
    reports = {}
    if todo:
        began = time.time()
        feats, owner = collect_features(run, lo, hi)
        collect_s = time.time() - began
        for m in todo:
            began = time.time()
            _scores(run, m, hi)           # every score file is checked before the training starts
            predictors, report = train_metric(run, m, feats, owner, lo, hi, variant, settings)
            report.update(run_id=run.labels.run_id, metric=m, settings=vars(settings), block_inputs_seconds=round(collect_s, 1),
                          train_seconds=round(time.time() - began, 1), record=records[m])
            path = run.paths.predictor(m)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.with_suffix(".json").unlink(missing_ok=True)      # the report goes last: a crash leaves none
            save_predictors(path, predictors, records[m])
            write_json(path.with_suffix(".json"), report)
            reports[m] = report
    for m in metrics:
        reports.setdefault(m, read_json(run.paths.predictor(m).with_suffix(".json")))
    return reports

"""The sweep's results (METHOD §6): the per-sample rows aggregated into curves, the settings they answer,
and the files (``results.json``, ``results.csv``, ``per_sample.json``, one JSON per curve, the figures).
``results.json`` is written last and names the request it answers, the sha256 of every score file read and
of every file written, so :func:`sweep_done` can tell whether the folder holds exactly that sweep."""
from __future__ import annotations

import csv
import io
import math

import numpy as np

from .artifacts import KINDS, RESULT_FILES
from .errors import PipelineError
from .fingerprint import sha256_file
from .intervals import bootstrap_interval
from .io import read_json, write_json, write_text
from .labelset import load_labels
from .metric_registry import METRICS, get_metric
from .provenance import meta_path
from .quality import MEASURES
from .sites import ATTN, COMPONENTS
from .sources import SOURCES, curve_key


def figure_stem(plot_metric: str) -> str:
    """``tradeoff`` for BLEU (the name from before the other measures), ``tradeoff_<measure>`` for them."""
    return "tradeoff" if plot_metric == "bleu" else f"tradeoff_{plot_metric}"


def fingerprint(path) -> dict:
    """What a score file the sweep read was: its content's sha256 and its provenance."""
    meta = read_json(meta_path(path))
    return {"sha256": sha256_file(path), "run_id": meta.get("run_id"), "num_samples": meta.get("num_samples"),
            "n_steps": meta.get("n_steps")}


def _files_present(paths, metric: str) -> bool:
    return all(paths.score(kind, comp).is_file() for comp in COMPONENTS for kind in get_metric(metric).kinds)


def sweep_done(paths, run_id: str, request) -> bool:
    """True when ``paths.res`` holds a complete sweep of the labels ``run_id`` for exactly ``request`` (a
    :class:`utils.sweep.SweepRequest`), from score files of the same content since, with no metric's files
    added since (for ``all``), and every result file and figure holding the bytes the sweep wrote (a
    truncated, emptied or foreign file is not done).  run_pipeline.py skips the sweep then."""
    try:
        results = read_json(paths.results)
        recorded = results["settings"]
        wanted = request.recorded()
        if wanted.get("num_data") is None:
            wanted["num_data"] = len(load_labels(paths.labels))
        if recorded.get("labels_run_id") != run_id or recorded.get("request") != wanted:
            return False
        for rel, fp in recorded.get("score_files", {}).items():
            if fingerprint(paths.root / rel) != fp:
                return False
        for rel, fp in recorded.get("predictor_files", {}).items():     # retrained since: stale curves
            if sha256_file(paths.root / rel) != fp:
                return False
        if any(_files_present(paths, m) for m in recorded.get("metrics_skipped", [])):
            return False
        # results.json itself was read above; every other file must hold the bytes it recorded
        names = [n for n in RESULT_FILES if n != "results.json"] + [f"{key}.json" for key in results["curves"]]
        names += [figure_stem(m) + ext for m in wanted["plot_metrics"] for ext in (".png", ".pdf")]
        written = results["files"]
        return all(sha256_file(paths.res / n) == written[n] for n in names)
    except (OSError, KeyError, TypeError, ValueError, AttributeError, PipelineError):
        return False


def measure_samples(rows: list[dict], measure: str) -> tuple[list, list | None, object]:
    """``(values, weights, transform)`` of ``rows`` (one per sample) whose (weighted) mean, mapped through
    ``transform``, is the curve's ``measure`` (see :func:`aggregate`): BLEU and token agreement plain means;
    KL weighted by masked steps; perplexity exp of the step-weighted mean log-perplexity.  Rows without a
    KL (no masked step) carry no KL or perplexity.  The one definition the intervals and compare.py use."""
    if measure in ("bleu", "token_agreement"):
        return [r[measure] for r in rows], None, None
    scored = [r for r in rows if r["kl"] is not None]
    steps = [r["masked_steps"] for r in scored]
    if measure == "kl":
        return [r["kl"] for r in scored], steps, None
    if measure == "ppl":
        return [math.log(r["ppl"]) for r in scored], steps, np.exp
    raise PipelineError(f"unknown measure {measure!r}: one of {', '.join(MEASURES)}")


def aggregate(rows: list[dict], variants, ratios, counts) -> dict:
    """Per (metric, source) and ratio: mean BLEU and token agreement over samples; activation ratio = kept
    parameter weight / total over all samples' masked steps (a token-weighted share); KL and perplexity
    over all samples' masked steps (token-weighted: KL the mean, perplexity exp of the mean NLL); and for
    each quality measure ``<measure>_ci``, its 95 % bootstrap interval over the samples."""
    curves = {}
    for m, src in variants:
        points = []
        for p in ratios:
            sel = [r for r in rows if r["metric"] == m and r["source"] == src and r["ratio"] == float(p)]
            total = sum(r["total_weight"] for r in sel)
            scored = [r for r in sel if r["kl"] is not None]
            steps = sum(r["masked_steps"] for r in scored)
            points.append({
                "deactivation_ratio": float(p),
                "activation_ratio": sum(r["kept_weight"] for r in sel) / total if total else 1.0,
                "bleu": sum(r["bleu"] for r in sel) / len(sel) if sel else float("nan"),
                "token_agreement": sum(r["token_agreement"] for r in sel) / len(sel) if sel else float("nan"),
                "kl": sum(r["kl"] * r["masked_steps"] for r in scored) / steps if steps else None,
                "ppl": math.exp(sum(math.log(r["ppl"]) * r["masked_steps"] for r in scored) / steps)
                if steps else None,
                "samples": len(sel),
                # 95 % bootstrap intervals over the samples (utils/intervals.py), the same statistic as above
                **{f"{measure}_ci": bootstrap_interval(*measure_samples(sel, measure)) for measure in MEASURES}})
        curves[curve_key(m, src)] = {"metric": m, "source": src, "samples": counts[m], "points": points}
    return {"curves": curves}


def sweep_settings(run, request, metrics: list[str], skipped: list[str], weights, predictor_files=()) -> dict:
    """What ``results.json`` records beside the curves: the labels, the request, the model's sizes and a
    fingerprint of every score file read (``request``: a SweepRequest with the run's ``num_data``)."""
    N, M = request.num_data, request.calib_num_data
    used = sorted({(k, c) for m in metrics for c in COMPONENTS for k in get_metric(m).kinds})
    ig_kinds = [k for k, _ in used if KINDS[k].computed_by == "ig"]
    ig_steps = read_json(meta_path(run.paths.score(ig_kinds[0], ATTN))).get("n_steps") if ig_kinds else None
    layout, labels = run.layout, run.labels
    return {"labels_run_id": labels.run_id, "labels_settings": labels.settings, "num_data": N,
            "ratios": list(request.ratios), "mask_layers": request.mask_layers,
            "cor_gxo_variant": request.cor_gxo_variant, "sources": request.sources,
            "calibration_samples": None if M is None else [N, N + M - 1],
            "ig_n_steps": ig_steps, "unit_weights": weights.as_dict(),
            "layers": layout.num_layers, "heads": layout.num_heads, "neurons": layout.intermediate,
            "request": request.recorded(), "metrics_skipped": skipped,
            "score_files": {str(run.paths.score(k, c).relative_to(run.paths.root)):
                            fingerprint(run.paths.score(k, c)) for k, c in used},
            "predictor_files": {str(p.relative_to(run.paths.root)): sha256_file(p) for p in predictor_files}}


def _is_curve_file(name: str) -> bool:
    """A per-curve JSON of this sweep's naming (``<metric>.json``, ``<metric>@<source>.json``)."""
    if not name.endswith(".json"):
        return False
    metric, _, source = name[:-len(".json")].partition("@")
    return metric in METRICS and (source == "" or source in SOURCES)


def write_results(folder, results: dict, rows: list[dict], plot_metrics=("bleu",)) -> None:
    """Replace the folder's sweep results: ``results.json`` goes first (so a crash in between leaves no
    results.json beside half-replaced files, which marks the folder as unfinished) and comes back last,
    recording the sha256 of every other file written (``files``); per-curve JSONs and figures of curves or
    measures this sweep does not have are deleted."""
    from .plotting import plot_tradeoff

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").unlink(missing_ok=True)
    keep = {f"{key}.json" for key in results["curves"]}
    figures = {figure_stem(m) + ext for m in plot_metrics for ext in (".png", ".pdf")}
    for path in folder.iterdir():
        stale_curve = _is_curve_file(path.name) and path.name not in keep
        stale_figure = path.name.startswith("tradeoff") and path.suffix in (".png", ".pdf") and path.name not in figures
        if path.is_file() and (stale_curve or stale_figure):
            path.unlink()
    for key, curve in results["curves"].items():
        write_json(folder / f"{key}.json", {**curve, "settings": results["settings"]})
    write_json(folder / "per_sample.json", rows)
    write_text(folder / "results.csv", _csv(results))
    for measure in plot_metrics:
        plot_tradeoff(results, folder / figure_stem(measure), measure)
    written = [n for n in RESULT_FILES if n != "results.json"] + sorted(keep) + sorted(figures)
    results["files"] = {name: sha256_file(folder / name) for name in written}
    write_json(folder / "results.json", results)


def _csv(results: dict) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["metric", "source", "deactivation_ratio", "activation_ratio", "bleu", "token_agreement",
                     "kl", "ppl", "samples"] + [f"{m}_ci_{end}" for m in MEASURES for end in ("low", "high")])
    for curve in results["curves"].values():
        for pt in curve["points"]:
            writer.writerow([curve["metric"], curve["source"], pt["deactivation_ratio"],
                             f"{pt['activation_ratio']:.6f}", f"{pt['bleu']:.4f}", f"{pt['token_agreement']:.6f}",
                             "" if pt["kl"] is None else f"{pt['kl']:.6g}",
                             "" if pt["ppl"] is None else f"{pt['ppl']:.6g}", pt["samples"]] + _ci_cells(pt))
    return buf.getvalue()


def _ci_cells(point: dict) -> list[str]:
    """The low and high end of each measure's interval (empty where the point has none)."""
    cells = []
    for measure in MEASURES:
        ci = point.get(f"{measure}_ci")
        cells += ["", ""] if ci is None else [f"{ci[0]:.6g}", f"{ci[1]:.6g}"]
    return cells

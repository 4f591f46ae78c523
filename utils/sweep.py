"""The sparsity sweep (METHOD §5, §7): for each sample, every requested metric x mask source x deactivation
ratio is decoded in one batch and scored teacher-forced; quality against the dense label and the
activation ratio are aggregated.  ``results.json`` is written last and names the request it answers, so
:func:`sweep_done` can tell whether the folder already holds this sweep."""
from __future__ import annotations

import csv
import io
import json
import math
import os
import sys

import torch
from tqdm.auto import tqdm

from . import artifacts
from .artifacts import RESULT_FILES
from .errors import PipelineError
from .generation import (cache_bytes_per_position, can_generate_many, decode_groups, decode_memory_budget,
                         masked_generate, masked_generate_many, prompt_state)
from .distributed import current_shard, map_samples, open_checkpoint
from .io import read_json, write_json, write_text
from .masks import (METRIC_NAMES, apply_layer_selection, check_ratios, files_needed, kept_weight, layer_selection,
                    output_weight_norms, ranking, unit_weights)
from .metrics import bleu, teacher_forced_quality, token_agreement
from .models import eos_token_ids
from .labelset import load_labels
from .provenance import load_scores, meta_path
from .sites import ATTN, COMPONENTS, SiteHooks
from .sources import (DEFAULT_CALIB_NUM_DATA, SOURCES, curve_key, parse_sources, source_keep_masks,
                      static_keep_scores)

PLOT_METRICS = ("bleu", "token_agreement", "kl", "ppl")   # the y-axes the trade-off figure can show


def figure_stem(plot_metric: str) -> str:
    """``tradeoff`` for BLEU (today's name), ``tradeoff_<measure>`` for the others."""
    return "tradeoff" if plot_metric == "bleu" else f"tradeoff_{plot_metric}"


def sweep_request(metric_name, *, ratios, mask_layers=None, variant: str = "paper", sources=("oracle",),
                  num_data: int | None = None, calib_num_data: int | None = None, plot_metrics=("bleu",)) -> dict:
    """The settings that define a sweep, checked and normalised (recorded in ``results.json``; compare
    with :func:`sweep_done`).  ``metric_name``: a list of metrics, or ``["all"]`` (those whose files exist).
    ``num_data`` None: every labelled sample.  ``calib_num_data`` None: the default when ``static`` is
    requested, nothing otherwise."""
    names = list(metric_name)
    if names != ["all"]:
        unknown = [m for m in names if m not in METRIC_NAMES]
        if unknown:
            raise PipelineError(f"unknown --metric_name {', '.join(unknown)}; choose from {', '.join(METRIC_NAMES)} or all")
        repeated = sorted({m for m in names if names.count(m) > 1})
        if repeated:
            raise PipelineError(f"--metric_name repeats {', '.join(repeated)}; give each metric once")
    sources = parse_sources(sources)
    plots = list(dict.fromkeys(plot_metrics))
    bad = [m for m in plots if m not in PLOT_METRICS]
    if bad or not plots:
        raise PipelineError(f"unknown --plot_metric {', '.join(bad)}; choose from {', '.join(PLOT_METRICS)}")
    if "static" in sources:
        calib_num_data = DEFAULT_CALIB_NUM_DATA if calib_num_data is None else calib_num_data   # >= 1: main.py's flag
    elif calib_num_data is not None:
        raise PipelineError("--calib_num_data only applies to --source static; drop it or add static")
    return {"metric_name": names, "sources": sources, "ratios": check_ratios(ratios),
            "mask_layers": "all" if mask_layers is None else list(mask_layers), "cor_gxo_variant": variant,
            "num_data": num_data, "calib_num_data": calib_num_data, "plot_metrics": plots}


def _fingerprint(path) -> dict:
    """Enough to notice that a score file was rewritten after the sweep read it."""
    st = os.stat(path)
    meta = read_json(meta_path(path))
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "run_id": meta.get("run_id"),
            "num_samples": meta.get("num_samples"), "n_steps": meta.get("n_steps")}


def _files_present(paths, metric: str) -> bool:
    return all(paths.score(kind, comp).is_file() for comp in COMPONENTS for kind in files_needed(metric))


def sweep_done(paths, run_id: str, settings: dict) -> bool:
    """True when ``paths.res`` holds a complete sweep of the labels ``run_id`` for exactly ``settings``
    (a :func:`sweep_request` dict), from score files unchanged since, with no metric's files added since
    (for ``all``), and every result file and figure in place.  run_pipeline.py skips the sweep then."""
    try:
        results = read_json(paths.results)
        recorded = results["settings"]
        request = dict(settings)
        if request.get("num_data") is None:
            request["num_data"] = len(load_labels(paths.labels))
        if recorded.get("labels_run_id") != run_id or recorded.get("request") != request:
            return False
        for rel, fp in recorded.get("score_files", {}).items():
            if _fingerprint(paths.root / rel) != fp:
                return False
        if any(_files_present(paths, m) for m in recorded.get("metrics_skipped", [])):
            return False
        names = list(RESULT_FILES) + [f"{key}.json" for key in results["curves"]]
        names += [figure_stem(m) + ext for m in request["plot_metrics"] for ext in (".png", ".pdf")]
        return all((paths.res / n).is_file() for n in names)
    except (OSError, KeyError, TypeError, ValueError, PipelineError):
        return False


def load_metric_scores(run, metric_names: list[str], explicit: bool) -> tuple[dict, list[str]]:
    """``({metric: {comp: {kind: list of tensors}}}, skipped metrics)``.  With ``explicit`` False
    (``--metric_name all``), a metric whose score files are *missing* is skipped with a note; a file that
    is there but damaged, from other labels, of the wrong shape or non-finite is an error naming it."""
    cache, out, skipped = {}, {}, []
    for metric in metric_names:
        needed = [artifacts.score(kind, comp) for comp in COMPONENTS for kind in files_needed(metric)]
        missing = [a for a in needed if not run.paths.score(a.kind, a.component).is_file()]
        if missing and not explicit:
            print(f"note: skipping {metric}: {run.paths.score(missing[0].kind, missing[0].component)} is missing "
                  f"(run {missing[0].producer} to add it)", file=sys.stderr)
            skipped.append(metric)
            continue
        per = {}
        for a in needed:
            if a.name not in cache:
                cache[a.name] = load_scores(run.paths.score(a.kind, a.component), run.labels,
                                            a.expected_shape(run.layout), a.producer)
            per.setdefault(a.component, {})[a.kind] = cache[a.name]
        out[metric] = per
    if not out:
        raise PipelineError(f"no metric has its score files; run {artifacts.all_scores_hint()} first")
    return out, skipped


def metric_sample_count(per_metric: dict) -> int:
    return min(len(lst) for comp in per_metric.values() for lst in comp.values())


def metric_ranks(per_metric: dict, metric: str, i: int, head_dim: int, variant: str, out_norm=None,
                 device=None) -> dict:
    """Per-step keep-scores ``{comp: [T, L, units]}`` of one metric for sample ``i``, on ``device`` (the
    model's: sorting every step's and layer's scores is real work)."""
    out = {}
    for comp in COMPONENTS:
        s = {kind: lst[i].to(device) for kind, lst in per_metric[comp].items()}
        if out_norm is not None:
            s["out_norm"] = out_norm[comp]
        out[comp] = ranking(metric, comp, s, head_dim, variant)
    return out


def sample_keep_masks(per_metric: dict, metric: str, i: int, ratios, selected, head_dim, variant,
                      device=None, source: str = "oracle", static_rank=None, out_norm=None) -> dict:
    """Bool keep-masks ``{comp: [R, T, L, units]}`` of one metric and mask source for sample ``i``."""
    ranks = metric_ranks(per_metric, metric, i, head_dim, variant, out_norm, device)
    return {comp: apply_layer_selection(source_keep_masks(source, ranks[comp], ratios,
                                                          None if static_rank is None else static_rank[comp]),
                                        selected)
            for comp in COMPONENTS}


def distinct_variants(keep: dict) -> tuple[list[int], list[int]]:
    """``(first, copy_of)``: the index of the first variant of each distinct mask (in order), and for every
    variant the position in ``first`` of the variant it equals.  ``keep[comp]``: bool ``[B, T, L, units]``;
    two variants are equal when every component's masks are."""
    first, copy_of, seen = [], [], {}
    flat = torch.cat([keep[c].reshape(keep[c].shape[0], -1) for c in COMPONENTS], dim=1).cpu()
    for b in range(flat.shape[0]):
        key = flat[b].numpy().tobytes()
        if key not in seen:
            seen[key] = len(first)
            first.append(b)
        copy_of.append(seen[key])
    return first, copy_of


GPU_SAMPLE_BATCH = 8   # samples decoded together on a GPU, where a pass costs its kernel launches: 8 x ~64
                       # variants is ~500 rows, still launch-bound for these models, and XSum's padded
                       # caches then take ~11 GB


def auto_sample_batch(device) -> int:
    """Samples the sweep decodes together by default: one on a CPU (arithmetic-bound, so batching saves
    nothing there and the padded attention would only add work), ``GPU_SAMPLE_BATCH`` on a GPU."""
    return GPU_SAMPLE_BATCH if torch.device(device).type == "cuda" else 1


def run_sweep(run, metric_names: list[str], *, explicit: bool, ratios, mask_layers=None,
              variant: str = "paper", batch_size: int = 0, sources=("oracle",), calib_num_data=None,
              plot_metrics=("bleu",), sample_batch: int = 0) -> dict:
    """Masked generation of every sample for every (metric, source, ratio); returns and writes the results.

    ``batch_size``: masked variants per forward (0: all of a sample's).  ``sample_batch``: samples decoded
    together (0: :func:`auto_sample_batch`); with a ``batch_size`` given, one sample at a time."""
    request = sweep_request(["all"] if not explicit else metric_names, ratios=ratios, mask_layers=mask_layers,
                            variant=variant, sources=sources, num_data=run.num_data,
                            calib_num_data=calib_num_data, plot_metrics=plot_metrics)
    ratios, sources, M = request["ratios"], request["sources"], request["calib_num_data"]
    scores, skipped = load_metric_scores(run, metric_names, explicit)
    metrics = list(scores)
    counts = {m: min(run.num_data, metric_sample_count(scores[m])) for m in metrics}
    layout, labels, tok = run.layout, run.labels, run.tokenizer
    selected = layer_selection(mask_layers, layout.num_layers)
    weights = unit_weights(layout)
    out_norm = output_weight_norms(layout) if "wina" in metrics else None
    N = run.num_data
    static = {}
    if "static" in sources:
        if N + M > len(labels):
            raise PipelineError(f"--source static calibrates on samples {N}..{N + M - 1} (after the {N} evaluated: "
                                f"--num_data {N}, --calib_num_data {M}), but {labels.path} holds {len(labels)}; "
                                f"give --num_data N with N + {M} <= {len(labels)}, lower --calib_num_data, or rerun "
                                f"{artifacts.LABELS.producer} --num_data {N + M} and the score steps")
        for m in metrics:
            have = metric_sample_count(scores[m])
            if have < N + M:
                msg = (f"--source static calibrates {m} on samples {N}..{N + M - 1}, but its score files hold "
                       f"{have} samples; rerun its score step with --num_data {N + M}, or lower --calib_num_data")
                if explicit:
                    raise PipelineError(msg)
                print(f"note: skipping {m}@static: {msg}", file=sys.stderr)
                continue
            static[m] = static_keep_scores(scores[m], m, range(N, N + M), layout.head_dim, variant, out_norm)
    # the curves, in order: sources outer (oracle first: today's files come first), metrics inner
    variants = [(m, src) for src in sources for m in metrics if src != "static" or m in static]
    eos = labels.settings.get("eos_token_ids") or eos_token_ids(run.model, tok)
    hooks = SiteHooks(run.model, layout)
    key = json.dumps({"run_id": labels.run_id, "variants": variants, "counts": counts, "request": request,
                      "quality": ["bleu", "token_agreement", "kl", "ppl"]})
    ckpt = open_checkpoint(run.paths.res / ".sweep", key)
    R = len(ratios)
    device = next(run.model.parameters()).device
    group = 1 if batch_size > 0 else sample_batch if sample_batch > 0 else auto_sample_batch(device)

    def prepare(i):
        """Sample i's distinct masks and dense prompt state (None: nothing to decode)."""
        active = [(m, src) for m, src in variants if i < counts[m]]
        label = labels.label_ids[i]
        if not (active and label):
            return None
        masks = [sample_keep_masks(scores[m], m, i, ratios, selected, layout.head_dim, variant, device,
                                   source=src, static_rank=static.get(m), out_norm=out_norm)
                 for m, src in active]
        keep = {c: torch.cat([mk[c] for mk in masks]) for c in COMPONENTS}   # [V*R, T, L, U]
        kept, total = kept_weight(keep, weights)
        prompt = torch.tensor([labels.prompt_ids[i]])
        # variants with the same masks (every metric at ratio 0, for one) decode and score once
        first, copy_of = distinct_variants(keep)
        return {"i": i, "active": active, "label": label, "prompt": prompt, "kept": kept, "total": total,
                "unique": {c: keep[c][first] for c in COMPONENTS}, "copy_of": copy_of,
                "state": prompt_state(run.model, prompt)}

    def decode_one(job):
        step = batch_size if batch_size > 0 else len(job["copy_of"])
        unique, decoded = job["unique"], []
        for s in range(0, unique[ATTN].shape[0], step):
            part = {c: unique[c][s:s + step] for c in COMPONENTS}
            decoded.extend(masked_generate(run.model, hooks, job["prompt"], part, eos, len(job["label"]),
                                           state=job["state"]))
        return decoded

    def decode(jobs):
        """Each job's distinct variants decoded: several samples in one batch where allowed, in groups whose
        padded caches fit the device's memory."""
        if len(jobs) < 2 or not can_generate_many(run.model, [j["prompt"].shape[1] for j in jobs],
                                                  [len(j["label"]) for j in jobs]):
            return [decode_one(j) for j in jobs]
        sizes = [(j["unique"][ATTN].shape[0], j["prompt"].shape[1] + len(j["label"]),
                  cache_bytes_per_position(j["state"][1])) for j in jobs]
        decoded = []
        for group in decode_groups(sizes, decode_memory_budget(device)):
            part = [jobs[g] for g in group]
            if len(part) == 1:
                decoded.append(decode_one(part[0]))
                continue
            decoded.extend(masked_generate_many(run.model, hooks, [j["state"] for j in part],
                                                [j["unique"] for j in part], eos, [len(j["label"]) for j in part]))
        return decoded

    def rows_of(job, decoded):
        i, label, copy_of = job["i"], job["label"], job["copy_of"]
        outputs = [decoded[j] for j in copy_of]
        quality = teacher_forced_quality(run.model, hooks, job["prompt"], label, job["unique"], batch_size,
                                         prompt_cache=job["state"][1])
        if quality is not None:
            quality = {k: v[copy_of] for k, v in quality.items()}
        sample_rows = []
        for b, ids in enumerate(outputs):
            text = tok.decode(ids, skip_special_tokens=True)
            metric, src = job["active"][b // R]
            sample_rows.append({"sample": i, "metric": metric, "source": src, "ratio": float(ratios[b % R]),
                                "bleu": bleu(text, labels.texts[i]),
                                "token_agreement": token_agreement(ids, label),
                                "kl": None if quality is None else float(quality["kl"][b]),
                                "ppl": None if quality is None else math.exp(float(quality["nll"][b])),
                                "masked_steps": len(label) - 1,
                                "kept_weight": float(job["kept"][b]), "total_weight": float(job["total"][b]),
                                "output": text})
        return sample_rows

    def sweep_group(indices):
        jobs = {i: prepare(i) for i in indices}
        live = [job for job in jobs.values() if job is not None]
        decoded = dict(zip((j["i"] for j in live), decode(live))) if live else {}
        out = []
        for i in indices:
            out.append(rows_of(jobs[i], decoded[i]) if jobs[i] is not None else [])
            bar.update(1)
        return out

    bar = tqdm(total=run.num_data, desc="sweep", unit="sample", disable=not current_shard().is_main)
    try:
        with bar:
            per_sample = map_samples(ckpt, run.num_data, sweep_group, skipped=lambda i: bar.update(1),
                                     group=group)
    finally:
        hooks.remove()
    if per_sample is None:  # another process writes the results
        return None
    rows = [row for sample_rows in per_sample for row in sample_rows]
    results = aggregate(rows, variants, ratios, counts)
    used = sorted({(k, c) for m in metrics for c in COMPONENTS for k in files_needed(m)})
    ig_steps = None
    if "ig" in metrics:
        ig_steps = read_json(meta_path(run.paths.score("ig", ATTN))).get("n_steps")
    results["settings"] = {"labels_run_id": labels.run_id, "labels_settings": labels.settings,
                           "num_data": run.num_data, "ratios": list(ratios),
                           "mask_layers": "all" if mask_layers is None else mask_layers,
                           "cor_gxo_variant": variant, "sources": sources,
                           "calibration_samples": None if M is None else [N, N + M - 1],
                           "ig_n_steps": ig_steps, "unit_weights": weights.as_dict(),
                           "layers": layout.num_layers, "heads": layout.num_heads,
                           "neurons": layout.intermediate, "request": request, "metrics_skipped": skipped,
                           "score_files": {str(run.paths.score(k, c).relative_to(run.paths.root)):
                                           _fingerprint(run.paths.score(k, c)) for k, c in used}}
    write_results(run.paths.res, results, rows, request["plot_metrics"])
    ckpt.finish()
    return results


def aggregate(rows: list[dict], variants, ratios, counts) -> dict:
    """Per (metric, source) and ratio: mean BLEU and token agreement over samples; activation ratio = kept
    parameter weight / total over all samples' masked steps (a token-weighted share); KL and perplexity
    over all samples' masked steps (token-weighted: KL the mean, perplexity exp of the mean NLL)."""
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
                "samples": len(sel)})
        curves[curve_key(m, src)] = {"metric": m, "source": src, "samples": counts[m], "points": points}
    return {"curves": curves}


def _is_curve_file(name: str) -> bool:
    """A per-curve JSON of this sweep's naming (``<metric>.json``, ``<metric>@<source>.json``)."""
    if not name.endswith(".json"):
        return False
    metric, _, source = name[:-len(".json")].partition("@")
    return metric in METRIC_NAMES and (source == "" or source in SOURCES)


def write_results(folder, results: dict, rows: list[dict], plot_metrics=("bleu",)) -> None:
    """Replace the folder's sweep results: ``results.json`` goes first (so a crash in between leaves no
    results.json beside half-replaced files, which marks the folder as unfinished) and comes back last;
    per-curve JSONs and figures of curves or measures this sweep does not have are deleted."""
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
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["metric", "source", "deactivation_ratio", "activation_ratio", "bleu", "token_agreement",
                     "kl", "ppl", "samples"])
    for curve in results["curves"].values():
        for pt in curve["points"]:
            writer.writerow([curve["metric"], curve["source"], pt["deactivation_ratio"],
                             f"{pt['activation_ratio']:.6f}", f"{pt['bleu']:.4f}", f"{pt['token_agreement']:.6f}",
                             "" if pt["kl"] is None else f"{pt['kl']:.6g}",
                             "" if pt["ppl"] is None else f"{pt['ppl']:.6g}", pt["samples"]])
    write_text(folder / "results.csv", buf.getvalue())
    for measure in plot_metrics:
        plot_tradeoff(results, folder / figure_stem(measure), measure)
    write_json(folder / "results.json", results)

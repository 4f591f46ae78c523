"""The sparsity sweep (METHOD §5): for each sample, every requested metric at every deactivation ratio
is decoded in one batch; quality against the dense label and the activation ratio are aggregated."""
from __future__ import annotations

import csv
import io
import json
import sys

import torch
from tqdm.auto import tqdm

from .errors import PipelineError
from .generation import masked_generate
from .distributed import current_shard, map_samples, open_checkpoint
from .io import write_json, write_text
from .masks import (METRIC_NAMES, apply_layer_selection, files_needed, keep_masks, kept_weight, layer_selection,
                    ranking, unit_weights)
from .metrics import bleu, token_agreement
from .models import eos_token_ids
from .provenance import load_scores
from .sites import ATTN, COMPONENTS, MLP, SiteHooks

PRODUCERS = {"magnitude": {ATTN: "Mag_attention.py", MLP: "Mag_mlp.py"},
             "gradient": "attribution_attention.py --metric gradient",
             "gxo": "attribution_attention.py --metric gxo", "grad_norm": "attribution_attention.py --metric gxo",
             "ig": "attribution_attention.py --metric ig"}


def producer_of(kind: str, comp: str) -> str:
    p = PRODUCERS[kind]
    return p[comp] if isinstance(p, dict) else p


def load_metric_scores(run, metric_names: list[str], explicit: bool) -> dict:
    """``{metric: {comp: {kind: list of tensors}}}``.  With ``explicit`` False (``--metric_name all``), a
    metric whose files are missing is skipped with a warning instead of stopping the run."""
    layout, cache, out = run.layout, {}, {}

    def shape(kind, comp):
        units = layout.units(comp)
        return (lambda T: (T, layout.num_layers)) if kind == "grad_norm" else \
            (lambda T: (T, layout.num_layers, units))

    for metric in metric_names:
        try:
            per = {}
            for comp in COMPONENTS:
                per[comp] = {}
                for kind in files_needed(metric):
                    if (kind, comp) not in cache:
                        cache[(kind, comp)] = load_scores(run.paths.score(kind, comp), run.labels,
                                                          shape(kind, comp), producer_of(kind, comp))
                    per[comp][kind] = cache[(kind, comp)]
            out[metric] = per
        except PipelineError as err:
            if explicit:
                raise
            print(f"note: skipping {metric}: {err}", file=sys.stderr)
    if not out:
        raise PipelineError("no metric has its score files; run Mag_attention.py, Mag_mlp.py and "
                            "attribution_attention.py first")
    return out


def metric_sample_count(per_metric: dict) -> int:
    return min(len(lst) for comp in per_metric.values() for lst in comp.values())


def sample_keep_masks(per_metric: dict, metric: str, i: int, ratios, selected, head_dim, variant,
                      device=None) -> dict:
    """Bool keep-masks ``{comp: [R, T, L, units]}`` of one metric for sample ``i``, built on ``device``
    (the model's: sorting every step's and layer's scores is real work, and torchrun gives each CPU
    process one thread)."""
    out = {}
    for comp in COMPONENTS:
        s = {kind: lst[i].to(device) for kind, lst in per_metric[comp].items()}
        rank = ranking(metric, comp, s, head_dim, variant)
        out[comp] = apply_layer_selection(keep_masks(rank, ratios), selected)
    return out


def run_sweep(run, metric_names: list[str], *, explicit: bool, ratios, mask_layers=None,
              variant: str = "paper", batch_size: int = 0) -> dict:
    """Masked generation of every sample for every (metric, ratio); returns and writes the results."""
    for m in metric_names:
        if m not in METRIC_NAMES:
            raise PipelineError(f"unknown metric {m!r}; choose from {', '.join(METRIC_NAMES)} or all")
    scores = load_metric_scores(run, metric_names, explicit)
    metrics = list(scores)
    counts = {m: min(run.num_data, metric_sample_count(scores[m])) for m in metrics}
    layout, labels, tok = run.layout, run.labels, run.tokenizer
    selected = layer_selection(mask_layers, layout.num_layers)
    weights = unit_weights(layout)
    eos = labels.settings.get("eos_token_ids") or eos_token_ids(run.model, tok)
    hooks = SiteHooks(run.model, layout)
    key = json.dumps({"run_id": labels.run_id, "metrics": metrics, "counts": counts, "ratios": list(ratios),
                      "mask_layers": mask_layers, "variant": variant})
    ckpt = open_checkpoint(run.paths.res / ".sweep", key)
    R = len(ratios)
    device = next(run.model.parameters()).device

    def sweep_one(i):
        active = [m for m in metrics if i < counts[m]]
        label = labels.label_ids[i]
        sample_rows = []
        if active and label:
            masks = [sample_keep_masks(scores[m], m, i, ratios, selected, layout.head_dim, variant, device)
                     for m in active]
            keep = {c: torch.cat([mk[c] for mk in masks]) for c in COMPONENTS}   # [M*R, T, L, U]
            kept, total = kept_weight(keep, weights)
            prompt = torch.tensor([labels.prompt_ids[i]])
            step = batch_size if batch_size > 0 else keep[ATTN].shape[0]
            outputs = []
            for s in range(0, keep[ATTN].shape[0], step):
                part = {c: keep[c][s:s + step] for c in COMPONENTS}
                outputs.extend(masked_generate(run.model, hooks, prompt, part, eos, len(label)))
            for b, ids in enumerate(outputs):
                text = tok.decode(ids, skip_special_tokens=True)
                sample_rows.append({"sample": i, "metric": active[b // R], "ratio": float(ratios[b % R]),
                                    "bleu": bleu(text, labels.texts[i]),
                                    "token_agreement": token_agreement(ids, label),
                                    "kept_weight": float(kept[b]), "total_weight": float(total[b]),
                                    "output": text})
        bar.update(1)
        return sample_rows

    bar = tqdm(total=run.num_data, desc="sweep", unit="sample", disable=not current_shard().is_main)
    try:
        with bar:
            per_sample = map_samples(ckpt, run.num_data, sweep_one, skipped=lambda i: bar.update(1))
    finally:
        hooks.remove()
    if per_sample is None:  # another process writes the results
        return None
    rows = [row for sample_rows in per_sample for row in sample_rows]
    results = aggregate(rows, metrics, ratios, counts)
    results["settings"] = {"labels_run_id": labels.run_id, "labels_settings": labels.settings,
                           "num_data": run.num_data, "ratios": list(ratios),
                           "mask_layers": "all" if mask_layers is None else mask_layers,
                           "cor_gxo_variant": variant, "unit_weights": weights.as_dict(),
                           "layers": layout.num_layers, "heads": layout.num_heads,
                           "neurons": layout.intermediate}
    write_results(run.paths.res, results, rows)
    ckpt.finish()
    return results


def aggregate(rows: list[dict], metrics, ratios, counts) -> dict:
    """Per metric and ratio: mean BLEU and token agreement over samples; activation ratio = kept
    parameter weight / total over all samples' masked steps (a token-weighted share)."""
    curves = {}
    for m in metrics:
        points = []
        for p in ratios:
            sel = [r for r in rows if r["metric"] == m and r["ratio"] == float(p)]
            total = sum(r["total_weight"] for r in sel)
            points.append({
                "deactivation_ratio": float(p),
                "activation_ratio": sum(r["kept_weight"] for r in sel) / total if total else 1.0,
                "bleu": sum(r["bleu"] for r in sel) / len(sel) if sel else float("nan"),
                "token_agreement": sum(r["token_agreement"] for r in sel) / len(sel) if sel else float("nan"),
                "samples": len(sel)})
        curves[m] = {"samples": counts[m], "points": points}
    return {"curves": curves}


def write_results(folder, results: dict, rows: list[dict]) -> None:
    from .plotting import plot_tradeoff

    folder.mkdir(parents=True, exist_ok=True)
    for metric, curve in results["curves"].items():
        write_json(folder / f"{metric}.json", {"metric": metric, **curve, "settings": results["settings"]})
    write_json(folder / "results.json", results)
    write_json(folder / "per_sample.json", rows)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["metric", "deactivation_ratio", "activation_ratio", "bleu", "token_agreement", "samples"])
    for metric, curve in results["curves"].items():
        for pt in curve["points"]:
            writer.writerow([metric, pt["deactivation_ratio"], f"{pt['activation_ratio']:.6f}",
                             f"{pt['bleu']:.4f}", f"{pt['token_agreement']:.6f}", pt["samples"]])
    write_text(folder / "results.csv", buf.getvalue())
    plot_tradeoff(results, folder / "tradeoff")

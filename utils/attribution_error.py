"""How wrong are the scores?  The real loss change of removing one unit, against each metric's prediction.

For a sample, a few masked generation steps t >= 1 are drawn, and at each a random subset of units of
each component (drawn uniformly over all (layer, unit) pairs).  Step t runs label token t-1 against the
dense KV cache of steps 0..t-1 (teacher-forced, as in attribution); one forward pass of B rows shares
that cache, row 0 dense and every other row zeroing exactly one unit at the position step t computes,
so ``delta_loss = CE(row) - CE(dense row)`` is the true cost of removing that unit at that step (the
sweep's masks act on the same position).  Steps t >= 1 only: step 0 is never masked in the sweep, and
there the scores describe only the last of the prompt positions a mask would act on.

Predicted removal cost of each metric (METHOD §4, in loss units where the metric has them), as its
declaration in utils/metric_registry.py says (``removal_cost``): ``-d·gxo`` (heads) / ``-gxo`` (neurons);
cor_gxo its keep-score ``-d·gxo + ½‖x‖‖∇_layer‖``; ``-d·ig``; ``-d·gradient``; magnitude ``‖x‖``.  A metric
declared without a removal cost (snip, wina) is not studied.  The agreement is Spearman's rank
correlation per metric and component (it is what decides a mask: only the order of the scores matters
within a step and layer).
"""
from __future__ import annotations

import inspect
import json

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .distributed import current_shard, map_samples, open_checkpoint
from .errors import PipelineError
from .io import save_figure, write_json
from .kv_cache import cache_argument_name, detach_cache_, forward_kwargs, output_cache, repeated_cache
from .masks import ranking
from .metric_registry import get_metric, studied_metrics
from .provenance import score_fingerprints
from .sites import ATTN, COMPONENTS, SiteHooks

OUTPUT_DIR = "attribution_error"


# -- rank correlation, without scipy ------------------------------------------------------------------
def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n in float64; tied values share the mean of the ranks they span."""
    values = values.double().flatten()
    n = values.numel()
    order = torch.argsort(values, stable=True)
    sorted_vals = values[order]
    ranks = torch.empty(n, dtype=torch.float64)
    start = 0
    while start < n:
        end = start
        while end + 1 < n and sorted_vals[end + 1] == sorted_vals[start]:
            end += 1
        ranks[order[start:end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double().flatten(), y.double().flatten()
    if x.numel() < 2:
        return float("nan")
    x, y = x - x.mean(), y - y.mean()
    denom = torch.sqrt((x * x).sum() * (y * y).sum())
    return float("nan") if denom == 0 else float((x * y).sum() / denom)


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman's rho: Pearson's correlation of the average ranks (NaN if either side is constant)."""
    return pearson(average_ranks(x), average_ranks(y))


# -- one sample ---------------------------------------------------------------------------------------
def predicted_costs(metric: str, comp: str, scores: dict, head_dim: int) -> torch.Tensor:
    """``[T, L, units]``: the removal cost ``metric`` predicts for every unit of one sample."""
    cost = get_metric(metric).removal_cost
    if cost is None:
        raise PipelineError(f"the {metric} metric predicts no removal cost; study one of "
                            f"{', '.join(studied_metrics())}")
    return cost.of(comp, ranking(metric, comp, scores, head_dim, "paper"), head_dim)


def choose_units(layout, label_len: int, num_units: int, num_steps: int, seed: int, index: int):
    """The steps (t >= 1) and, per step and component, the (layer, unit) pairs to remove; reproducible
    from (seed, sample index) alone, so a resumed or sharded run draws the same ones."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    # an empty label (the model stopped at once, as Gemma-3 base does on some questions) has no step
    candidates = torch.arange(1, max(label_len, 1))
    steps = sorted(candidates[torch.randperm(len(candidates), generator=g)[:num_steps]].tolist())
    picks = {}
    for t in steps:
        for comp in COMPONENTS:
            units = layout.units(comp)
            flat = torch.randperm(layout.num_layers * units, generator=g)[:num_units]
            picks[(t, comp)] = [(int(f) // units, int(f) % units) for f in flat]
    return steps, picks


@torch.no_grad()
def removal_losses(model, hooks: SiteHooks, prompt_ids: torch.Tensor, label_ids: list[int], picks: dict,
                   steps: list[int], batch_size: int) -> dict:
    """``{(t, comp, layer, unit): (delta_loss, dense_loss)}`` for every picked unit of every picked step."""
    layout = hooks.layout
    device = next(model.parameters()).device
    name = cache_argument_name(model)
    # only the last position's logits matter: a 384-token prompt x 262k vocabulary would be 400 MB
    last = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    labels = torch.tensor(label_ids, dtype=torch.long, device=device)
    out, cache = {}, None
    for t in range(max(steps) + 1 if steps else 0):
        step_input = prompt_ids.to(device) if t == 0 else labels[t - 1:t].view(1, 1)
        if t in steps:
            removals = [(comp, l, u) for comp in COMPONENTS for l, u in picks[(t, comp)]]
            for start in range(0, len(removals), batch_size):
                chunk = removals[start:start + batch_size]
                B = len(chunk) + 1                                     # row 0: the dense model
                masks = {c: torch.ones(B, layout.num_layers, layout.units(c), device=device) for c in COMPONENTS}
                for b, (comp, l, u) in enumerate(chunk, start=1):
                    masks[comp][b, l, u] = 0.0
                with hooks.settings(masks=masks):
                    logits = model(**forward_kwargs(name, step_input.expand(B, -1), repeated_cache(cache, B)),
                                   **last).logits[:, -1].float()
                losses = F.cross_entropy(logits, labels[t:t + 1].expand(B), reduction="none").double()
                for b, (comp, l, u) in enumerate(chunk, start=1):
                    out[(t, comp, l, u)] = (float(losses[b] - losses[0]), float(losses[0]))
        cache = output_cache(model(**forward_kwargs(name, step_input, cache), **last))   # the dense step t
        detach_cache_(cache)
    return out


def sample_rows(run, hooks, per_metric: dict, index: int, *, num_units: int, num_steps: int, seed: int,
                batch_size: int) -> list[dict]:
    layout, labels = run.layout, run.labels
    label = labels.label_ids[index]
    steps, picks = choose_units(layout, len(label), num_units, num_steps, seed, index)
    if not steps:
        return []
    prompt = torch.tensor([labels.prompt_ids[index]])
    real = removal_losses(run.model, hooks, prompt, label, picks, steps, batch_size)
    predicted = {}
    for metric, per_comp in per_metric.items():
        if index >= min(len(lst) for kinds in per_comp.values() for lst in kinds.values()):
            continue  # e.g. IG computed on fewer samples
        for comp in COMPONENTS:
            s = {kind: lst[index] for kind, lst in per_comp[comp].items()}
            predicted[(metric, comp)] = predicted_costs(metric, comp, s, layout.head_dim)
    rows = []
    for (t, comp, l, u), (delta, dense) in real.items():
        rows.append({"sample": index, "step": t, "component": comp, "layer": l, "unit": u,
                     "delta_loss": delta, "dense_loss": dense,
                     "predicted": {m: float(p[t, l, u]) for (m, c), p in predicted.items() if c == comp}})
    return rows


# -- the whole run ------------------------------------------------------------------------------------
def summarize(rows: list[dict], metrics: list[str]) -> dict:
    """Spearman (and Pearson) of predicted cost vs real delta loss per metric and component."""
    out = {}
    for metric in metrics:
        out[metric] = {}
        for comp in COMPONENTS:
            pairs = [(r["predicted"][metric], r["delta_loss"]) for r in rows
                     if r["component"] == comp and metric in r["predicted"]]
            x = torch.tensor([p for p, _ in pairs], dtype=torch.float64)
            y = torch.tensor([d for _, d in pairs], dtype=torch.float64)
            out[metric][comp] = {"spearman": spearman(x, y), "pearson": pearson(x, y), "n": len(pairs)}
    return out


def plot_scatter(rows: list[dict], summary: dict, metrics: list[str], stem, title: str) -> None:
    """One panel per (component, metric): predicted removal cost (x) against the real delta loss (y)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(COMPONENTS), len(metrics), figsize=(2.8 * len(metrics), 5.4), squeeze=False)
    for r_i, comp in enumerate(COMPONENTS):
        for c_i, metric in enumerate(metrics):
            ax = axes[r_i][c_i]
            pts = [(r["predicted"][metric], r["delta_loss"]) for r in rows
                   if r["component"] == comp and metric in r["predicted"]]
            if pts:
                ax.scatter([p for p, _ in pts], [d for _, d in pts], s=4, alpha=0.5, linewidths=0,
                           rasterized=True)   # thousands of points: a light PDF
            ax.axhline(0, color="gray", lw=0.5)
            stats = summary[metric][comp]
            ax.set_title(f"{metric}, {'heads' if comp == ATTN else 'neurons'}\n"
                         f"ρ = {stats['spearman']:.2f} (n={stats['n']})", fontsize=8)
            ax.tick_params(labelsize=6)
            if r_i == len(COMPONENTS) - 1:
                ax.set_xlabel("predicted removal cost", fontsize=7)
            if c_i == 0:
                ax.set_ylabel("real Δloss (unit removed)", fontsize=7)
    fig.suptitle(title, fontsize=9)
    # fixed margins: tight_layout would lay out all panels' text once more (slow on a busy CPU), and
    # save_figure crops to the drawn area anyway
    fig.subplots_adjust(left=0.07, right=0.99, bottom=0.1, top=0.86, wspace=0.35, hspace=0.55)
    for suffix in (".png", ".pdf"):
        save_figure(fig, stem.with_name(stem.name + suffix))
    plt.close(fig)


def measure_attribution_error(run, per_metric: dict, *, num_units: int, num_steps: int, seed: int,
                              batch_size: int) -> dict | None:
    """Write ``rows.json``, ``summary.json`` and ``scatter.png/.pdf`` under ``<result>/attribution_error/``
    and return the summary (None in the processes other than the first under torchrun).  The saved samples
    and the summary carry the sha256 of every score file read: scores recomputed since (IG with other
    steps) are other inputs, and their samples are not adopted."""
    out_dir = run.paths.root / OUTPUT_DIR
    metrics = [m for m in studied_metrics() if m in per_metric]
    counts = {m: min(len(lst) for kinds in per_metric[m].values() for lst in kinds.values()) for m in metrics}
    settings = {"num_units": num_units, "steps": num_steps, "seed": seed, "num_data": run.num_data,
                "metrics": metrics, "metric_samples": counts,
                "score_files": score_fingerprints(run.paths, metrics)}
    key = json.dumps({"run_id": run.labels.run_id, **settings}, sort_keys=True)
    ckpt = open_checkpoint(out_dir / "rows.json", key)
    with SiteHooks(run.model, run.layout) as hooks, \
            tqdm(total=run.num_data, desc="attribution error", unit="sample",
                 disable=not current_shard().is_main) as bar:
        def one(i):
            rows = sample_rows(run, hooks, per_metric, i, num_units=num_units, num_steps=num_steps, seed=seed,
                               batch_size=batch_size)
            bar.update(1)
            return rows

        per_sample = map_samples(ckpt, run.num_data, one, skipped=lambda i: bar.update(1))
    if per_sample is None:
        return None
    rows = [r for sample in per_sample for r in sample]
    if not rows:
        raise PipelineError("no sample has a label of two or more tokens, so there is no masked step to "
                            "measure; use more samples (--num_data)")
    summary = {"run_id": run.labels.run_id, "labels_settings": run.labels.settings, **settings,
               "rows": len(rows), "correlation": summarize(rows, metrics)}
    # the summary names the folder's run: it leaves first and comes back last, so a failure in between (a
    # full disk) leaves no summary beside files of another run, and the saved samples stay for the rerun
    (out_dir / "summary.json").unlink(missing_ok=True)
    write_json(out_dir / "rows.json", rows)
    model = run.labels.settings.get("model", "")
    plot_scatter(rows, summary["correlation"], metrics, out_dir / "scatter",
                 f"{model}: predicted vs real cost of removing one unit ({len(rows)} removals)")
    write_json(out_dir / "summary.json", summary)
    ckpt.finish()
    return summary

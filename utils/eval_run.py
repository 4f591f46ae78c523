"""evaluate.py's run (METHOD §11): settle the variants (static's calibration), score
every task and corpus (each saved under ``eval/`` with its key and adopted by a rerun with the same key), and
write the results, the CSV table and the figure.  The scoring itself is utils/evaluation.py's."""
from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from dataclasses import replace

import numpy as np

from .artifacts import EVAL_DIR
from .errors import PipelineError
from .eval_tasks import corpus_short_name, load_corpus, load_task
from .evaluation import MaskBook, Variant, add_bos, evaluate_task, harness_lm, text_nll
from .intervals import bootstrap_interval
from .io import read_json, write_json, write_text
from .masks import layer_selection
from .metric_registry import get_metric
from .sites import SiteHooks
from .sources import DEFAULT_CALIB_NUM_DATA, get_source

EVAL_FORMAT = 1          # bump when what a saved task or corpus file means changes


def calibration(run, args):
    """``(calibrated, selected, settings)`` of the static source: the sweep's own plan (utils.sweep: scores
    loaded and checked, the mean keep-score over samples N .. N+M-1)."""
    from .sweep import plan_sweep, sweep_request
    from .sweep_results import fingerprint

    M = args.calib_num_data or DEFAULT_CALIB_NUM_DATA
    N = args.num_data if args.num_data is not None else len(run.labels) - M
    if N < 1:
        raise PipelineError(f"--source static calibrates on the last {M} of {len(run.labels)} labelled samples "
                            f"and needs at least one before them; lower --calib_num_data or label more samples")
    request = sweep_request(args.metric_name, ratios=args.ratios, mask_layers=args.layers,
                            variant=args.cor_gxo_variant, sources=["static"], num_data=N, calib_num_data=M)
    plan = plan_sweep(replace(run, num_data=N), request)
    kinds = sorted({(k, c) for m in args.metric_name for c in ("attention", "mlp") for k in get_metric(m).kinds})
    files = {str(run.paths.score(k, c).relative_to(run.paths.root)): fingerprint(run.paths.score(k, c))
             for k, c in kinds}
    return plan.calibrated, plan.selected, {"calibration_samples": [N, N + M - 1], "score_files": files}


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj).encode()).hexdigest()[:16]


def _saved(path, key):
    if path.is_file():
        try:
            saved = read_json(path)
        except (ValueError, OSError):
            print(f"note: {path} is damaged; recomputing it", file=sys.stderr)
            return None
        if isinstance(saved, dict) and saved.get("key") == key:
            return saved
    return None


def run_task(lm, book, name, args, variants, base_key, folder):
    """One task's rows for every variant (saved as ``folder/tasks/<task>.json``), or the saved ones."""
    task = load_task(name, args.limit)
    key = {**base_key, "task": task.name, "rows": task.fingerprint, "metrics": list(task.metrics)}
    path = folder / "tasks" / f"{task.name}.json"
    saved = _saved(path, key)
    if saved is not None:
        print(f"{task.name}: done already ({path})")
        return saved
    print(f"{task.name}: {len(task.rows)} rows, {len(variants)} variants")
    lm.table.clear()
    book.shares = [[] for _ in variants]
    start = time.perf_counter()
    rows = evaluate_task(lm, task, variants)
    seconds = time.perf_counter() - start
    for i, (row, v) in enumerate(zip(rows, variants)):
        row.update(v.as_dict(), activation_ratio=book.activation_ratio(i))
    out = {"key": key, "task": task.name, "source_file": task.source, "metrics": list(task.metrics),
           "rows": rows, "seconds": seconds}
    write_json(path, out)
    return out


def run_corpus(model, hooks, tokenizer, book, name, args, variants, base_key, folder):
    """One corpus's perplexity for every variant (saved as ``folder/ppl/<corpus>.json``), or the saved one."""
    texts, where = load_corpus(name, args.limit)
    bos = [tokenizer.bos_token_id] if add_bos(tokenizer) else []
    ids = [(bos + tokenizer(t, add_special_tokens=False)["input_ids"])[:args.ppl_max_tokens] for t in texts]
    short = corpus_short_name(name)
    key = {**base_key, "corpus": short, "texts": _digest(ids), "max_tokens": args.ppl_max_tokens}
    path = folder / "ppl" / f"{short}.json"
    saved = _saved(path, key)
    if saved is not None:
        print(f"perplexity {short}: done already ({path})")
        return saved
    masks = book.masks([0])           # static masks do not depend on the text
    start = time.perf_counter()
    from tqdm.auto import tqdm
    nll = [text_nll(model, hooks, x, masks).tolist() for x in tqdm(ids, desc=f"perplexity {short}", unit="text")]
    counts = [max(len(x) - 1, 0) for x in ids]
    seconds = time.perf_counter() - start
    rows = []
    total = sum(counts)
    for i, v in enumerate(variants):
        per_text = [n[i] / c for n, c in zip(nll, counts) if c]
        weights = [c for c in counts if c]
        mean = sum(n[i] for n in nll) / total if total else float("nan")
        rows.append({**v.as_dict(), "ppl": math.exp(mean), "nll": mean, "tokens": total, "texts": len(weights),
                     "ppl_ci": bootstrap_interval(per_text, weights, np.exp),
                     "activation_ratio": book.activation_ratio(i)})
    out = {"key": key, "corpus": short, "source_file": where, "rows": rows, "seconds": seconds}
    write_json(path, out)
    return out


CSV_COLUMNS = ["kind", "name", "measure", "curve", "metric", "source", "ratio", "activation_ratio", "value",
               "stderr", "ci_low", "ci_high", "n"]


def csv_rows(tasks: list, corpora: list) -> list[list]:
    out = []
    for t in tasks:
        for r in t["rows"]:
            for m in t["metrics"]:
                out.append(["accuracy", t["task"], m, r["curve"], r["metric"], r["source"], r["ratio"],
                            r["activation_ratio"], r[m], r[f"{m}_stderr"], None, None, r["n"]])
    for c in corpora:
        for r in c["rows"]:
            low, high = r["ppl_ci"] or (None, None)
            out.append(["perplexity", c["corpus"], "ppl", r["curve"], r["metric"], r["source"], r["ratio"],
                        r["activation_ratio"], r["ppl"], None, low, high, r["tokens"]])
    return out


def _cell(x):
    if x is None:
        return ""
    return f"{x:.6g}" if isinstance(x, float) else str(x)


def plot(tasks: list, corpora: list, stem, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .io import save_figure

    panels = [(t["task"], "acc", t["rows"]) for t in tasks] + [(c["corpus"], "ppl", c["rows"]) for c in corpora]
    cols = min(4, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3.3 * nrows), squeeze=False)
    for ax, (name, measure, rows) in zip(axes.flat, panels):
        dense = next(r for r in rows if r["metric"] is None)
        ax.axhline(dense[measure], color="black", lw=1, ls="--", label="dense")
        curves = {}
        for r in rows:
            if r["metric"] is not None:
                curves.setdefault((r["metric"], r["source"]), []).append(r)
        for (metric, source), pts in curves.items():
            pts = sorted(pts, key=lambda r: r["activation_ratio"])
            m = get_metric(metric)
            x = [r["activation_ratio"] for r in pts]
            y = [r[measure] for r in pts]
            ax.plot(x, y, color=m.color, marker=m.marker, ls=get_source(source).linestyle, label=f"{m.label} ({source})")
            if measure == "acc":
                err = [r.get("acc_stderr") or 0.0 for r in pts]
                ax.fill_between(x, [a - e for a, e in zip(y, err)], [a + e for a, e in zip(y, err)],
                                color=m.color, alpha=0.12, lw=0)
            else:
                cis = [r["ppl_ci"] for r in pts]
                if all(cis):
                    ax.fill_between(x, [c[0] for c in cis], [c[1] for c in cis], color=m.color, alpha=0.12, lw=0)
        if measure == "ppl":
            ax.set_yscale("log")
        ax.set_title(f"{name} ({'accuracy' if measure == 'acc' else 'perplexity'}, n={dense.get('n', dense.get('texts'))})",
                     fontsize=9)
        ax.set_xlabel("activation ratio")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, stem.with_suffix(".png"))
    save_figure(fig, stem.with_suffix(".pdf"))
    plt.close(fig)


def print_table(tasks, corpora) -> None:
    names = [t["task"] for t in tasks] + [f"ppl:{c['corpus']}" for c in corpora]
    keys = [(r["curve"], r["ratio"]) for r in (tasks or corpora)[0]["rows"]]
    print(f"{'curve':<22} {'p':>4} {'active':>6} " + " ".join(f"{n[:12]:>12}" for n in names))
    for curve, ratio in keys:
        cells, active = [], None
        for t in tasks:
            r = next(r for r in t["rows"] if (r["curve"], r["ratio"]) == (curve, ratio))
            active = r["activation_ratio"]
            cells.append(f"{r['acc']:.3f}±{r['acc_stderr'] or 0:.3f}")
        for c in corpora:
            r = next((r for r in c["rows"] if (r["curve"], r["ratio"]) == (curve, ratio)), None)
            cells.append("" if r is None else f"{r['ppl']:.2f}")
            active = active if r is None or active is not None else r["activation_ratio"]
        p = "" if ratio is None else f"{ratio:.1f}"
        print(f"{curve:<22} {p:>4} {active or 1.0:>6.3f} " + " ".join(f"{c:>12}" for c in cells))


def run_evaluation(run, args) -> dict:
    """Evaluate ``args``'s tasks and corpora (evaluate.py's parsed flags) on ``run``; write
    ``eval/results.json``, ``results.csv`` and ``accuracy.png``/``.pdf``; returns the results."""
    import lm_eval                       # noqa: F401  (utils.evaluation says how to install it)

    calibrated, selected, cal_settings = {}, layer_selection(args.layers, run.layout.num_layers), {}
    if "static" in args.source:
        calibrated, selected, cal_settings = calibration(run, args)
    variants = [Variant()] + [Variant(m, s, p) for s in args.source for m in args.metric_name for p in args.ratios]
    ppl_variants = [v for v in variants if v.source in (None, "static")]
    folder = run.paths.root / EVAL_DIR
    lm_version = lm_eval.__version__ if hasattr(lm_eval, "__version__") else None
    base_key = {"format": EVAL_FORMAT, "run_id": run.labels.run_id, "variants": [v.as_dict() for v in variants],
                "mask_layers": args.layers, "cor_gxo_variant": args.cor_gxo_variant, "limit": args.limit,
                "lm_eval": lm_version, **cal_settings}
    hooks = SiteHooks(run.model, run.layout)
    tasks, corpora = [], []
    start = time.perf_counter()
    try:
        book = MaskBook(run.model, hooks, run.layout, variants, calibrated=calibrated, selected=selected,
                        cor_gxo_variant=args.cor_gxo_variant)
        lm = harness_lm(run.model, hooks, run.tokenizer, book)
        for name in args.tasks:
            tasks.append(run_task(lm, book, name, args, variants, base_key, folder))
        ppl_book = MaskBook(run.model, hooks, run.layout, ppl_variants, calibrated=calibrated, selected=selected)
        ppl_key = {**base_key, "variants": [v.as_dict() for v in ppl_variants]}
        for name in args.ppl:
            corpora.append(run_corpus(run.model, hooks, run.tokenizer, ppl_book, name, args, ppl_variants, ppl_key,
                                      folder))
    finally:
        hooks.remove()
    settings = {"labels_run_id": run.labels.run_id, "labels_settings": run.labels.settings,
                "command": sys.argv, "tasks": args.tasks, "ppl": args.ppl, "sources": args.source,
                "metrics": args.metric_name, "ratios": args.ratios, "limit": args.limit,
                "ppl_max_tokens": args.ppl_max_tokens, "mask_layers": args.layers,
                "cor_gxo_variant": args.cor_gxo_variant, "lm_eval_version": lm_version, **cal_settings,
                "seconds_this_command": time.perf_counter() - start}
    results = {"settings": settings, "accuracy": [{k: v for k, v in t.items() if k != "key"} for t in tasks],
               "perplexity": [{k: v for k, v in c.items() if k != "key"} for c in corpora]}
    write_json(folder / "results.json", results)
    table = csv_rows(tasks, corpora)
    write_text(folder / "results.csv", "\n".join(",".join(_cell(x) for x in row) for row in [CSV_COLUMNS] + table) + "\n")
    model = run.labels.settings.get("model")
    plot(tasks, corpora, folder / "accuracy", f"{model}: dense and masked (limit {args.limit or 'none'})")
    print_table(tasks, corpora)
    print(f"wrote {folder}/results.json, results.csv, accuracy.png, accuracy.pdf")
    return results

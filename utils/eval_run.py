"""evaluate.py's run (METHOD §11): settle the variants (the sources' calibration, masks and maskers), score
every task and corpus (each saved under ``eval/`` with its key and adopted by a rerun with the same key), and
write the results, the CSV table and the figure.  The scoring itself is utils/evaluation.py's."""
from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from .artifacts import EVAL_DIR
from .errors import PipelineError
from .eval_tasks import corpus_short_name, load_corpus, load_task
from .evaluation import PPL_SOURCES, MaskBook, Variant, add_bos, evaluate_task, harness_lm
from .fingerprint import sha256_file
from .intervals import bootstrap_interval
from .io import read_json, write_json, write_text
from .masks import layer_selection, unit_weights
from .metric_registry import get_metric
from .sites import SiteHooks
from .sources import DEFAULT_CALIB_NUM_DATA, get_source

EVAL_FORMAT = 2          # bump when what a saved task or corpus file means changes (2: per-row values kept)


@dataclass
class EvalPlan:
    """What an evaluation computes, settled before any task runs (:func:`plan_evaluation`)."""
    variants: list              # [Variant]: dense first, then source x metric x ratio
    calibrated: dict            # {metric: {comp: [L, units]}}: static's mean keep-scores
    selected: torch.Tensor      # [L]: the masked layers
    maskers: dict = field(default_factory=dict)   # {per-token source: its masker}, hooks attached
    settings: dict = field(default_factory=dict)  # calibration samples, score and predictor files read

    @property
    def ppl_variants(self) -> list:
        return [v for v in self.variants if v.source is None or v.source in PPL_SOURCES]

    def close(self) -> None:
        for masker in self.maskers.values():
            masker.remove()


def calibration_range(run, args) -> tuple[int, int] | None:
    """``(N, M)``: the calibration samples N .. N+M-1 of the requested sources that read them
    (``M = --calib_num_data``, ``N = --num_data``, by default the last M labelled samples); None when none does."""
    users = [s for s in args.source if get_source(s).needs_calibration]
    if not users:
        return None
    M = args.calib_num_data or DEFAULT_CALIB_NUM_DATA
    N = args.num_data if args.num_data is not None else len(run.labels) - M
    if N < 1:
        raise PipelineError(f"--source {' and '.join(users)} calibrates on the last {M} of {len(run.labels)} "
                            "labelled samples and needs at least one before them; lower --calib_num_data or label "
                            "more samples")
    return N, M


def _request(args, sources, N, M):
    from .sweep import sweep_request
    return sweep_request(args.metric_name, ratios=args.ratios, mask_layers=args.layers, variant=args.cor_gxo_variant,
                         sources=sources, num_data=N, calib_num_data=M)


def static_calibration(run, args, N: int, M: int) -> tuple[dict, torch.Tensor, dict]:
    """``(calibrated, selected, settings)`` of the static source: the sweep's own plan (utils.sweep: scores
    loaded and checked, the mean keep-score over samples N .. N+M-1)."""
    from .sweep import plan_sweep
    from .sweep_results import fingerprint

    plan = plan_sweep(replace(run, num_data=N), _request(args, ["static"], N, M))
    kinds = sorted({(k, c) for m in args.metric_name for c in ("attention", "mlp") for k in get_metric(m).kinds})
    files = {str(run.paths.score(k, c).relative_to(run.paths.root)): fingerprint(run.paths.score(k, c))
             for k, c in kinds}
    return plan.calibrated, plan.selected, {"score_files": files}


def token_maskers(run, args, sources: list, selected, N, M) -> tuple[dict, dict, dict]:
    """``(maskers, covered, settings)`` of the per-token sources: the sweep's builders
    (utils/token_sources.py; teal calibrates its thresholds on samples N .. N+M-1, online and teal note the
    metrics they cannot use), except that a metric without a trained predictor is refused, not skipped."""
    from .predictor import PredictorMasker
    from .sweep import check_calibration_samples
    from .token_sources import build_maskers, load_predictor

    request = _request(args, args.source, N, M)
    if M is not None:
        check_calibration_samples(replace(run, num_data=N), request)
    weights = unit_weights(run.layout)
    settings = {}

    def make(src):
        if src != "predictor":
            return get_source(src).masker(run, request, args.metric_name, selected, weights)
        found = [load_predictor(run, request, m) for m in args.metric_name]   # missing or stale: refused
        settings["predictors"] = {str(run.paths.predictor(m).relative_to(run.paths.root)):
                                  sha256_file(run.paths.predictor(m)) for m in args.metric_name}
        return PredictorMasker(run.model, run.layout, weights, selected, args.metric_name, found), \
            list(args.metric_name)

    maskers, covered = build_maskers(sources, make)
    return maskers, covered, settings


def plan_evaluation(run, args) -> EvalPlan:
    """The variants of ``args`` (evaluate.py's parsed flags) for ``run``, with what they need: static's
    calibrated mean keep-scores, the per-token sources' maskers, and the settings that key the saved files."""
    calibration = calibration_range(run, args)
    N, M = calibration or (None, None)
    settings = {} if calibration is None else {"calibration_samples": [N, N + M - 1]}
    calibrated, selected = {}, layer_selection(args.layers, run.layout.num_layers)
    if "static" in args.source:
        calibrated, selected, found = static_calibration(run, args, N, M)
        settings.update(found)
    per_token = [s for s in args.source if get_source(s).per_token]
    maskers, covered, found = token_maskers(run, args, per_token, selected, N, M) if per_token else ({}, {}, {})
    settings.update(found)
    variants = [Variant()] + [Variant(m, s, p) for s in args.source for m in covered.get(s, args.metric_name)
                              for p in args.ratios]
    if args.source and len(variants) == 1:
        raise PipelineError(f"--source {' '.join(args.source)} has no variant to evaluate for --metric_name "
                            f"{' '.join(args.metric_name)} (see the notes above)")
    return EvalPlan(variants, calibrated, selected, maskers, settings)


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
    book.reset()
    start = time.perf_counter()
    rows = evaluate_task(lm, task, variants)
    seconds = time.perf_counter() - start
    for i, (row, v) in enumerate(zip(rows, variants)):
        row.update(v.as_dict(), activation_ratio=book.activation_ratio(i))
    out = {"key": key, "task": task.name, "source_file": task.source, "metrics": list(task.metrics),
           "rows": rows, "seconds": seconds}
    write_json(path, out)
    return out


def run_corpus(tokenizer, book, name, args, variants, base_key, folder):
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
    book.reset()
    masks = book.masks([0])           # the masks of perplexity's sources do not depend on the text
    start = time.perf_counter()
    from tqdm.auto import tqdm
    nll = [book.text_nll(x, masks).tolist() for x in tqdm(ids, desc=f"perplexity {short}", unit="text")]
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
                     "activation_ratio": book.activation_ratio(i),
                     "text_nll": [n[i] for n in nll]})       # per text, summed over its tokens (compare.py)
    out = {"key": key, "corpus": short, "source_file": where, "rows": rows, "seconds": seconds,
           "text_tokens": counts}
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

    plan = plan_evaluation(run, args)
    variants, ppl_variants = plan.variants, plan.ppl_variants
    folder = run.paths.root / EVAL_DIR
    lm_version = lm_eval.__version__ if hasattr(lm_eval, "__version__") else None
    base_key = {"format": EVAL_FORMAT, "run_id": run.labels.run_id, "variants": [v.as_dict() for v in variants],
                "mask_layers": args.layers, "cor_gxo_variant": args.cor_gxo_variant, "limit": args.limit,
                "lm_eval": lm_version, **plan.settings}
    hooks = SiteHooks(run.model, run.layout)
    tasks, corpora = [], []
    start = time.perf_counter()
    try:
        book = MaskBook(run.model, hooks, run.layout, variants, calibrated=plan.calibrated, selected=plan.selected,
                        cor_gxo_variant=args.cor_gxo_variant, maskers=plan.maskers)
        lm = harness_lm(run.model, hooks, run.tokenizer, book)
        for name in args.tasks:
            tasks.append(run_task(lm, book, name, args, variants, base_key, folder))
        ppl_book = MaskBook(run.model, hooks, run.layout, ppl_variants, calibrated=plan.calibrated,
                            selected=plan.selected, maskers=plan.maskers)
        ppl_key = {**base_key, "variants": [v.as_dict() for v in ppl_variants]}
        for name in args.ppl:
            corpora.append(run_corpus(run.tokenizer, ppl_book, name, args, ppl_variants, ppl_key, folder))
    finally:
        hooks.remove()
        plan.close()
    settings = {"labels_run_id": run.labels.run_id, "labels_settings": run.labels.settings,
                "command": sys.argv, "tasks": args.tasks, "ppl": args.ppl, "sources": args.source,
                "metrics": args.metric_name, "ratios": args.ratios, "limit": args.limit,
                "ppl_max_tokens": args.ppl_max_tokens, "mask_layers": args.layers,
                "cor_gxo_variant": args.cor_gxo_variant, "lm_eval_version": lm_version, **plan.settings,
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

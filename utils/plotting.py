"""The figures: the trade-off (activation ratio against a quality measure, one curve per metric, one
panel per mask source) and quality against measured decode speed-up."""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # scripts run headless
import matplotlib.pyplot as plt  # noqa: E402

from .artifacts import KINDS  # noqa: E402
from .errors import PipelineError  # noqa: E402
from .io import read_json, save_figure  # noqa: E402
from .metric_registry import METRICS  # noqa: E402
from .sources import SOURCES, label_free_sources  # noqa: E402

MEASURE_LABEL = {"bleu": "BLEU against the dense output", "token_agreement": "token agreement with the dense output",
                 "kl": "KL(dense || masked), nats per token", "ppl": "perplexity of the dense label"}


def _metric_style(metric: str) -> tuple:
    """(legend label, colour, marker) of a metric's curves, as declared (a metric no longer declared, from
    an older results file: its name, matplotlib's next colour, circles)."""
    declared = METRICS.get(metric)
    return (declared.label, declared.color, declared.marker) if declared else (metric, None, "o")


def _reads_ig(metric: str) -> bool:
    declared = METRICS.get(metric)
    return declared is not None and any(KINDS[k].computed_by == "ig" for k in declared.kinds)


def _title(results: dict) -> str:
    """Model, dataset, sample count and IG steps (where IG is plotted)."""
    settings = results.get("settings", {})
    labels = settings.get("labels_settings", {})
    names = []
    for key in ("model", "dataset"):
        value = str(labels.get(key, ""))
        if "/" in value and Path(value).exists():  # a local path: its name says enough
            value = Path(value).name
        names.append(value)
    parts = [p for p in names if p] + [f"{settings.get('num_data', '?')} samples"]
    if settings.get("ig_n_steps") and any(_reads_ig(c.get("metric")) for c in results["curves"].values()):
        parts.append(f"IG-{settings['ig_n_steps']}")
    return ", ".join(parts)


def _curve_metric_source(key: str, curve: dict) -> tuple[str, str]:
    metric, _, source = key.partition("@")
    return curve.get("metric", metric), curve.get("source", source or "oracle")


def plot_tradeoff(results: dict, stem: Path, measure: str = "bleu") -> None:
    """Write ``stem.png`` and ``stem.pdf``: activation ratio (x) against ``measure`` (y), one curve per
    metric, one panel per mask source.  A curve with fewer samples than the most is set apart (see
    :func:`_fewer_samples_style`); its numbers stay in the result files."""
    curves = results["curves"]
    sources = list(dict.fromkeys(_curve_metric_source(k, c)[1] for k, c in curves.items()))
    most = max(c["samples"] for c in curves.values())
    fig, axes = plt.subplots(1, len(sources), figsize=(6.4 if len(sources) == 1 else 4.6 * len(sources), 4.4),
                             sharey=True, squeeze=False)
    drawn, banded = 0, False
    for ax, source in zip(axes[0], sources):
        for key, curve in curves.items():
            metric, src = _curve_metric_source(key, curve)
            if src != source:
                continue
            pts = sorted((p for p in curve["points"] if p.get(measure) is not None
                          and not math.isnan(p[measure])), key=lambda p: p["activation_ratio"])
            drawn += len(pts)
            label, color, marker = _metric_style(metric)
            style = {"marker": marker, "color": color, "linewidth": 1.5, "markersize": 4}
            if curve["samples"] < most:
                label, style = _fewer_samples_style(label, style, curve["samples"])
            ax.plot([p["activation_ratio"] for p in pts], [p[measure] for p in pts], label=label, **style)
            band = [p for p in pts if p.get(f"{measure}_ci") is not None]
            if band:       # the 95 % bootstrap interval over samples (utils/intervals.py)
                banded = True
                ax.fill_between([p["activation_ratio"] for p in band], [p[f"{measure}_ci"][0] for p in band],
                                [p[f"{measure}_ci"][1] for p in band], color=style["color"], alpha=0.12,
                                linewidth=0)
        ax.set_xlabel("activation ratio (share of head + neuron parameters kept)", fontsize=8 if len(sources) > 1 else 10)
        if len(sources) > 1 or source != "oracle":
            ax.set_title(SOURCES[source].title if source in SOURCES else source, fontsize=9)
        ax.set_xlim(0, 1.02)
        if measure == "ppl" and drawn:
            ax.set_yscale("log")
        elif measure not in ("kl", "ppl"):
            ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel(MEASURE_LABEL.get(measure, measure))
    fig.suptitle(_title(results), fontsize=10)
    if not drawn:
        # KL and perplexity are averaged over the masked steps t >= 1: labels of one token have none
        fig.text(0.5, 0.5, f"no {measure} values: no sample has a masked step (every label is one token long)",
                 ha="center", va="center", fontsize=9, color="0.3")
    fewer = sorted({c["samples"] for c in curves.values() if c["samples"] < most})
    notes = (["shaded: 95 % bootstrap interval over the samples"] if banded else []) + \
        ([_fewer_samples_note(fewer, most)] if fewer else [])
    if notes:
        fig.text(0.5, -0.01, "\n".join(notes), ha="center", va="top", fontsize=7, color="0.3")
    for suffix in (".png", ".pdf"):
        save_figure(fig, Path(str(stem) + suffix))
    plt.close(fig)


# A curve on fewer samples than the others (the quick start's IG: 1 of 8 questions) is not comparable with
# them: at one sample a masked answer either matches the label or not, so its BLEU jumps between 0 and 100
# across neighbouring ratios.  It stays in the figure (and in every result file) but is drawn thin, dashed
# and faded, its legend entry says how many samples it has, and a note under the figure says what that
# means and where comparable curves are.
def _fewer_samples_style(label: str, style: dict, samples: int) -> tuple[str, dict]:
    label += " (n=1, noise)" if samples == 1 else f" (n={samples})"
    return label, {**style, "linestyle": "--", "linewidth": 0.9, "markersize": 3, "alpha": 0.45}


def _fewer_samples_note(fewer: list[int], most: int) -> str:
    lines = [f"dashed, faded: fewer samples than the other curves (n={most}), so not comparable with them.",
             "Curves on 100 samples per model and task: RESULTS.md.",
             "More samples for this run: the metric's score step with a larger --num_data "
             "(run_pipeline.py --ig_num_data for IG)."]
    if 1 in fewer:
        lines[1] = f"A curve on 1 sample is noise, not a result. {lines[1]}"
    return "\n".join(lines)


def speedup_at(rows: list[dict], kept: float) -> float:
    """Decode speed-up at a kept share, linearly interpolated between the benchmark's points (clamped to
    the measured range: no extrapolation)."""
    pts = sorted((float(r["kept"]), float(r["speedup"])) for r in rows)
    if kept <= pts[0][0]:
        return pts[0][1]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if kept <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (kept - x0) / (x1 - x0)
    return pts[-1][1]


def rows_for_source(rows: list[dict], source: str) -> list[dict]:
    """The benchmark rows that time ``source``'s masks: rows whose ``per_token`` names it (its gathered path,
    with the dense point 1.0 at kept share 1 added), else, for a source of one mask per request, the sparse
    model's untagged rows; none for a source that needs the label or has no path timed."""
    # a per-token row's share is what its decode really read (teal's differs from the share asked for)
    tagged = [{**r, "kept": r.get("kept_heads", r["kept"])} for r in rows if r.get("per_token") == source]
    known = SOURCES.get(source)
    if tagged:
        return tagged + ([] if any(float(r["kept"]) == 1.0 for r in tagged) else [{"kept": 1.0, "speedup": 1.0}])
    if known is None or known.uses_label or known.per_token:
        return []
    return [r for r in rows if not r.get("per_token")]


def load_speed_rows(bench_json) -> dict:
    """``{(device, batch): rows}`` from one or several decode benchmark JSONs: each a list of rows (or
    ``{"settings": ..., "rows": [...]}``) like ``{"device": "cpu", "batch": 1, "kept": 0.5, "speedup": 1.6}``;
    a row without ``device`` takes its file's ``settings`` (device name and dtype).  Where a file timed
    several paths of one device and batch (fused or not), the one with the fastest dense decode is kept:
    the path one would deploy."""
    paths = [bench_json] if isinstance(bench_json, (str, Path)) else list(bench_json)
    groups = {}
    for path in paths:
        try:
            data = read_json(path)
        except (OSError, ValueError) as err:
            raise PipelineError(f"cannot read the benchmark JSON {path} ({type(err).__name__}); "
                                "give the file the decode benchmark wrote") from None
        rows = data.get("rows") if isinstance(data, dict) else data
        settings = data.get("settings", {}) if isinstance(data, dict) else {}
        default_device = " ".join(str(settings[k]) for k in ("device_name", "dtype") if settings.get(k)) or "?"
        paths_of = {}
        try:
            for r in rows:
                kept, speedup = float(r["kept"]), float(r["speedup"])
                if not (math.isfinite(speedup) and speedup > 0 and 0 < kept <= 1):
                    raise ValueError
                key = (str(r.get("device", default_device)), r.get("batch", 1))
                paths_of.setdefault(key, {}).setdefault((r.get("fused"), r.get("compile")), []).append(r)
        except (TypeError, KeyError, ValueError):
            raise PipelineError(f"{path} is not a decode benchmark JSON: it needs rows with 'kept' in (0, 1] and "
                                "a finite positive 'speedup' (and 'device', 'batch')") from None
        for key, variants in paths_of.items():
            def dense_ms(group):
                dense = [r for r in group if float(r["kept"]) == 1.0 and "ms_per_token" in r]
                return dense[0]["ms_per_token"] if dense else 0.0
            groups[key] = min(variants.values(), key=dense_ms)
    if not groups:
        raise PipelineError(f"{', '.join(map(str, paths))} holds no benchmark rows")
    return groups


def plot_speed_quality(results: dict, bench_json, stem: Path, measure: str = "bleu", sources=None) -> None:
    """Write ``stem.png``/``.pdf``: ``measure`` (y) against measured decode speed-up (x), the speed-up of
    each point interpolated at its activation ratio; one panel per (device, batch) of the benchmark, one
    line style per mask source.  Only ``sources`` are drawn: by default (None) the label-free ones, whose one
    mask per request is what the sparse model removes (an oracle mask changes every token and needs the
    answer, so no sparse model runs it)."""
    groups = load_speed_rows(bench_json)
    sources = label_free_sources() if sources is None else sources
    unknown = [s for s in sources if s not in SOURCES]
    if unknown:
        raise PipelineError(f"unknown --source {', '.join(unknown)}; choose from {', '.join(SOURCES)}")
    have = sorted({_curve_metric_source(k, c)[1] for k, c in results["curves"].items()})
    if not set(have) & set(sources):
        raise PipelineError(f"the sweep's results hold no curve of {', '.join(sources)} (only {', '.join(have) or 'none'}); "
                            f"rerun main.py with --source {' '.join(sources)}, or draw those it has with "
                            f"--source {' '.join(have)}")
    fig, axes = plt.subplots(1, len(groups), figsize=(5.2 * len(groups), 4.4), sharey=True, squeeze=False)
    for ax, ((device, batch), rows) in zip(axes[0], sorted(groups.items(), key=lambda g: str(g[0]))):
        for key, curve in results["curves"].items():
            metric, source = _curve_metric_source(key, curve)
            if source not in sources:
                continue
            timed = rows_for_source(rows, source)
            if not timed:
                continue
            pts = [p for p in curve["points"] if p.get(measure) is not None and not math.isnan(p[measure])]
            xs = [speedup_at(timed, p["activation_ratio"]) for p in pts]
            label, color, marker = _metric_style(metric)
            linestyle = SOURCES[source].linestyle if source in SOURCES else "-"
            ax.plot(xs, [p[measure] for p in pts], linestyle=linestyle, color=color, marker=marker,
                    markersize=4, linewidth=1.3, label=f"{label} ({source})")
        ax.set_title(f"{device}, batch {batch}", fontsize=9)
        ax.set_xlabel("measured decode speed-up over dense (×)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    axes[0][0].set_ylabel(MEASURE_LABEL.get(measure, measure))
    fig.suptitle(_title(results), fontsize=10)
    for suffix in (".png", ".pdf"):
        save_figure(fig, Path(str(stem) + suffix))
    plt.close(fig)

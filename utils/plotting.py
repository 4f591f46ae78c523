"""The figures: the trade-off (activation ratio against a quality measure, one curve per metric, one
panel per mask source) and quality against measured decode speed-up."""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # scripts run headless
import matplotlib.pyplot as plt  # noqa: E402

from .errors import PipelineError  # noqa: E402
from .io import read_json, save_figure  # noqa: E402

STYLE = {"magnitude": ("tab:gray", "o"), "gradient": ("tab:orange", "v"), "gxo": ("tab:blue", "s"),
         "snip": ("tab:purple", "^"), "cor_gxo": ("tab:red", "D"), "ig": ("tab:green", "P"),
         "wina": ("tab:brown", "X")}
LABEL = {"magnitude": "Magnitude", "gradient": "Gradient", "gxo": "GxO", "snip": "SNIP |GxO|",
         "cor_gxo": "Corrected GxO", "ig": "Integrated gradients", "wina": "WINA"}
SOURCE_TITLE = {"oracle": "oracle (per token, dense label)", "prompt": "prompt (one mask per request)",
                "static": "static (calibrated, one mask)"}
MEASURE_LABEL = {"bleu": "BLEU against the dense output", "token_agreement": "token agreement with the dense output",
                 "kl": "KL(dense || masked), nats per token", "ppl": "perplexity of the dense label"}


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
    if settings.get("ig_n_steps") and any(c.get("metric") == "ig" for c in results["curves"].values()):
        parts.append(f"IG-{settings['ig_n_steps']}")
    return ", ".join(parts)


def _curve_metric_source(key: str, curve: dict) -> tuple[str, str]:
    metric, _, source = key.partition("@")
    return curve.get("metric", metric), curve.get("source", source or "oracle")


def plot_tradeoff(results: dict, stem: Path, measure: str = "bleu") -> None:
    """Write ``stem.png`` and ``stem.pdf``: activation ratio (x) against ``measure`` (y), one curve per
    metric, one panel per mask source.  ``(n=…)`` marks a curve with fewer samples than the most."""
    curves = results["curves"]
    sources = list(dict.fromkeys(_curve_metric_source(k, c)[1] for k, c in curves.items()))
    most = max(c["samples"] for c in curves.values())
    fig, axes = plt.subplots(1, len(sources), figsize=(6.4 if len(sources) == 1 else 4.6 * len(sources), 4.4),
                             sharey=True, squeeze=False)
    for ax, source in zip(axes[0], sources):
        for key, curve in curves.items():
            metric, src = _curve_metric_source(key, curve)
            if src != source:
                continue
            pts = sorted((p for p in curve["points"] if p.get(measure) is not None
                          and not math.isnan(p[measure])), key=lambda p: p["activation_ratio"])
            color, marker = STYLE.get(metric, (None, "o"))
            label = LABEL.get(metric, metric) + ("" if curve["samples"] == most else f" (n={curve['samples']})")
            ax.plot([p["activation_ratio"] for p in pts], [p[measure] for p in pts], marker=marker, color=color,
                    label=label, linewidth=1.5, markersize=4)
        ax.set_xlabel("activation ratio (share of head + neuron parameters kept)", fontsize=8 if len(sources) > 1 else 10)
        if len(sources) > 1 or source != "oracle":
            ax.set_title(SOURCE_TITLE.get(source, source), fontsize=9)
        ax.set_xlim(0, 1.02)
        if measure == "ppl":
            ax.set_yscale("log")
        elif measure != "kl":
            ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel(MEASURE_LABEL.get(measure, measure))
    fig.suptitle(_title(results), fontsize=10)
    for suffix in (".png", ".pdf"):
        save_figure(fig, Path(str(stem) + suffix))
    plt.close(fig)


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
                if not (math.isfinite(float(r["kept"])) and math.isfinite(float(r["speedup"]))):
                    raise ValueError
                key = (str(r.get("device", default_device)), r.get("batch", 1))
                paths_of.setdefault(key, {}).setdefault((r.get("fused"), r.get("compile")), []).append(r)
        except (TypeError, KeyError, ValueError):
            raise PipelineError(f"{path} is not a decode benchmark JSON: it needs rows with finite 'kept' and "
                                "'speedup' (and 'device', 'batch')") from None
        for key, variants in paths_of.items():
            def dense_ms(group):
                dense = [r for r in group if float(r["kept"]) == 1.0 and "ms_per_token" in r]
                return dense[0]["ms_per_token"] if dense else 0.0
            groups[key] = min(variants.values(), key=dense_ms)
    if not groups:
        raise PipelineError(f"{', '.join(map(str, paths))} holds no benchmark rows")
    return groups


def plot_speed_quality(results: dict, bench_json, stem: Path, measure: str = "bleu",
                       sources=("prompt", "static")) -> None:
    """Write ``stem.png``/``.pdf``: ``measure`` (y) against measured decode speed-up (x), the speed-up of
    each point interpolated at its activation ratio; one panel per (device, batch) of the benchmark, one
    line style per mask source.  Only ``sources`` are drawn: by default the label-free ones, whose one mask
    per request is what the sparse model removes (an oracle mask changes every token and needs the answer,
    so no sparse model runs it)."""
    groups = load_speed_rows(bench_json)
    dashes = {"oracle": "-", "prompt": "--", "static": ":"}
    fig, axes = plt.subplots(1, len(groups), figsize=(5.2 * len(groups), 4.4), sharey=True, squeeze=False)
    for ax, ((device, batch), rows) in zip(axes[0], sorted(groups.items(), key=lambda g: str(g[0]))):
        for key, curve in results["curves"].items():
            metric, source = _curve_metric_source(key, curve)
            if source not in sources:
                continue
            pts = [p for p in curve["points"] if p.get(measure) is not None and not math.isnan(p[measure])]
            xs = [speedup_at(rows, p["activation_ratio"]) for p in pts]
            color, marker = STYLE.get(metric, (None, "o"))
            ax.plot(xs, [p[measure] for p in pts], linestyle=dashes.get(source, "-"), color=color, marker=marker,
                    markersize=4, linewidth=1.3, label=f"{LABEL.get(metric, metric)} ({source})")
        ax.set_title(f"{device}, batch {batch}", fontsize=9)
        ax.set_xlabel("measured decode speed-up over dense (×)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    axes[0][0].set_ylabel(MEASURE_LABEL.get(measure, measure))
    fig.suptitle(_title(results), fontsize=10)
    for suffix in (".png", ".pdf"):
        save_figure(fig, Path(str(stem) + suffix))
    plt.close(fig)

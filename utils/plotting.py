"""The trade-off figure: activation ratio (x) against BLEU (y), one curve per metric."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # scripts run headless
import matplotlib.pyplot as plt  # noqa: E402

from .io import save_figure  # noqa: E402

STYLE = {"magnitude": ("tab:gray", "o"), "gradient": ("tab:orange", "v"), "gxo": ("tab:blue", "s"),
         "snip": ("tab:purple", "^"), "cor_gxo": ("tab:red", "D"), "ig": ("tab:green", "P")}
LABEL = {"magnitude": "Magnitude", "gradient": "Gradient", "gxo": "GxO", "snip": "SNIP |GxO|",
         "cor_gxo": "Corrected GxO", "ig": "Integrated gradients"}


def plot_tradeoff(results: dict, stem: Path) -> None:
    """Write ``stem.png`` and ``stem.pdf``."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    counts = {m: c["samples"] for m, c in results["curves"].items()}
    same_n = len(set(counts.values())) == 1
    for metric, curve in results["curves"].items():
        pts = sorted(curve["points"], key=lambda p: p["activation_ratio"])
        color, marker = STYLE.get(metric, (None, "o"))
        label = LABEL.get(metric, metric) + ("" if same_n else f" (n={curve['samples']})")
        ax.plot([p["activation_ratio"] for p in pts], [p["bleu"] for p in pts], marker=marker, color=color,
                label=label, linewidth=1.5, markersize=4)
    settings = results.get("settings", {})
    model = settings.get("labels_settings", {}).get("model", "")
    if "/" in model and Path(model).exists():  # a local path: its name says enough
        model = Path(model).name
    ax.set_xlabel("activation ratio (share of head + neuron parameters kept)")
    ax.set_ylabel("BLEU against the dense output")
    title = f"{model}, {settings.get('num_data', '?')} samples" if same_n else model
    ax.set_title(title, fontsize=10)
    ax.set_xlim(0, 1.02)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    for suffix in (".png", ".pdf"):
        save_figure(fig, Path(str(stem) + suffix))
    plt.close(fig)

"""For every curve of a sweep: the largest sparsity (share of head + neuron parameters switched off) at which
BLEU stays >= a bar and at which KL stays <= a bar, and, given decode benchmark JSONs, the decode speed-up
measured at that sparsity.  Printed as a Markdown table (RESULTS.md's per-model tables).

"Largest sparsity" walks each curve from p = 0 upward and stops at the first point that misses the bar (a
later point that passes again is not counted: the curves are noisy, and a deployment needs the whole range
up to its setting to hold).  The speed-up is interpolated at that point's activation ratio between the
benchmark's rows (utils/plotting.speedup_at) of the same kind of path: rows whose ``per_token`` names the
curve's source (its gathered path, at the share it really read), else, for prompt and static, the rows of
the sparse model with the units removed; none for the oracle (it needs the label).

    python benchmarks/sparsity_table.py result/truthfulqa/res/both/results.json [cpu.json ...]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from utils.cli import cli_entry  # noqa: E402
from utils.errors import PipelineError  # noqa: E402
from utils.io import read_json  # noqa: E402
from utils.plotting import rows_for_source, speedup_at  # noqa: E402

BLEU_BAR = 95.0      # BLEU against the dense output: within 5 % of it
KL_BAR = 0.1         # nats per token


def largest_sparsity(points: list[dict], ok) -> dict | None:
    """The last point, walking up the deactivation ratios from 0, before the first that fails ``ok``."""
    best = None
    for pt in sorted(points, key=lambda p: p["deactivation_ratio"]):
        if pt.get("samples", 0) == 0 or not ok(pt):
            break
        best = pt
    return best


def table(results: dict, bench: list[dict], bleu_bar: float, kl_bar: float) -> str:
    head = (f"| curve | sparsity at BLEU ≥ {bleu_bar:g} | BLEU there | sparsity at KL ≤ {kl_bar:g} | KL there |"
            + (" speed-up at the BLEU point | speed-up at the KL point |" if bench else ""))
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for key, curve in results["curves"].items():
        cells = [key]
        speeds = []
        for name, ok in (("bleu", lambda p: p["bleu"] >= bleu_bar),
                         ("kl", lambda p: p.get("kl") is not None and p["kl"] <= kl_bar)):
            pt = largest_sparsity(curve["points"], ok)
            if pt is None:
                cells += ["none", "—"]
                speeds.append("—")
                continue
            off = 1 - pt["activation_ratio"]
            cells += [f"{off:.0%} (p = {pt['deactivation_ratio']:g})", f"{pt[name]:.3g}"]
            rows = rows_for_source(bench, curve.get("source", "oracle"))
            speeds.append(f"{speedup_at(rows, pt['activation_ratio']):.2f}×" if rows and off > 0 else
                          ("1.00×" if rows else "—"))
        lines.append("| " + " | ".join(cells + (speeds if bench else [])) + " |")
    return "\n".join(lines)


@cli_entry
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", help="results.json of a main.py sweep")
    p.add_argument("bench_json", nargs="*", help="decode benchmark JSONs (bench_decode.py --json), one device")
    p.add_argument("--bleu", type=float, default=BLEU_BAR, help="the BLEU bar")
    p.add_argument("--kl", type=float, default=KL_BAR, help="the KL bar (nats per token)")
    args = p.parse_args(argv)
    try:
        results = read_json(args.results)
        if not all(isinstance(c.get("points"), list) for c in results["curves"].values()):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise PipelineError(f"{args.results} is not a sweep's results.json; run main.py first") from None
    bench = []
    for path in args.bench_json:
        try:
            data = read_json(path)
            bench += list(data.get("rows") if isinstance(data, dict) else data)
        except (OSError, ValueError, TypeError, AttributeError):
            raise PipelineError(f"cannot read the benchmark JSON {path}; give the file bench_decode.py --json "
                                "wrote") from None
    print(table(results, bench, args.bleu, args.kl))


if __name__ == "__main__":
    main()

"""Quality against measured decode speed-up: the sweep's results.json (activation ratio, BLEU, ... per
metric, source and ratio) and the decode benchmark's JSONs (rows with "kept" and "speedup"; the device from
each file's settings) -> one panel per device and batch, each point placed at the speed-up interpolated at
its activation ratio.  Only the label-free sources are drawn by default, each against the rows that time its
masks (tagged rows of a per-token path; the sparse model's rows for prompt and static).

    python benchmarks/plot_speed_quality.py result/truthfulqa/res/both/results.json bench_decode.json
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from utils.cli import cli_entry  # noqa: E402
from utils.errors import PipelineError  # noqa: E402
from utils.io import read_json  # noqa: E402
from utils.plotting import plot_speed_quality  # noqa: E402
from utils.quality import MEASURES  # noqa: E402
from utils.sources import label_free_sources  # noqa: E402

MEASURE = "bleu"
SOURCES = list(label_free_sources())   # prompt, static and the per-token sources
OUT = None          # None: speed_quality.png/.pdf beside results.json


@cli_entry
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", help="results.json of a main.py sweep")
    p.add_argument("bench_json", nargs="+",
                   help="decode benchmark JSONs (bench_decode.py --json): one panel per device and batch")
    p.add_argument("--source", nargs="+", default=list(SOURCES),
                   help="mask sources to draw (default: the label-free ones, which the sparse model runs)")
    p.add_argument("--measure", default=MEASURE, choices=MEASURES, help="quality measure on the y-axis")
    p.add_argument("--out", default=OUT, help="output stem (writes .png and .pdf)")
    args = p.parse_args(argv)
    try:
        results = read_json(args.results)
        curves = results["curves"]
        if not isinstance(curves, dict) or not all(isinstance(c, dict) and isinstance(c.get("points"), list)
                                                   for c in curves.values()):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError):
        raise PipelineError(f"{args.results} is not a sweep's results.json; run main.py first") from None
    stem = Path(args.out) if args.out else Path(args.results).with_name("speed_quality")
    plot_speed_quality(results, args.bench_json, stem, args.measure, sources=args.source)
    print(f"wrote {stem}.png, {stem}.pdf")


if __name__ == "__main__":
    main()

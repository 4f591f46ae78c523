"""Are two result folders the same, sample for sample?  Labels, every score file (bit for bit), the
sweep's per-sample rows and the curves.  Prints one line per file and a JSON summary.

    python benchmarks/compare_runs.py RESULT_DIR_A RESULT_DIR_B [--json same.json]
"""
import argparse
import json
import sys
from pathlib import Path

import torch


def same_scores(a: Path, b: Path) -> bool:
    x, y = torch.load(a), torch.load(b)
    return len(x) == len(y) and all(torch.equal(p, q) for p, q in zip(x, y))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    same = {}
    for f in sorted(args.a.rglob("*.pt")):
        other = args.b / f.relative_to(args.a)
        same[str(f.relative_to(args.a))] = other.exists() and same_scores(f, other)
    for name in ("labels.json", "res/both/per_sample.json"):
        fa, fb = args.a / name, args.b / name
        same[name] = fa.exists() and fb.exists() and json.loads(fa.read_text()) == json.loads(fb.read_text())
    ra, rb = (json.loads((d / "res/both/results.json").read_text())["curves"] for d in (args.a, args.b))
    same["res/both/results.json curves"] = ra == rb
    for name, ok in same.items():
        print(f"{'same' if ok else 'DIFFERENT'}  {name}")
    if args.json:
        Path(args.json).write_text(json.dumps(same, indent=1))
    sys.exit(0 if all(same.values()) else 1)


if __name__ == "__main__":
    main()

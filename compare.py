"""Is one curve of a sweep better than another beyond the noise of its samples?  For two curves of one
main.py sweep (a metric, e.g. ``cor_gxo``, or ``metric@source``, e.g. ``magnitude@static``), at each ratio
both have: each curve's value, their difference and its 95 % paired-bootstrap interval over the samples both
evaluated (the same samples drawn for both curves in every resample, seeded; utils/intervals.py).  A
difference whose interval excludes 0 is "outside the noise" of these samples; one whose interval holds 0 is
not separable.  The statistics are the sweep's own (METHOD §6): BLEU and token agreement per-sample means,
KL and perplexity token-weighted over the masked steps.

    python compare.py result/truthfulqa --a cor_gxo --b ig                     # every shared ratio
    python compare.py docs/smollm2-135m_truthfulqa-100_per_token_per_sample.json.gz --a cor_gxo --b wina
    python compare.py result/truthfulqa --a magnitude@online --b magnitude@static --ratios 0.1 --measure bleu kl

The same for evaluate.py's results (``eval/results.json``; METHOD §11): two of its curves (``dense``,
``magnitude@static``, ...; ``dense`` stands beside every ratio of the other), paired over the task's rows
(accuracy: the share of rows answered right, ``<task>:<acc|acc_norm>``) or the corpus's texts (perplexity,
token-weighted, ``ppl:<corpus>``); every task's acc and every corpus by default:

    python compare.py result/truthfulqa/eval --a magnitude@static --b wina@static --measure piqa:acc ppl:wiki
"""
import argparse
import gzip
import json
from pathlib import Path

import numpy as np

from utils.artifacts import SWEEP_DIR
from utils.cli import cli_entry
from utils.errors import PipelineError
from utils.intervals import paired_difference
from utils.io import read_json, write_json
from utils.quality import MEASURES
from utils.sources import curve_key

MEASURE = ["bleu", "kl"]      # a sweep's: any of MEASURES (an evaluation's default: every task's acc and corpus)
RATIOS = None                 # deactivation ratios to compare (None: every ratio both curves have)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", type=Path,
                   help="a result folder, its sweep folder, or a per_sample.json (or .json.gz, as in docs/); or "
                        "an evaluation: its eval/ folder or results.json")
    p.add_argument("--a", required=True, help="the first curve: a metric (its oracle curve) or metric@source")
    p.add_argument("--b", required=True, help="the curve it is compared with")
    p.add_argument("--ratios", type=float, nargs="+", default=RATIOS,
                   help="deactivation ratios p (default: every ratio both curves have)")
    p.add_argument("--measure", nargs="+", default=None,
                   help=f"a sweep's quality measures, any of {' '.join(MEASURES)} (default: {' '.join(MEASURE)}); "
                        "an evaluation's <task>:<acc|acc_norm> and ppl:<corpus> (default: all)")
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    return p


def per_sample_file(path: Path) -> Path:
    """The sweep's per_sample.json from a result folder, its sweep folder or the file itself; or an
    evaluation's results.json (its eval/ folder, or the file)."""
    for candidate in (path, path / "per_sample.json", path / SWEEP_DIR / "per_sample.json", path / "results.json"):
        if candidate.is_file():
            return candidate
    raise PipelineError(f"no per_sample.json at {path} (nor {path / SWEEP_DIR}); run main.py for that folder first")


def _chosen_ratios(shared: list, ratios) -> list:
    """``ratios`` (all of them in ``shared``, else a one-line error), or every shared ratio."""
    if ratios is None:
        return shared
    missing = [p for p in ratios if float(p) not in shared]
    if missing:
        raise PipelineError(f"ratio {missing[0]:g} is not in both curves; they share: "
                            f"{', '.join(f'{p:g}' for p in shared)}")
    return [float(p) for p in ratios]


def _paired_row(measure: str, p, a: str, b: str, side_a: tuple, side_b: tuple, transform) -> dict:
    """One output row: both curves' statistic over the same samples (``side``: values, weights), their
    difference and its paired interval."""
    (va, wa), (vb, wb) = side_a, side_b
    diff, interval = paired_difference(va, vb, wa, wb, transform)
    return {"measure": measure, "ratio": p, "a": a, "b": b, "samples": len(va),
            "value_a": _statistic(va, wa, transform), "value_b": _statistic(vb, wb, transform),
            "difference": diff, "interval": interval,
            "separable": interval is not None and (interval[0] > 0 or interval[1] < 0)}


def eval_curves(results: dict) -> dict:
    """``{curve: {ratio: {measure: (values, weights, transform)}}}`` from evaluate.py's results: per task and
    metric the rows' values (``<task>:<metric>``), per corpus the texts' mean NLL per token weighted by their
    tokens, mapped through exp (``ppl:<corpus>``)."""
    curves = {}
    try:
        for t in results["accuracy"]:
            for row in t["rows"]:
                for m in t["metrics"]:
                    curves.setdefault(row["curve"], {}).setdefault(row["ratio"], {})[f"{t['task']}:{m}"] = (
                        row["items"][m], None, None)
        for c in results["perplexity"]:
            counts = c["text_tokens"]
            for row in c["rows"]:
                kept = [(n / k, k) for n, k in zip(row["text_nll"], counts) if k]
                curves.setdefault(row["curve"], {}).setdefault(row["ratio"], {})[f"ppl:{c['corpus']}"] = (
                    [v for v, _ in kept], [k for _, k in kept], np.exp)
    except KeyError:
        raise PipelineError("this evaluation keeps no per-row values (made before they were kept); rerun "
                            "evaluate.py for that folder") from None
    except TypeError:
        raise PipelineError("the file is not evaluate.py's results.json; point at a run's eval/ folder") from None
    return curves


def compare_eval(results: dict, a: str, b: str, ratios=None, measures=None) -> list[dict]:
    """As :func:`compare`, for two curves of an evaluation; ``dense`` (no ratio) pairs with every ratio."""
    curves = eval_curves(results)
    for name in (a, b):
        if name not in curves:
            raise PipelineError(f"no curve {name!r} in this evaluation; it has: {', '.join(sorted(curves))}")
    def ratios_of(name):
        return {p for p in curves[name] if p is not None}
    shared = sorted(ratios_of(a) & ratios_of(b) if ratios_of(a) and ratios_of(b) else ratios_of(a) | ratios_of(b))
    shared = _chosen_ratios(shared, ratios)
    available = sorted(next(iter(curves[a].values())))
    if measures is None:
        measures = [m for m in available if m.endswith(":acc") or m.startswith("ppl:")]
    bad = [m for m in measures if m not in available]
    if bad:
        raise PipelineError(f"no measure {bad[0]!r} in this evaluation; it has: {', '.join(available)}")
    out = []
    for measure in measures:
        for p in shared:
            va, wa, t = curves[a].get(p, curves[a].get(None))[measure]
            vb, wb, _ = curves[b].get(p, curves[b].get(None))[measure]
            out.append(_paired_row(measure, p, a, b, (va, wa), (vb, wb), t))
    return out


def curves_of(rows: list[dict]) -> dict:
    """``{curve name: {ratio: {sample: row}}}`` from the sweep's per-sample rows."""
    curves = {}
    try:
        for r in rows:
            curves.setdefault(curve_key(r["metric"], r["source"]), {}).setdefault(float(r["ratio"]), {})[
                r["sample"]] = r
    except (KeyError, TypeError, ValueError):
        raise PipelineError("the file does not hold a sweep's per-sample rows; point at main.py's "
                            "per_sample.json") from None
    return curves


def _statistic(values, weights, transform) -> float:
    """The curve's value over these samples: the (weighted) mean, mapped through ``transform``."""
    if not values:
        return float("nan")
    mean = float(np.average(values, weights=weights))
    return float(transform(mean)) if transform is not None else mean


def compare(rows: list[dict], a: str, b: str, ratios=None, measures=MEASURE) -> list[dict]:
    """One row per measure and ratio: both curves' statistic over the samples they share, the difference
    and its paired 95 % interval (None with fewer than two shared samples)."""
    from utils.sweep_results import measure_samples     # noqa: PLC0415  (the sweep's one definition)

    curves = curves_of(rows)
    if not curves:
        raise PipelineError("the file holds no per-sample rows; point at a finished main.py sweep's per_sample.json")
    for name in (a, b):
        if name not in curves:
            raise PipelineError(f"no curve {name!r} in this sweep; it has: {', '.join(sorted(curves))}")
    shared = sorted(set(curves[a]) & set(curves[b]))
    shared = _chosen_ratios(shared, ratios)
    out = []
    for measure in measures:
        for p in shared:
            ra, rb = curves[a][p], curves[b][p]
            samples = sorted(set(ra) & set(rb))
            if measure in ("kl", "ppl"):      # both need a KL (a masked step) for the pair to count
                samples = [s for s in samples if ra[s]["kl"] is not None and rb[s]["kl"] is not None]
            va, wa, t = measure_samples([ra[s] for s in samples], measure)
            vb, wb, _ = measure_samples([rb[s] for s in samples], measure)
            out.append(_paired_row(measure, p, a, b, (va, wa), (vb, wb), t))
    return out


def _show(rows: list[dict]) -> str:
    a, b = rows[0]["a"], rows[0]["b"]
    lines = [f"{'measure':<20}{'p':>6}{a:>20}{b:>20}{'a - b':>12}  {'95 % paired interval':<24}{'n':>5}"]
    for r in rows:
        iv = "—" if r["interval"] is None else f"[{r['interval'][0]:+.4g}, {r['interval'][1]:+.4g}]"
        verdict = "outside the noise" if r["separable"] else "not separable"
        lines.append(f"{r['measure']:<20}{r['ratio']:>6g}{r['value_a']:>20.4g}{r['value_b']:>20.4g}"
                     f"{r['difference']:>+12.4g}  {iv:<24}{r['samples']:>5}  {verdict}")
    return "\n".join(lines)


@cli_entry
def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.a == args.b:
        raise PipelineError("--a and --b name the same curve; compare two different curves")
    path = per_sample_file(args.results)
    try:
        rows = json.loads(gzip.decompress(path.read_bytes())) if path.suffix == ".gz" else read_json(path)
    except (OSError, ValueError, EOFError):
        raise PipelineError(f"{path} cannot be read as JSON; rerun main.py for that folder") from None
    if isinstance(rows, dict) and "accuracy" in rows:
        result = compare_eval(rows, args.a, args.b, args.ratios, args.measure)
    elif isinstance(rows, list):
        bad = [m for m in args.measure or [] if m not in MEASURES]
        if bad:
            raise PipelineError(f"--measure {bad[0]} is not a sweep's measure: one of {', '.join(MEASURES)}")
        result = compare(rows, args.a, args.b, args.ratios, args.measure or MEASURE)
    else:
        raise PipelineError(f"{path} does not hold a sweep's per-sample rows; point at main.py's per_sample.json")
    print(_show(result))
    if args.json:
        write_json(args.json, {"per_sample": str(path), "rows": result})
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()

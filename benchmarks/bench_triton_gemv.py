"""The masked Triton kernels of utils/triton_gemv.py on their own, on a GPU: each against the dense GEMV of the
same weight (``F.linear``) and against the stock gathers they replace, at several kept shares, in one run, with
their error against a float32 reference.

    python benchmarks/bench_triton_gemv.py --json triton_gemv.json        # Phi-2's shapes, bf16, CUDA graphs

Shapes (Phi-2's): the query projection (2560 -> 2560, 80-row heads), fc1 (2560 -> 10240, 1-row neurons), the
output projection and fc2 as column products (2560 and 10240 input channels).  Each timing is one CUDA graph
of ``REPLAYS`` calls, replayed ``REPEATS`` times (median), so launch overhead is amortised as in a compiled
decode step; the bytes-ideal is the dense time times the kept share.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.cli import cli_entry  # noqa: E402
from utils.errors import PipelineError  # noqa: E402
from utils.io import write_json  # noqa: E402

SHAPES = [  # name, kind, units, group, input width (rows) or output width (columns)
    ("q_proj rows (heads)", "rows", 32, 80, 2560),
    ("fc1 rows (neurons)", "rows", 10240, 1, 2560),
    ("out_proj columns (heads)", "columns", 32, 80, 2560),
    ("fc2 columns (neurons)", "columns", 10240, 1, 2560),
]
KEPT = [1.0, 0.5, 0.3]
DTYPE = "bfloat16"
REPLAYS = 50
REPEATS = 7
SEED = 0


def graphed(fn, replays: int):
    """``fn`` called ``replays`` times, captured in one CUDA graph (warmed up outside the capture)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(replays):
            fn()
    return graph.replay


def time_us(fn, replays: int, repeats: int) -> float:
    """Median microseconds per call of ``fn`` (graphed)."""
    replay = graphed(fn, replays)
    replay()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        replay()
        end.record()
        end.synchronize()
        times.append(1e3 * start.elapsed_time(end) / replays)
    return statistics.median(times)


def measure(name, kind, units, group, width, share, dtype, args) -> dict:
    from utils.triton_gemv import masked_columns, masked_rows

    g = torch.Generator(device="cuda").manual_seed(SEED)
    channels = units * group
    k = max(1, round(share * units))
    keep = torch.zeros(units, dtype=torch.bool, device="cuda")
    keep[torch.randperm(units, generator=g, device="cuda")[:k]] = True
    idx = keep.repeat_interleave(group).nonzero().view(-1)
    if kind == "rows":                                   # w [channels, width] @ x [width]
        w = torch.randn(channels, width, generator=g, device="cuda", dtype=dtype) / width ** 0.5
        x = torch.randn(width, generator=g, device="cuda", dtype=dtype)
        ref = torch.where(keep.repeat_interleave(group), w.float() @ x.float(), torch.zeros((), device="cuda"))
        calls = {"dense F.linear": lambda: F.linear(x, w),
                 "stock index_select + mv": lambda: torch.mv(w.index_select(0, idx), x),
                 "triton masked_rows": lambda: masked_rows(w, x, keep, group)}
        got = masked_rows(w, x, keep, group)
    else:                                                # x [channels] @ wt [channels, width]
        wt = torch.randn(channels, width, generator=g, device="cuda", dtype=dtype) / channels ** 0.5
        x = torch.randn(channels, generator=g, device="cuda", dtype=dtype)
        offsets = torch.zeros(1, dtype=torch.long, device="cuda")
        ref = (x.float() * keep.repeat_interleave(group)) @ wt.float()
        calls = {"dense F.linear": lambda: F.linear(x, wt.t()),
                 "stock embedding_bag": lambda: F.embedding_bag(idx, wt, offsets, per_sample_weights=x[idx],
                                                                mode="sum"),
                 "stock index_select + mv": lambda: torch.mv(wt.index_select(0, idx).t(), x[idx]),
                 "triton masked_columns": lambda: masked_columns(wt, x, keep, group)}
        got = masked_columns(wt, x, keep, group)
    err = float((got.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
    times = {label: time_us(fn, args.replays, args.repeats) for label, fn in calls.items()}
    dense = times["dense F.linear"]
    row = {"shape": name, "kind": kind, "kept": share, "units_kept": k, "units": units, "rel_err": err,
           "us": times, "speedup_vs_dense": {label: dense / t for label, t in times.items()},
           "ideal": 1.0 / (k / units)}
    print(f"{name}, kept {share}: " + ", ".join(f"{label} {t:.1f} us ({dense / t:.2f}x)" for label, t in
                                                times.items()) + f"; rel err {err:.1e}", flush=True)
    return row


def run(args) -> dict:
    if not torch.cuda.is_available():
        raise PipelineError("bench_triton_gemv times the Triton kernels on a GPU; this machine has none "
                            "(tests/test_triton_gemv.py checks them on a CPU)")
    dtype = getattr(torch, args.dtype)
    rows = [measure(*shape, share, dtype, args) for shape in SHAPES for share in args.kept]
    return {"settings": {"device_name": torch.cuda.get_device_name(), "dtype": args.dtype, "replays": args.replays,
                         "repeats": args.repeats, "torch": torch.__version__,
                         "triton": __import__("triton").__version__}, "rows": rows}


def markdown(result: dict) -> str:
    s = result["settings"]
    labels = list(dict.fromkeys(label for r in result["rows"] for label in r["us"]))
    lines = [f"{s['device_name']}, {s['dtype']}, µs per call (CUDA graph of {s['replays']} calls, median of "
             f"{s['repeats']}) and speed-up over the dense GEMV", "",
             "| shape | kept | " + " | ".join(labels) + " | ideal | rel. error |",
             "| --- | --- | " + " | ".join("---" for _ in labels) + " | --- | --- |"]
    for r in result["rows"]:
        cells = [f"{r['us'][label]:.1f} ({r['speedup_vs_dense'][label]:.2f}x)" if label in r["us"] else "-"
                 for label in labels]
        lines.append(f"| {r['shape']} | {r['kept']} | " + " | ".join(cells) + f" | {r['ideal']:.2f}x | "
                     f"{r['rel_err']:.1e} |")
    return "\n".join(lines)


@cli_entry
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kept", type=float, nargs="+", default=KEPT)
    p.add_argument("--dtype", default=DTYPE, choices=("bfloat16", "float16", "float32"))
    p.add_argument("--replays", type=int, default=REPLAYS)
    p.add_argument("--repeats", type=int, default=REPEATS)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if any(not 0 < k <= 1 for k in args.kept) or args.replays < 1 or args.repeats < 1:
        raise PipelineError("need --kept in (0, 1], --replays >= 1, --repeats >= 1")
    result = run(args)
    print(markdown(result))
    if args.json:
        write_json(Path(args.json), result)
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()

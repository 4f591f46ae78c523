"""Masked matrix-vector products for the gathered per-token decode on a GPU (utils/gathered.py, ``kernels="triton"``):
two Triton kernels that read only the kept units' weights, in place, with shape-static inputs (a boolean keep
mask, not a list of indices), so a decode step that uses them needs no host synchronisation and can be captured
whole in a CUDA graph.

- :func:`masked_rows` ``(w [R, in], x [in], keep [R // group]) -> [R]``: ``w[r] · x`` for every row whose unit
  ``r // group`` is kept, 0 for the others (the query rows of a head, the gate/up rows of a neuron).
- :func:`masked_columns` ``(wt [in, out], x [in], keep [in // group]) -> [out]``: ``Σ x[i] · wt[i]`` over the kept
  input channels (the output-projection columns of the kept heads, the down columns of the kept neurons, a TEAL
  projection's kept inputs); split over the input in blocks whose partial sums are added atomically.

Why masks, and why Triton: a masked-off lane of a load issues no memory read, so a block of rows whose unit is
pruned costs nothing but its share of the keep mask, the way TEAL's own kernel skips pruned channels, while stock
PyTorch gathers either copy the kept rows first (``index_select``: the weights read twice) or, for one bag of
thousands of indices (``embedding_bag``), run on the GPU at a few per cent of its bandwidth (BENCHMARKS.md).
Products accumulate in float32 and are returned in float32: the caller's cast back to the weights' dtype is
then one element-wise operation that a compiler fuses with the bias or activation that follows.

On a machine without a GPU the same kernels run in Triton's interpreter (``triton.runtime.interpreter``), slowly:
that is how the tests check them against plain PyTorch.  Both are registered as PyTorch custom operators, so
``torch.compile`` (``fullgraph=True``) treats them as opaque calls.
"""
from __future__ import annotations

import os
import sys

import torch

from .errors import PipelineError

# block sizes: the interpreter's (CPU tests); on a GPU triton.autotune picks among CONFIGS per shape on first use.
# rows: BLOCK_R rows a program, its input read in BLOCK_K chunks; columns: BLOCK_N outputs a program, over
# BLOCK_K input channels (partial sums added atomically)
INTERPRETED_BLOCKS = {"rows": dict(BLOCK_R=16, BLOCK_K=128), "columns": dict(BLOCK_K=64, BLOCK_N=128),
                      "threshold_columns": dict(BLOCK_K=64, BLOCK_N=128)}
CONFIGS = {"rows": [dict(BLOCK_R=r, BLOCK_K=k) for r, k in ((4, 256), (8, 256), (16, 128), (16, 256), (32, 128))],
           "columns": [dict(BLOCK_K=k, BLOCK_N=n) for k, n in ((32, 128), (64, 128), (32, 256), (64, 256),
                                                               (128, 64))]}
CONFIGS["threshold_columns"] = CONFIGS["columns"]
KEYS = {"rows": ["R", "IN"], "columns": ["IN", "OUT"], "threshold_columns": ["IN", "OUT"]}

_kernels = {}
if "triton" not in sys.modules and not torch.cuda.is_available():
    # no GPU: the kernels can only be interpreted, and triton decides that when it is first imported (it may be
    # imported by torch.compile before any kernel is asked for)
    os.environ.setdefault("TRITON_INTERPRET", "1")


def require() -> None:
    """Fail now, in one line, if triton is missing (rather than at the first decode step)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        raise PipelineError("the triton kernels need the triton package (pip install triton; CUDA builds of "
                            "torch bring it); or use kernels='stock'") from None


def _kernel(name: str, device: torch.device):
    """The kernel ``name``: compiled for a GPU; on a CPU, interpreted."""
    if name not in _kernels:
        require()
        import triton

        from . import _triton_kernels

        kernel = triton.jit(getattr(_triton_kernels, f"{name}_kernel"))
        if not triton_interpreted():
            # the autotuner reruns a kernel while timing it: the atomically added output is zeroed before each run
            kernel = triton.autotune([triton.Config(c) for c in CONFIGS[name]], key=KEYS[name],
                                     reset_to_zero=["out_ptr"] if "columns" in name else None)(kernel)
        _kernels[name] = kernel
    if (device.type == "cpu") != triton_interpreted():
        raise PipelineError(f"the triton kernels on {device.type} need TRITON_INTERPRET={int(device.type == 'cpu')} "
                            "when triton is first imported; start a new process with it set")
    return _kernels[name]


def _launch(name: str, device: torch.device, grid, *args, **constexprs) -> None:
    """Run kernel ``name`` over ``grid(blocks)``: with the autotuner's blocks on a GPU, the interpreter's on a CPU."""
    blocks = INTERPRETED_BLOCKS[name] if device.type == "cpu" else {}
    _kernel(name, device)[grid](*args, **constexprs, **blocks)


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def triton_interpreted() -> bool:
    """Whether the imported triton interprets kernels on the host (``TRITON_INTERPRET=1``)."""
    import triton

    return bool(triton.knobs.runtime.interpret)


def _check(w: torch.Tensor, x: torch.Tensor, keep: torch.Tensor | None, group: int, what: str) -> None:
    """A contiguous 2-D weight and 1-D input of one dtype; a bool ``keep`` of ``w.shape[0] // group`` units."""
    if w.dim() != 2 or not w.is_contiguous() or x.dim() != 1 or not x.is_contiguous() or (
            keep is not None and keep.dtype != torch.bool):
        raise PipelineError(f"{what}: a contiguous 2-D weight, a contiguous 1-D input and a bool keep mask, "
                            f"not {tuple(w.shape)}, {tuple(x.shape)}, {None if keep is None else keep.dtype}")
    if x.dtype != w.dtype or (keep is not None and (keep.dim() != 1 or keep.shape[0] * group != w.shape[0])):
        raise PipelineError(f"{what}: keep [{w.shape[0] // max(group, 1)}] of {group}-wide units and an input of "
                            f"the weight's dtype, not keep {None if keep is None else tuple(keep.shape)}, "
                            f"input {x.dtype}")


def _columns_grid(IN: int, OUT: int):
    return lambda meta: (triton_cdiv(OUT, meta["BLOCK_N"]), triton_cdiv(IN, meta["BLOCK_K"]))


@torch.library.custom_op("sparse_activation::masked_rows", mutates_args=())
def masked_rows(w: torch.Tensor, x: torch.Tensor, keep: torch.Tensor, group: int) -> torch.Tensor:
    """``[R]`` float32: ``w[r] · x`` where unit ``r // group`` is kept, else 0 (``w`` ``[R, in]``, ``keep``
    ``[R // group]``)."""
    _check(w, x, keep, group, "masked_rows")
    R, IN = w.shape
    out = torch.empty(R, device=w.device, dtype=torch.float32)
    _launch("rows", w.device, lambda meta: (triton_cdiv(R, meta["BLOCK_R"]),), w, x, keep.contiguous(), out, R, IN,
            group)
    return out


@masked_rows.register_fake
def _(w, x, keep, group):
    return w.new_empty(w.shape[0], dtype=torch.float32)


@torch.library.custom_op("sparse_activation::masked_columns", mutates_args=())
def masked_columns(wt: torch.Tensor, x: torch.Tensor, keep: torch.Tensor, group: int) -> torch.Tensor:
    """``[out]`` float32: ``Σ_i x[i] · wt[i]`` over the input channels ``i`` whose unit ``i // group`` is kept
    (``wt`` ``[in, out]``, ``keep`` ``[in // group]``)."""
    _check(wt, x, keep, group, "masked_columns")
    IN, OUT = wt.shape
    out = torch.zeros(OUT, device=wt.device, dtype=torch.float32)
    _launch("columns", wt.device, _columns_grid(IN, OUT), wt, x, keep.contiguous(), out, IN, OUT, group)
    return out


@masked_columns.register_fake
def _(wt, x, keep, group):
    return wt.new_empty(wt.shape[1], dtype=torch.float32)


@torch.library.custom_op("sparse_activation::threshold_columns", mutates_args=())
def threshold_columns(wt: torch.Tensor, x: torch.Tensor, threshold: float, norms: torch.Tensor | None) -> torch.Tensor:
    """``[out]`` float32: ``Σ_i x[i] · wt[i]`` over the input channels with ``|x[i]| (· norms[i]) >= threshold``
    (float32 scores; ``norms`` float32 ``[in]`` or None)."""
    _check(wt, x, None, 1, "threshold_columns")
    if norms is not None and (norms.dtype != torch.float32 or norms.shape != (wt.shape[0],)):
        raise PipelineError(f"threshold_columns: norms float32 [{wt.shape[0]}], not {norms.dtype} {tuple(norms.shape)}")
    IN, OUT = wt.shape
    out = torch.zeros(OUT, device=wt.device, dtype=torch.float32)
    _launch("threshold_columns", wt.device, _columns_grid(IN, OUT), wt, x, x if norms is None else norms.contiguous(),
            out, IN, OUT, float(threshold), HAS_NORM=norms is not None)
    return out


@threshold_columns.register_fake
def _(wt, x, threshold, norms):
    return wt.new_empty(wt.shape[1], dtype=torch.float32)

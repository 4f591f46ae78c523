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

# block sizes: the interpreter's (CPU tests); on a GPU triton.autotune picks among CONFIGS per shape on first use
BLOCK_ROWS = 16       # rows of one program of masked_rows (its input read in BLOCK_IN chunks)
BLOCK_IN = 128
BLOCK_OUT = 128       # output columns of one program of masked_columns
BLOCK_SPLIT = 64      # input channels of one program of masked_columns (partial sums added atomically)
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
    interpreted = bool(triton_interpreted())
    if (device.type == "cpu") != interpreted:
        raise PipelineError(f"the triton kernels on {device.type} need TRITON_INTERPRET={int(device.type == 'cpu')} "
                            "when triton is first imported; start a new process with it set")
    return _kernels[name]


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def triton_interpreted() -> bool:
    """Whether the imported triton interprets kernels on the host (``TRITON_INTERPRET=1``)."""
    import triton

    return bool(triton.knobs.runtime.interpret)


def _check(w: torch.Tensor, x: torch.Tensor, keep: torch.Tensor, units_dim: int, group: int, what: str) -> None:
    if w.dim() != 2 or not w.is_contiguous() or x.dim() != 1 or not x.is_contiguous() or keep.dtype != torch.bool:
        raise PipelineError(f"{what}: a contiguous 2-D weight, a contiguous 1-D input and a bool keep mask, "
                            f"not {tuple(w.shape)}, {tuple(x.shape)}, {keep.dtype}")
    if keep.dim() != 1 or keep.shape[0] * group != w.shape[units_dim] or x.dtype != w.dtype:
        raise PipelineError(f"{what}: keep [{w.shape[units_dim] // max(group, 1)}] of {group}-wide units and an "
                            f"input of the weight's dtype, not keep {tuple(keep.shape)}, input {x.dtype}")


@torch.library.custom_op("sparse_activation::masked_rows", mutates_args=())
def masked_rows(w: torch.Tensor, x: torch.Tensor, keep: torch.Tensor, group: int) -> torch.Tensor:
    """``[R]`` float32: ``w[r] · x`` where unit ``r // group`` is kept, else 0 (``w`` ``[R, in]``, ``keep``
    ``[R // group]``)."""
    _check(w, x, keep, 0, group, "masked_rows")
    R, IN = w.shape
    out = torch.empty(R, device=w.device, dtype=torch.float32)
    kernel = _kernel("rows", w.device)
    if w.device.type == "cpu":
        kernel[((R + BLOCK_ROWS - 1) // BLOCK_ROWS,)](w, x, keep.contiguous(), out, R, IN, group,
                                                    BLOCK_R=BLOCK_ROWS, BLOCK_K=BLOCK_IN)
    else:
        kernel[lambda meta: (triton_cdiv(R, meta["BLOCK_R"]),)](w, x, keep.contiguous(), out, R, IN, group)
    return out


@masked_rows.register_fake
def _(w, x, keep, group):
    return w.new_empty(w.shape[0], dtype=torch.float32)


@torch.library.custom_op("sparse_activation::masked_columns", mutates_args=())
def masked_columns(wt: torch.Tensor, x: torch.Tensor, keep: torch.Tensor, group: int) -> torch.Tensor:
    """``[out]`` float32: ``Σ_i x[i] · wt[i]`` over the input channels ``i`` whose unit ``i // group`` is kept
    (``wt`` ``[in, out]``, ``keep`` ``[in // group]``)."""
    _check(wt, x, keep, 0, group, "masked_columns")
    IN, OUT = wt.shape
    out = torch.zeros(OUT, device=wt.device, dtype=torch.float32)
    kernel = _kernel("columns", wt.device)
    if wt.device.type == "cpu":
        kernel[(triton_cdiv(OUT, BLOCK_OUT), triton_cdiv(IN, BLOCK_SPLIT))](wt, x, keep.contiguous(), out, IN, OUT,
                                                                           group, BLOCK_K=BLOCK_SPLIT,
                                                                           BLOCK_N=BLOCK_OUT)
    else:
        kernel[lambda meta: (triton_cdiv(OUT, meta["BLOCK_N"]), triton_cdiv(IN, meta["BLOCK_K"]))](
            wt, x, keep.contiguous(), out, IN, OUT, group)
    return out


@masked_columns.register_fake
def _(wt, x, keep, group):
    return wt.new_empty(wt.shape[1], dtype=torch.float32)


@torch.library.custom_op("sparse_activation::threshold_columns", mutates_args=())
def threshold_columns(wt: torch.Tensor, x: torch.Tensor, threshold: float, norms: torch.Tensor | None) -> torch.Tensor:
    """``[out]`` float32: ``Σ_i x[i] · wt[i]`` over the input channels with ``|x[i]| (· norms[i]) >= threshold``
    (float32 scores; ``norms`` float32 ``[in]`` or None)."""
    _check(wt, x, torch.ones(wt.shape[0], dtype=torch.bool), 0, 1, "threshold_columns")
    if norms is not None and (norms.dtype != torch.float32 or norms.shape != (wt.shape[0],)):
        raise PipelineError(f"threshold_columns: norms float32 [{wt.shape[0]}], not {norms.dtype} {tuple(norms.shape)}")
    IN, OUT = wt.shape
    out = torch.zeros(OUT, device=wt.device, dtype=torch.float32)
    kernel = _kernel("threshold_columns", wt.device)
    args = (wt, x, x if norms is None else norms.contiguous(), out, IN, OUT, float(threshold))
    if wt.device.type == "cpu":
        kernel[(triton_cdiv(OUT, BLOCK_OUT), triton_cdiv(IN, BLOCK_SPLIT))](*args, HAS_NORM=norms is not None,
                                                                           BLOCK_K=BLOCK_SPLIT, BLOCK_N=BLOCK_OUT)
    else:
        kernel[lambda meta: (triton_cdiv(OUT, meta["BLOCK_N"]), triton_cdiv(IN, meta["BLOCK_K"]))](
            *args, HAS_NORM=norms is not None)
    return out


@threshold_columns.register_fake
def _(wt, x, threshold, norms):
    return wt.new_empty(wt.shape[1], dtype=torch.float32)

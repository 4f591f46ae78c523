"""The memory floor of batch-1 decoding: a decode step must read every weight it uses once and the KV
cache it attends to, so it cannot run faster than those bytes divided by the device's read bandwidth.

- :func:`read_bandwidth` measures that bandwidth in the same process as the timings it is compared with
  (one large reduction, the best of several: the floor is what the device *can* do);
- :func:`bytes_per_token` counts what one decode step of a model must read;
- :func:`floor_fields` turns both into the benchmark row's ``floor_ms`` and ``share_of_floor``;
- :func:`kernel_kind` sorts the profiler's device kernels into the groups that explain the gap.
"""
from __future__ import annotations

import re
import time

import torch
from torch import nn

from .architecture import decoder_layers, layer_modules, qkv_names, spell_qkv
from .errors import PipelineError
from .sparse_model import unique_params

GPU_READ_BYTES = 2 ** 30          # at least 1 GiB on a GPU: far larger than its L2 cache
CPU_READ_BYTES = 2 ** 28          # 256 MiB on a CPU: far larger than its caches


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reads(x: torch.Tensor) -> dict:
    """Reductions that read every byte of ``x`` once.  Their speeds differ by kernel (a wider element type
    means fewer, larger loads), so the fastest stands for the device."""
    out = {"sum": lambda: x.sum(dtype=torch.float32), "amax": lambda: x.amax()}
    if x.numel() % 2 == 0 and x.element_size() == 2:
        wide = x.view(torch.float32)                      # the same bytes as float32 words
        out["sum_as_float32"] = lambda: wide.sum()
    return out


def read_bandwidth(device, dtype: torch.dtype = torch.float32, nbytes: int | None = None, repeats: int = 5) -> dict:
    """Bytes per second of one large read on ``device``: reductions over a tensor of ``nbytes`` (default 1 GiB
    on a GPU, 256 MiB on a CPU) in ``dtype``, the fastest of ``repeats`` timed runs of each after a warm-up,
    the fastest reduction kept.  Returns ``{"bytes_per_s", "nbytes", "seconds", "dtype", "kernel"}``."""
    device = torch.device(device)
    nbytes = nbytes or (GPU_READ_BYTES if device.type == "cuda" else CPU_READ_BYTES)
    if repeats < 1:
        raise PipelineError(f"read_bandwidth needs repeats >= 1, not {repeats}")
    elem = torch.empty((), dtype=dtype).element_size()
    x = torch.ones(max(2, nbytes // elem // 2 * 2), dtype=dtype, device=device)
    best, kernel = float("inf"), None
    for name, read in _reads(x).items():
        for i in range(repeats + 1):
            _sync(device)
            start = time.perf_counter()
            read()
            _sync(device)
            took = time.perf_counter() - start
            if i and took < best:                  # the first run warms up (allocator, kernel selection)
                best, kernel = took, name
    size = x.numel() * elem
    del x
    return {"bytes_per_s": size / best, "nbytes": size, "seconds": best, "dtype": str(dtype).replace("torch.", ""),
            "kernel": kernel}


def weight_read_bytes(model: nn.Module, batch: int = 1) -> int:
    """Bytes of parameters one decode step reads: every parameter in full, except an input embedding
    table that is not also the LM head, of which only the ``batch`` looked-up rows are read."""
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == emb.data_ptr()
    total = 0
    for p in unique_params(model):
        if p.data_ptr() == emb.data_ptr() and not tied:
            total += batch * p.shape[-1] * p.element_size()
        else:
            total += p.numel() * p.element_size()
    return total


def kv_bytes_per_position(model: nn.Module) -> int:
    """Bytes of keys and values one position adds to the KV cache over all layers: the output widths of
    every layer's key and value projections (a sparse model's kept KV heads) in the weights' dtype."""
    total = 0
    for i, layer in enumerate(decoder_layers(model)):
        attention = layer_modules(layer, i).attention
        names = qkv_names(attention)
        if names is None:
            raise PipelineError(f"cannot read the key/value widths of {type(model).__name__}: its attention has no "
                                f"separate {spell_qkv()} projections")
        for name in names[1:]:                    # key, value
            proj = getattr(attention, name)
            total += proj.out_features * proj.weight.element_size()
    return total


def bytes_per_token(model: nn.Module, batch: int, prompt_len: int, new_tokens: int) -> dict:
    """What one decode step must read, on average over the ``new_tokens - 1`` steps after the prompt:
    the weights (:func:`weight_read_bytes`) and each sequence's KV cache at its mean length (step ``s``
    feeds position ``prompt_len + s - 1`` and attends to ``prompt_len + s`` positions, s = 1 .. new_tokens - 1:
    ``prompt_len + new_tokens / 2`` on average)."""
    mean_len = prompt_len + new_tokens / 2
    weights = weight_read_bytes(model, batch)
    kv = batch * mean_len * kv_bytes_per_position(model)
    return {"weights": weights, "kv_cache": int(kv), "total": int(weights + kv), "mean_cache_len": mean_len}


def floor_fields(read_bytes: int, bandwidth: float, ms_per_token: float) -> dict:
    """``floor_ms``: the time to read ``read_bytes`` at ``bandwidth`` bytes/s; ``share_of_floor``: that
    floor over the measured time (1.0 = at the memory limit)."""
    floor_ms = 1e3 * read_bytes / bandwidth
    return {"read_bytes": int(read_bytes), "floor_ms": floor_ms, "share_of_floor": floor_ms / ms_per_token}


# The kernel groups of the per-step breakdown, tried in order on the kernel's (lower-case) name.
KERNEL_KINDS = (
    ("attention", r"flash|fmha|attention|sdpa|softmax"),
    ("masked gemv", r"rows_kernel|columns_kernel"),          # utils/triton_gemv.py
    ("gemv", r"gemv|gemm|cublas|cutlass|sm\d+_xmma|matmul|mm_|splitk|nvjet"),
    ("norm", r"norm"),
    ("selection", r"kthvalue|topk|radix|sort"),           # before copies: gatherTopK, gatherKthValue
    ("copies", r"copy|memcpy|memset|cat_|index|gather|scatter|fill"),
)


def kernel_kind(name: str) -> str:
    """The group of a device kernel by its name: attention, gemv (any matrix product), norm, copies or
    other (elementwise, reductions, rotary, sampling...)."""
    low = name.lower()
    for kind, pattern in KERNEL_KINDS:
        if re.search(pattern, low):
            return kind
    return "other"


def kernel_breakdown(kernels, steps: int) -> dict:
    """Per decode step, from ``(name, microseconds)`` of every device kernel the profiler saw over
    ``steps`` steps: the kernel count and, per kind, kernels and microseconds."""
    if steps < 1:
        raise PipelineError(f"kernel_breakdown needs steps >= 1, not {steps}")
    kinds = {}
    for name, us in kernels:
        kind = kinds.setdefault(kernel_kind(name), {"kernels": 0, "us": 0.0})
        kind["kernels"] += 1
        kind["us"] += float(us)
    return {"kernels_per_step": sum(v["kernels"] for v in kinds.values()) / steps,
            "us_per_step": sum(v["us"] for v in kinds.values()) / steps,
            "by_kind": {k: {"kernels_per_step": v["kernels"] / steps, "us_per_step": v["us"] / steps}
                        for k, v in sorted(kinds.items())}}

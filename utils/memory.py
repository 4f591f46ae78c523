"""How much a pass may hold: a share of a GPU's free memory, and the retry at half the budget when that
estimate turns out too large."""
from __future__ import annotations

import torch

from .errors import PipelineError


def free_memory(device) -> int | None:
    """Free bytes on ``device`` if it is a CUDA device; None on any other (a CPU's is not asked)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free


def free_memory_budget(device, fraction: float, *, per_item: int = 1, lower: int = 0, upper: int | None = None,
                       otherwise=None):
    """How many items of ``per_item`` bytes ``fraction`` of ``device``'s free memory holds, kept between
    ``lower`` and ``upper`` (None: no upper bound); ``otherwise`` where free memory is not known (a CPU).

    ``int(fraction * free / per_item)``: with a power-of-two ``fraction`` and ``per_item=1`` that is
    ``free // (1 / fraction)`` exactly (a float holds every byte count below 2 ** 53)."""
    free = free_memory(device)
    if free is None:
        return otherwise
    items = max(lower, int(fraction * free / per_item))
    return items if upper is None else min(upper, items)


def halve_on_oom(run, budget: int, fix: str):
    """``run(budget)``; after an out-of-memory error, again with half the budget, down to 1.

    For budgets estimated from free memory: the estimate can be too large (memory another process takes
    meanwhile, an allocator's fragmentation).  Returns ``(result, the budget it ran with)``, so the caller
    can keep the smaller budget for later work.  A budget of 1 that runs out too raises a PipelineError
    whose message ends with ``fix``."""
    while True:
        try:
            return run(budget), budget
        except torch.OutOfMemoryError:
            if budget <= 1:
                raise PipelineError(f"out of device memory even with a budget of 1; {fix}") from None
        # outside the except block: the failed attempt's tensors are released with its traceback first
        torch.cuda.empty_cache()
        budget //= 2

"""The per-unit convention of the score files (METHOD §3): a head's gradient, GxO and IG are the *mean*
over its ``head_dim`` output dimensions (the released pipeline's layout); a neuron's are its own value.
The convention is applied by :func:`head_mean` and undone by :func:`head_sum` (the sum over the head's
dimensions, what a removal changes to first order): every module that needs either calls these."""
from __future__ import annotations

import torch

from .sites import ATTN


def head_mean(comp: str, values: torch.Tensor, head_dim: int) -> torch.Tensor:
    """``[..., width]`` per output dimension -> ``[..., units]``: heads average their ``head_dim`` dims."""
    if comp != ATTN:
        return values
    return values.reshape(*values.shape[:-1], -1, head_dim).mean(-1)


def head_sum(comp: str, scores: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Undo :func:`head_mean`: a head's score summed over its dims (``head_dim`` x the mean)."""
    return scores * head_dim if comp == ATTN else scores

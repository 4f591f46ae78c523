"""95 % confidence intervals of the sweep's quality per point: a percentile bootstrap over the samples,
seeded, so a rerun gives the same interval.  A point's samples are resampled with replacement and its
statistic (a plain mean, or a token-weighted mean) recomputed on each resample."""
from __future__ import annotations

import numpy as np

CONFIDENCE = 0.95
RESAMPLES = 2000        # percentile intervals settle to about 0.1 of their width at this count
SEED = 0                # every point draws from a fresh generator with this seed: reproducible, independent


def bootstrap_interval(values, weights=None, transform=None, *, resamples: int = RESAMPLES, seed: int = SEED,
                       confidence: float = CONFIDENCE):
    """``[low, high]`` of the ``confidence`` percentile bootstrap of the mean of ``values`` (weighted by
    ``weights`` when given, e.g. masked steps for a token-weighted mean), mapped through ``transform``
    (e.g. ``np.exp`` for perplexity from mean log-perplexities); None for fewer than two values (a single
    sample says nothing about its spread, and a zero-width interval would claim certainty)."""
    values = np.asarray(values, dtype=np.float64)
    n = values.size
    if n < 2:
        return None
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    if weights is None:
        stats = values[idx].mean(axis=1)
    else:
        w = np.asarray(weights, dtype=np.float64)
        stats = (values[idx] * w[idx]).sum(axis=1) / w[idx].sum(axis=1)
    if transform is not None:
        stats = transform(stats)
    tail = (1 - confidence) / 2
    low, high = np.quantile(stats, [tail, 1 - tail])
    return [float(low), float(high)]


def _stat(values, weights, idx):
    """Each resample's (weighted) mean: rows of ``idx`` index the samples."""
    if weights is None:
        return values[idx].mean(axis=1)
    return (values[idx] * weights[idx]).sum(axis=1) / weights[idx].sum(axis=1)


def paired_difference(a, b, weights_a=None, weights_b=None, transform=None, *, resamples: int = RESAMPLES,
                      seed: int = SEED, confidence: float = CONFIDENCE):
    """``(difference, [low, high])``: the statistic of ``a`` minus that of ``b`` (a plain or weighted mean,
    mapped through ``transform``, as :func:`bootstrap_interval`), where ``a[i]`` and ``b[i]`` are the same
    sample under two curves, and its ``confidence`` percentile interval from a paired bootstrap: each resample
    draws samples with replacement and takes both curves' values of the drawn samples, so what the samples
    share (an easy question is easy for both curves) cancels.  The interval is None for fewer than two
    samples."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired values need the same samples: {a.shape} against {b.shape}")
    wa = None if weights_a is None else np.asarray(weights_a, dtype=np.float64)
    wb = None if weights_b is None else np.asarray(weights_b, dtype=np.float64)
    t = transform if transform is not None else (lambda x: x)
    whole = np.arange(a.size)[None, :]
    diff = float(t(_stat(a, wa, whole))[0] - t(_stat(b, wb, whole))[0]) if a.size else float("nan")
    if a.size < 2:
        return diff, None
    idx = np.random.default_rng(seed).integers(0, a.size, size=(resamples, a.size))
    stats = t(_stat(a, wa, idx)) - t(_stat(b, wb, idx))
    tail = (1 - confidence) / 2
    low, high = np.quantile(stats, [tail, 1 - tail])
    return diff, [float(low), float(high)]

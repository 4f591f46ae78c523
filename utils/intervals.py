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

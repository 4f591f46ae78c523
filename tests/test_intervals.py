"""The sweep's 95 % confidence intervals (utils/intervals.py): a seeded bootstrap over samples, checked
against analytic facts, and carried into results.json, results.csv and the figures."""
from __future__ import annotations

import csv
import io
import math

import numpy as np
import pytest

from utils.intervals import bootstrap_interval
from utils.sweep_results import _csv, aggregate


def test_identical_samples_have_zero_width_and_one_sample_none():
    assert bootstrap_interval([42.0] * 7) == [42.0, 42.0]
    assert bootstrap_interval([3.0] * 5, weights=[1, 4, 2, 2, 9]) == pytest.approx([3.0, 3.0])
    assert bootstrap_interval([7.0]) is None and bootstrap_interval([]) is None


def test_seeded_and_reproducible():
    values = np.random.default_rng(5).normal(size=30)
    assert bootstrap_interval(values) == bootstrap_interval(values)
    assert bootstrap_interval(values, seed=1) != bootstrap_interval(values, seed=2)


def test_mean_interval_matches_the_normal_approximation():
    """For many samples the percentile bootstrap of a mean is mean ± 1.96 sd / sqrt(n) (sd with 1/n)."""
    values = np.random.default_rng(11).exponential(scale=3.0, size=2000)
    low, high = bootstrap_interval(values, resamples=4000)
    half = 1.959964 * values.std() / math.sqrt(values.size)
    assert low == pytest.approx(values.mean() - half, abs=0.08 * half)
    assert high == pytest.approx(values.mean() + half, abs=0.08 * half)
    # more samples from the same distribution, narrower interval (by about sqrt(4) = 2)
    few = bootstrap_interval(values[:500], resamples=4000)
    assert (few[1] - few[0]) / (high - low) == pytest.approx(2.0, rel=0.15)


def test_weighted_interval_is_of_the_token_weighted_mean():
    """Weights as masked steps: a sample of 9 steps counts 9 times in the statistic, so with that sample
    alone differing, the interval leans towards it in proportion."""
    values, weights = [0.0, 0.0, 0.0, 1.0], [1, 1, 1, 9]
    low, high = bootstrap_interval(values, weights)
    assert 0.0 <= low <= 9 / 12 <= high <= 1.0
    # the same statistic, written out: each resample's sum(v w) / sum(w), 2.5th and 97.5th percentiles
    rng = np.random.default_rng(0)
    idx = rng.integers(0, 4, size=(2000, 4))
    v, w = np.array(values), np.array(weights, dtype=float)
    stats = (v[idx] * w[idx]).sum(1) / w[idx].sum(1)
    assert [low, high] == pytest.approx(list(np.quantile(stats, [0.025, 0.975])))


def _row(sample, bleu, kl, ppl, steps):
    return {"sample": sample, "metric": "gxo", "source": "oracle", "ratio": 0.5, "bleu": bleu,
            "token_agreement": bleu / 100, "kl": kl, "ppl": ppl, "masked_steps": steps, "kept_weight": 5.0,
            "total_weight": 10.0}


def test_aggregate_carries_intervals_into_results_and_csv():
    rows = [_row(0, 20.0, 0.1, 2.0, 3), _row(1, 60.0, 0.3, 4.0, 1), _row(2, 100.0, 0.2, 3.0, 2)]
    out = aggregate(rows, [("gxo", "oracle")], [0.5], {"gxo": 3})
    (point,) = out["curves"]["gxo"]["points"]
    assert point["bleu_ci"] == bootstrap_interval([20.0, 60.0, 100.0])
    assert point["token_agreement_ci"] == bootstrap_interval([0.2, 0.6, 1.0])
    assert point["kl_ci"] == bootstrap_interval([0.1, 0.3, 0.2], [3, 1, 2])
    ppl_low, ppl_high = bootstrap_interval([math.log(2.0), math.log(4.0), math.log(3.0)], [3, 1, 2])
    assert point["ppl_ci"] == pytest.approx([math.exp(ppl_low), math.exp(ppl_high)])
    for measure in ("bleu", "token_agreement", "kl", "ppl"):
        low, high = point[f"{measure}_ci"]
        assert low <= point[measure] <= high
    table = list(csv.DictReader(io.StringIO(_csv(out))))
    assert float(table[0]["bleu_ci_low"]) == pytest.approx(point["bleu_ci"][0], rel=1e-5)
    assert float(table[0]["ppl_ci_high"]) == pytest.approx(point["ppl_ci"][1], rel=1e-5)
    one = aggregate(rows[:1], [("gxo", "oracle")], [0.5], {"gxo": 1})["curves"]["gxo"]["points"][0]
    assert one["bleu_ci"] is None and list(csv.DictReader(io.StringIO(_csv(
        {"curves": {"gxo": {"metric": "gxo", "source": "oracle", "points": [one]}}}))))[0]["bleu_ci_low"] == ""


def test_the_figure_draws_a_band(tmp_path, monkeypatch):
    import matplotlib.axes

    from utils.plotting import plot_tradeoff

    rows = [_row(i, b, 0.1, 2.0, 2) for i, b in enumerate((10.0, 50.0, 90.0))]
    results = aggregate(rows, [("gxo", "oracle")], [0.5], {"gxo": 3})
    bands = []
    real = matplotlib.axes.Axes.fill_between
    monkeypatch.setattr(matplotlib.axes.Axes, "fill_between",
                        lambda self, x, y1, y2, **kw: bands.append((list(x), list(y1), list(y2))) or
                        real(self, x, y1, y2, **kw))
    plot_tradeoff(results, tmp_path / "tradeoff", "bleu")
    point = results["curves"]["gxo"]["points"][0]
    assert bands == [([point["activation_ratio"]], [point["bleu_ci"][0]], [point["bleu_ci"][1]])]

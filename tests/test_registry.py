"""The metric, score-kind and mask-source registries are the one place a metric or source is declared:
a toy metric or source declared through them shows up in the request check, the rankings, the masks, the
result-file names, the figures and the --help texts, and is gone once removed; every built-in ranking
equals METHOD §4's formula, computed here by hand on random tensors."""
import math

import pytest
import torch

import main as sweep_main
import run_pipeline
from utils import artifacts
from utils.attribution_error import predicted_costs
from utils.errors import PipelineError
from utils.masks import RankInputs, ranking
from utils.metric_registry import (METRICS, Metric, RemovalCost, metric_names, register_metric, studied_metrics,
                                   unregister_metric)
from utils.plotting import _metric_style
from utils.sites import ATTN, MLP
from utils.sources import (SOURCES, Source, calibrated_sources, label_free_sources, parse_sources, register_source,
                           source_keep_masks, unregister_source)
from utils.sweep import sample_keep_masks, sweep_request
from utils.sweep_results import _is_curve_file

T, L, H, I, D = 3, 2, 4, 6, 8      # steps, layers, heads, neurons, head width
UNITS = {ATTN: H, MLP: I}


def random_scores(seed=0) -> dict:
    """``{comp: {kind: [T, L, units]}}`` (grad_norm ``[T, L]``), as the score files hold them."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for comp, U in UNITS.items():
        out[comp] = {k: torch.randn(T, L, U, generator=g, dtype=torch.float64) for k in ("gradient", "gxo", "ig")}
        out[comp]["magnitude"] = torch.rand(T, L, U, generator=g, dtype=torch.float64)
        out[comp]["grad_norm"] = torch.rand(T, L, generator=g, dtype=torch.float64)
    return out


def by_hand(metric, comp, s, out_norm, variant="paper"):
    """METHOD §4's keep-scores, one unit at a time, with plain floats."""
    scale = D if comp == ATTN else 1
    out = torch.empty(T, L, UNITS[comp], dtype=torch.float64)
    for t in range(T):
        for l in range(L):
            for u in range(UNITS[comp]):
                g, gx, ig = (float(s[k][t, l, u]) for k in ("gradient", "gxo", "ig"))
                mag = float(s["magnitude"][t, l, u])
                if metric == "magnitude":
                    v = mag
                elif metric in ("gradient", "gxo", "ig"):
                    v = -{"gradient": g, "gxo": gx, "ig": ig}[metric]
                elif metric == "snip":
                    v = abs(gx)
                elif metric == "wina":
                    v = mag * float(out_norm[comp][l, u])
                elif variant == "released" and comp == ATTN:   # cor_gxo as the released code computes it
                    norm = math.sqrt(sum(float(x) ** 2 for x in s["gradient"][t, l]))
                    v = -gx + 0.5 * mag * norm
                else:                                           # cor_gxo, the paper's formula
                    v = -scale * gx + 0.5 * mag * float(s["grad_norm"][t, l])
                out[t, l, u] = v
    return out


@pytest.mark.parametrize("variant", ["paper", "released"])
@pytest.mark.parametrize("metric", ["magnitude", "gradient", "gxo", "snip", "cor_gxo", "ig", "wina"])
def test_every_declared_ranking_equals_method_formula(metric, variant):
    scores = random_scores(seed=len(metric))
    g = torch.Generator().manual_seed(7)
    out_norm = {comp: torch.rand(L, U, generator=g, dtype=torch.float64) for comp, U in UNITS.items()}
    inputs = RankInputs(D, variant, out_norm)
    for comp in UNITS:
        s = {kind: scores[comp][kind] for kind in METRICS[metric].kinds}   # only the files it declares
        got = inputs.rank(metric, comp, s)
        torch.testing.assert_close(got, by_hand(metric, comp, scores[comp], out_norm, variant), rtol=1e-12, atol=1e-12)


def test_predicted_removal_costs_follow_the_declarations():
    """The attribution-error study: -d·score for heads (per-head means), the keep-score itself otherwise."""
    scores = random_scores(seed=3)
    assert studied_metrics() == ("gxo", "cor_gxo", "ig", "gradient", "magnitude")
    for metric in studied_metrics():
        for comp in UNITS:
            cost = predicted_costs(metric, comp, scores[comp], D)
            keep = by_hand(metric, comp, scores[comp], None)
            scale = D if comp == ATTN and metric in ("gradient", "gxo", "ig") else 1
            torch.testing.assert_close(cost, scale * keep, rtol=1e-12, atol=1e-12)
    with pytest.raises(PipelineError, match="the snip metric predicts no removal cost"):
        predicted_costs("snip", ATTN, scores[ATTN], D)


def test_every_metric_reads_declared_score_kinds():
    for metric in METRICS.values():
        assert metric.kinds and set(metric.kinds) <= set(artifacts.KINDS), metric.name
    assert artifacts.SCORE_KINDS == ("magnitude", "gradient", "gxo", "ig", "grad_norm")
    assert artifacts.score("grad_norm", MLP).producer == "attribution_attention.py --metric gxo"
    assert artifacts.score("magnitude", MLP).producer == "Mag_mlp.py"


def _negative_abs_gradient(comp, s, head_dim, variant):
    return -s["gradient"].abs()


@pytest.fixture
def toy_metric():
    """A metric declared from outside: -|gradient|, with a removal cost, after every built-in one."""
    metric = register_metric(Metric("toy", ("gradient",), _negative_abs_gradient, "Toy |g|", "tab:olive", "*",
                                    removal_cost=RemovalCost(9)))
    try:
        yield metric
    finally:
        unregister_metric("toy")


def test_a_declared_metric_is_everywhere(toy_metric):
    assert metric_names()[-1] == "toy" and studied_metrics()[-1] == "toy"
    request = sweep_request(["toy", "gxo"], ratios=[0.0, 0.5])
    assert request.metrics == ["toy", "gxo"] and request.recorded()["metric_name"] == ["toy", "gxo"]
    assert sweep_request(["all"], ratios=[0.0]).metrics[-1] == "toy"
    with pytest.raises(PipelineError, match=r"unknown --metric_name nope; choose from .*, wina, toy or all"):
        sweep_request(["nope"], ratios=[0.0])
    assert "wina toy, or all" in " ".join(sweep_main.build_parser().format_help().split())
    assert _is_curve_file("toy.json") and _is_curve_file("toy@static.json")
    assert _metric_style("toy") == ("Toy |g|", "tab:olive", "*")
    with pytest.raises(PipelineError, match="already declared"):
        register_metric(toy_metric)

    scores = random_scores(seed=5)
    for comp in UNITS:
        keep = ranking("toy", comp, scores[comp], D)
        torch.testing.assert_close(keep, -scores[comp]["gradient"].abs())
    # its masks: per step and layer, the units of the smallest |gradient| go first (METHOD §5's threshold)
    per = {comp: {"gradient": [scores[comp]["gradient"].float()]} for comp in UNITS}
    masks = sample_keep_masks(per, "toy", 0, [0.5], torch.ones(L, dtype=torch.bool), RankInputs(D))
    for comp, U in UNITS.items():
        for t in range(T):
            for l in range(L):
                values = (-scores[comp]["gradient"][t, l].abs()).tolist()
                threshold = sorted(values)[math.floor(0.5 * U)]
                assert masks[comp][0, t, l].tolist() == [v >= threshold for v in values]


def test_a_removed_metric_is_gone():
    register_metric(Metric("toy", ("gradient",), _negative_abs_gradient, "Toy", "tab:olive", "*"))
    unregister_metric("toy")
    assert "toy" not in metric_names()
    with pytest.raises(PipelineError, match="unknown --metric_name toy"):
        sweep_request(["toy"], ratios=[0.0])
    with pytest.raises(PipelineError, match="unknown metric 'toy'"):
        ranking("toy", ATTN, random_scores()[ATTN], D)
    assert not _is_curve_file("toy.json")
    assert _metric_style("toy") == ("toy", None, "o")   # an old results file still plots


def _last_step(rank, calibrated):
    return rank[-1:]


@pytest.fixture
def toy_sources():
    yield
    unregister_source("last")
    unregister_source("median")


def test_a_declared_source_is_everywhere(toy_sources):
    """A source is one declaration plus its function: here the last step's scores for every step, and a
    calibrated one; the sources' order, masks, calibration rule and help texts all follow, and removed,
    it is gone."""
    register_source(Source("last", _last_step, "the last step's mask for every step", "last (one mask)", "-.",
                           uses_label=True))
    assert parse_sources(["all"]) == ["oracle", "prompt", "static", "online", "predictor", "teal", "last"]
    assert parse_sources(["last", "oracle"]) == ["oracle", "last"]
    rank = torch.randn(4, L, I, generator=torch.Generator().manual_seed(2))
    masks = source_keep_masks("last", rank, [0.0, 0.5])
    assert masks.shape == (2, 4, L, I)
    assert all(torch.equal(masks[:, t], source_keep_masks("oracle", rank, [0.0, 0.5])[:, 3]) for t in range(4))
    help_text = " ".join(sweep_main.build_parser().format_help().split())
    assert "last (the last step's mask for every step), or all" in help_text
    assert "oracle prompt static online predictor teal last or all" in " ".join(run_pipeline.build_parser().format_help().split())
    assert label_free_sources() == ("prompt", "static", "online", "predictor", "teal")
    request = sweep_request(["gxo"], ratios=[0.0], sources=["last"])
    assert request.calib_num_data is None

    register_source(Source("median", SOURCES["static"].keep_scores, "calibrated median", "median", ":",
                           needs_calibration=True))
    assert calibrated_sources() == ("static", "predictor", "teal", "median")
    assert sweep_request(["gxo"], ratios=[0.0], sources=["median"]).calib_num_data == 100
    with pytest.raises(PipelineError, match=r"^--calib_num_data only applies to --source static or predictor or teal "
                                            r"or median; drop it or add static or predictor or teal or median$"):
        sweep_request(["gxo"], ratios=[0.0], sources=["oracle"], calib_num_data=3)
    unregister_source("median")
    unregister_source("last")
    assert calibrated_sources() == ("static", "predictor", "teal")
    assert list(SOURCES) == ["oracle", "prompt", "static", "online", "predictor", "teal"]
    with pytest.raises(PipelineError, match="unknown --source last; choose from oracle, prompt, static, online, predictor, teal or all"):
        parse_sources(["last"])

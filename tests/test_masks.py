"""Thresholds, ties, ratios, rankings and activation-ratio weights (METHOD §4-5)."""
import math

import pytest
import torch
from transformers import PhiConfig, PhiForCausalLM

from utils.errors import PipelineError
from utils.masks import (apply_layer_selection, keep_masks, kept_weight, layer_selection, parse_layers, ranking,
                         unit_weights)
from utils.sites import ATTN, MLP, locate_units


def reference_keep(scores_1d, p):
    """METHOD §5 literally: sort ascending, threshold at index floor(p*c), keep >= threshold."""
    values = sorted(scores_1d.tolist())
    threshold = values[math.floor(p * len(values) + 1e-9)]
    return torch.tensor([v >= threshold for v in scores_1d.tolist()])


@pytest.mark.parametrize("c", [4, 10, 37])
def test_keep_masks_follow_the_threshold_rule(c):
    torch.manual_seed(c)
    scores = torch.randn(3, 2, c)
    ratios = [k / 10 for k in range(10)]
    masks = keep_masks(scores, ratios)
    assert masks.shape == (10, 3, 2, c)
    for r, p in enumerate(ratios):
        for t in range(3):
            for l in range(2):
                assert torch.equal(masks[r, t, l], reference_keep(scores[t, l], p))
        # distinct scores: exactly c - floor(p*c) units stay
        assert (masks[r].sum(-1) == c - math.floor(p * c + 1e-9)).all()
    assert masks[0].all()  # p = 0 keeps everything


def test_ties_at_the_threshold_are_kept():
    scores = torch.tensor([[0.0, 1.0, 1.0, 1.0, 2.0]])
    keep = keep_masks(scores, [0.4])[0, 0]
    assert keep.tolist() == [False, True, True, True, True]   # floor(0.4*5)=2 -> threshold 1.0, ties keep
    keep = keep_masks(torch.zeros(1, 6), [0.9])[0, 0]
    assert keep.all()


def test_float_ratios_hit_the_intended_index():
    scores = torch.arange(10.0)[None]
    for k in range(10):
        assert keep_masks(scores, [k / 10])[0].sum() == 10 - k   # 0.7*10 must not floor to 6


def test_bad_ratio_is_refused():
    with pytest.raises(PipelineError, match="outside"):
        keep_masks(torch.zeros(1, 4), [1.0])


def score_dict(T=2, L=3, U=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = {k: torch.randn(T, L, U, generator=g) for k in ("gradient", "gxo", "ig")}
    s["magnitude"] = torch.rand(T, L, U, generator=g)
    s["grad_norm"] = torch.rand(T, L, generator=g)
    return s


def test_rankings_follow_method_table():
    s = score_dict()
    assert torch.equal(ranking("magnitude", ATTN, s, 8), s["magnitude"])
    for m in ("gradient", "gxo", "ig"):
        assert torch.equal(ranking(m, MLP, s, 8), -s[m])
    assert torch.equal(ranking("snip", ATTN, s, 8), s["gxo"].abs())
    d = 8
    heads = ranking("cor_gxo", ATTN, s, d)
    t, l, h = 1, 2, 3
    assert heads[t, l, h].item() == pytest.approx(-d * s["gxo"][t, l, h].item()
                                                  + 0.5 * s["magnitude"][t, l, h].item() * s["grad_norm"][t, l].item())
    neurons = ranking("cor_gxo", MLP, s, d)
    assert neurons[t, l, h].item() == pytest.approx(-s["gxo"][t, l, h].item()
                                                    + 0.5 * s["magnitude"][t, l, h].item() * s["grad_norm"][t, l].item())
    released = ranking("cor_gxo", ATTN, s, d, variant="released")
    grad_norm_over_heads = s["gradient"][t, l].norm().item()
    assert released[t, l, h].item() == pytest.approx(-s["gxo"][t, l, h].item()
                                                     + 0.5 * s["magnitude"][t, l, h].item() * grad_norm_over_heads)
    assert torch.equal(ranking("cor_gxo", MLP, s, d, variant="released"), neurons)


def test_unknown_metric_and_variant_are_refused():
    with pytest.raises(PipelineError, match="unknown metric"):
        ranking("random", ATTN, score_dict(), 8)
    with pytest.raises(PipelineError, match="cor_gxo_variant"):
        ranking("cor_gxo", ATTN, score_dict(), 8, variant="other")


def test_phi2_shaped_weights_split_one_third_heads_two_thirds_neurons():
    cfg = PhiConfig(vocab_size=16, hidden_size=2560, intermediate_size=10240, num_hidden_layers=1,
                    num_attention_heads=32, partial_rotary_factor=0.4)
    with torch.device("meta"):
        model = PhiForCausalLM(cfg)
    w = unit_weights(locate_units(model))
    assert w.head == 4 * 2560 * 80 and w.neuron == 2 * 2560
    assert w.head_share == pytest.approx(1 / 3, abs=1e-12)
    assert w.as_dict()["neurons_share"] == pytest.approx(2 / 3, abs=1e-12)


def test_gqa_and_gated_weights(arch_model):
    arch, model = arch_model
    w = unit_weights(locate_units(model))
    if arch == "llama":  # 4 heads sharing 2 kv heads, head_dim 8, hidden 32, gated MLP
        assert w.head == 32 * 8 * (1 + 2 * 0.5) + 8 * 32
        assert w.neuron == 3 * 32
    elif arch == "gemma":  # 4 heads sharing 1 kv head, head_dim 8, hidden 32, gated MLP
        assert w.head == 32 * 8 * (1 + 2 * 0.25) + 8 * 32
        assert w.neuron == 3 * 32
    else:
        assert w.head == 4 * 32 * 8 and w.neuron == 2 * 32


def test_activation_ratio_counts_masked_steps_and_all_layers():
    from utils.masks import UnitWeights
    w = UnitWeights(head=3.0, neuron=1.0, num_heads=2, intermediate=4)   # layer total 10
    T, L = 3, 2
    keep = {ATTN: torch.ones(1, T, L, 2, dtype=torch.bool), MLP: torch.ones(1, T, L, 4, dtype=torch.bool)}
    keep[ATTN][0, 0] = False      # step 0 is never counted
    keep[ATTN][0, 1, 0, 0] = False  # one head off at step 1, layer 0
    keep[MLP][0, 2, 1, :2] = False  # two neurons off at step 2, layer 1
    kept, total = kept_weight(keep, w)
    assert total.item() == 2 * L * 10
    assert kept.item() == 40 - 3 - 2


def test_unmasked_layers_count_as_fully_active():
    masks = torch.zeros(2, 1, 4, 3, dtype=torch.bool)
    selected = layer_selection([0, 2], 4)
    out = apply_layer_selection(masks, selected)
    assert not out[:, :, [0, 2]].any() and out[:, :, [1, 3]].all()
    assert parse_layers("0-2,5") == [0, 1, 2, 5] and parse_layers("all") is None
    with pytest.raises(PipelineError, match="layers 0-3"):
        layer_selection([4], 4)
    with pytest.raises(PipelineError, match="mask_layers"):
        parse_layers("a-b")


def test_layer_and_ratio_lists_that_would_skew_the_sweep_are_refused():
    from utils.masks import check_ratios
    with pytest.raises(PipelineError, match="the range 1-0 is empty"):
        parse_layers("1-0")                       # would mask nothing: p = 0.9 gives BLEU 100
    with pytest.raises(PipelineError, match="names layer 2 more than once"):
        parse_layers("0-2,2")
    assert parse_layers("3-3") == [3]
    with pytest.raises(PipelineError, match="repeats 0.5"):
        check_ratios([0.0, 0.5, 0.5])             # would count the samples of p = 0.5 twice
    with pytest.raises(PipelineError, match="outside"):
        check_ratios([0.2, 1.5])
    assert check_ratios([0, 0.5]) == [0.0, 0.5]


def test_head_mean_and_its_undo():
    """A head's score is the mean over its dims (the files' convention); head_sum gives back the sum a
    removal changes; neurons pass through both unchanged."""
    from utils.units import head_mean, head_sum

    torch.manual_seed(3)
    values = torch.randn(5, 2, 12, dtype=torch.float64)       # [T, L, heads x head_dim], head_dim 4
    means = head_mean(ATTN, values, 4)
    assert means.shape == (5, 2, 3)
    for h in range(3):
        dims = values[..., 4 * h:4 * h + 4]
        assert torch.allclose(means[..., h], sum(dims.unbind(-1)) / 4, rtol=1e-12, atol=0)
        assert torch.allclose(head_sum(ATTN, means, 4)[..., h], sum(dims.unbind(-1)), rtol=1e-12, atol=1e-15)
    assert torch.equal(head_mean(MLP, values, 4), values) and torch.equal(head_sum(MLP, values, 4), values)

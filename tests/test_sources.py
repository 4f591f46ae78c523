"""Label-free mask sources (METHOD §7) and the wina metric: the prompt source's live scores equal the
stored t = 0 rows, its mask is step 0's at every step; the static mask is the threshold of the mean
keep-score over the calibration steps; wina = magnitude x the output projection's column norms."""
import math

import pytest
import torch

from conftest import VOCAB
from reference import dense_label
from utils.attribution import Attributor
from utils.errors import PipelineError
from utils.masks import RankInputs, output_weight_norms, ranking
from utils.sites import ATTN, MLP, locate_units
from utils.sources import calibrated_keep_scores, parse_sources, prompt_scores, source_keep_masks

RATIOS = [0.0, 0.3, 0.5, 0.9]


def threshold_keep(values, p):
    """METHOD §5 by hand: sort ascending, threshold at index floor(p*c), keep every value >= it."""
    ordered = sorted(values)
    threshold = ordered[math.floor(p * len(ordered) + 1e-9)]
    return [v >= threshold for v in values]


def test_wina_norms_and_ranking_from_the_weights(arch_model):
    arch, model = arch_model
    layout = locate_units(model)
    norms = output_weight_norms(layout)
    modules = dict(model.named_modules())
    out_name, down_name = {"phi": ("dense", "fc2")}.get(arch, ("o_proj", "down_proj"))
    d = layout.head_dim
    for l in range(layout.num_layers):
        w_o = modules[f"model.layers.{l}.self_attn.{out_name}"].weight      # [hidden, heads*d]
        w_down = modules[f"model.layers.{l}.mlp.{down_name}"].weight        # [hidden, intermediate]
        for h in range(layout.num_heads):
            block = w_o[:, h * d:(h + 1) * d]
            want = math.sqrt(sum(float(v) ** 2 for v in block.flatten()))
            assert norms[ATTN][l, h].item() == pytest.approx(want, rel=1e-6)
        for j in (0, 7, layout.intermediate - 1):
            want = math.sqrt(sum(float(v) ** 2 for v in w_down[:, j]))
            assert norms[MLP][l, j].item() == pytest.approx(want, rel=1e-6)
    g = torch.Generator().manual_seed(3)
    mag = torch.rand(2, layout.num_layers, layout.intermediate, generator=g)
    wina = ranking("wina", MLP, {"magnitude": mag, "out_norm": norms[MLP]}, d)
    assert wina[1, 2, 5].item() == pytest.approx(mag[1, 2, 5].item() * norms[MLP][2, 5].item(), rel=1e-6)


def test_wina_on_gpt2_conv1d():
    """GPT-2's Conv1D stores [in, out]: the unit's output column is a row there."""
    from conftest import tiny_gpt2
    model = tiny_gpt2()
    layout = locate_units(model)
    norms = output_weight_norms(layout)
    w = model.transformer.h[1].mlp.c_proj.weight        # [intermediate, hidden]
    assert norms[MLP][1, 9].item() == pytest.approx(float(w[9].norm()), rel=1e-6)
    w = model.transformer.h[0].attn.c_proj.weight       # [heads*d, hidden]
    assert norms[ATTN][0, 2].item() == pytest.approx(float(w[16:24].norm()), rel=1e-6)


@pytest.mark.parametrize("metric", ["magnitude", "gxo", "cor_gxo", "wina", "ig"])
def test_prompt_scores_equal_stored_step_zero_rows(arch_model, metric):
    """prompt_scores sees only the prompt (its target is the model's own greedy token); the per-token
    scores of the dense label at t = 0 have label[0] as target: the same."""
    _, model = arch_model
    layout = locate_units(model)
    prompt = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(5))
    label = dense_label(model, prompt, 4, eos_ids=[VOCAB + 5], pad_id=0)
    ig_steps = 2 if metric == "ig" else 0
    with Attributor(model) as attributor:
        stored = attributor.score_sample(prompt, label, ig_steps=ig_steps)
    live = prompt_scores(model, prompt, metric, ig_steps=ig_steps)
    norms = output_weight_norms(layout)
    for comp in (ATTN, MLP):
        s = {k: stored[f"{k}_{comp}"] for k in ("magnitude", "gradient", "gxo", "grad_norm")}
        if metric == "ig":
            s["ig"] = stored[f"ig_{comp}"]
        s["out_norm"] = norms[comp]
        want = ranking(metric, comp, s, layout.head_dim)[0]
        assert live[comp].shape == want.shape == (layout.num_layers, layout.units(comp))
        torch.testing.assert_close(live[comp], want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    assert all(len(m._forward_pre_hooks) == 0 for m in layout.attn_out + layout.mlp_down)  # its hooks are gone


def test_prompt_source_uses_step_zero_at_every_step():
    g = torch.Generator().manual_seed(1)
    rank = torch.randn(5, 3, 11, generator=g)
    masks = source_keep_masks("prompt", rank, RATIOS)
    assert masks.shape == (len(RATIOS), 5, 3, 11)
    for r, p in enumerate(RATIOS):
        for l in range(3):
            want = threshold_keep(rank[0, l].tolist(), p)
            for t in range(5):
                assert masks[r, t, l].tolist() == want
    oracle = source_keep_masks("oracle", rank, RATIOS)
    assert oracle[2, 3, 1].tolist() == threshold_keep(rank[3, 1].tolist(), RATIOS[2])


def test_static_mask_is_the_threshold_of_the_mean_over_calibration_steps():
    g = torch.Generator().manual_seed(2)
    L, H, I, d = 2, 4, 6, 8
    lengths = [3, 1, 4, 2]                    # samples 2 and 3 calibrate; 0 and 1 are evaluated
    per = {}
    for comp, U in ((ATTN, H), (MLP, I)):
        per[comp] = {"gxo": [torch.randn(T, L, U, generator=g) for T in lengths],
                     "magnitude": [torch.rand(T, L, U, generator=g) for T in lengths],
                     "grad_norm": [torch.rand(T, L, generator=g) for T in lengths],
                     "gradient": [torch.randn(T, L, U, generator=g) for T in lengths]}
    static = calibrated_keep_scores(per, "cor_gxo", [2, 3], RankInputs(d))
    for comp, U in ((ATTN, H), (MLP, I)):
        scale = d if comp == ATTN else 1
        for l in range(L):
            want = []
            for u in range(U):
                values = [-scale * per[comp]["gxo"][i][t, l, u].item()
                          + 0.5 * per[comp]["magnitude"][i][t, l, u].item() * per[comp]["grad_norm"][i][t, l].item()
                          for i in (2, 3) for t in range(lengths[i])]   # 4 + 2 steps, each once
                want.append(sum(values) / len(values))
            assert static[comp][l].tolist() == pytest.approx(want, rel=1e-5)
            masks = source_keep_masks("static", torch.zeros(3, L, U), RATIOS, static[comp])
            for r, p in enumerate(RATIOS):
                for t in range(3):
                    assert masks[r, t, l].tolist() == threshold_keep(static[comp][l].tolist(), p)
    gxo = calibrated_keep_scores(per, "gxo", [0], RankInputs(d))
    torch.testing.assert_close(gxo[MLP], -per[MLP]["gxo"][0].mean(0))


def test_static_without_calibration_steps_is_refused():
    per = {c: {"magnitude": [torch.zeros(0, 2, 4)]} for c in (ATTN, MLP)}
    with pytest.raises(PipelineError, match="no label tokens"):
        calibrated_keep_scores(per, "magnitude", [0], RankInputs(8))


def test_source_names():
    assert parse_sources(["static", "oracle"]) == ["oracle", "static"]
    assert parse_sources(["all"]) == ["oracle", "prompt", "static", "online", "predictor", "teal"]
    with pytest.raises(PipelineError, match="unknown --source label"):
        parse_sources(["label"])
    with pytest.raises(PipelineError, match="repeats prompt"):
        parse_sources(["prompt", "prompt"])

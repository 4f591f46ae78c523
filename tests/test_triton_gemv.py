"""The masked Triton kernels (utils/triton_gemv.py, run here in Triton's interpreter) against plain PyTorch
products, and the gathered decode paths built on them (``kernels="triton"``) against the per-token maskers'
zero-masking on tiny Phi, Llama and Gemma-3 models, eager and traced as one graph."""
import sys

import pytest
import torch

pytest.importorskip("triton", reason="the triton package runs the kernels (requirements-test.txt installs it)")

from conftest import NO_EOS, assert_close, random_ids  # noqa: E402
from test_gathered import (RATIOS, STEPS, all_layers, gathered_tokens, random_predictors, stepwise_logits,  # noqa: E402
                           teal_case)
from utils.decode import GreedyDecoder  # noqa: E402
from utils.errors import PipelineError  # noqa: E402
from utils.gathered import _Gather, predictor_model, teal_model  # noqa: E402
from utils.generation import token_masked_generate  # noqa: E402
from utils.masks import unit_weights  # noqa: E402
from utils.predictor import PredictorMasker  # noqa: E402
from utils.sites import locate_units  # noqa: E402
from utils.teal import calibrate_thresholds  # noqa: E402
from utils.triton_gemv import masked_columns, masked_rows, threshold_columns  # noqa: E402


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("seed", [0, 1])
def test_masked_kernels_by_formula(dtype, rtol, seed):
    """Odd sizes (no multiple of any block), several unit widths, and the two edge masks."""
    g = torch.Generator().manual_seed(seed)
    units, group, width = 23 + seed, 3 + 2 * seed, 150 + 37 * seed
    w = torch.randn(units * group, width, generator=g).to(dtype)
    x = torch.randn(width, generator=g).to(dtype)
    for keep in (torch.rand(units, generator=g) > 0.5, torch.zeros(units, dtype=torch.bool),
                 torch.ones(units, dtype=torch.bool)):
        rows = keep.repeat_interleave(group)
        want = torch.where(rows, w.float() @ x.float(), torch.zeros(()))
        assert_close(masked_rows(w, x, keep, group).float(), want, "rows", rtol=rtol)
        assert masked_rows(w, x, keep, group).dtype == torch.float32       # the caller casts (fused there)
        xt = torch.randn(units * group, generator=g).to(dtype)
        want = (xt.float() * rows) @ w.float()
        got = masked_columns(w, xt, keep, group)
        assert got.dtype == torch.float32
        assert_close(got.float(), want, "columns", rtol=rtol)
        if not keep.any():
            assert not got.any() and not masked_rows(w, x, keep, group).any()


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_threshold_kernel_by_formula(dtype, rtol):
    """TEAL's rule inside the kernel: |x| >= t (magnitude) and |x| * norm >= t (wina), a threshold exactly on
    some channels' score (kept: >=), one below every score and one above."""
    g = torch.Generator().manual_seed(7)
    wt = torch.randn(201, 77, generator=g).to(dtype)
    x = torch.randn(201, generator=g).to(dtype)
    norms = wt.float().norm(dim=1)
    for scale in (None, norms):
        scores = x.float().abs() if scale is None else x.float().abs() * scale
        for t in (float(scores.median()), float(scores[17]), 0.0, float(scores.max()) * 2):
            keep = scores >= t
            want = (x.float() * keep) @ wt.float()
            got = threshold_columns(wt, x, t, scale)
            assert got.dtype == torch.float32
            assert_close(got.float(), want, f"threshold {t}", rtol=rtol)
    poisoned = wt.clone()
    poisoned[x.abs() < x.abs().median()] = float("nan")             # pruned channels' columns are not read
    t = float(x.float().abs().median())
    assert torch.equal(threshold_columns(poisoned, x, t, None), threshold_columns(wt, x, t, None))


def test_masked_kernels_ignore_what_they_skip():
    """A pruned unit's weights (and a pruned channel's input) are not read: NaN there changes nothing."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(12, 40, generator=g)
    keep = torch.tensor([True, False, True, False])
    poisoned = w.clone().view(4, 3, 40)
    poisoned[~keep] = float("nan")
    x = torch.randn(40, generator=g)
    assert torch.equal(masked_rows(poisoned.view(12, 40), x, keep, 3), masked_rows(w, x, keep, 3))
    xt = torch.randn(12, generator=g)
    xt_poisoned = xt.clone().view(4, 3)
    xt_poisoned[~keep] = float("nan")
    assert torch.equal(masked_columns(poisoned.view(12, 40), xt_poisoned.view(-1), keep, 3),
                       masked_columns(w, xt, keep, 3))


def test_masked_kernels_refuse_bad_shapes():
    w, x = torch.randn(6, 5), torch.randn(5)
    with pytest.raises(PipelineError, match="keep"):
        masked_rows(w, x, torch.ones(4, dtype=torch.bool), 2)
    with pytest.raises(PipelineError, match="bool"):
        masked_rows(w, x, torch.ones(3), 2)
    with pytest.raises(PipelineError, match="contiguous"):
        masked_columns(w.t(), torch.randn(5), torch.ones(5, dtype=torch.bool), 1)
    with pytest.raises(PipelineError, match="norms"):
        threshold_columns(w, torch.randn(6), 0.5, torch.ones(5))


def test_triton_predictor_path_equals_predictor_masker(arch_model):
    arch, model = arch_model
    layout = locate_units(model)
    preds = random_predictors(layout, seed=4)
    masker = PredictorMasker(model, layout, unit_weights(layout), all_layers(layout), ["m"], [preds])
    prompt = random_ids(13, batch=1, length=6)
    try:
        for ratio in RATIOS:
            masked = token_masked_generate(model, masker, prompt, [0], [ratio], NO_EOS, STEPS)[0][0]
            fast = predictor_model(model, preds, ratio, kernels="triton")
            assert gathered_tokens(fast, prompt, STEPS) == masked, (arch, ratio)
            slow = stepwise_logits(model, prompt, masked, lambda: masker.rows([0], [ratio]))
            quick = stepwise_logits(fast, prompt, masked, torch.no_grad)
            assert_close(quick, slow, f"{arch} triton predictor p={ratio}")
            kept = [int(m.mask.sum()) for m in fast.modules() if isinstance(m, _Gather)]
            assert kept and all(k == m.keep for k, m in zip(kept, (m for m in fast.modules()
                                                                  if isinstance(m, _Gather))))
    finally:
        masker.remove()


@pytest.mark.parametrize("metric", ["magnitude", "wina"])
def test_triton_teal_path_equals_teal_masker(arch_model, metric):
    arch, model = arch_model
    ratio = 0.5
    thresholds, masker, prompt = teal_case(model, metric, ratio, sample_seed=70, prompt_seed=14)
    try:
        masked = token_masked_generate(model, masker, prompt, [0], [ratio], NO_EOS, STEPS)[0][0]
        stock = teal_model(model, thresholds[0, 0], wina=metric == "wina")
        fast = teal_model(model, thresholds[0, 0], wina=metric == "wina", kernels="triton")
        assert gathered_tokens(fast, prompt, STEPS) == masked, arch
        slow = stepwise_logits(model, prompt, masked, lambda: masker.rows([0], [ratio]))
        for m in (stock, fast):
            m.gathered["counter"]["kept"] = 0
        quick = stepwise_logits(fast, prompt, masked, torch.no_grad)
        stepwise_logits(stock, prompt, masked, torch.no_grad)
        assert_close(quick, slow, f"{arch} triton teal")
        assert fast.gathered["counter"]["kept"] == stock.gathered["counter"]["kept"] > 0
        fast.gathered["counter"].update(kept=0, on=False)       # counting off: no host synchronisation
        assert stepwise_logits(fast, prompt, masked, torch.no_grad).equal(quick)
        assert fast.gathered["counter"]["kept"] == 0
    finally:
        masker.remove()


def test_triton_paths_trace_as_one_graph(arch_model):
    """With the masked kernels the predictor and teal steps have fixed shapes and no host synchronisation:
    they trace as one graph (fullgraph; backend "eager") and decode the eager path's tokens."""
    arch, model = arch_model
    layout = locate_units(model)
    preds = random_predictors(layout, seed=6)
    prompt = random_ids(15, batch=1, length=5)
    want = gathered_tokens(predictor_model(model, preds, 0.5, kernels="triton"), prompt, 8)
    fast = predictor_model(model, preds, 0.5, kernels="triton", static=True)     # topk: what a GPU compiles
    decoder = GreedyDecoder(fast, 1, prompt.shape[1] + 8, compile="default", backend="eager")
    assert decoder.generate(prompt, 8)[0].tolist() == want, arch
    samples = [(random_ids(s, batch=1, length=5)[0].tolist(), random_ids(s + 90, batch=1, length=10)[0].tolist())
               for s in range(2)]
    teal = teal_model(model, calibrate_thresholds(model, samples, ["magnitude"], [0.5])[0, 0], kernels="triton")
    want = gathered_tokens(teal, prompt, 8)
    teal.gathered["counter"]["on"] = False
    decoder = GreedyDecoder(teal, 1, prompt.shape[1] + 8, compile="default", backend="eager")
    assert decoder.generate(prompt, 8)[0].tolist() == want, arch


def test_keep_masks_by_formula():
    """The mask selections against select_units (index lists): ties at the threshold all kept, or exactly k."""
    from utils.gathered import keep_mask, select_units
    g = torch.Generator().manual_seed(8)
    for k in (1, 5, 11, 12):
        scores = torch.randn(12, generator=g)
        scores[4] = scores[9]
        for static in (False, True):
            want = torch.zeros(12, dtype=torch.bool)
            want[select_units(scores, k, static)] = True
            got = keep_mask(scores, k, static)
            assert torch.equal(got, want), (k, static)
            assert not static or int(got.sum()) == k
    tied = torch.tensor([1.0, 2.0, 2.0, 0.5])
    assert keep_mask(tied, 1).tolist() == [False, True, True, False]
    assert int(keep_mask(tied, 1, static=True).sum()) == 1


def test_unknown_kernels_are_refused(monkeypatch):
    from conftest import tiny_llama
    model = tiny_llama()
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "triton", None)              # as if triton were not installed: refused at build
        with pytest.raises(PipelineError, match="pip install triton"):
            teal_model(model, torch.zeros(3, 7), kernels="triton")
    with pytest.raises(PipelineError, match="unknown kernels"):
        predictor_model(model, random_predictors(locate_units(model)), 0.5, kernels="cuda")
    with pytest.raises(PipelineError, match="unknown kernels"):
        teal_model(model, torch.zeros(3, 7), kernels="cuda")

"""The gathered per-token decode (utils/gathered.py) equals zero-masking by the per-token maskers: the
``predictor`` path against ``PredictorMasker``, the ``teal`` path against ``TealMasker`` (greedy tokens
through ``token_masked_generate``, logits step by step), on tiny Phi, Llama (grouped KV) and Gemma-3 models;
its gathers and its choice of units against direct formulas; its shape-static variant traces as one graph."""
import contextlib

import pytest
import torch
from transformers import DynamicCache

from conftest import NO_EOS, VOCAB, assert_close, random_ids
from utils.decode import GreedyDecoder
from utils.gathered import (_Gather, column_gather, predictor_model, row_gather, select_units,
                            teal_model)
from utils.errors import PipelineError
from utils.generation import token_masked_generate
from utils.masks import unit_weights
from utils.predictor import Predictor, PredictorMasker, PredictorSettings
from utils.sites import ATTN, MLP, SiteHooks, locate_units
from utils.teal import TealMasker, calibrate_thresholds
from utils.token_masks import top_share

STEPS = 16                    # long enough for the kept sets to change many times; short enough for the suite
RATIOS = (0.3, 0.7)


def random_predictors(layout, seed=0):
    out = {}
    for i, comp in enumerate((ATTN, MLP)):
        p = Predictor(layout.num_layers, layout.hidden, layout.units(comp), PredictorSettings(rank=8, seed=seed + i))
        g = torch.Generator().manual_seed(seed + 10 + i)
        p.mean.copy_(0.1 * torch.randn(p.mean.shape, generator=g))
        p.scale.copy_(0.5 + torch.rand(p.scale.shape, generator=g))
        p.bias.data.copy_(0.1 * torch.randn(p.bias.shape, generator=g))
        out[comp] = p.eval().requires_grad_(False)
    return out


def stepwise_logits(model, prompt, tokens, context):
    """``[len(tokens) - 1, V]``: the logits of each step t >= 1 fed ``tokens[t-1]`` after a dense prompt pass,
    every step inside ``context()``."""
    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=prompt, cache=cache, use_cache=True)
        out = []
        for tok in tokens[:-1]:
            with context():
                logits = model(input_ids=torch.tensor([[tok]]), cache=cache, use_cache=True).logits
            out.append(logits[0, -1])
    return torch.stack(out)


def gathered_tokens(model, prompt, n):
    return GreedyDecoder(model, 1, prompt.shape[1] + n).generate(prompt, n)[0].tolist()


def all_layers(layout):
    return [True] * layout.num_layers


def teal_case(model, metric, ratio, sample_seed=50, prompt_seed=4):
    """Teal thresholds calibrated on three random (prompt, continuation) pairs, the masker that applies them to
    every layer, and a prompt: ``(thresholds, masker, prompt)``."""
    layout = locate_units(model)
    samples = [(random_ids(s, batch=1, length=5)[0].tolist(),
                random_ids(s + sample_seed, batch=1, length=12)[0].tolist()) for s in range(3)]
    thresholds = calibrate_thresholds(model, samples, [metric], [ratio])
    masker = TealMasker(model, layout, unit_weights(layout), all_layers(layout), [metric], thresholds, [ratio])
    return thresholds, masker, random_ids(prompt_seed, batch=1, length=6)


def test_predictor_path_equals_predictor_masker(arch_model):
    arch, model = arch_model
    layout = locate_units(model)
    preds = random_predictors(layout)
    masker = PredictorMasker(model, layout, unit_weights(layout), all_layers(layout), ["m"], [preds])
    prompt = random_ids(3, batch=1, length=6)
    try:
        for ratio in RATIOS:
            masked = token_masked_generate(model, masker, prompt, [0], [ratio], NO_EOS, STEPS)[0][0]
            fast = predictor_model(model, preds, ratio)
            assert gathered_tokens(fast, prompt, STEPS) == masked, (arch, ratio)
            slow = stepwise_logits(model, prompt, masked, lambda: masker.rows([0], [ratio]))
            quick = stepwise_logits(fast, prompt, masked, torch.no_grad)
            assert_close(quick, slow, f"{arch} predictor p={ratio}")
    finally:
        masker.remove()


@pytest.mark.parametrize("metric,ratio", [("magnitude", 0.3), ("wina", 0.7)])
def test_teal_path_equals_teal_masker(arch_model, metric, ratio):
    arch, model = arch_model
    thresholds, masker, prompt = teal_case(model, metric, ratio)
    try:
        masked = token_masked_generate(model, masker, prompt, [0], [ratio], NO_EOS, STEPS)[0][0]
        fast = teal_model(model, thresholds[0, 0], wina=metric == "wina")
        assert gathered_tokens(fast, prompt, STEPS) == masked, (arch, metric, ratio)
        counter = fast.gathered["counter"]
        counter["kept"] = 0
        kept_masked = []

        @contextlib.contextmanager
        def step():
            with masker.rows([0], [ratio]):
                yield
                kept_masked.append(float(masker.take_kept()[0]))

        slow = stepwise_logits(model, prompt, masked, step)
        kept_masked = sum(kept_masked)
        quick = stepwise_logits(fast, prompt, masked, torch.no_grad)
        assert_close(quick, slow, f"{arch} teal {metric} p={ratio}")
        assert counter["kept"] == pytest.approx(kept_masked, rel=1e-3), "weights read = the masker's kept weight"
        share = counter["kept"] / (fast.gathered["layer_weights"] * (len(masked) - 1))
        assert share < 1 - ratio / 2, "a real share of the columns is skipped"
    finally:
        masker.remove()


def test_one_step_equals_explicit_zero_masks(arch_model):
    """Independent of the maskers: the units the gathered step chose, zero-masked by fixed site masks on the
    stock model (their K/V still cached), give the same logits."""
    arch, model = arch_model
    layout = locate_units(model)
    fast = predictor_model(model, random_predictors(layout, seed=5), 0.5)
    prompt = random_ids(6, batch=1, length=7)
    tok = torch.tensor([[11]])
    with torch.no_grad():
        cache = DynamicCache()
        model(input_ids=prompt, cache=cache, use_cache=True)
        fast_logits = fast(input_ids=tok, cache=cache, use_cache=True).logits
        keep = {ATTN: torch.zeros(1, layout.num_layers, layout.num_heads, dtype=torch.bool),
                MLP: torch.zeros(1, layout.num_layers, layout.intermediate, dtype=torch.bool)}
        for m in fast.modules():
            if isinstance(m, _Gather):
                comp = ATTN if hasattr(m, "heads") else MLP
                keep[comp][0, m.layer, m.idx] = True
        assert int(keep[ATTN].sum()) == layout.num_layers * (layout.num_heads - layout.num_heads // 2)
        cache2 = DynamicCache()
        model(input_ids=prompt, cache=cache2, use_cache=True)
        hooks = SiteHooks(model, layout)
        try:
            with hooks.settings(masks={c: keep[c].float() for c in keep}):
                slow_logits = model(input_ids=tok, cache=cache2, use_cache=True).logits
        finally:
            hooks.remove()
        for (k1, v1), (k2, v2) in zip(((lay.keys, lay.values) for lay in cache.layers),
                                      ((lay.keys, lay.values) for lay in cache2.layers)):
            assert_close(k1, k2, f"{arch} keys")                 # every KV head is still cached
            assert_close(v1, v2, f"{arch} values")
    assert_close(fast_logits, slow_logits, f"{arch} one step")


def test_gathers_and_selection_by_formula():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(10, 3, 16, generator=g)
    x = torch.randn(16, generator=g)
    idx = torch.tensor([7, 2, 5])
    expected = torch.einsum("nmi,i->nm", w, x)[idx]
    assert_close(row_gather("index_select")(w, idx, x), expected, "index_select")
    assert_close(row_gather("compiled", backend="eager")(w, idx, x), expected, "compiled")
    wt = torch.randn(16, 6, generator=g)
    keep = x.abs() >= x.abs().median()
    kidx = keep.nonzero().view(-1)
    assert_close(column_gather(wt, kidx, x[kidx])[0], (x * keep) @ wt, "columns")
    for ratio in (0.0, 0.25, 0.5, 0.9):
        scores = torch.randn(12, generator=g)
        scores[3] = scores[5]                                    # a tie, kept or not as top_share decides
        want = top_share(scores.view(1, 1, -1), torch.tensor([ratio]))[0, 0]
        from utils.token_masks import kept_units
        got = torch.zeros(12, dtype=torch.bool)
        got[select_units(scores, kept_units(ratio, 12))] = True
        assert torch.equal(got, want), ratio
    tied = torch.tensor([1.0, 2.0, 2.0, 0.5])
    assert sorted(select_units(tied, 1).tolist()) == [1, 2]     # both tied units, as the masker keeps


def test_cpp_rows_kernel():
    """The C++ gather-GEMV by formula (float32 and bfloat16), and a predictor decode through it."""
    try:
        cpp = row_gather("cpp")           # built once per machine (about 20 s), then loaded from torch's cache
    except PipelineError as err:
        pytest.skip(str(err))
    g = torch.Generator().manual_seed(1)
    w = torch.randn(40, 2, 70, generator=g)
    x = torch.randn(70, generator=g)
    idx = torch.tensor([39, 0, 17, 18, 5])
    assert_close(cpp(w, idx, x), torch.einsum("nmi,i->nm", w, x)[idx], "cpp float32")
    wb, xb = w.bfloat16(), x.bfloat16()
    assert_close(cpp(wb, idx, xb).float(), torch.einsum("nmi,i->nm", wb.float(), xb.float())[idx], "cpp bf16",
                 rtol=1e-2)
    from conftest import tiny_llama
    model = tiny_llama()
    preds = random_predictors(locate_units(model), seed=3)
    prompt = random_ids(9, batch=1, length=5)
    assert gathered_tokens(predictor_model(model, preds, 0.5, rows="cpp"), prompt, 16) == \
        gathered_tokens(predictor_model(model, preds, 0.5), prompt, 16)


def test_static_variant_traces_as_one_graph(arch_model):
    """The shape-static selection (fixed k, no host check) with the fused row gather compiles as one graph
    (backend "eager": dynamo's trace only) and decodes the same tokens as the eager gathered path."""
    arch, model = arch_model
    layout = locate_units(model)
    preds = random_predictors(layout, seed=2)
    prompt = random_ids(8, batch=1, length=5)
    want = gathered_tokens(predictor_model(model, preds, 0.5), prompt, 12)
    static = predictor_model(model, preds, 0.5, rows="compiled", static=True, backend="eager")
    decoder = GreedyDecoder(static, 1, prompt.shape[1] + 12, compile="default", backend="eager")
    assert decoder.generate(prompt, 12)[0].tolist() == want, arch


def test_batch_above_one_is_refused():
    from conftest import tiny_llama
    model = tiny_llama()
    fast = predictor_model(model, random_predictors(locate_units(model)), 0.5)
    with pytest.raises(PipelineError, match="batch 1"):
        GreedyDecoder(fast, 2, 12).generate(torch.randint(0, VOCAB, (2, 4)), 3)

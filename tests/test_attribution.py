"""The fused attribution equals the naive per-layer, per-step loop (METHOD §3)."""
import pytest
import torch

from conftest import VOCAB, assert_close
from reference import reference_scores
from utils.attribution import Attributor


def random_sample(seed, prompt_len=7, label_len=5):
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, VOCAB, (1, prompt_len), generator=g)
    label = torch.randint(0, VOCAB, (label_len,), generator=g).tolist()
    return prompt, label


@pytest.mark.parametrize("use_cache", [False, True])
def test_fused_gradient_gxo_magnitude_match_naive_loop(arch_model, use_cache):
    _, model = arch_model
    prompt, label = random_sample(11)
    fast = Attributor(model).score_sample(prompt, label)
    slow = reference_scores(model, prompt, label, use_cache=use_cache)
    expected = {f"{k}_{c}" for k in ("magnitude", "gradient", "gxo", "grad_norm") for c in ("attention", "mlp")}
    assert set(fast) == expected == set(slow)
    for key in expected:
        assert_close(fast[key], slow[key], key)
    L, H = 3, 4
    assert fast["gxo_attention"].shape == (len(label), L, H)
    assert fast["gxo_mlp"].shape[:2] == (len(label), L)
    # the scores are not trivially zero: a wrong sign or a missed site would show
    assert fast["gxo_attention"].abs().min() > 0 and fast["grad_norm_mlp"].min() > 0


@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_batched_ig_matches_naive_ig_loop(arch_model, chunk):
    _, model = arch_model
    prompt, label = random_sample(23, prompt_len=5, label_len=3)
    fast = Attributor(model).score_sample(prompt, label, ig_steps=3, batch_size=chunk)
    slow = reference_scores(model, prompt, label, ig_steps=3, gradients=False)
    for comp in ("attention", "mlp"):
        assert_close(fast[f"ig_{comp}"], slow[f"ig_{comp}"], f"ig_{comp} (chunk {chunk})")


def test_batched_ig_matches_naive_ig_loop_on_gpt2():
    """The staggered batch hooks the decoder blocks generically: GPT-2's blocks take other arguments."""
    from conftest import tiny_gpt2
    model = tiny_gpt2()
    prompt, label = random_sample(29, prompt_len=4, label_len=3)
    fast = Attributor(model).score_sample(prompt, label, ig_steps=2, batch_size=9)
    slow = reference_scores(model, prompt, label, ig_steps=2, gradients=False)
    for comp in ("attention", "mlp"):
        assert_close(fast[f"ig_{comp}"], slow[f"ig_{comp}"], f"gpt2 ig_{comp}")


def test_ig_rows_join_at_their_own_layer(arch_model):
    """Each IG element runs only from its own layer up: layer l sees the dense row plus the elements of
    layers <= l (2 components x n steps per layer), so the batch grows with depth."""
    _, model = arch_model
    prompt, label = random_sample(4, prompt_len=3, label_len=2)
    seen = []
    att = Attributor(model)
    handles = [block.register_forward_hook(lambda m, a, out: seen.append((out[0] if isinstance(out, tuple)
                                                                           else out).shape[0]))
               for block in att.layout.decoder_layers]
    try:
        att.score_sample(prompt, label, ig_steps=3, batch_size=10_000, ig_packed=False)   # one step per pass
    finally:
        for h in handles:
            h.remove()
    L, n = 3, 3
    staggered = [1 + 2 * n * (l + 1) for l in range(L)]
    dense = [1] * L
    # per step: the IG pass (one chunk holds all elements), then the dense pass; the prompt step's IG runs
    # as two staggered passes: the positions before the last without autograd, then the last against them
    assert seen == staggered + staggered + dense + (staggered + dense) * (len(label) - 1)


def test_ig_with_one_step_equals_gxo(arch_model):
    _, model = arch_model
    prompt, label = random_sample(5)
    s = Attributor(model).score_sample(prompt, label, ig_steps=1)
    for comp in ("attention", "mlp"):
        assert_close(s[f"ig_{comp}"], s[f"gxo_{comp}"], comp)


def test_ig_differs_from_gxo_with_more_steps(arch_model):
    """Guards the test above: IG-1 = GxO must not hold because IG ignores alpha."""
    _, model = arch_model
    prompt, label = random_sample(5)
    s = Attributor(model).score_sample(prompt, label, ig_steps=4)
    diff = (s["ig_mlp"] - s["gxo_mlp"]).abs().max() / s["gxo_mlp"].abs().max()
    assert diff > 1e-3


def test_magnitude_only_pass_equals_fused_magnitudes(arch_model):
    _, model = arch_model
    prompt, label = random_sample(3)
    att = Attributor(model)
    full = att.score_sample(prompt, label)
    mags = att.score_sample(prompt, label, gradients=False)
    assert set(mags) == {"magnitude_attention", "magnitude_mlp"}
    for comp in ("attention", "mlp"):
        torch.testing.assert_close(mags[f"magnitude_{comp}"], full[f"magnitude_{comp}"], rtol=1e-5, atol=0)


def test_empty_label_gives_zero_steps(arch_model):
    _, model = arch_model
    prompt, _ = random_sample(1)
    s = Attributor(model).score_sample(prompt, [], ig_steps=2)
    assert s["gxo_attention"].shape == (0, 3, 4)
    assert s["ig_mlp"].shape[0] == 0 and s["grad_norm_attention"].shape == (0, 3)


def test_hooks_leave_the_model_dense_after_scoring(arch_model):
    _, model = arch_model
    prompt, label = random_sample(9)
    with torch.no_grad():
        before = model(prompt).logits
    Attributor(model).score_sample(prompt, label, ig_steps=2)
    with torch.no_grad():
        after = model(prompt).logits
    torch.testing.assert_close(before, after, rtol=0, atol=0)


@pytest.mark.parametrize("chunk", [1, 3, 100])
def test_step_batched_scores_match_naive_loop(arch_model, chunk):
    """All steps teacher-forced as one batch (the GPU path) equals the per-step naive loop."""
    _, model = arch_model
    prompt, label = random_sample(31, prompt_len=6, label_len=5)
    fast = Attributor(model).score_sample(prompt, label, step_mode="batched", batch_size=chunk)
    slow = reference_scores(model, prompt, label)
    assert set(fast) == set(slow)
    for key in slow:
        assert_close(fast[key], slow[key], f"{key} (chunk {chunk})")
    mags = Attributor(model).score_sample(prompt, label, gradients=False, step_mode="batched", batch_size=chunk)
    for comp in ("attention", "mlp"):
        assert_close(mags[f"magnitude_{comp}"], slow[f"magnitude_{comp}"], comp)


def test_step_modes_are_checked(arch_model):
    _, model = arch_model
    prompt, label = random_sample(2)
    with pytest.raises(ValueError, match="step_mode"):
        Attributor(model).score_sample(prompt, label, step_mode="fast")
    with pytest.raises(ValueError, match="cached"):
        Attributor(model).score_sample(prompt, label, ig_steps=2, step_mode="batched")


def test_auto_step_mode_choice():
    """auto picks batched for gradient/GxO on CUDA only; IG and CPUs run cached; explicit modes stay."""
    from utils.attribution import resolve_step_mode

    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert resolve_step_mode("auto", gpu, ig=False) == "batched"
    assert resolve_step_mode("auto", gpu, ig=True) == "cached"
    assert resolve_step_mode("auto", cpu, ig=False) == "prefix"      # gradients: two passes per sample
    assert resolve_step_mode("auto", cpu, ig=False, gradients=False) == "batched"   # magnitudes: one pass
    assert resolve_step_mode("auto", cpu, ig=True, gradients=False) == "cached"
    assert resolve_step_mode("auto", cpu, ig=True) == "cached"
    assert resolve_step_mode("batched", cpu, ig=False) == "batched"
    assert resolve_step_mode("cached", gpu, ig=False) == "cached"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="auto differs from cached only on CUDA")
def test_auto_on_cuda_runs_the_batched_path(arch_model):
    """On CUDA auto must be the batched path (bit for bit), not the cached one it equals on a CPU."""
    import copy

    model = copy.deepcopy(arch_model[1]).cuda()   # the fixture's model is shared with other tests
    prompt, label = random_sample(2)
    auto = Attributor(model).score_sample(prompt, label, step_mode="auto")
    batched = Attributor(model).score_sample(prompt, label, step_mode="batched")
    for key in batched:
        assert torch.equal(auto[key], batched[key]), key


def test_ig_batch_size_bounds_the_positions_of_a_pass(arch_model):
    """--batch_size counts token positions: a prompt-step element (5 positions) costs its last position
    plus its 4 earlier ones, which run without autograd, at ``ig.prompt_row_cost`` (more than 12 // 5 = 2
    elements per pass); a one-token step packs 12 (one step per pass; packed steps:
    tests/test_ig_fast.py); the dense row comes on top.  Each prompt-step chunk runs as two passes: its
    first 4 positions without autograd, then the last position against them."""
    _, model = arch_model
    prompt, label = random_sample(6, prompt_len=5, label_len=2)
    shapes = []
    att = Attributor(model)
    last = att.layout.decoder_layers[-1]
    handle = last.register_forward_hook(lambda m, a, out: shapes.append(tuple((out[0] if isinstance(out, tuple)
                                                                                 else out).shape[:2])))
    try:
        att.score_sample(prompt, label, gradients=False, ig_steps=3, batch_size=12, ig_packed=False)
    finally:
        handle.remove()
    elements = 2 * 3 * 3                     # components x layers x steps
    per_pass = int(12 // att.ig.prompt_row_cost(5))
    assert 12 // 5 < per_pass < elements
    chunks = [per_pass] * (elements // per_pass) + ([elements % per_pass] if elements % per_pass else [])
    prefix_passes = [s for s in shapes if s[1] == 4]
    token_passes = [s for s in shapes if s[1] == 1]
    assert prefix_passes == [(n + 1, 4) for n in chunks]                       # + the dense row
    assert [s for s in shapes if s[1] == 5] == [(1, 5)]                          # the dense prompt step
    assert token_passes[:len(chunks)] == [(n + 1, 1) for n in chunks]          # their last positions
    assert token_passes[len(chunks):] == [(13, 1), (7, 1), (1, 1)]             # 12 + 6 elements, then dense
    assert sum(r - 1 for r, _ in prefix_passes) == elements


@pytest.mark.parametrize("use_cache", [False, True])
def test_prefix_steps_match_naive_loop(arch_model, use_cache):
    """step_mode prefix (all steps as rows of one pass against the shared dense cache, one backward) gives
    the naive loop's magnitude, gradient, GxO and norms, in two passes per sample whatever the label length:
    the prefix pass (decoder only) and one pass of T one-token rows."""
    _, model = arch_model
    prompt, label = random_sample(13, prompt_len=6, label_len=5)
    passes = []
    handle = model.register_forward_pre_hook(lambda m, a, k: passes.append(tuple(k["input_ids"].shape)),
                                             with_kwargs=True)
    try:
        fast = Attributor(model).score_sample(prompt, label, step_mode="prefix")
    finally:
        handle.remove()
    assert passes == [(len(label), 1)]           # the LM head runs once, on the T step rows
    slow = reference_scores(model, prompt, label, use_cache=use_cache)
    assert set(fast) == set(slow)
    for key in slow:
        assert_close(fast[key], slow[key], key)
    assert fast["gxo_attention"].abs().min() > 0 and fast["grad_norm_mlp"].min() > 0
    mags = Attributor(model).score_sample(prompt, label, gradients=False, step_mode="prefix")
    for comp in ("attention", "mlp"):
        assert_close(mags[f"magnitude_{comp}"], slow[f"magnitude_{comp}"], f"magnitude_{comp} without gradients")


def test_prefix_steps_fall_back_to_cached_where_the_cache_cannot_be_shared():
    """A one-token prompt with a one-token label has no cached position; a model outside the attention
    interface cannot share its cache: both run the cached loop (one pass per step), equal to the naive loop."""
    from conftest import tiny_llama
    model = tiny_llama()
    att = Attributor(model)
    for prompt_len, label_len, supported in ((1, 1, True), (5, 3, False)):
        prompt, label = random_sample(17, prompt_len=prompt_len, label_len=label_len)
        if not supported:
            model._supports_attention_backend = False      # the instance only
        passes = []
        handle = model.register_forward_pre_hook(lambda m, a, k: passes.append(tuple(k["input_ids"].shape)),
                                                 with_kwargs=True)
        try:
            fast = att.score_sample(prompt, label, step_mode="prefix")
        finally:
            handle.remove()
            model.__dict__.pop("_supports_attention_backend", None)
        assert passes == [(1, prompt_len)] + [(1, 1)] * (label_len - 1)
        slow = reference_scores(model, prompt, label)
        for key in slow:
            assert_close(fast[key], slow[key], f"{key} ({prompt_len}, {label_len}, {supported})")

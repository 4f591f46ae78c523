"""Packed integrated gradients (several generation steps' IG elements per pass, every row reading its
prefix of the one shared cache) equal the one-step-per-pass path and the naive per-layer loop (METHOD §3)."""
import torch

from conftest import VOCAB, assert_close, tiny_gemma
from reference import reference_scores
from utils.attribution import Attributor
from utils.ig import alphas_run, ig_alphas


def test_alpha_grid_is_k_over_n():
    """alpha_k = k / n for k = 1..n, ending at 1 (the dense model); with the dense gradient at hand the
    elements run all alphas but that last one."""
    assert ig_alphas(1) == [1.0]
    assert ig_alphas(4) == [0.25, 0.5, 0.75, 1.0]
    assert ig_alphas(3) == [1 / 3, 2 / 3, 1.0]
    assert ig_alphas(20)[0] == 0.05 and len(ig_alphas(20)) == 20
    assert alphas_run(4, dense_grads=None) == [0.25, 0.5, 0.75, 1.0]
    assert alphas_run(4, dense_grads={}) == [0.25, 0.5, 0.75]
    assert alphas_run(1, dense_grads={}) == []


def random_sample(seed, prompt_len, label_len):
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, VOCAB, (1, prompt_len), generator=g)
    return prompt, torch.randint(0, VOCAB, (label_len,), generator=g).tolist()


def passes_of(model, fn):
    """Run ``fn`` counting the forward passes of ``model`` and their batch sizes."""
    sizes = []
    handle = model.register_forward_pre_hook(lambda m, a, k: sizes.append(k["input_ids"].shape), with_kwargs=True)
    try:
        return fn(), sizes
    finally:
        handle.remove()


def test_packed_ig_matches_per_step_path_and_naive_loop(arch_model):
    """Budget 5: a pass holds part of one step; 40: parts of two steps; 100000: every later step at once."""
    _, model = arch_model
    prompt, label = random_sample(31, prompt_len=6, label_len=4)
    att = Attributor(model)
    slow = reference_scores(model, prompt, label, ig_steps=3, gradients=False)
    for budget in (5, 40, 100_000):
        packed, sizes = passes_of(model, lambda: att.score_sample(prompt, label, ig_steps=3, gradients=False,
                                                                  batch_size=budget, ig_packed=True))
        per_step = att.score_sample(prompt, label, ig_steps=3, gradients=False, batch_size=budget,
                                    ig_packed=False)
        assert set(packed) == set(per_step) == set(slow)
        for key in slow:
            assert_close(packed[key], slow[key], f"packed {key} (budget {budget})")
            assert_close(per_step[key], slow[key], f"per-step {key} (budget {budget})")
        assert packed["ig_attention"].abs().min() > 0
        if budget == 100_000:   # the 4 dense steps as rows of one pass, the prompt's IG, then ONE pass for
            # all later steps: 3 dense rows + 3 steps x 2 components x 3 layers x 2 alphas (alpha = 1 is the
            # dense gradient, not run again)
            one_token = [tuple(s) for s in sizes if s[1] == 1 and s[0] > 1]
            assert one_token == [(4, 1), (3 + 3 * 2 * 3 * 2, 1)]


def test_packed_ig_keeps_gradient_and_gxo(arch_model):
    """With IG packed, the dense steps still give the gradient, GxO and norms of the cached path."""
    _, model = arch_model
    prompt, label = random_sample(33, prompt_len=5, label_len=3)
    att = Attributor(model)
    packed = att.score_sample(prompt, label, ig_steps=1, batch_size=1000, ig_packed=True)
    plain = att.score_sample(prompt, label)
    for key in plain:
        assert_close(packed[key], plain[key], key)
    for comp in ("attention", "mlp"):   # IG with one step (alpha = 1) is GxO
        assert_close(packed[f"ig_{comp}"], plain[f"gxo_{comp}"], f"ig-1 vs gxo {comp}")


def test_packed_ig_with_sliding_window_layers():
    """Gemma-3 sliding-window layers: a sequence within the window is packed, a longer one falls back to
    one step per pass; both equal the naive loop."""
    prompt, label = random_sample(37, prompt_len=5, label_len=4)
    for window, packs in ((16, True), (6, False)):
        model = tiny_gemma(sliding_window=window, seed=2)
        att = Attributor(model)
        assert att.can_pack_ig(5, 4) is packs
        fast, sizes = passes_of(model, lambda: att.score_sample(prompt, label, ig_steps=2, batch_size=10_000,
                                                                        ig_packed=True))
        multi_step = [s for s in sizes if s[1] == 1 and s[0] > 1 + 2 * 3 * 2]
        assert bool(multi_step) is packs
        slow = reference_scores(model, prompt, label, ig_steps=2, gradients=False)
        for comp in ("attention", "mlp"):
            assert_close(fast[f"ig_{comp}"], slow[f"ig_{comp}"], f"window {window} ig_{comp}")


def test_packed_ig_on_gpt2():
    """GPT-2's blocks take the attention mask positionally: the staggered rows must cut it too."""
    from conftest import tiny_gpt2
    model = tiny_gpt2()
    prompt, label = random_sample(41, prompt_len=4, label_len=3)
    fast = Attributor(model).score_sample(prompt, label, ig_steps=2, batch_size=10_000, ig_packed=True)
    slow = reference_scores(model, prompt, label, ig_steps=2, gradients=False)
    for comp in ("attention", "mlp"):
        assert_close(fast[f"ig_{comp}"], slow[f"ig_{comp}"], f"gpt2 ig_{comp}")


def test_progress_counts_every_step_once():
    from conftest import tiny_llama
    prompt, label = random_sample(43, prompt_len=4, label_len=5)
    for n_steps in (1, 2):      # with one step, alpha = 1 alone: the dense gradient, no IG pass at all
        ticks = []
        Attributor(tiny_llama()).score_sample(prompt, label, ig_steps=n_steps, batch_size=30, ig_packed=True,
                                              on_step=lambda: ticks.append(1))
        assert len(ticks) == 5, n_steps


def test_packed_pass_respects_the_position_budget():
    """A packed row costs its one position plus its cache slots weighted by the cache weight: with a
    budget of 40 every pass holds at most 40 // (1 + w * longest prefix) elements (plus its dense rows),
    and all 3 later steps x 12 elements are computed (alpha = 1 is the dense gradient, not run again)."""
    from conftest import tiny_llama
    model = tiny_llama()
    prompt, label = random_sample(47, prompt_len=6, label_len=4)
    att = Attributor(model)
    w = att.ig.cache_weight()
    assert 0 < w < 1
    _, sizes = passes_of(model, lambda: att.score_sample(prompt, label, gradients=False, ig_steps=3,
                                                         batch_size=40, ig_packed=True))
    packed = [s[0] for s in sizes if s[1] == 1 and s[0] > 1]
    assert packed[0] == 4          # the dense steps, one row each
    packed = packed[1:]
    most = int(40 // (1 + w * 6))
    assert all(r - 2 <= most for r in packed)
    assert sum(packed) >= 3 * 12 and len(packed) >= 36 / (most + 2)


def test_packing_is_the_default(arch_model):
    """On a CPU too (these tests) IG packs the later steps: the 3 dense steps as the rows of one pass, the
    prompt step's last position (its earlier positions run without logits), then one pass holding both
    later steps (2 dense rows + 2 x 2 components x 3 layers x 1 alpha: alpha = 1 is the dense gradient)."""
    _, model = arch_model
    prompt, label = random_sample(53, prompt_len=4, label_len=3)
    _, sizes = passes_of(model, lambda: Attributor(model).score_sample(prompt, label, gradients=False, ig_steps=2,
                                                                       batch_size=10_000))
    assert [tuple(s) for s in sizes if s[1] == 1] == [(3, 1), (1, 1), (2 + 2 * 2 * 3 * 1, 1)]


def test_prompt_step_passes_count_its_earlier_positions_as_cheap():
    """The prompt step's IG elements run their earlier positions without autograd: a budget of B holds
    B // ig.prompt_row_cost(P) elements per pass (more than B // P, counting them as whole positions), one
    no-grad pass over the P-1 earlier positions per chunk, and the scores still equal the naive loop."""
    from conftest import tiny_llama
    model = tiny_llama()
    P, n_steps = 6, 3
    prompt, label = random_sample(59, prompt_len=P, label_len=2)     # the dense cache pass reads P positions
    att = Attributor(model)
    cost = att.ig.prompt_row_cost(P)
    assert 1 < cost < P
    assert att.ig.prompt_row_cost(1) == 1
    elements = att.layout.num_layers * 2 * (n_steps - 1)             # alpha = 1 is the dense gradient
    for budget in (cost, 2 * P, 10_000):
        # the no-grad passes over the earlier positions run the decoder alone (no logits)
        fast, sizes = passes_of(model.base_model, lambda: att.score_sample(prompt, label, gradients=False,
                                                                           ig_steps=n_steps, batch_size=budget))
        per_pass = max(1, int(budget // cost))
        assert per_pass > budget // P
        earlier = [s for s in sizes if s[1] == P - 1]
        assert len(earlier) == -(-elements // per_pass), budget
        slow = reference_scores(model, prompt, label, ig_steps=n_steps, gradients=False)
        for comp in ("attention", "mlp"):
            assert_close(fast[f"ig_{comp}"], slow[f"ig_{comp}"], f"budget {budget} ig_{comp}")

"""Sliding-window attention (Gemma-3) with sequences longer than the window.

``transformers`` keeps a sliding layer's cache as a ``DynamicSlidingWindowLayer`` (only the last
window - 1 keys/values, plus a running length), and our KV-cache operations (repeated_cache for the IG
batch and the masked generations, detach_cache_) copy or map those layers.  These tests check that the
cached fast paths equal computations that never use a cache (every step recomputes the whole sequence,
the model's own sliding-window mask doing the windowing), with a window of 4 and sequences of 12."""
import torch
import torch.nn.functional as F

from conftest import VOCAB, assert_close, tiny_gemma
from reference import reference_scores
from utils.attribution import Attributor
from utils.generation import masked_generate
from utils.kv_cache import cache_argument_name, output_cache, repeated_cache
from utils.sites import ATTN, COMPONENTS, MLP, SiteHooks, locate_units

WINDOW = 4


def sample(seed, prompt_len=7, label_len=5):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, VOCAB, (1, prompt_len), generator=g),
            torch.randint(0, VOCAB, (label_len,), generator=g).tolist())


def test_the_window_matters_for_these_lengths():
    """Guards the tests below: with a window of 4 the model's output differs from a full-attention one."""
    ids = torch.cat([sample(1)[0], sample(2)[0]], dim=1)            # 14 tokens
    windowed = tiny_gemma(sliding_window=WINDOW)
    full = tiny_gemma(sliding_window=512)
    with torch.no_grad():
        a, b = windowed(ids).logits[0, -1], full(ids).logits[0, -1]
    assert (a - b).abs().max() > 1e-3
    cache = output_cache(windowed(ids, use_cache=True))
    kinds = {type(layer).__name__ for layer in cache.layers}
    assert "DynamicSlidingWindowLayer" in kinds                     # the windowed cache is really in use


def test_cached_scores_equal_the_no_cache_reference_beyond_the_window():
    model = tiny_gemma(sliding_window=WINDOW)
    prompt, label = sample(5)
    fast = Attributor(model).score_sample(prompt, label, ig_steps=3, batch_size=64)
    slow = reference_scores(model, prompt, label, ig_steps=3, use_cache=False)
    assert set(slow) <= set(fast)
    for key in slow:
        assert_close(fast[key], slow[key], key)


def test_batched_steps_equal_the_no_cache_reference_beyond_the_window():
    model = tiny_gemma(sliding_window=WINDOW)
    prompt, label = sample(6)
    fast = Attributor(model).score_sample(prompt, label, step_mode="batched", batch_size=30)
    slow = reference_scores(model, prompt, label, use_cache=False)
    for key in slow:
        assert_close(fast[key], slow[key], key)
    # magnitudes alone: one teacher-forced pass records every step (auto picks it on any device)
    mags = Attributor(model).score_sample(prompt, label, gradients=False)
    for comp in ("attention", "mlp"):
        assert_close(mags[f"magnitude_{comp}"], slow[f"magnitude_{comp}"], comp)


def test_repeated_cache_keeps_the_window_state():
    """A repeated sliding-window cache continues exactly like the original, row by row."""
    model = tiny_gemma(sliding_window=WINDOW)
    prompt, label = sample(8, prompt_len=9)
    name = cache_argument_name(model)
    with torch.no_grad():
        cache = output_cache(model(prompt, use_cache=True))
        rep = repeated_cache(cache, 3)
        nxt = torch.tensor([[label[0]]])
        one = model(nxt, **{name: cache}, use_cache=True).logits[0, -1]
        three = model(nxt.expand(3, 1), **{name: rep}, use_cache=True).logits[:, -1]
        full = model(torch.cat([prompt, nxt], dim=1)).logits[0, -1]
    torch.testing.assert_close(three, one.expand(3, -1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(one, full, rtol=1e-4, atol=1e-5)


def masked_greedy_without_cache(model, prompt, keep_one, steps):
    """Greedy generation recomputing the whole sequence each step; step t's mask applies at the position
    step t computes (the input token of step t), the prompt runs dense (step 0 is never masked)."""
    layout = locate_units(model)
    ids = prompt.clone()
    P = prompt.shape[1]
    out = []

    def hook_for(comp, layer):
        def hook(module, args):
            x = args[0]
            factor = torch.ones(x.shape[1], x.shape[-1])
            for t in range(1, x.shape[1] - P + 1):
                m = keep_one[comp][t, layer].float()
                factor[P - 1 + t] = m.repeat_interleave(layout.head_dim) if comp == ATTN else m
            return (x * factor,) + tuple(args[1:])
        return hook

    handles = [(layout.attn_out if c == ATTN else layout.mlp_down)[l].register_forward_pre_hook(hook_for(c, l))
               for c in COMPONENTS for l in range(layout.num_layers)]
    try:
        with torch.no_grad():
            for _ in range(steps):
                nxt = model(ids, use_cache=False).logits[0, -1].argmax()
                out.append(int(nxt))
                ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    finally:
        for h in handles:
            h.remove()
    return out


def test_masked_generation_beyond_the_window_equals_no_cache_generation():
    model = tiny_gemma(sliding_window=WINDOW)
    layout = locate_units(model)
    prompt, _ = sample(9, prompt_len=6)
    T, B = 8, 3
    g = torch.Generator().manual_seed(4)
    keep = {ATTN: torch.rand(B, T, layout.num_layers, layout.num_heads, generator=g) > 0.3,
            MLP: torch.rand(B, T, layout.num_layers, layout.intermediate, generator=g) > 0.3}
    with SiteHooks(model, layout) as hooks:
        batched = masked_generate(model, hooks, prompt, keep, eos_ids=[VOCAB + 5])
    expected = [masked_greedy_without_cache(model, prompt, {c: keep[c][b] for c in COMPONENTS}, T)
                for b in range(B)]
    assert batched == expected
    dense = masked_greedy_without_cache(model, prompt, {c: torch.ones_like(keep[c][0]) for c in COMPONENTS}, T)
    assert any(row != dense for row in batched)     # the masks change something: the check is not vacuous


def test_step_loss_beyond_the_window_is_the_no_cache_loss():
    """The dense per-step losses along a label longer than the window, cached vs recomputed."""
    model = tiny_gemma(sliding_window=WINDOW)
    prompt, label = sample(10, prompt_len=5, label_len=8)
    labels = torch.tensor(label)
    name = cache_argument_name(model)
    with torch.no_grad():
        cache, cached = None, []
        for t in range(len(label)):
            ids = prompt if t == 0 else labels[t - 1:t].view(1, 1)
            out = model(ids, **({name: cache} if cache is not None else {}), use_cache=True)
            cache = output_cache(out)
            cached.append(F.cross_entropy(out.logits[0, -1:], labels[t:t + 1]).item())
        full = model(torch.cat([prompt, labels[None, :-1]], dim=1)).logits[0, prompt.shape[1] - 1:]
        recomputed = F.cross_entropy(full, labels, reduction="none").tolist()
    torch.testing.assert_close(torch.tensor(cached), torch.tensor(recomputed), rtol=1e-5, atol=1e-5)

"""Teacher-forced KL and perplexity of masked variants (utils/quality.py) against a slow reference: the
masked model run step by step against its own KV cache, each step under its own mask."""

import pytest
import torch

from conftest import VOCAB
from utils.kv_cache import cache_argument_name, output_cache
from utils.quality import teacher_forced_quality
from utils.sites import ATTN, MLP, SiteHooks, locate_units


def step_by_step_reference(model, layout, prompt, label, keep_one):
    """Per masked step t >= 1: (KL(dense || masked), -log p_masked(label[t])) with the masked model
    teacher-forced on the label one token at a time; its own pre-hooks zero the units (no SiteHooks)."""
    current = {"mask": None}

    def make(comp, layer):
        def hook(module, args):
            if current["mask"] is None:
                return None
            m = current["mask"][comp][layer].to(args[0].dtype)
            if comp == ATTN:
                m = m.repeat_interleave(layout.head_dim)
            return (args[0] * m,) + tuple(args[1:])
        return hook

    handles = [mod.register_forward_pre_hook(make(c, l)) for c, mods in ((ATTN, layout.attn_out), (MLP, layout.mlp_down))
               for l, mod in enumerate(mods)]
    name = cache_argument_name(model)
    try:
        with torch.no_grad():
            def run(masked):
                out = model(input_ids=prompt, use_cache=True)        # step 0: dense in both runs
                cache, logps = output_cache(out), []
                for t in range(1, len(label)):
                    current["mask"] = {c: keep_one[c][t] for c in (ATTN, MLP)} if masked else None
                    out = model(input_ids=torch.tensor([[label[t - 1]]]), use_cache=True, **{name: cache})
                    current["mask"] = None
                    cache = output_cache(out)
                    logps.append(torch.log_softmax(out.logits[0, -1].double(), -1))
                return logps
            dense, masked = run(False), run(True)
    finally:
        for h in handles:
            h.remove()
    kl = [float((d.exp() * (d - m)).sum()) for d, m in zip(dense, masked)]
    nll = [float(-m[label[t]]) for t, m in zip(range(1, len(label)), masked)]
    return kl, nll


@pytest.mark.parametrize("seed", [0, 1])
def test_teacher_forced_kl_and_nll_match_step_by_step(arch_model, seed):
    _, model = arch_model
    layout = locate_units(model)
    # a random tiny model predicts nearly uniformly (KL ~1e-3); sharpen its logits so KL and NLL are O(1)
    # and a relative tolerance means something
    model.get_output_embeddings().register_forward_pre_hook(lambda m, args: (args[0] * 40,))
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, VOCAB, (1, 5 + seed), generator=g)
    T, B = 7, 5
    label = torch.randint(0, VOCAB, (T,), generator=g).tolist()
    keep = {ATTN: torch.rand(B, T, layout.num_layers, layout.num_heads, generator=g) > 0.4,
            MLP: torch.rand(B, T, layout.num_layers, layout.intermediate, generator=g) > 0.4}
    keep[ATTN][0] = True   # variant 0 keeps everything: KL 0, the dense model's NLL
    keep[MLP][0] = True
    with SiteHooks(model, layout) as hooks:
        got = teacher_forced_quality(model, hooks, prompt, label, keep, batch_size=2)   # chunks of 2 variants
        whole = teacher_forced_quality(model, hooks, prompt, label, keep)
        # the sweep hands over the prompt's cache it decoded from: the same numbers, and the cache untouched
        from utils.generation import masked_generate, prompt_state
        state = prompt_state(model, prompt)
        masked_generate(model, hooks, prompt, keep, eos_ids=[VOCAB + 5], state=state)
        shared = teacher_forced_quality(model, hooks, prompt, label, keep, prompt_cache=state[1])
    torch.testing.assert_close(got["kl"], whole["kl"], rtol=0, atol=1e-6)
    for key in ("kl", "nll"):
        torch.testing.assert_close(shared[key], whole[key], rtol=0, atol=0)
    for b in range(B):
        kl, nll = step_by_step_reference(model, layout, prompt, label, {c: keep[c][b] for c in keep})
        assert got["kl"][b].item() == pytest.approx(sum(kl) / len(kl), rel=1e-5, abs=1e-6)
        assert got["nll"][b].item() == pytest.approx(sum(nll) / len(nll), rel=1e-5, abs=1e-6)
        if b > 0:
            assert got["kl"][b].item() > 0.05, "masks this strong must move the distribution"
    assert abs(got["kl"][0].item()) < 1e-6


def test_no_masked_step_gives_none(arch_model):
    _, model = arch_model
    layout = locate_units(model)
    keep = {ATTN: torch.ones(2, 1, layout.num_layers, layout.num_heads, dtype=torch.bool),
            MLP: torch.ones(2, 1, layout.num_layers, layout.intermediate, dtype=torch.bool)}
    with SiteHooks(model, layout) as hooks:
        assert teacher_forced_quality(model, hooks, torch.tensor([[1, 2, 3]]), [4], keep) is None

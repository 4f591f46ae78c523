"""The shared-prefix attention of packed IG passes (utils/kv_cache.py) against transformers' stock
attention with a real KV cache per row, and packed IG with prompts much longer than the label against
the naive per-layer loop (tests/reference.py)."""
import inspect

import pytest
import torch
from transformers import DynamicCache, Gemma2Config, Gemma2ForCausalLM

from conftest import VOCAB, tiny_gemma, tiny_gpt2, tiny_llama, tiny_phi
from reference import reference_scores
from utils.attribution import Attributor
from utils.kv_cache import SharedPrefix, shared_prefix_pass

RTOL = 1e-5


def tiny_gemma2(softcap, seed=0):
    """Gemma-2 passes its attention-logit softcap to the attention function (Gemma-3 defines none)."""
    torch.manual_seed(seed)
    cfg = Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                       sliding_window=512, attn_logit_softcapping=softcap, query_pre_attn_scalar=12,
                       attn_implementation="eager")   # transformers 5.17 picks sdpa, which drops the softcap
    model = Gemma2ForCausalLM(cfg).eval().requires_grad_(False)
    for layer in model.model.layers:    # random init gives tiny logits, which a softcap leaves as they are
        layer.self_attn.q_proj.weight.mul_(20)
        layer.self_attn.k_proj.weight.mul_(20)
    return model


MODELS = {"llama-gqa": tiny_llama, "phi-mha": tiny_phi, "gemma3": tiny_gemma, "gpt2": tiny_gpt2,
          "gemma2-softcap": lambda: tiny_gemma2(softcap=2.0)}


def cache_kwarg(model):
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params and "past_key_values" not in params else "past_key_values"


def cache_of(out):
    return getattr(out, "cache", None) or out.past_key_values


def stock_rows(model, seq, lengths, new_ids, weight):
    """Row r, the stock way: the model runs seq[:lengths[r]] into its own DynamicCache, then new_ids[r]
    against it.  Returns the new tokens' logits and d(sum logits * weight)/d(new token embeddings)."""
    embed = model.get_input_embeddings()
    logits, grads = [], []
    for r, n in enumerate(lengths):
        with torch.no_grad():
            cache = cache_of(model(input_ids=seq[:, :n], use_cache=True))
        assert isinstance(cache, DynamicCache) and cache.get_seq_length() == n
        x = embed(new_ids[r:r + 1, None]).detach().requires_grad_(True)
        with torch.enable_grad():
            out = model(inputs_embeds=x, position_ids=torch.tensor([[n]]), use_cache=True,
                        **{cache_kwarg(model): cache}).logits[:, -1]
            (g,) = torch.autograd.grad((out * weight[r]).sum(), x)
        logits.append(out.detach())
        grads.append(g)
    return torch.cat(logits), torch.cat(grads)


def shared_rows(model, seq, lengths, new_ids, weight):
    """All rows in one pass with no cache object, each reading its prefix of the whole sequence's cache."""
    with torch.no_grad():
        cache = cache_of(model(input_ids=seq, use_cache=True))
    lengths_t = torch.tensor(lengths)
    x = model.get_input_embeddings()(new_ids[:, None]).detach().requires_grad_(True)
    with torch.enable_grad(), shared_prefix_pass(model, SharedPrefix(cache, lengths_t, max(lengths))):
        out = model(inputs_embeds=x, position_ids=lengths_t[:, None], use_cache=False).logits[:, -1]
        (g,) = torch.autograd.grad((out * weight).sum(), x)
    return out.detach(), g


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_shared_prefix_attention_equals_stock_attention_with_a_cache_per_row(name):
    model = MODELS[name]()
    g = torch.Generator().manual_seed(hash(name) % 1000)
    seq = torch.randint(0, VOCAB, (1, 23), generator=g)
    lengths = [23, 1, 9, 17, 9, 2]                        # unsorted, repeated, the whole cache, one position
    new_ids = torch.randint(0, VOCAB, (len(lengths),), generator=g)
    weight = torch.randn(len(lengths), VOCAB, generator=g)
    implementation = model.config._attn_implementation
    fast_logits, fast_grad = shared_rows(model, seq, lengths, new_ids, weight)
    slow_logits, slow_grad = stock_rows(model, seq, lengths, new_ids, weight)
    assert model.config._attn_implementation == implementation     # restored after the pass
    assert rel_err(fast_logits, slow_logits) < RTOL
    assert rel_err(fast_grad, slow_grad) < RTOL
    assert fast_grad.abs().min() > 0
    # the rows really differ by their prefix: the same token at two lengths gives different logits
    assert rel_err(fast_logits[2], fast_logits[3]) > 1e-3


def test_softcap_is_applied():
    """Gemma-2's softcap changes the attention here (so the equality above covers it)."""
    g = torch.Generator().manual_seed(5)
    seq = torch.randint(0, VOCAB, (1, 12), generator=g)
    lengths, new_ids = [12, 4], torch.randint(0, VOCAB, (2,), generator=g)
    weight = torch.randn(2, VOCAB, generator=g)
    capped, _ = shared_rows(tiny_gemma2(softcap=2.0), seq, lengths, new_ids, weight)
    uncapped, _ = shared_rows(tiny_gemma2(softcap=None), seq, lengths, new_ids, weight)
    assert rel_err(capped, uncapped) > 1e-3


def test_config_restored_after_an_error_and_short_sliding_cache_refused():
    model = tiny_gemma(sliding_window=6)
    seq = torch.randint(0, VOCAB, (1, 10))
    with torch.no_grad():
        cache = cache_of(model(input_ids=seq, use_cache=True))
    with pytest.raises(ValueError, match="fewer than the 10 positions"):
        SharedPrefix(cache, torch.tensor([10]), 10)
    before = model.config._attn_implementation
    with pytest.raises(RuntimeError, match="boom"):
        with shared_prefix_pass(model, SharedPrefix(cache, torch.tensor([5]), 5)):
            assert model.config._attn_implementation != before
            raise RuntimeError("boom")
    assert model.config._attn_implementation == before


@pytest.mark.parametrize("build", [tiny_phi, tiny_llama, tiny_gemma, tiny_gpt2],
                         ids=["phi", "llama", "gemma", "gpt2"])
def test_packed_ig_with_a_long_prompt_equals_the_naive_loop(build):
    """P = 40 >> T = 3; budget 60: passes hold parts of steps, 10**5: all later steps in one pass."""
    model = build()
    g = torch.Generator().manual_seed(61)
    prompt = torch.randint(0, VOCAB, (1, 40), generator=g)
    label = torch.randint(0, VOCAB, (3,), generator=g).tolist()
    slow = reference_scores(model, prompt, label, ig_steps=2, gradients=False)
    att = Attributor(model)
    for budget in (60, 100_000):
        fast = att.score_sample(prompt, label, ig_steps=2, gradients=False, batch_size=budget, ig_packed=True)
        for key in ("ig_attention", "ig_mlp"):
            err = ((fast[key] - slow[key]).abs().max() / slow[key].abs().max()).item()
            assert err < 1e-4, f"{key} budget {budget}: {err:.2e}"
            assert fast[key][1:].abs().min() > 0


def test_a_model_outside_the_attention_interface_is_not_packed_and_a_bypass_is_caught():
    """No ``_supports_attention_backend``: one step per pass (equal to the naive loop).  A layer whose
    attention bypasses the interface at run time would attend to its own token only: an error."""
    import copy

    from utils.errors import PipelineError
    model = tiny_llama()
    g = torch.Generator().manual_seed(71)
    prompt = torch.randint(0, VOCAB, (1, 6), generator=g)
    label = torch.randint(0, VOCAB, (3,), generator=g).tolist()
    att = Attributor(model)
    model._supports_attention_backend = False          # the instance only
    assert not att.can_pack_ig(6, 3)
    fast = att.score_sample(prompt, label, ig_steps=2, gradients=False, batch_size=1000)
    slow = reference_scores(model, prompt, label, ig_steps=2, gradients=False)
    assert torch.allclose(fast["ig_mlp"], slow["ig_mlp"], rtol=1e-4, atol=1e-7)
    del model._supports_attention_backend
    assert att.can_pack_ig(6, 3)
    attn = model.model.layers[1].self_attn
    attn.config = copy.deepcopy(model.config)          # dispatches on its own config: switched too ...
    stock_forward = attn.forward

    def eager_forward(*args, **kwargs):                # ... unless it forces eager while it runs
        saved, attn.config._attn_implementation = attn.config._attn_implementation, "eager"
        try:
            return stock_forward(*args, **kwargs)
        finally:
            attn.config._attn_implementation = saved
    attn.forward = eager_forward
    with pytest.raises(PipelineError, match="2 of 3 layers"):
        att.score_sample(prompt, label, ig_steps=2, gradients=False, batch_size=1000)

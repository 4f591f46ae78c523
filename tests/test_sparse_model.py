"""The sparse model view equals zero-masking the same units (SiteHooks masks, the slow reference)."""
import pytest
import torch
from torch import nn

from conftest import NO_EOS, hf_greedy, random_ids
from utils.architecture import decoder_layers
from utils.errors import PipelineError
from utils.generation import masked_generate
from utils.kv_cache import cache_argument_name, forward_kwargs, output_cache
from utils.sites import ATTN, MLP, SiteHooks, locate_units
from utils.sparse_model import sparse_cache, sparse_model, weight_bytes


def hard_masks(layout, seed):
    """Random masks with the hard cases: layer 0 drops KV group 1 entirely (where there are several
    groups), layer 1 drops every head and neuron, the last layer keeps an uneven number of heads per
    KV group (padding) and random neurons."""
    g = torch.Generator().manual_seed(seed)
    L, H, I, KV = layout.num_layers, layout.num_heads, layout.intermediate, layout.num_kv_heads
    heads = torch.rand(L, H, generator=g) > 0.5
    neurons = torch.rand(L, I, generator=g) > 0.5
    per = H // KV
    if KV > 1:
        heads[0, per:2 * per] = False
        heads[0, 0] = True
    heads[1], neurons[1] = False, False
    last = torch.zeros(H, dtype=torch.bool)
    last[:per] = True                 # group 0 complete
    if KV > 1:
        last[per] = True              # group 1 with one head: padded up to `per`
    else:
        last[0] = False               # one group: keep an odd subset
        last[torch.randperm(per, generator=g)[:per - 1]] = True
    heads[-1] = last
    return {ATTN: heads, MLP: neurons}


def zero_masked_logits(model, layout, keep, ids):
    B = ids.shape[0]
    masks = {c: keep[c][None].expand(B, -1, -1).float() for c in keep}
    with SiteHooks(model, layout) as hooks, hooks.settings(masks=masks), torch.no_grad():
        return model(input_ids=ids).logits


def zero_masked_generate(model, layout, keep, ids, n):
    """Greedy generation with the units zeroed at every position (prompt included)."""
    B = ids.shape[0]
    masks = {c: keep[c][None].expand(B, -1, -1).float() for c in keep}
    with SiteHooks(model, layout) as hooks, hooks.settings(masks=masks):
        return hf_greedy(model, ids, n)


def test_logits_equal_zero_masking(arch_model):
    arch, model = arch_model
    layout = locate_units(model)
    for seed in range(3):
        keep = hard_masks(layout, seed)
        sparse, plan = sparse_model(model, keep)
        ids = random_ids(seed, length=12)
        with torch.no_grad():
            got = sparse(input_ids=ids).logits
        want = zero_masked_logits(model, layout, keep, ids)
        assert torch.allclose(got, want, atol=1e-5, rtol=0), (arch, (got - want).abs().max())
        dense = model(input_ids=ids).logits
        assert (dense - want).abs().max() > 1e-2, "masks this strong must change the logits"
    per = layout.num_heads // layout.num_kv_heads
    if layout.num_kv_heads > 1 and per > 1:     # GQA (the Llama-style model)
        assert plan.layers[-1].groups == per
        assert not bool(plan.layers[-1].head_live.all()), "the uneven layer is padded"
    if layout.num_kv_heads > 1:
        assert len(plan.layers[0].kv_heads) < layout.num_kv_heads, "a KV group with no kept head is removed"
    assert len(plan.layers[1].q_heads) == 1 and len(plan.layers[1].neurons) == 1   # the dead placeholder


def test_keep_everything_is_the_dense_model(arch_model):
    _, model = arch_model
    layout = locate_units(model)
    keep = {ATTN: torch.ones(layout.num_layers, layout.num_heads, dtype=torch.bool),
            MLP: torch.ones(layout.num_layers, layout.intermediate, dtype=torch.bool)}
    sparse, _ = sparse_model(model, keep)
    ids = random_ids(5, length=12)
    with torch.no_grad():
        assert torch.allclose(sparse(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5, rtol=0)
    assert weight_bytes(sparse) == weight_bytes(model)
    assert hf_greedy(sparse, ids, 20).tolist() == hf_greedy(model, ids, 20).tolist()


def test_greedy_generation_equals_zero_masking(arch_model):
    arch, model = arch_model
    layout = locate_units(model)
    for seed in range(2):
        keep = hard_masks(layout, 10 + seed)
        sparse, _ = sparse_model(model, keep)
        ids = random_ids(20 + seed, length=6)
        want = zero_masked_generate(model, layout, keep, ids, 24)
        assert hf_greedy(sparse, ids, 24).tolist() == want.tolist(), arch
        assert want.tolist() != hf_greedy(model, ids, 24).tolist()


def test_dense_prefill_then_sparse_decode_equals_masked_generate(arch_model):
    """Step 0 dense, later steps sparse, through a DynamicCache handed over with sparse_cache."""
    arch, model = arch_model
    layout = locate_units(model)
    T = 22
    for seed in range(2):
        keep = hard_masks(layout, 30 + seed)
        sparse, plan = sparse_model(model, keep)
        ids = random_ids(40 + seed, batch=1, length=7)
        with torch.no_grad():
            name = cache_argument_name(model)
            out = model(**forward_kwargs(name, ids))
            cache = output_cache(out)
            dense_keys = [layer.keys.clone() for layer in cache.layers]
            cache = sparse_cache(cache, plan)
            tokens = [out.logits[:, -1].argmax(-1)]
            for _ in range(T - 1):
                out = sparse(**forward_kwargs(name, tokens[-1][:, None], cache))
                cache = output_cache(out)
                tokens.append(out.logits[:, -1].argmax(-1))
        got = torch.stack(tokens, 1)[0].tolist()
        steps = {c: keep[c][None, None].expand(1, T, -1, -1) for c in keep}
        with SiteHooks(model, layout) as hooks:
            want = masked_generate(model, hooks, ids, steps, eos_ids=NO_EOS)[0]
        assert got == want, arch
        for layer, lp, keys in zip(cache.layers, plan.layers, dense_keys):
            assert layer.keys.shape[1] == len(lp.kv_heads)
            # the handed-over prompt keys are the dense cache's kept heads, unchanged
            assert torch.equal(layer.keys[:, :, :7], keys[:, lp.kv_heads])


def test_dense_model_untouched_and_unchanged_modules_shared(arch_model):
    _, model = arch_model
    layout = locate_units(model)
    ids = random_ids(3, length=12)
    before = model(input_ids=ids).logits
    shapes = {n: p.shape for n, p in model.named_parameters()}
    sparse, _ = sparse_model(model, hard_masks(layout, 1))
    assert torch.equal(model(input_ids=ids).logits, before)
    assert {n: p.shape for n, p in model.named_parameters()} == shapes
    assert type(sparse) is type(model)
    assert sparse.get_input_embeddings() is model.get_input_embeddings()
    assert sparse.get_output_embeddings() is model.get_output_embeddings()
    sparse_layers, dense_layers = decoder_layers(sparse), layout.decoder_layers
    assert sparse_layers is not dense_layers
    norm = next(n for n, _ in dense_layers[0].named_children() if "norm" in n)
    assert getattr(sparse_layers[0], norm) is getattr(dense_layers[0], norm)

    copy_, _ = sparse_model(model, hard_masks(layout, 1), share_unchanged=False)
    assert copy_.get_input_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    with torch.no_grad():
        assert torch.equal(copy_(input_ids=ids).logits, sparse(input_ids=ids).logits)


def _per_unit_bytes(model, layout):
    """Bytes one head (q rows and bias, output-projection columns), one KV head (k and v rows and
    biases) and one neuron (up/gate rows and biases, down column) hold, read off the dense modules."""
    attn = layout.decoder_layers[0].self_attn
    hd = layout.head_dim

    def rows(lin, n):
        return (lin.weight.numel() + (lin.bias.numel() if lin.bias is not None else 0)) // n * lin.weight.element_size()

    head = rows(attn.q_proj, layout.num_heads) + layout.attn_out[0].weight.element_size() * hd * layout.hidden
    kv = rows(attn.k_proj, layout.num_kv_heads) + rows(attn.v_proj, layout.num_kv_heads)
    mlp = layout.decoder_layers[0].mlp
    ups = [m for n, m in mlp.named_children() if isinstance(m, nn.Linear) and m is not layout.mlp_down[0]]
    neuron = sum(rows(m, layout.intermediate) for m in ups) + layout.mlp_down[0].weight.element_size() * layout.hidden
    return head, kv, neuron


def test_weight_bytes_are_embeddings_plus_kept_share(arch_model):
    """Balanced masks (the same number of heads in every KV group: no padding): the sparse model holds
    the dense bytes minus exactly the removed units' bytes; embeddings count once and are unchanged."""
    arch, model = arch_model
    layout = locate_units(model)
    L, H, I, KV = layout.num_layers, layout.num_heads, layout.intermediate, layout.num_kv_heads
    per = H // KV
    g = torch.Generator().manual_seed(0)
    heads = torch.zeros(L, H, dtype=torch.bool)
    for l in range(L):
        for grp in range(KV):
            heads[l, grp * per + torch.randperm(per, generator=g)[:max(1, per // 2)]] = True
    if KV > 1:
        heads[0, per:2 * per] = False        # a whole KV group removed in layer 0
    neurons = torch.zeros(L, I, dtype=torch.bool)
    for l in range(L):
        neurons[l, torch.randperm(I, generator=g)[:I * 3 // 10]] = True
    sparse, _ = sparse_model(model, {ATTN: heads, MLP: neurons})
    head, kv, neuron = _per_unit_bytes(model, layout)
    removed_groups = (heads.view(L, KV, per).sum(-1) == 0).sum().item()
    removed = (~heads).sum().item() * head + removed_groups * kv + (~neurons).sum().item() * neuron
    dense, got = weight_bytes(model), weight_bytes(sparse)
    assert got["total"] == dense["total"] - removed, arch
    assert got["embeddings"] == dense["embeddings"] > 0
    emb = model.get_input_embeddings().weight
    assert dense["embeddings"] >= emb.numel() * emb.element_size()
    # the target: sparse weights <= embeddings + kept share of the rest (unit weights kept 50% / 30%)
    kept = 1 - removed / dense["rest"]
    assert got["total"] <= dense["embeddings"] + kept * dense["rest"] + 1e-9
    assert got["total"] < 0.75 * dense["total"]


def test_bad_mask_shape_is_one_line_error(arch_model):
    _, model = arch_model
    layout = locate_units(model)
    keep = {ATTN: torch.ones(layout.num_layers, layout.num_heads + 1, dtype=torch.bool),
            MLP: torch.ones(layout.num_layers, layout.intermediate, dtype=torch.bool)}
    with pytest.raises(PipelineError, match="keep masks must be"):
        sparse_model(model, keep)


def test_static_cache_handover_equals_masked_generate(arch_model):
    """The same handover from a dense StaticCache: the sparse layers keep the kept KV heads' slices."""
    from transformers import StaticCache

    arch, model = arch_model
    layout = locate_units(model)
    keep, T = hard_masks(layout, 60), 16
    sparse, plan = sparse_model(model, keep)
    ids = random_ids(61, batch=1, length=7)
    name = cache_argument_name(model)
    cache = StaticCache(config=model.config, max_cache_len=40)
    with torch.no_grad():
        out = model(**forward_kwargs(name, ids, cache))
        handed = sparse_cache(cache, plan)
        tokens = [out.logits[:, -1].argmax(-1)]
        for _ in range(T - 1):
            out = sparse(**forward_kwargs(name, tokens[-1][:, None], handed))
            tokens.append(out.logits[:, -1].argmax(-1))
    steps = {c: keep[c][None, None].expand(1, T, -1, -1) for c in keep}
    with SiteHooks(model, layout) as hooks:
        want = masked_generate(model, hooks, ids, steps, eos_ids=NO_EOS)[0]
    assert torch.stack(tokens, 1)[0].tolist() == want, arch
    for dense_layer, layer, lp in zip(cache.layers, handed.layers, plan.layers):
        assert layer.keys.shape[1] == len(lp.kv_heads) and dense_layer.keys.shape[1] == layout.num_kv_heads


def test_fused_projections_are_a_one_line_error():
    """GPT-2 (one c_attn for q/k/v, Conv1D weights) is located and hooked but cannot be sliced."""
    from conftest import tiny_gpt2

    model = tiny_gpt2()
    layout = locate_units(model)
    keep = {ATTN: torch.ones(layout.num_layers, layout.num_heads, dtype=torch.bool),
            MLP: torch.ones(layout.num_layers, layout.intermediate, dtype=torch.bool)}
    with pytest.raises(PipelineError, match=r"^sparse_model needs separate q_proj/k_proj/v_proj Linear modules; "
                                            r"decoder layer 0 \(GPT2Block\) \(GPT2Attention\) has none$"):
        sparse_model(model, keep)

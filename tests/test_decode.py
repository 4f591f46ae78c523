"""The decode loop (static cache, one step function) equals transformers' greedy generate, for dense,
fused and sparse models."""
import pytest
import torch
from torch import nn

from conftest import NO_EOS, hf_greedy, random_ids
from utils.decode import GreedyDecoder, fuse_projections
from utils.errors import PipelineError
from utils.generation import masked_generate
from utils.sites import ATTN, MLP, SiteHooks, locate_units
from utils.sparse_model import sparse_model


def greedy_decode(model, prompt_ids, new_tokens: int, *, prefill_model=None, plan=None):
    """One-off :class:`GreedyDecoder` run: ``[B, new_tokens]`` greedy tokens."""
    decoder = GreedyDecoder(model, prompt_ids.shape[0], prompt_ids.shape[1] + new_tokens)
    return decoder.generate(prompt_ids, new_tokens, prefill_model=prefill_model, plan=plan)


def random_keep(layout, seed, p_off=0.5):
    g = torch.Generator().manual_seed(seed)
    return {ATTN: torch.rand(layout.num_layers, layout.num_heads, generator=g) > p_off,
            MLP: torch.rand(layout.num_layers, layout.intermediate, generator=g) > p_off}


def test_decode_loop_equals_generate(arch_model):
    arch, model = arch_model
    for seed in range(2):
        ids = random_ids(seed)
        assert greedy_decode(model, ids, 24).tolist() == hf_greedy(model, ids, 24).tolist(), arch


def test_decoder_reused_across_requests(arch_model):
    """One decoder (one cache, one step function) serves several prompts, as the benchmark's repeats do."""
    _, model = arch_model
    decoder = GreedyDecoder(model, batch=2, max_len=40)
    for seed in range(3):
        ids = random_ids(seed, length=5 + seed)
        assert decoder.generate(ids, 20).tolist() == hf_greedy(model, ids, 20).tolist()


def test_fused_projections_are_exact(arch_model):
    arch, model = arch_model
    fused = fuse_projections(model)
    attn = fused.model.layers[0].self_attn
    assert isinstance(attn.qkv_proj.proj, nn.Linear)
    assert attn.qkv_proj.proj.out_features == sum(getattr(model.model.layers[0].self_attn, n).out_features
                                                  for n in ("q_proj", "k_proj", "v_proj"))
    assert hasattr(fused.model.layers[0].mlp, "gate_up_proj") == (arch != "phi")   # Phi's MLP is not gated
    assert isinstance(model.model.layers[0].self_attn.q_proj, nn.Linear), "the original is untouched"
    ids = random_ids(4, length=12)
    with torch.no_grad():
        assert torch.allclose(fused(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5, rtol=0)
    assert attn.qkv_proj._pending is None, "nothing held between passes"
    assert greedy_decode(fused, ids, 20).tolist() == hf_greedy(model, ids, 20).tolist()


@pytest.mark.parametrize("fused", [False, True])
def test_sparse_decode_with_dense_prefill_equals_masked_generate(arch_model, fused):
    """The benchmark's sparse path: dense prompt, cache handed over, sparse (fused) steps, against the
    zero-masked reference with the same constant mask for steps >= 1."""
    arch, model = arch_model
    layout = locate_units(model)
    T = 21
    for seed in range(2):
        keep = random_keep(layout, seed)
        sparse, plan = sparse_model(model, keep)
        if fused:
            sparse = fuse_projections(sparse)
        ids = random_ids(50 + seed, batch=1)
        got = greedy_decode(sparse, ids, T, prefill_model=model, plan=plan)[0].tolist()
        steps = {c: keep[c][None, None].expand(1, T, -1, -1) for c in keep}
        with SiteHooks(model, layout) as hooks:
            want = masked_generate(model, hooks, ids, steps, eos_ids=NO_EOS)[0]
        assert got == want, arch
        assert got != hf_greedy(model, ids, T)[0].tolist()


def test_compiled_step_traces_as_one_graph():
    """fullgraph=True: the fused step (its hand-over of the k/v pieces included) has no graph break."""
    from conftest import tiny_llama

    model = tiny_llama()
    layout = locate_units(model)
    sparse, plan = sparse_model(model, random_keep(layout, 3))
    fused = fuse_projections(sparse)
    ids = random_ids(9, batch=1)
    decoder = GreedyDecoder(fused, batch=1, max_len=24, compile="default", backend="eager")
    want = greedy_decode(sparse, ids, 12, prefill_model=model, plan=plan)
    assert decoder.generate(ids, 12, prefill_model=model, plan=plan).tolist() == want.tolist()


def test_decoder_errors_are_one_line(arch_model):
    _, model = arch_model
    with pytest.raises(PipelineError, match="CUDA graphs"):
        GreedyDecoder(model, batch=1, max_len=16, compile="reduce-overhead")
    with pytest.raises(PipelineError, match="exceed the cache"):
        GreedyDecoder(model, batch=1, max_len=16).generate(random_ids(0, batch=1, length=10), 8)
    with pytest.raises(PipelineError, match="built for batch"):
        GreedyDecoder(model, batch=1, max_len=16).generate(random_ids(0, batch=2, length=4), 4)


def test_fusing_already_fused_projections_is_a_one_line_error():
    from conftest import tiny_gpt2

    with pytest.raises(PipelineError, match=r"^fuse_projections needs q_proj/k_proj/v_proj Linear modules in "
                                            r"GPT2Block\.attn; run without --fused$"):
        fuse_projections(tiny_gpt2())

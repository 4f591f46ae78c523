"""Unit sites are found on stock modules; masking one head zeroes exactly its slice."""
import pytest
import torch
from torch import nn

from conftest import VOCAB, tiny_gpt2
from utils.errors import PipelineError
from utils.sites import ATTN, MLP, SiteHooks, locate_units


def test_layouts_of_supported_architectures(arch_model):
    arch, model = arch_model
    layout = locate_units(model)
    assert layout.num_layers == 3 and layout.num_heads == 4 and layout.head_dim == 8
    names = {"phi": ("dense", "fc2"), "llama": ("o_proj", "down_proj"), "gemma": ("o_proj", "down_proj")}[arch]
    modules = dict(model.named_modules())
    assert modules[f"model.layers.1.self_attn.{names[0]}"] is layout.attn_out[1]
    assert modules[f"model.layers.2.mlp.{names[1]}"] is layout.mlp_down[2]
    assert layout.intermediate == model.config.intermediate_size
    assert layout.gated_mlp == (arch in ("llama", "gemma"))
    assert layout.num_kv_heads == {"phi": 4, "llama": 2, "gemma": 1}[arch]


def test_gpt2_layout_uses_conv1d_c_proj():
    model = tiny_gpt2()
    layout = locate_units(model)
    assert layout.num_layers == 2 and layout.intermediate == 4 * 32
    assert layout.attn_out[0] is model.transformer.h[0].attn.c_proj
    assert layout.mlp_down[1] is model.transformer.h[1].mlp.c_proj


def test_unsupported_architecture_names_what_is_missing(arch_model):
    _, model = arch_model
    model.model.layers[0].mlp = nn.Identity()   # no down projection any more
    with pytest.raises(PipelineError, match=r"no MLP down projection in decoder layer 0.*looked for down_proj"):
        locate_units(model)


def inputs_of(model, module, ids, hooks, masks):
    """The module's input in a dense pass and in a masked pass."""
    got = []
    handle = module.register_forward_hook(lambda m, args, out: got.append(args[0].detach().clone()))
    with torch.no_grad():
        model(ids)
        with hooks.settings(masks=masks):
            model(ids)
    handle.remove()
    return got


@pytest.mark.parametrize("head", [0, 2, 3])
def test_masking_one_head_zeroes_exactly_its_slice(arch_model, head):
    _, model = arch_model
    layout = locate_units(model)
    ids = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(head))
    keep = torch.ones(1, layout.num_layers, layout.num_heads, dtype=torch.bool)
    keep[0, 1, head] = False
    with SiteHooks(model, layout) as hooks:
        dense, masked = inputs_of(model, layout.attn_out[1], ids, hooks, {ATTN: keep, MLP: None})
    d = layout.head_dim
    off = torch.zeros(dense.shape[-1], dtype=torch.bool)
    off[head * d:(head + 1) * d] = True
    assert dense[..., off].abs().sum() > 0
    assert (masked[..., off] == 0).all()
    torch.testing.assert_close(masked[..., ~off], dense[..., ~off], rtol=0, atol=0)


def test_masking_neurons_zeroes_exactly_them(arch_model):
    _, model = arch_model
    layout = locate_units(model)
    ids = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(4))
    keep = torch.ones(1, layout.num_layers, layout.intermediate, dtype=torch.bool)
    keep[0, 1, [1, 5]] = False
    with SiteHooks(model, layout) as hooks:
        dense, masked = inputs_of(model, layout.mlp_down[1], ids, hooks, {ATTN: None, MLP: keep})
    off = torch.zeros(layout.intermediate, dtype=torch.bool)
    off[[1, 5]] = True
    assert dense[..., off].abs().sum() > 0 and (masked[..., off] == 0).all()
    torch.testing.assert_close(masked[..., ~off], dense[..., ~off], rtol=0, atol=0)


def test_hooks_are_removed(arch_model):
    _, model = arch_model
    layout = locate_units(model)
    with SiteHooks(model, layout):
        assert all(len(m._forward_pre_hooks) == 1 for m in layout.attn_out + layout.mlp_down)
    assert all(len(m._forward_pre_hooks) == 0 for m in layout.attn_out + layout.mlp_down)

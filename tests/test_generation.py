"""Masked greedy generation (METHOD §5)."""
import torch

from conftest import VOCAB
from utils.generation import dense_label, masked_generate, strip_at_eos
from utils.sites import ATTN, MLP, SiteHooks, locate_units


def random_keep(layout, B, T, seed, p_off=0.4):
    g = torch.Generator().manual_seed(seed)
    return {ATTN: torch.rand(B, T, layout.num_layers, layout.num_heads, generator=g) > p_off,
            MLP: torch.rand(B, T, layout.num_layers, layout.intermediate, generator=g) > p_off}


def prompt(seed, length=6):
    return torch.randint(0, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))


def test_all_kept_reproduces_dense_generation(arch_model):
    _, model = arch_model
    layout = locate_units(model)
    for seed in range(3):
        ids = prompt(seed)
        label = dense_label(model, ids, 12, eos_ids=[VOCAB + 5], pad_id=0)   # an EOS that never comes
        assert len(label) == 12
        keep = {ATTN: torch.ones(4, 12, layout.num_layers, layout.num_heads, dtype=torch.bool),
                MLP: torch.ones(4, 12, layout.num_layers, layout.intermediate, dtype=torch.bool)}
        with SiteHooks(model, layout) as hooks:
            outs = masked_generate(model, hooks, ids, keep, eos_ids=[VOCAB + 5])
        assert outs == [label] * 4


def test_batched_masked_generation_equals_one_at_a_time(arch_model):
    _, model = arch_model
    layout = locate_units(model)
    ids, T, B = prompt(7), 10, 6
    keep = random_keep(layout, B, T, seed=3)
    with SiteHooks(model, layout) as hooks:
        batched = masked_generate(model, hooks, ids, keep, eos_ids=[VOCAB + 5])
        single = [masked_generate(model, hooks, ids, {c: keep[c][b:b + 1] for c in keep}, eos_ids=[VOCAB + 5])[0]
                  for b in range(B)]
    assert batched == single
    dense = dense_label(model, ids, T, eos_ids=[VOCAB + 5], pad_id=0)
    assert any(out != dense for out in batched), "masks this strong must change some output"
    assert all(out[0] == dense[0] for out in batched), "step 0 is never masked"


def test_masks_apply_per_step(arch_model):
    """A mask only at step t leaves tokens before t+1 equal to the dense ones."""
    _, model = arch_model
    layout = locate_units(model)
    ids, T = prompt(11), 8
    dense = dense_label(model, ids, T, eos_ids=[VOCAB + 5], pad_id=0)
    keep = {ATTN: torch.ones(1, T, layout.num_layers, layout.num_heads, dtype=torch.bool),
            MLP: torch.ones(1, T, layout.num_layers, layout.intermediate, dtype=torch.bool)}
    keep[MLP][0, 4] = False   # every neuron off at step 4 only
    keep[ATTN][0, 4] = False
    with SiteHooks(model, layout) as hooks:
        out = masked_generate(model, hooks, ids, keep, eos_ids=[VOCAB + 5])[0]
    assert out[:4] == dense[:4]
    assert out != dense


def test_generation_stops_at_eos(arch_model):
    _, model = arch_model
    layout = locate_units(model)
    ids = prompt(2)
    free = dense_label(model, ids, 10, eos_ids=[VOCAB + 5], pad_id=0)
    eos = free[3]
    stopped = dense_label(model, ids, 10, eos_ids=[eos], pad_id=0)
    assert stopped == free[:free.index(eos)]
    keep = {ATTN: torch.ones(2, 10, layout.num_layers, layout.num_heads, dtype=torch.bool),
            MLP: torch.ones(2, 10, layout.num_layers, layout.intermediate, dtype=torch.bool)}
    with SiteHooks(model, layout) as hooks:
        outs = masked_generate(model, hooks, ids, keep, eos_ids=[eos])
    assert outs == [stopped, stopped]
    assert strip_at_eos([1, 2, 9, 3], [9]) == [1, 2]

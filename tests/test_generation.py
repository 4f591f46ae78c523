"""Masked greedy generation (METHOD §5)."""
import torch

from conftest import VOCAB
from reference import dense_label
from utils.generation import masked_generate, strip_at_eos
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


def test_cache_with_room_gives_bitwise_the_concatenated_cache(arch_model):
    """Decoding steps writing into preallocated room see exactly the keys and values the concatenating
    cache holds: bitwise equal logits, also past the room (it then grows like the stock cache) and with
    Gemma-3's sliding-window layers (repeated as they are)."""
    from utils.kv_cache import cache_argument_name, cache_with_room, output_cache, repeated_cache
    _, model = arch_model
    ids = prompt(11)
    with torch.no_grad():
        base = output_cache(model(input_ids=ids, use_cache=True))
    kwarg = cache_argument_name(model)
    for room in (1, 8):
        stock = repeated_cache(base, 3)       # the stock layers: concatenated at every step
        roomy = cache_with_room(base, 3, room)
        tokens = torch.randint(0, VOCAB, (5, 3, 1), generator=torch.Generator().manual_seed(room))
        for step in range(5):
            with torch.no_grad():
                a = model(input_ids=tokens[step], use_cache=True, **{kwarg: stock}).logits
                b = model(input_ids=tokens[step], use_cache=True, **{kwarg: roomy}).logits
            assert torch.equal(a, b), f"room {room}, step {step}"
    assert base.get_seq_length() == ids.shape[1]        # the prompt's own cache is left as it was


def test_distinct_variants_against_pairwise_comparison():
    from utils.sweep import distinct_variants
    g = torch.Generator().manual_seed(5)
    base = {ATTN: torch.rand(4, 3, 2, 4, generator=g) > 0.5, MLP: torch.rand(4, 3, 2, 6, generator=g) > 0.5}
    order = [2, 0, 2, 1, 3, 0, 0]                       # variants 0, 2 and 5/6 repeat earlier ones
    keep = {c: base[c][order] for c in base}
    keep[MLP][6, 2, 1, 5] = ~keep[MLP][6, 2, 1, 5]      # ... except one unit of one step makes 6 distinct
    first, copy_of = distinct_variants(keep)
    equal = [[all(torch.equal(keep[c][a], keep[c][b]) for c in keep) for b in range(7)] for a in range(7)]
    expected_first = [b for b in range(7) if not any(equal[a][b] for a in range(b))]
    assert first == expected_first == [0, 1, 3, 4, 6]
    for b in range(7):
        assert equal[first[copy_of[b]]][b]


# -- several samples in one batch (the sweep on a GPU) ------------------------------------------------------

def naive_masked_greedy(model, layout, ids, keep_b, new_tokens):
    """One variant, no cache: every step recomputes prompt + tokens so far, step t's mask on the position
    step t computes (the prompt dense), steps at or past the mask's T dense; EOS never comes here."""
    hooks = SiteHooks(model, layout)
    T = keep_b[ATTN].shape[0]
    out = []
    try:
        for t in range(new_tokens):
            seq = torch.cat([ids, torch.tensor([out], dtype=torch.long).view(1, -1)], dim=1)
            steps = [min(s, T) for s in range(1, t + 1)]      # the generated positions' steps (T: dense)
            masks = None
            if t > 0:
                masks = {}
                for c in (ATTN, MLP):
                    padded = torch.cat([keep_b[c], torch.ones_like(keep_b[c][:1])])   # row T: dense
                    masks[c] = padded[steps][None]                                   # [1, t, L, units]
            with torch.no_grad(), hooks.settings(masks=masks):
                logits = model(input_ids=seq, use_cache=False).logits
            out.append(int(logits[0, -1].argmax()))
    finally:
        hooks.remove()
    return out


def test_several_samples_in_one_batch_decode_as_each_alone(arch_model):
    """Prompts of different lengths (left-padded in the batch), variant counts, mask lengths and token
    budgets (one sample decodes past its masks, one decodes a single token), against a no-cache greedy loop."""
    from utils.generation import masked_generate_many, prompt_state
    _, model = arch_model
    layout = locate_units(model)
    lengths, counts, steps, budgets = (9, 3, 14, 6), (3, 2, 4, 2), (7, 5, 10, 1), (7, 9, 10, 1)
    prompts = [prompt(40 + s, n) for s, n in enumerate(lengths)]
    keeps = [random_keep(layout, b, t, seed=50 + s) for s, (b, t) in enumerate(zip(counts, steps))]
    with SiteHooks(model, layout) as hooks:
        states = [prompt_state(model, ids) for ids in prompts]
        many = masked_generate_many(model, hooks, states, keeps, [VOCAB + 5], list(budgets))
    want = [[naive_masked_greedy(model, layout, ids, {c: keep[c][b] for c in keep}, n) for b in range(k)]
            for ids, keep, k, n in zip(prompts, keeps, counts, budgets)]
    assert many == want
    assert [len(rows) for rows in many] == list(counts)
    dense = [dense_label(model, ids, n, eos_ids=[VOCAB + 5], pad_id=0) for ids, n in zip(prompts, budgets)]
    assert any(row != d for rows, d in zip(many, dense) for row in rows), "these masks must change outputs"


def test_several_samples_stop_at_their_own_eos(arch_model):
    """A row stops at EOS without stopping the others; the samples' budgets cut their own rows."""
    from utils.generation import masked_generate_many, prompt_state
    _, model = arch_model
    layout = locate_units(model)
    prompts = [prompt(60, 5), prompt(61, 8)]
    free = [dense_label(model, ids, 8, eos_ids=[VOCAB + 5], pad_id=0) for ids in prompts]
    eos = free[0][3]
    keeps = [{c: torch.ones(2, 8, layout.num_layers, layout.units(c), dtype=torch.bool) for c in (ATTN, MLP)}
             for _ in prompts]
    with SiteHooks(model, layout) as hooks:
        many = masked_generate_many(model, hooks, [prompt_state(model, ids) for ids in prompts], keeps, [eos], [8, 6])
    assert many[0] == [strip_at_eos(free[0], [eos])] * 2
    assert many[1] == [strip_at_eos(free[1][:6], [eos])] * 2


def test_several_samples_only_inside_the_sliding_window():
    """The padded layout must fit a sliding window; the sweep decodes one sample at a time otherwise."""
    from conftest import tiny_gemma, tiny_llama
    from utils.generation import can_generate_many
    gemma = tiny_gemma(sliding_window=16)
    assert can_generate_many(gemma, [5, 9], [3, 6])          # 9 + 6 < 16
    assert not can_generate_many(gemma, [5, 12], [3, 4])     # 12 + 4 reaches the window
    assert can_generate_many(tiny_llama(), [200], [100])     # no window


def test_samples_decoded_together_fit_the_memory_budget():
    """Groups are consecutive, never exceed the budget (rows x longest sequence x bytes per position)
    unless a sample alone does, and keep every sample once, in order."""
    from conftest import tiny_llama
    from utils.generation import cache_bytes_per_position, decode_groups, prompt_state
    sizes = [(10, 20, 8), (10, 30, 8), (5, 10, 8), (40, 50, 8), (1, 5, 8)]
    assert decode_groups(sizes, None) == [[0, 1, 2, 3, 4]]
    # 20 rows x 30 x 8 = 4800 fits 5000; adding sample 2 makes 25 x 30 x 8 = 6000
    assert decode_groups(sizes, 5000) == [[0, 1], [2], [3], [4]]
    # 25 x 30 x 8 = 6000 fits 20000, 65 x 50 x 8 = 26000 does not; then 41 x 50 x 8 = 16400 does
    assert decode_groups(sizes, 20000) == [[0, 1, 2], [3, 4]]
    assert decode_groups(sizes, 1) == [[0], [1], [2], [3], [4]]
    assert decode_groups([], 100) == []
    model = tiny_llama(layers=3, heads=4, kv_heads=2, hidden=32)      # head_dim 8
    _, cache = prompt_state(model, prompt(1, 5))
    assert cache_bytes_per_position(cache) == 3 * 2 * 2 * 8 * 4       # layers x (K, V) x kv heads x dim x fp32

"""Batched greedy labels (utils/labels.py) equal batch-1 greedy decoding (tests/reference.py: dense_label)."""
import pytest
import torch

from conftest import BUILDERS, VOCAB, tiny_gemma
from reference import dense_label
from utils.labels import greedy_labels, label_batch_size


def random_prompts(seed, n, lo=2, hi=12):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi, (n,), generator=g).tolist()
    budgets = torch.randint(0, 9, (n,), generator=g).tolist()
    return [torch.randint(0, VOCAB, (k,), generator=g).tolist() for k in lengths], budgets


def batch_one(model, prompts, budgets, eos):
    return [dense_label(model, torch.tensor([p]), b, eos, 0) if b else [] for p, b in zip(prompts, budgets)]


def pick_eos(model, prompts):
    """An EOS id the model actually emits early for some prompts (else stopping at EOS is untested)."""
    with torch.no_grad():
        firsts = [int(model(input_ids=torch.tensor([p])).logits[0, -1].argmax()) for p in prompts]
    return [max(set(firsts), key=firsts.count)]


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_batched_labels_equal_batch_one_greedy(arch_model, batch_size):
    _, model = arch_model
    prompts, budgets = random_prompts(5, 10)
    eos = pick_eos(model, prompts)
    expected = batch_one(model, prompts, budgets, eos)
    got = greedy_labels(model, prompts, budgets, eos, 0, batch_size=batch_size)
    assert got == expected
    # the case is not trivial: labels of several lengths, some cut by EOS before their budget
    assert len({len(x) for x in got}) > 2
    assert any(len(x) < b for x, b in zip(got, budgets))
    assert all(len(x) <= b for x, b in zip(got, budgets))


@pytest.mark.parametrize("window", [4, 512])
def test_batched_labels_with_sliding_window_layers(window):
    """Gemma-3 sliding-window layers: sequences longer than the window must not see pad slots."""
    model = tiny_gemma(sliding_window=window, seed=3)
    prompts, budgets = random_prompts(8, 6, lo=3, hi=9)
    budgets = [6] * len(prompts)
    expected = batch_one(model, prompts, budgets, [VOCAB + 1])
    assert greedy_labels(model, prompts, budgets, [VOCAB + 1], 0, batch_size=6) == expected


def test_half_precision_decodes_one_sample_at_a_time():
    model = BUILDERS["llama"]()
    assert label_batch_size(model, 5) == 5 and label_batch_size(model) == 16   # CPU default
    assert label_batch_size(model.to(torch.bfloat16), 16) == 1


def test_bad_arguments():
    model = BUILDERS["phi"]()
    with pytest.raises(ValueError, match="budgets"):
        greedy_labels(model, [[1, 2]], [], [0], 0)
    assert greedy_labels(model, [[1, 2], [3]], [0, 0], [0], 0) == [[], []]

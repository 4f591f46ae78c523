"""Memory budgets (utils/memory.py): a share of a GPU's free memory within bounds, and the out-of-memory
retry at half the budget, on a fake CUDA device (``torch.cuda.mem_get_info`` monkeypatched)."""
import pytest
import torch

from conftest import VOCAB, tiny_llama
from utils.attribution import Attributor
from utils.errors import PipelineError
from utils.generation import decode_memory_budget
from utils.memory import free_memory, free_memory_budget, halve_on_oom

FREE = 81_604_378_627          # an odd byte count, as a real card reports


@pytest.fixture
def fake_gpu(monkeypatch):
    """``torch.cuda.mem_get_info`` answers FREE bytes free of 80 GiB; the devices it was asked about are listed."""
    asked = []

    def mem_get_info(device=None):
        asked.append(torch.device(device))
        return FREE, 80 * 2 ** 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    return asked


def test_free_memory_asks_cuda_devices_only(fake_gpu):
    assert free_memory("cuda:1") == FREE
    assert free_memory(torch.device("cpu")) is None
    assert fake_gpu == [torch.device("cuda:1")]


def test_budget_is_a_share_of_free_memory_within_its_bounds(fake_gpu):
    # 0.6 of 81_604_378_627 bytes is 48_962_627_176.2; in items of 1000 bytes, 48_962_627
    assert free_memory_budget("cuda", 0.6, per_item=1000) == 48_962_627
    assert free_memory_budget("cuda", 0.6, per_item=1000, lower=50_000_000) == 50_000_000
    assert free_memory_budget("cuda", 0.6, per_item=1000, upper=2 ** 24) == 2 ** 24
    assert free_memory_budget("cuda", 0.6, per_item=1000, lower=2 ** 20, upper=2 ** 28) == 48_962_627
    assert free_memory_budget("cuda", 1 / 32) == 2_550_136_832                # 81_604_378_627 // 32, exactly
    assert free_memory_budget("cpu", 0.6, per_item=1000, lower=5, otherwise=2048) == 2048
    assert free_memory_budget("cpu", 0.5) is None


def test_decode_budget_is_a_quarter_of_free_memory(fake_gpu):
    assert decode_memory_budget("cuda:0") == 20_401_094_656          # 81_604_378_627 // 4, exactly
    assert decode_memory_budget("cpu") is None


def test_out_of_memory_halves_the_budget_and_retries():
    tried = []

    def run(budget):
        tried.append(budget)
        if budget > 5:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return f"ran at {budget}"
    assert halve_on_oom(run, 40, "free some memory") == ("ran at 5", 5)
    assert tried == [40, 20, 10, 5]
    assert halve_on_oom(run, 3, "free some memory") == ("ran at 3", 3)      # no error: no retry


def test_out_of_memory_at_a_budget_of_one_names_the_fix():
    tried = []

    def run(budget):
        tried.append(budget)
        raise torch.OutOfMemoryError("CUDA out of memory")
    with pytest.raises(PipelineError) as err:
        halve_on_oom(run, 9, "score on the CPU with --device cpu")
    assert tried == [9, 4, 2, 1]
    assert str(err.value) == "out of device memory even with a budget of 1; score on the CPU with --device cpu"


def test_other_errors_are_not_retried():
    tried = []

    def run(budget):
        tried.append(budget)
        raise RuntimeError("not a memory problem")
    with pytest.raises(RuntimeError, match="not a memory problem"):
        halve_on_oom(run, 8, "unused")
    assert tried == [8]


def test_packed_ig_retries_an_automatic_budget_and_keeps_the_smaller_one():
    """An automatic budget (2048 on a CPU) that runs out of memory is halved until a pass fits (here 512),
    and later samples start there; the scores are those of that budget given by hand, and progress a
    failed attempt reported is not reported again (one tick per token)."""
    g = torch.Generator().manual_seed(61)
    prompt = torch.randint(0, VOCAB, (1, 5), generator=g)
    label = torch.randint(0, VOCAB, (4,), generator=g).tolist()
    att = Attributor(tiny_llama())
    packed_steps = att.ig.packed_steps
    budgets = []

    def packed_within_512(prompt_len, labels, cache, n_steps, budget, **kwargs):
        budgets.append(budget)
        if budget > 512:               # after the prompt step, which reported its progress
            raise torch.OutOfMemoryError("CUDA out of memory")
        return packed_steps(prompt_len, labels, cache, n_steps, budget, **kwargs)
    att.ig.packed_steps = packed_within_512
    ticks = []
    retried = att.score_sample(prompt, label, ig_steps=3, batch_size=None, on_step=lambda: ticks.append(1))
    assert budgets == [2048, 1024, 512]
    assert len(ticks) == 4
    assert att.position_budget() == 512
    by_hand = att.score_sample(prompt, label, ig_steps=3, batch_size=512)
    assert set(retried) == set(by_hand)
    for key in by_hand:
        assert torch.equal(retried[key], by_hand[key]), key

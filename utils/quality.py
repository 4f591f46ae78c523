"""Quality of a masked generation against the dense label: BLEU and token agreement of the decoded
output, and (teacher-forced, no decoding) the KL divergence from the dense model and the perplexity of
the label.  These are the quality *measures* (``--plot_metric``); the *metrics* that rank units are
declared in utils/metric_registry.py."""
from __future__ import annotations

import sacrebleu
import torch

from .kv_cache import cache_argument_name, forward_kwargs, output_cache, repeated_cache
from .memory import free_memory_budget
from .sites import ATTN, MLP, SiteHooks

MEASURES = ("bleu", "token_agreement", "kl", "ppl")   # every sweep row has them; the trade-off figure plots any


def bleu(hypothesis: str, reference: str) -> float:
    """Sentence-level sacreBLEU (0-100, sacreBLEU's default smoothing)."""
    return float(sacrebleu.sentence_bleu(hypothesis, [reference]).score)


def token_agreement(output_ids: list[int], label_ids: list[int]) -> float:
    """Share of the label's positions where the masked output has the same token (a shorter output
    counts its missing positions as disagreeing)."""
    if not label_ids:
        return 1.0
    same = sum(1 for a, b in zip(output_ids, label_ids) if a == b)
    return same / len(label_ids)


# -- teacher-forced quality (no decoding): KL from the dense next-token distribution, NLL of the label ----
LOGITS_BUDGET = 2 ** 24   # logits (variants x steps x vocab) one teacher-forced pass may hold: ~64 MB in fp32
GPU_LOGITS_BUDGET = 2 ** 28   # on a GPU, up to this many where free memory allows: a pass is a launch-bound
                              # ~30 ms there, and Gemma's 262k vocabulary left 2 variants per pass at 2 ** 24


def logits_budget(device) -> int:
    """Logits one teacher-forced pass may hold on ``device``.  On a GPU, a 32nd of its free memory (the
    logits, their log-softmax, its exp and the KL's product, in float32, with room to spare), between the
    CPU's budget and ``GPU_LOGITS_BUDGET``."""
    return free_memory_budget(device, 1 / 32, lower=LOGITS_BUDGET, upper=GPU_LOGITS_BUDGET, otherwise=LOGITS_BUDGET)


@torch.no_grad()
def teacher_forced_quality(model, hooks: SiteHooks, prompt_ids: torch.Tensor, label_ids: list[int], keep: dict | None,
                           batch_size: int = 0, prompt_cache=None, masker=None, rows=None) -> dict | None:
    """KL(dense || masked) and the masked model's NLL of the label, per variant, averaged over the masked
    steps t = 1..T-1; None when the label has no masked step (T < 2).

    ``keep[comp]``: bool ``[B, T, L, units]`` as for masked generation.  One forward over prompt +
    label[:T-1] per variant, the mask of step t applied at position P-1+t (the prompt dense): each
    position's keys and values are computed under its own step's mask, so this is exactly the step-by-step
    masked model teacher-forced on the label.  ``prompt_cache``: the dense prompt's cache (batch 1), when
    the caller already has it (utils.generation.prompt_state).  With a per-token ``masker``
    (utils/token_masks.py) instead of ``keep``, ``rows`` = (variants, ratios) of the B variants: the masker
    chooses every label position's masks from that pass's own activations.  Returns ``{"kl": [B], "nll": [B]}``
    (float64, CPU)."""
    T = len(label_ids)
    if T < 2:
        return None
    device = next(model.parameters()).device
    cache_name = cache_argument_name(model)
    labels = torch.tensor(label_ids, dtype=torch.long, device=device)
    steps = labels[:-1][None]                                        # label[0..T-2] at positions P..P+T-2
    targets = labels[1:]                                              # step t predicts label[t]
    # The prompt positions are dense for every variant: run them once and give each variant a copy of
    # their cache, so a variant's pass computes only its T-1 label positions (the prompt is most of the
    # sequence: ~4x less work on TruthfulQA, ~15x on XSum's 400-token prompts).
    if prompt_cache is None:
        prompt_cache = output_cache(model(**forward_kwargs(cache_name, prompt_ids.to(device))))

    def log_probs(batch):
        kwargs = forward_kwargs(cache_name, steps.expand(batch, -1), repeated_cache(prompt_cache, batch))
        logits = model(**kwargs).logits
        return torch.log_softmax(logits.float(), dim=-1)              # [batch, T-1, V]

    dense = log_probs(1)
    dense_p = dense.exp()
    B = keep[ATTN].shape[0] if masker is None else len(rows[0])
    per_pass = batch_size if batch_size > 0 else max(1, logits_budget(device) // ((T - 1) * dense.shape[-1]))
    kl, nll = [], []
    for s in range(0, B, per_pass):
        if masker is None:
            part = {c: keep[c][s:s + per_pass, 1:T].to(device) for c in (ATTN, MLP)}   # steps 1..T-1
            setting = hooks.settings(masks=part)   # [b, T-1, L, units]: one mask per label position
        else:
            setting = masker.rows(rows[0][s:s + per_pass], rows[1][s:s + per_pass])
        with setting:
            masked = log_probs(min(per_pass, B - s))
        kl.append((dense_p * (dense - masked)).sum(-1).mean(-1))
        nll.append(-masked.gather(-1, targets.view(1, -1, 1).expand(masked.shape[0], -1, 1))[..., 0].mean(-1))
    return {"kl": torch.cat(kl).double().cpu(), "nll": torch.cat(nll).double().cpu()}

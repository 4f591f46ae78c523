"""Each quality measure and its aggregation against values computed by hand on a tiny case, so that a
swapped argument, a step counted too many or a wrong weighting fails: BLEU and token agreement of one
output, teacher-forced KL(dense || masked) and NLL per variant (from plain full-sequence forwards, the
masks applied by hooks written here), the sweep's aggregation over samples (BLEU and token agreement:
plain means; KL: token-weighted mean; perplexity: exp of the token-weighted mean NLL; activation ratio:
kept / total weight), and the rows a real sweep writes."""
import json
import math

import pytest
import sacrebleu
import torch

from conftest import in_process, tiny_llama
from utils.quality import bleu, teacher_forced_quality, token_agreement
from utils.sites import ATTN, MLP, SiteHooks, locate_units
from utils.sweep_results import aggregate


# -- BLEU and token agreement of one output ---------------------------------------------------------------

def test_bleu_by_hand():
    # equal lengths (no brevity penalty); clipped n-gram matches 5/6, 3/5, 2/4, 1/3
    assert bleu("the cat sat on the mat", "the cat sat on a mat") == pytest.approx(100 * (1 / 12) ** 0.25)
    # a short output: every n-gram matches, brevity penalty exp(1 - 6/4)
    assert bleu("the cat sat on", "the cat sat on a mat") == pytest.approx(100 * math.exp(-0.5))
    # the same pair swapped: precisions 4/6, 3/5, 2/4, 1/3 and no penalty (the order matters)
    assert bleu("the cat sat on a mat", "the cat sat on") == pytest.approx(100 * (1 / 15) ** 0.25)
    assert bleu("the cat sat on a mat", "the cat sat on a mat") == pytest.approx(100)


def test_token_agreement_by_hand():
    assert token_agreement([1, 2, 3], [1, 5, 3, 4]) == 2 / 4          # missing positions disagree
    assert token_agreement([1, 5, 3, 4], [1, 2, 3]) == 2 / 3          # counted over the label's positions
    assert token_agreement([1, 2, 3, 4, 5], [1, 2]) == 1.0            # tokens past the label do not count
    assert token_agreement([2, 1], [1, 2]) == 0.0                     # position by position, not as a set
    assert token_agreement([], []) == 1.0


# -- teacher-forced KL and NLL of one sample -------------------------------------------------------------

def by_hand(model, layout, prompt, label, keep_one):
    """Per masked step t = 1..T-1: (KL(dense || masked), -log p_masked(label[t])), from two plain forwards
    over prompt + label[:T-1] without a cache; the masked one zeroes, at position P-1+t (which predicts
    label[t]), the units step t's mask drops."""
    P, T = prompt.shape[1], len(label)
    ids = torch.cat([prompt, torch.tensor([label[:-1]])], dim=1)

    def log_probs(masked):
        handles = []
        if masked:
            for comp, modules in ((ATTN, layout.attn_out), (MLP, layout.mlp_down)):
                for layer, module in enumerate(modules):
                    m = torch.ones(ids.shape[1], keep_one[comp].shape[-1])
                    for t in range(1, T):
                        m[P - 1 + t] = keep_one[comp][t, layer].float()
                    if comp == ATTN:
                        m = m.repeat_interleave(layout.head_dim, dim=-1)
                    handles.append(module.register_forward_pre_hook(
                        lambda mod, args, m=m: (args[0] * m,) + tuple(args[1:])))
        try:
            with torch.no_grad():
                logits = model(input_ids=ids, use_cache=False).logits[0].double()
        finally:
            for h in handles:
                h.remove()
        return torch.log_softmax(logits[P:P + T - 1], dim=-1)        # rows predict label[1..T-1]

    dense, masked = log_probs(False), log_probs(True)
    kl = [float((d.exp() * (d - m)).sum()) for d, m in zip(dense, masked)]
    nll = [float(-masked[t - 1, label[t]]) for t in range(1, T)]
    reverse_kl = [float((m.exp() * (m - d)).sum()) for d, m in zip(dense, masked)]
    return kl, nll, reverse_kl


def test_teacher_forced_kl_and_nll_by_hand():
    model = tiny_llama(seed=3)
    layout = locate_units(model)
    # a random tiny model predicts nearly uniformly; sharpened logits make KL and NLL O(1)
    model.get_output_embeddings().register_forward_pre_hook(lambda m, args: (args[0] * 40,))
    g = torch.Generator().manual_seed(7)
    prompt = torch.randint(0, 128, (1, 4), generator=g)
    label = torch.randint(0, 128, (5,), generator=g).tolist()
    T, B = len(label), 3
    keep = {ATTN: torch.rand(B, T, layout.num_layers, layout.num_heads, generator=g) > 0.4,
            MLP: torch.rand(B, T, layout.num_layers, layout.intermediate, generator=g) > 0.4}
    keep[ATTN][0], keep[MLP][0] = True, True                          # variant 0: the dense model
    with SiteHooks(model, layout) as hooks:
        got = teacher_forced_quality(model, hooks, prompt, label, keep)
    assert got["kl"].shape == got["nll"].shape == (B,)
    for b in range(B):
        kl, nll, reverse_kl = by_hand(model, layout, prompt, label, {c: keep[c][b] for c in keep})
        assert len(kl) == T - 1                                       # step 0 is dense: not a masked step
        assert got["kl"][b].item() == pytest.approx(sum(kl) / (T - 1), rel=1e-5, abs=1e-7)
        assert got["nll"][b].item() == pytest.approx(sum(nll) / (T - 1), rel=1e-5)
        if b > 0:
            # the checks above can fail: the other direction, or one step too many, is far off
            assert abs(sum(reverse_kl) - sum(kl)) > 1e-2 * sum(kl) > 0
            assert abs(sum(kl) / T - sum(kl) / (T - 1)) > 1e-3 * sum(kl) / (T - 1)
    assert got["kl"][0].item() == pytest.approx(0, abs=1e-7)


# -- the aggregation over samples -----------------------------------------------------------------------

def row(sample, ratio, bleu_, agreement, kl, ppl, steps, kept, total, metric="gxo", source="oracle"):
    return {"sample": sample, "metric": metric, "source": source, "ratio": ratio, "bleu": bleu_,
            "token_agreement": agreement, "kl": kl, "ppl": ppl, "masked_steps": steps, "kept_weight": kept,
            "total_weight": total}


def test_aggregate_by_hand():
    rows = [row(0, 0.5, 40.0, 0.5, 0.2, math.exp(1.0), 3, 30.0, 100.0),
            row(1, 0.5, 80.0, 1.0, 0.6, math.exp(2.0), 1, 10.0, 50.0),
            row(2, 0.5, 100.0, 1.0, None, None, 0, 0.0, 0.0),      # a one-token label: no masked step
            # rows of another ratio, metric and source must not be mixed in
            row(0, 0.0, 1.0, 0.0, 9.0, 9.0, 3, 100.0, 100.0),
            row(0, 0.5, 1.0, 0.0, 9.0, 9.0, 3, 1.0, 100.0, metric="ig"),
            row(0, 0.5, 1.0, 0.0, 9.0, 9.0, 3, 1.0, 100.0, source="prompt")]
    out = aggregate(rows, [("gxo", "oracle")], [0.5], {"gxo": 3})
    (key, curve), = out["curves"].items()
    assert (curve["metric"], curve["source"], curve["samples"]) == ("gxo", "oracle", 3)
    (point,) = curve["points"]
    assert point["deactivation_ratio"] == 0.5 and point["samples"] == 3
    assert point["bleu"] == pytest.approx((40 + 80 + 100) / 3)                  # a plain mean over samples
    assert point["token_agreement"] == pytest.approx((0.5 + 1 + 1) / 3)
    assert point["kl"] == pytest.approx((0.2 * 3 + 0.6 * 1) / 4)                # token-weighted: 0.3
    assert point["ppl"] == pytest.approx(math.exp((1.0 * 3 + 2.0 * 1) / 4))     # exp of the mean NLL
    assert point["activation_ratio"] == pytest.approx((30 + 10) / (100 + 50))   # weight, not mean of shares


def test_aggregate_without_masked_steps():
    rows = [row(0, 0.3, 50.0, 0.25, None, None, 0, 0.0, 0.0)]
    (point,) = next(iter(aggregate(rows, [("gxo", "oracle")], [0.3], {"gxo": 1})["curves"].values()))["points"]
    assert point["kl"] is None and point["ppl"] is None and point["activation_ratio"] == 1.0
    assert point["bleu"] == 50.0 and point["token_agreement"] == 0.25


# -- the rows and curves a real sweep writes -------------------------------------------------------------

def test_sweep_rows_and_curves_by_hand(run_copy):
    """At ratio 0 nothing is masked: KL 0, the dense model's perplexity of label[1..T-1] (from one plain
    forward here), every weight kept; every row's BLEU is its output against the label, and every curve
    point the hand aggregation of its rows."""
    from utils.labelset import load_labels
    from utils.models import load_model_and_tokenizer

    result, where = run_copy
    in_process("main", "--metric_name", "magnitude", "--ratios", "0.0", "0.5", *where)
    rows = json.loads((result / "res" / "both" / "per_sample.json").read_text())
    results = json.loads((result / "res" / "both" / "results.json").read_text())
    labels = load_labels(result / "labels.json")
    model, _ = load_model_and_tokenizer(labels.settings["model"], "cpu", torch.float32)
    assert len(rows) == 2 * len(labels.label_ids) and {r["ratio"] for r in rows} == {0.0, 0.5}
    for r in rows:
        i = r["sample"]
        label, text = labels.label_ids[i], labels.texts[i]
        assert r["masked_steps"] == len(label) - 1
        assert r["bleu"] == sacrebleu.sentence_bleu(r["output"], [text]).score
        if r["ratio"] == 0.0:
            assert r["kl"] == pytest.approx(0, abs=1e-6) and r["kept_weight"] == r["total_weight"] > 0
            assert r["output"] == text and r["token_agreement"] == 1.0
            P = len(labels.prompt_ids[i])
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([labels.prompt_ids[i] + label[:-1]])).logits[0].double()
            logp = torch.log_softmax(logits[P:P + len(label) - 1], dim=-1)
            nll = -logp[torch.arange(len(label) - 1), torch.tensor(label[1:])].mean().item()
            assert r["ppl"] == pytest.approx(math.exp(nll), rel=1e-5)
    (curve,) = results["curves"].values()
    for point in curve["points"]:
        sel = [r for r in rows if r["ratio"] == point["deactivation_ratio"]]
        steps = sum(r["masked_steps"] for r in sel)
        assert point["bleu"] == pytest.approx(sum(r["bleu"] for r in sel) / len(sel))
        assert point["token_agreement"] == pytest.approx(sum(r["token_agreement"] for r in sel) / len(sel))
        assert point["kl"] == pytest.approx(sum(r["kl"] * r["masked_steps"] for r in sel) / steps, abs=1e-12)
        assert point["ppl"] == pytest.approx(math.exp(sum(math.log(r["ppl"]) * r["masked_steps"] for r in sel) / steps))
        assert point["activation_ratio"] == pytest.approx(sum(r["kept_weight"] for r in sel) /
                                                          sum(r["total_weight"] for r in sel))
    assert [p["activation_ratio"] for p in curve["points"]][0] == 1.0

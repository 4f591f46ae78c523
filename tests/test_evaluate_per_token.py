"""evaluate.py's per-token sources (METHOD §11): the log-likelihoods and perplexities computed under the
online, predictor and teal maskers, and their kept shares, against a slow computation written out here (one
plain full forward per variant and request, hooks of the test's own that choose every masked position's
masks from that pass's activations in explicit loops, the earlier positions dense), on tiny Phi, Llama and
Gemma models; then the step itself: variants, calibration samples, a missing or stale predictor, resume."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import QUESTIONS, exits_2, in_process, random_predictor

from utils.masks import unit_weights
from utils.sites import ATTN, MLP, SiteHooks, locate_units

CHOICES = ["blue", "eight legs"]
RATIOS = [0.0, 0.3, 0.5]
METRICS = ["magnitude", "wina"]            # online and teal: the metric; predictor: two random predictors


# -- the slow reference: shares nothing with utils/ but the unit weights of METHOD §5 ---------------------------
def _attn_mlp(model):
    return [(layer.self_attn, layer.mlp) for layer in model.model.layers]


def _unit_site(block, comp):
    """The module whose input is the heads (attention output projection) or the neurons (down projection)."""
    if comp == ATTN:
        return block.o_proj if hasattr(block, "o_proj") else block.dense
    return block.down_proj if hasattr(block, "down_proj") else block.fc2


def _top_share(scores, ratio):
    """Keep every unit scoring at least the element at index min(floor(p·c), c-1) of the ascending scores."""
    c = len(scores)
    threshold = sorted(scores)[min(int(math.floor(ratio * c + 1e-9)), c - 1)]
    return [s >= threshold for s in scores]


def _online_score(wina):
    def score(comp, layer, s, units, module, inputs, head_dim):
        out = []
        for j, u in enumerate(units):
            value = float(u.norm())                        # a head's ||x_h||, a neuron's |x_j|
            if wina:
                cols = module.weight[:, j * head_dim:(j + 1) * head_dim] if comp == ATTN else module.weight[:, j:j + 1]
                value *= float(cols.norm())
            out.append(value)
        return out
    return score


def _predictor_score(predictor):
    def score(comp, layer, s, units, module, inputs, head_dim):
        p = predictor[comp]
        h = inputs[(comp, layer)][0, s].float()            # the hidden state entering the block, this position
        z = (h - p.mean[layer]) / p.scale[layer]
        return ((z @ p.down[layer]) @ p.up[layer] + p.bias[layer]).tolist()
    return score


def _unit_hooks(model, start, ratio, selected, score, tally):
    """At every position from ``start`` on, keep each masked layer's top share of ``score``'s unit scores;
    add the kept weight to ``tally``."""
    cfg = model.config
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    w = unit_weights(locate_units(model))
    inputs, handles = {}, []
    for layer, (attn, mlp) in enumerate(_attn_mlp(model)):
        for comp, block in ((ATTN, attn), (MLP, mlp)):
            def remember(mod, args, kwargs, key=(comp, layer)):
                inputs[key] = (args[0] if args else kwargs["hidden_states"]).detach().clone()
            handles.append(block.register_forward_pre_hook(remember, with_kwargs=True))

            def hook(mod, args, comp=comp, layer=layer):
                x = args[0].clone()
                per = w.head if comp == ATTN else w.neuron
                for s in range(start, x.shape[1]):
                    vec = x[0, s]
                    units = ([vec[h * head_dim:(h + 1) * head_dim] for h in range(heads)] if comp == ATTN
                             else [vec[j:j + 1] for j in range(vec.shape[0])])
                    if not selected[layer]:
                        tally[0] += len(units) * per
                        continue
                    keep = _top_share(score(comp, layer, s, units, mod, inputs, head_dim), ratio)
                    for j, k in enumerate(keep):
                        if k:
                            tally[0] += per
                        elif comp == ATTN:
                            x[0, s, j * head_dim:(j + 1) * head_dim] = 0
                        else:
                            x[0, s, j] = 0
                return (x,)
            handles.append(_unit_site(block, comp).register_forward_pre_hook(hook))
    return handles


def _teal_hooks(model, start, thresholds, v, r, selected, wina, tally):
    """Every nn.Linear of the attention and MLP blocks (declaration order): from ``start`` on, zero each input
    channel whose |x| (times its weight column's norm for wina) is below the threshold; add kept columns x
    output width to ``tally``."""
    handles = []
    for layer, (attn, mlp) in enumerate(_attn_mlp(model)):
        linears = [m for block in (attn, mlp) for m in block.children() if isinstance(m, nn.Linear)]
        for j, lin in enumerate(linears):
            def hook(mod, args, layer=layer, j=j):
                x = args[0].clone()
                out_width, in_width = mod.weight.shape
                norms = mod.weight.norm(dim=0)
                threshold = float(thresholds[v, r, layer, j])
                for s in range(start, x.shape[1]):
                    for c in range(in_width):
                        score = abs(float(x[0, s, c])) * (float(norms[c]) if wina else 1.0)
                        if not selected[layer] or score >= threshold:
                            tally[0] += out_width
                        else:
                            x[0, s, c] = 0
                return (x,)
            handles.append(lin.register_forward_pre_hook(hook))
    return handles


def slow_log_probs(model, ids, start, source, metric, ratio, selected, extra):
    """``(log-probs [S, V] float64, kept weight)`` of one plain forward over ``ids``, the per-token source's
    masks chosen at every position from ``start`` on (the earlier positions dense)."""
    tally = [0.0]
    v = METRICS.index(metric)
    if source == "online":
        handles = _unit_hooks(model, start, ratio, selected, _online_score(metric == "wina"), tally)
    elif source == "predictor":
        handles = _unit_hooks(model, start, ratio, selected, _predictor_score(extra[v]), tally)
    else:
        handles = _teal_hooks(model, start, extra, v, RATIOS.index(ratio), selected, metric == "wina", tally)
    try:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0]
    finally:
        for h in handles:
            h.remove()
    return torch.log_softmax(logits.double(), -1), tally[0]


# -- the maskers under test, built directly ------------------------------------------------------------------------
def build_masker(source, model, layout, selected):
    """``(masker, what the slow reference needs)``."""
    from utils.predictor import PredictorMasker
    from utils.teal import TealMasker, calibrate_thresholds
    from utils.token_masks import OnlineMasker

    weights = unit_weights(layout)
    if source == "online":
        return OnlineMasker(model, layout, weights, selected, METRICS), None
    if source == "predictor":
        preds = [{c: random_predictor(layout, c, 10 * v + i) for i, c in enumerate((ATTN, MLP))} for v in range(2)]
        return PredictorMasker(model, layout, weights, selected, METRICS, preds), preds
    g = torch.Generator().manual_seed(3)
    samples = [(torch.randint(0, 500, (5,), generator=g).tolist(), torch.randint(0, 500, (6,), generator=g).tolist())
               for _ in range(2)]
    thresholds = calibrate_thresholds(model, samples, METRICS, RATIOS)
    return TealMasker(model, layout, weights, selected, METRICS, thresholds, RATIOS), thresholds


@pytest.fixture(scope="module", params=["phi", "llama", "gemma"])
def arch(request, tiny_model_dirs):
    folder = tiny_model_dirs[request.param]
    return (request.param, AutoModelForCausalLM.from_pretrained(folder).eval().requires_grad_(False),
            AutoTokenizer.from_pretrained(folder))


def _book(model, source, selected):
    from utils.evaluation import MaskBook, Variant

    layout = locate_units(model)
    hooks = SiteHooks(model, layout)
    masker, extra = build_masker(source, model, layout, selected)
    variants = [Variant()] + [Variant(m, source, p) for m in METRICS for p in RATIOS]
    book = MaskBook(model, hooks, layout, variants, selected=selected, maskers={source: masker})
    return book, variants, extra, (hooks, masker)


def _encode(tok, context, choice):
    """lm-eval's rule: the context alone, and the continuation = tokens of (context + ' ' + choice) after it."""
    whole = tok(context + " " + choice, add_special_tokens=False)["input_ids"]
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    return ctx, whole[len(ctx):]


@pytest.mark.parametrize("source", ["online", "predictor", "teal"])
def test_per_token_loglikelihoods_and_kept_share_equal_a_slow_loop(arch, source):
    """The mask acts at the context's last position and every continuation position but the last, chosen
    there from the masked model's own activations; the context's other positions run dense."""
    from utils.evaluation import harness_lm

    name, model, tok = arch
    layers = model.config.num_hidden_layers
    # Llama: its last layer unmasked (it counts in full)
    selected = torch.tensor([True] * layers) if name != "llama" else torch.tensor([True] * (layers - 1) + [False])
    book, variants, extra, owned = _book(model, source, selected)
    w = unit_weights(locate_units(model))
    contexts = [f"Question: {q}\nAnswer:" for q, _ in QUESTIONS[:2]]
    requests = [SimpleNamespace(args=(c, f" {choice}")) for c in contexts for choice in CHOICES]
    try:
        lm = harness_lm(model, owned[0], tok, book, progress=False)
        for i, v in enumerate(variants):
            lm.variant = i
            got = [ll for ll, _ in lm.loglikelihood(requests)]
            want, kept, positions = [], 0.0, 0
            for r in requests:
                ctx, cont = _encode(tok, r.args[0], r.args[1][1:])
                ids = ctx + cont[:-1]                      # the last token's own output is not scored
                if v.metric is None:
                    logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
                else:
                    logp, k = slow_log_probs(model, ids, len(ctx) - 1, source, v.metric, v.ratio, selected, extra)
                    kept += k
                    positions += len(cont)
                want.append(sum(logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont)))
            assert got == pytest.approx(want, rel=1e-5, abs=1e-5), (name, source, v)
            if v.metric is None:
                dense = got
            elif v.ratio == 0.5:                  # the masks did something
                assert max(abs(a - b) for a, b in zip(got, dense)) > 1e-3, (name, source, v)
            share = 1.0 if v.metric is None else kept / (positions * layers * w.layer_total)
            assert book.activation_ratio(i) == pytest.approx(share, rel=1e-9), (name, source, v)
            if v.ratio == 0.0:
                assert book.activation_ratio(i) == 1.0
            elif v.ratio == 0.5:
                assert book.activation_ratio(i) < 0.95
        assert lm.table and all(len(ll) == len(variants) for ll, _ in lm.table.values())
    finally:
        for h in owned:
            h.remove()


@pytest.mark.parametrize("source", ["online", "predictor", "teal"])
def test_per_token_perplexity_equals_a_slow_loop(tiny_model_dirs, source):
    """Perplexity (on the tiny Llama): the mask acts at every position, each chosen from that position's own
    activations."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["llama"]).eval().requires_grad_(False)
    tok = AutoTokenizer.from_pretrained(tiny_model_dirs["llama"])
    selected = torch.ones(model.config.num_hidden_layers, dtype=torch.bool)
    book, variants, extra, owned = _book(model, source, selected)
    w = unit_weights(locate_units(model))
    texts = [tok(t, add_special_tokens=False)["input_ids"] for t in ("The cat sat on the mat.", "Rain falls.")]
    try:
        masks = book.masks([0])
        got = [book.text_nll(ids, masks) for ids in texts]
        for i, v in enumerate(variants[1:], start=1):
            kept = 0.0
            for t, ids in enumerate(texts):
                logp, k = slow_log_probs(model, ids[:-1], 0, source, v.metric, v.ratio, selected, extra)
                kept += k
                want = -sum(logp[j, ids[j + 1]].item() for j in range(len(ids) - 1))
                assert float(got[t][i]) == pytest.approx(want, rel=1e-5, abs=1e-5), (source, v)
            positions = sum(len(ids) - 1 for ids in texts)
            share = kept / (positions * model.config.num_hidden_layers * w.layer_total)
            assert book.activation_ratio(i) == pytest.approx(share, rel=1e-9), (source, v)
    finally:
        for h in owned:
            h.remove()


# -- the step ------------------------------------------------------------------------------------------------------
def _evaluate(where, *args):
    in_process("evaluate", *where, *args)
    return json.loads((where[where.index("--result_dir") + 1] / "eval" / "results.json").read_text())


def test_the_step_evaluates_per_token_sources_and_refuses_a_missing_or_stale_predictor(run_copy, tmp_path, capsys,
                                                                                        monkeypatch):
    import utils.token_sources as token_sources

    result, where = run_copy
    labels = json.loads((result / "labels.json").read_text())
    task = tmp_path / "qa.jsonl"
    task.write_text("\n".join(json.dumps({"query": f"Question: {q}\nAnswer:", "choices": CHOICES, "gold": 0})
                              for q, _ in QUESTIONS[:3]) + "\n")
    corpus = tmp_path / "held.txt"
    corpus.write_text("The cat sat on the mat.\nRain is water falling from clouds.\n")
    common = ["--tasks", task, "--ppl", corpus, "--metric_name", "magnitude", "wina", "--ratios", "0.0", "0.5",
              "--num_data", "1", "--calib_num_data", "1"]

    err = exits_2(capsys, "evaluate", *where, *common, "--source", "predictor")
    assert "no trained predictor for magnitude" in err and "train_predictor.py --num_data 1 --calib_num_data 1" in err
    in_process("train_predictor", *where, "--num_data", 1, "--calib_num_data", 1, "--epochs", 2,
               "--metric_name", "magnitude", "wina")

    seen = []
    real = token_sources.calibrate_thresholds

    def spy(model, samples, metrics, ratios, *a, **k):
        seen.append((samples, metrics, ratios))
        return real(model, samples, metrics, ratios, *a, **k)

    monkeypatch.setattr(token_sources, "calibrate_thresholds", spy)
    capsys.readouterr()
    res = _evaluate(where, *common, "--source", "online", "predictor", "teal")
    # teal calibrates on the static source's samples N .. N+M-1 (here sample 1), at the evaluated ratios
    assert seen == [([(labels["prompt_token_ids"][1], labels["label_token_ids"][1])], METRICS, [0.0, 0.5])]
    assert res["settings"]["calibration_samples"] == [1, 1]
    assert set(res["settings"]["predictors"]) == {"predictor/magnitude.pt", "predictor/wina.pt"}
    rows = res["accuracy"][0]["rows"]
    assert [r["curve"] for r in rows] == ["dense"] + [f"{m}@{s}" for s in ("online", "predictor", "teal")
                                                      for m in METRICS for _ in (0.0, 0.5)]
    ppl = res["perplexity"][0]["rows"]
    assert [r["curve"] for r in ppl] == [r["curve"] for r in rows]
    for acc, pp in zip(rows[1:], ppl[1:]):
        if acc["ratio"] == 0.0:                   # p = 0 keeps everything: the dense model, read in full
            assert acc["acc"] == rows[0]["acc"] and acc["activation_ratio"] == 1.0
            assert pp["ppl"] == pytest.approx(ppl[0]["ppl"], rel=1e-6) and pp["activation_ratio"] == 1.0
        else:
            assert acc["activation_ratio"] < 0.95 and pp["activation_ratio"] < 0.95
    # resume: the same command reuses both files; other sources are another key
    capsys.readouterr()
    _evaluate(where, *common, "--source", "online", "predictor", "teal")
    assert capsys.readouterr().out.count("done already") == 2
    res = _evaluate(where, *common, "--source", "static", "online")
    assert "done already" not in capsys.readouterr().out
    assert [r["source"] for r in res["perplexity"][0]["rows"]] == [None] + ["static"] * 4 + ["online"] * 4

    # a metric online cannot use: a note; nothing left to evaluate: refused
    with pytest.raises(SystemExit) as info:
        in_process("evaluate", *where, "--tasks", task, "--ppl", "none", "--metric_name", "cor_gxo", "--source", "online")
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "no online curve for cor_gxo" in err[0] and err[-1].startswith("error: --source online has no variant")

    # a score file rewritten since the predictor was trained makes it stale: refused, naming the command
    from utils.io import read_json
    from utils.provenance import meta_path, write_scores
    mag = result / "magnitude" / "magnitude_mlp_list.pt"
    write_scores(mag, [t * 1.5 for t in torch.load(mag)], read_json(meta_path(mag)))
    err = exits_2(capsys, "evaluate", *where, *common, "--source", "predictor")
    assert "was trained on score files that have been rewritten since" in err and "train_predictor.py" in err

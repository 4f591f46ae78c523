"""The per-token label-free sources (METHOD §7b): each masker's masks against a slow computation written out
here (explicit loops over rows, positions and units, hooks of the test's own), on Phi, Llama and Gemma-style
models; TEAL's calibration against plain sorting; the sweep's per-token variants use no label; the predictor
step resumes and refuses stale inputs."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from conftest import NO_EOS, assert_close, exits_2, in_process, random_ids, random_predictor

from utils.masks import unit_weights
from utils.predictor import PredictorMasker
from utils.sites import ATTN, MLP, SiteHooks, locate_units
from utils.teal import TealMasker, calibrate_thresholds
from utils.token_masks import OnlineMasker

ROWS = ([0, 1, 0, 1], [0.5, 0.3, 0.0, 0.75])   # (variant, ratio) of four batch rows


# -- the slow references: written out again, sharing nothing with utils/ ------------------------------------
def _blocks(model):
    layers = model.model.layers
    return [(layer.self_attn, layer.mlp) for layer in layers]


def _sites(model):
    """Per layer, (attention output projection, MLP down projection)."""
    out = []
    for attn, mlp in _blocks(model):
        o = attn.o_proj if hasattr(attn, "o_proj") else attn.dense
        down = mlp.down_proj if hasattr(mlp, "down_proj") else mlp.fc2
        out.append((o, down))
    return out


def _top_share_slow(scores, ratio):
    """Keep every unit whose score is at least the element at index min(floor(p·c), c-1) of the sorted list."""
    c = len(scores)
    ordered = sorted(scores)
    threshold = ordered[min(int(math.floor(ratio * c + 1e-9)), c - 1)]
    return [s >= threshold for s in scores]


def _unit_hooks(model, score_of, rows):
    """Zero-mask the unit sites with per-row, per-position top shares of ``score_of(comp, layer, row, vec)``."""
    variant, ratio = rows
    cfg = model.config
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    handles = []
    for layer, (o, down) in enumerate(_sites(model)):
        for comp, module in ((ATTN, o), (MLP, down)):
            def hook(mod, args, comp=comp, layer=layer):
                x = args[0].clone()
                for b in range(x.shape[0]):
                    for s in range(x.shape[1]):
                        vec = x[b, s]
                        if comp == ATTN:
                            units = [vec[h * head_dim:(h + 1) * head_dim] for h in range(heads)]
                        else:
                            units = [vec[j:j + 1] for j in range(vec.shape[0])]
                        scores = [float(score_of(comp, layer, variant[b], u, j, b, s)) for j, u in enumerate(units)]
                        keep = _top_share_slow(scores, ratio[b])
                        for j, k in enumerate(keep):
                            if not k:
                                if comp == ATTN:
                                    x[b, s, j * head_dim:(j + 1) * head_dim] = 0
                                else:
                                    x[b, s, j] = 0
                return (x,)
            handles.append(module.register_forward_pre_hook(hook))
    return handles


def _logits(model, ids, rows, masker=None, handles=()):
    batch = ids.expand(len(rows[0]), -1)
    try:
        if masker is not None:
            with masker.rows(*rows):
                return model(input_ids=batch).logits
        return model(input_ids=batch).logits
    finally:
        for h in handles:
            h.remove()


def test_online_masks_equal_the_slow_computation(arch_model):
    arch, model = arch_model
    ids = random_ids(1, batch=1, length=6)
    layout = locate_units(model)
    norms = {}
    for layer, (o, down) in enumerate(_sites(model)):
        w_o, w_d = o.weight.detach(), down.weight.detach()
        d = layout.head_dim
        norms[(ATTN, layer)] = [w_o[:, h * d:(h + 1) * d].norm() for h in range(layout.num_heads)]
        norms[(MLP, layer)] = [w_d[:, j].norm() for j in range(w_d.shape[1])]

    def score(comp, layer, variant, unit, j, b, s):          # variant 0: magnitude, 1: wina
        magnitude = unit.norm() if comp == ATTN else unit.abs()[0]
        return magnitude * norms[(comp, layer)][j] if variant == 1 else magnitude

    slow = _logits(model, ids, ROWS, handles=_unit_hooks(model, score, ROWS))
    with OnlineMasker(model, layout, unit_weights(layout), torch.ones(layout.num_layers, dtype=torch.bool),
                      ["magnitude", "wina"]) as masker:
        fast = _logits(model, ids, ROWS, masker)
    assert_close(fast, slow, f"{arch} online")
    assert not torch.allclose(slow[0], slow[2])            # the masks did something (row 2 is dense)
    assert_close(slow[2], model(input_ids=ids).logits[0], f"{arch} p = 0 is dense")


def test_predictor_masks_equal_the_slow_computation(arch_model):
    arch, model = arch_model
    ids = random_ids(2, batch=1, length=6)
    layout = locate_units(model)
    preds = [{c: random_predictor(layout, c, seed=10 * v + i) for i, c in enumerate((ATTN, MLP))} for v in range(2)]
    seen = {}

    def remember(comp):
        def hook(mod, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            seen[(comp, mod)] = h.detach().clone()
        return hook

    handles = []
    for attn, mlp in _blocks(model):
        handles.append(attn.register_forward_pre_hook(remember(ATTN), with_kwargs=True))
        handles.append(mlp.register_forward_pre_hook(remember(MLP), with_kwargs=True))
    blocks = _blocks(model)

    def score(comp, layer, variant, unit, j, b, s):
        p = preds[variant][comp]
        h = seen[(comp, blocks[layer][0 if comp == ATTN else 1])][b, s]
        z = (h - p.mean[layer]) / p.scale[layer]
        out = sum(z[k] * p.down[layer][k] for k in range(z.shape[0]))            # [rank]
        return sum(out[r] * p.up[layer][r, j] for r in range(out.shape[0])) + p.bias[layer][j]

    slow = _logits(model, ids, ROWS, handles=handles + _unit_hooks(model, score, ROWS))
    selected = torch.ones(layout.num_layers, dtype=torch.bool)
    with PredictorMasker(model, layout, unit_weights(layout), selected, ["a", "b"], preds) as masker:
        fast = _logits(model, ids, ROWS, masker)
    assert_close(fast, slow, f"{arch} predictor")
    assert not torch.allclose(slow[0], slow[2])


def _projections(model):
    """Per layer, every nn.Linear of its attention and MLP blocks, in declaration order."""
    return [[m for m in block.children() if isinstance(m, nn.Linear)] for pair in _blocks(model) for block in pair]


def test_teal_masks_and_kept_weight_equal_the_slow_computation(arch_model):
    arch, model = arch_model
    ids = random_ids(3, batch=1, length=5)
    layout = locate_units(model)
    per_layer = [a + b for a, b in zip(_projections(model)[0::2], _projections(model)[1::2])]
    ratios = [0.0, 0.3, 0.5, 0.75]
    g = torch.Generator().manual_seed(4)
    P = len(per_layer[0])
    thresholds = torch.rand(2, len(ratios), layout.num_layers, P, generator=g) * 0.6
    thresholds[:, 0] = float("-inf")
    variant, ratio = ROWS
    kept = torch.zeros(len(variant), dtype=torch.float64)
    handles = []
    for layer, linears in enumerate(per_layer):
        for j, lin in enumerate(linears):
            def hook(mod, args, layer=layer, j=j):
                x = args[0].clone()
                norms = mod.weight.detach().norm(dim=0)
                for b in range(x.shape[0]):
                    thr = float(thresholds[variant[b], ratios.index(ratio[b]), layer, j])
                    for s in range(x.shape[1]):
                        for c in range(x.shape[2]):
                            score = abs(float(x[b, s, c])) * (float(norms[c]) if variant[b] == 1 else 1.0)
                            if score >= thr:
                                kept[b] += mod.weight.shape[0]
                            else:
                                x[b, s, c] = 0
                return (x,)
            handles.append(lin.register_forward_pre_hook(hook))
    slow = _logits(model, ids, ROWS, handles=handles)
    selected = torch.ones(layout.num_layers, dtype=torch.bool)
    weights = unit_weights(layout)
    with TealMasker(model, layout, weights, selected, ["magnitude", "wina"], thresholds, ratios) as masker:
        with masker.rows(*ROWS):
            fast = model(input_ids=ids.expand(4, -1)).logits
            fast_kept = masker.take_kept()
    assert_close(fast, slow, f"{arch} teal")
    assert torch.allclose(fast_kept, kept, rtol=1e-12)
    # every projection's weight adds up to the weight of all heads and neurons: p = 0 reads everything
    total = sum(lin.weight.numel() for linears in per_layer for lin in linears) * ids.shape[1]
    assert total == pytest.approx(weights.layer_total * layout.num_layers * ids.shape[1])
    assert float(kept[2]) == pytest.approx(total)
    assert float(kept[3]) < 0.6 * total


def test_teal_calibration_is_the_quantile_of_the_masked_positions():
    from conftest import tiny_llama
    model = tiny_llama()
    samples = [(random_ids(s, 1, 4)[0].tolist(), random_ids(s + 9, 1, 3 + s)[0].tolist()) for s in range(3)]
    ratios = [0.0, 0.2, 0.5]
    thresholds = calibrate_thresholds(model, samples, ["magnitude", "wina"], ratios)
    values = {}
    handles = []
    per_layer = [a + b for a, b in zip(_projections(model)[0::2], _projections(model)[1::2])]
    for layer, linears in enumerate(per_layer):
        for j, lin in enumerate(linears):
            def hook(mod, args, key=(layer, j)):
                values.setdefault(key, []).append(args[0][0].detach().clone())
            handles.append(lin.register_forward_pre_hook(hook))
    with torch.no_grad():
        for prompt, label in samples:
            model(input_ids=torch.tensor([prompt + label[:-1]]))
    for h in handles:
        h.remove()
    for (layer, j), xs in values.items():
        lin = per_layer[layer][j]
        # the masked positions: each sample's label positions (steps 1 .. T-1)
        x = torch.cat([t[len(p):] for t, (p, _) in zip(xs, samples)])
        for v, weigh in enumerate((False, True)):
            s = x.abs() * (lin.weight.norm(dim=0) if weigh else 1)
            flat = sorted(s.flatten().tolist())
            for r, p in enumerate(ratios):
                want = float("-inf") if p == 0 else flat[int(p * len(flat))]
                assert float(thresholds[v, r, layer, j]) == pytest.approx(want, rel=1e-6)


# -- the sweep's per-token variants read no label -------------------------------------------------------------
def _sweep_rows(model, labels):
    from tqdm.auto import tqdm

    from utils.sweep import SampleSweep, SweepPlan, sweep_request
    layout = locate_units(model)
    weights = unit_weights(layout)
    selected = torch.ones(layout.num_layers, dtype=torch.bool)
    preds = [{c: random_predictor(layout, c, seed=i) for i, c in enumerate((ATTN, MLP))}]
    ratios = [0.0, 0.5]
    g = torch.Generator().manual_seed(5)
    P = len(_projections(model)[0]) + len(_projections(model)[1])
    thresholds = torch.rand(1, 2, layout.num_layers, P, generator=g) * 0.5
    thresholds[:, 0] = float("-inf")
    maskers = {"online": OnlineMasker(model, layout, weights, selected, ["magnitude"]),
               "predictor": PredictorMasker(model, layout, weights, selected, ["gxo"], preds),
               "teal": TealMasker(model, layout, weights, selected, ["magnitude"], thresholds, ratios)}
    variants = [("magnitude", "online"), ("gxo", "predictor"), ("magnitude", "teal")]
    request = sweep_request(["magnitude", "gxo"], ratios=ratios, sources=["online"])
    plan = SweepPlan(request, {}, [], {"magnitude": 2, "gxo": 2}, variants, None, {}, selected, maskers)
    run = SimpleNamespace(model=model, layout=layout, labels=labels, num_data=2,
                          tokenizer=SimpleNamespace(decode=lambda ids, **k: " ".join(map(str, ids))))
    hooks = SiteHooks(model, layout)
    try:
        with tqdm(disable=True) as bar:
            return [r for rows in SampleSweep(run, hooks, plan, 0)([0, 1], bar) for r in rows]
    finally:
        hooks.remove()
        plan.close()


def test_per_token_variants_use_no_label():
    from conftest import tiny_gemma
    model = tiny_gemma()
    prompts = [random_ids(7, 1, 5)[0].tolist(), random_ids(8, 1, 7)[0].tolist()]

    def labels(seed):
        ids = [random_ids(seed + i, 1, 6)[0].tolist() for i in range(2)]
        return SimpleNamespace(label_ids=ids, prompt_ids=prompts, texts=[" ".join(map(str, x)) for x in ids],
                               settings={"eos_token_ids": NO_EOS})

    a, b = _sweep_rows(model, labels(20)), _sweep_rows(model, labels(40))
    assert len(a) == 2 * 3 * 2
    assert [(r["source"], r["ratio"], r["output"], r["kept_weight"]) for r in a] == \
        [(r["source"], r["ratio"], r["output"], r["kept_weight"]) for r in b]
    assert [r["bleu"] for r in a] != [r["bleu"] for r in b]          # the labels did differ
    layout = locate_units(model)
    w = unit_weights(layout)
    for r in a:
        share = r["kept_weight"] / r["total_weight"]
        if r["ratio"] == 0.0:
            assert share == pytest.approx(1.0)
        elif r["source"] != "teal":   # top share per layer: ceil of the kept counts, every step alike
            heads = layout.num_heads - math.floor(0.5 * layout.num_heads)
            neurons = layout.intermediate - math.floor(0.5 * layout.intermediate)
            assert share == pytest.approx((heads * w.head + neurons * w.neuron) / w.layer_total)
        assert r["total_weight"] == pytest.approx(5 * layout.num_layers * w.layer_total)   # 5 masked steps, no EOS


# -- the predictor step -----------------------------------------------------------------------------------------
def test_predictor_step_trains_resumes_and_refuses_stale_files(run_copy, capsys, monkeypatch):
    import utils.predictor_training as training
    result, where = run_copy
    train = ["train_predictor", *where, "--num_data", 1, "--calib_num_data", 1, "--epochs", 2]
    sweep = ["main", *where, "--num_data", 1, "--calib_num_data", 1, "--source", "predictor", "--ratios", 0, 0.5]

    calls = []
    real = training.train_metric

    def interrupted(run, metric, *args, **kwargs):
        calls.append(metric)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(run, metric, *args, **kwargs)

    monkeypatch.setattr(training, "train_metric", interrupted)
    with pytest.raises(SystemExit):              # cli_entry: Ctrl-C ends with exit 130
        in_process(*train, "--metric_name", "magnitude", "wina")
    assert (result / "predictor" / "magnitude.pt").is_file() and not (result / "predictor" / "wina.pt").exists()
    monkeypatch.setattr(training, "train_metric", real)
    capsys.readouterr()
    in_process(*train, "--metric_name", "magnitude", "wina")
    out = capsys.readouterr().out
    assert "magnitude: trained for these inputs already; kept" in out and "wina: trained" not in out
    report = __import__("json").loads((result / "predictor" / "wina.json").read_text())
    assert report["cost"]["parameters"] > 0 and report["tokens"]["train"] > 0

    in_process(*sweep, "--metric_name", "magnitude")
    results = __import__("json").loads((result / "res" / "both" / "results.json").read_text())
    assert list(results["curves"]) == ["magnitude@predictor"]

    # a rewritten score file makes the predictor stale: the sweep refuses, the step retrains
    from utils.io import read_json
    from utils.provenance import meta_path, write_scores
    mag = result / "magnitude" / "magnitude_mlp_list.pt"     # recomputed with other values (another dtype, say)
    write_scores(mag, [t * 1.5 for t in torch.load(mag)], read_json(meta_path(mag)))
    capsys.readouterr()
    err = exits_2(capsys, *sweep, "--metric_name", "magnitude")
    assert "was trained on score files that have been rewritten since" in err and "train_predictor.py --num_data 1 --calib_num_data 1" in err
    in_process(*train, "--metric_name", "magnitude")
    assert "kept" not in capsys.readouterr().out
    in_process(*sweep, "--metric_name", "magnitude")
    capsys.readouterr()
    # wina's predictor was trained on the old magnitude files; a damaged file is refused too
    err = exits_2(capsys, "main", *where, "--num_data", 1, "--calib_num_data", 1, "--source", "predictor",
                  "--metric_name", "wina", "--ratios", 0, 0.5)
    assert "predictor/wina.pt was trained on score files that have been rewritten since" in err
    (result / "predictor" / "magnitude.pt").write_bytes(b"junk")
    err = exits_2(capsys, *sweep, "--metric_name", "magnitude")
    assert "is damaged" in err
    err = exits_2(capsys, *train, "--num_data", 2)
    assert "give --num_data N >= 1 with N + M <= 2" in err


def test_a_failed_masker_build_removes_the_hooks_already_placed():
    from utils.token_sources import build_maskers

    removed = []

    class Fake:
        def __init__(self, name):
            self.name = name

        def remove(self):
            removed.append(self.name)

    def make(src):
        if src == "bad":
            raise RuntimeError("calibration failed")
        return (None, []) if src == "none" else (Fake(src), ["magnitude"])

    maskers, covered = build_maskers(["online", "none"], make)
    assert list(maskers) == ["online"] and covered == {"online": ["magnitude"], "none": []} and removed == []
    with pytest.raises(RuntimeError, match="calibration failed"):
        build_maskers(["online", "teal", "bad"], make)
    assert removed == ["online", "teal"]

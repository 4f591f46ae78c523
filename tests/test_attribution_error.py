"""attribution_error.py: real loss changes of single-unit removals against each metric's prediction."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import attribution_attention
import attribution_error
import label_generation
import Mag_attention
import Mag_mlp
from conftest import write_qa_file
from utils.attribution_error import average_ranks, choose_units, spearman
from utils.metric_registry import studied_metrics
from utils.models import load_model_and_tokenizer
from utils.sites import ATTN, locate_units


def brute_force_ranks(values):
    """rank_i = 1 + #(smaller values) + (#(equal values) - 1) / 2: the average rank, by definition."""
    return [1 + sum(v < x for v in values) + (sum(v == x for v in values) - 1) / 2 for x in values]


def test_average_ranks_and_spearman():
    g = torch.Generator().manual_seed(0)
    values = torch.randint(0, 6, (40,), generator=g).double()          # many ties
    assert average_ranks(values).tolist() == brute_force_ranks(values.tolist())
    x = torch.randn(50, generator=g, dtype=torch.float64)
    assert spearman(x, x.exp()) == pytest.approx(1.0, abs=1e-12)        # any increasing map: rho = 1
    assert spearman(x, -x ** 3) == pytest.approx(-1.0, abs=1e-12)
    # against Pearson of brute-force ranks, with ties on both sides
    a = torch.randint(0, 4, (30,), generator=g).double()
    b = a + torch.randint(0, 3, (30,), generator=g).double()
    ra = torch.tensor(brute_force_ranks(a.tolist()), dtype=torch.float64)
    rb = torch.tensor(brute_force_ranks(b.tolist()), dtype=torch.float64)
    expected = torch.corrcoef(torch.stack([ra, rb]))[0, 1].item()
    assert spearman(a, b) == pytest.approx(expected, abs=1e-12)
    assert math.isnan(spearman(torch.ones(5), x[:5]))                   # a constant side has no ranking


@pytest.fixture(scope="module")
def error_run(tiny_model_dirs, tmp_path_factory):
    """A tiny pipeline (labels, magnitudes, gradient/GxO, IG) on the Gemma-style model, then the step."""
    tmp = tmp_path_factory.mktemp("attr_error")
    data = write_qa_file(tmp / "qa.jsonl")
    result = tmp / "result"
    where = ["--dataset", str(data), "--result_dir", str(result), "--device", "cpu"]
    model_dir = str(tiny_model_dirs["gemma"])
    label_generation.main(["--model_name", model_dir, "--num_data", "3", *where])
    Mag_attention.main(where)
    Mag_mlp.main(where)
    attribution_attention.main(["--metric", "gradient", "gxo", *where])
    attribution_attention.main(["--metric", "ig", "--n_steps", "2", "--num_data", "2", *where])
    attribution_error.main(["--num_units", "6", "--steps", "2", "--batch_size", "5", *where])
    out = result / "attribution_error"
    return {"dir": out, "result": result, "model_dir": model_dir,
            "rows": json.loads((out / "rows.json").read_text()),
            "summary": json.loads((out / "summary.json").read_text()),
            "labels": json.loads((result / "labels.json").read_text())}


@pytest.mark.parametrize("label_len", [0, 1, 2, 7])
def test_choose_units_draws_masked_steps_only(label_len):
    """Steps come from 1 .. label_len - 1 (step 0 reads the prompt only); an empty or one-token label
    has none, and the draw depends on (seed, sample index) alone."""
    layout = SimpleNamespace(num_layers=3, units=lambda comp: 4 if comp == ATTN else 10)
    steps, picks = choose_units(layout, label_len, num_units=5, num_steps=3, seed=0, index=2)
    assert steps == sorted(set(steps)) and set(steps) <= set(range(1, label_len))
    assert len(steps) == min(3, max(label_len - 1, 0))
    assert all(len(p) == 5 and all(0 <= l < 3 for l, _ in p) for p in picks.values())
    assert len(picks) == 2 * len(steps)
    assert choose_units(layout, label_len, 5, 3, 0, 2) == (steps, picks)


def direct_removal_delta(model, prompt, label, t, comp, layer, unit):
    """Loss of step t with one unit zeroed at the position step t computes, minus the dense loss, from two
    plain forward passes over the whole sequence (no cache, no SiteHooks)."""
    layout = locate_units(model)
    module = (layout.attn_out if comp == ATTN else layout.mlp_down)[layer]
    dims = slice(unit * layout.head_dim, (unit + 1) * layout.head_dim) if comp == ATTN else slice(unit, unit + 1)
    seq = torch.tensor([prompt + label[:t]])

    def zero_unit(mod, args):
        x = args[0].clone()
        x[:, -1, dims] = 0
        return (x,) + tuple(args[1:])

    def loss():
        with torch.no_grad():
            logits = model(input_ids=seq, use_cache=False).logits[0, -1].float()
        return F.cross_entropy(logits[None], torch.tensor([label[t]])).item()

    dense = loss()
    handle = module.register_forward_pre_hook(zero_unit)
    try:
        removed = loss()
    finally:
        handle.remove()
    return removed - dense, dense


def test_rows_equal_direct_single_unit_removals(error_run):
    rows, labels = error_run["rows"], error_run["labels"]
    model, _ = load_model_and_tokenizer(error_run["model_dir"], "cpu", torch.float32)
    steps = {(r["sample"], r["step"]) for r in rows}
    # 3 samples x 2 steps (t >= 1) x 6 units x 2 components, fewer where a label is short
    expected = sum(min(2, len(ids) - 1) for ids in labels["label_token_ids"]) * 12
    assert len(rows) == expected > 0
    assert all(r["step"] >= 1 for r in rows)
    changed = 0
    for r in rows[::3]:
        i = r["sample"]
        delta, dense = direct_removal_delta(model, labels["prompt_token_ids"][i], labels["label_token_ids"][i],
                                            r["step"], r["component"], r["layer"], r["unit"])
        assert r["delta_loss"] == pytest.approx(delta, abs=2e-5), r
        assert r["dense_loss"] == pytest.approx(dense, abs=2e-5), r
        changed += abs(delta) > 1e-6
    assert changed > 0
    assert len(steps) >= 2


def test_predictions_come_from_the_score_files(error_run):
    rows, result = error_run["rows"], error_run["result"]
    gxo = {c: torch.load(result / "ig" / f"gxo_{c}_list.pt") for c in ("attention", "mlp")}
    mag = torch.load(result / "magnitude" / "magnitude_attention_list.pt")
    model, _ = load_model_and_tokenizer(error_run["model_dir"], "cpu", torch.float32)
    d = locate_units(model).head_dim
    for r in rows:
        i, t, l, u, comp = r["sample"], r["step"], r["layer"], r["unit"], r["component"]
        scale = d if comp == ATTN else 1
        assert r["predicted"]["gxo"] == pytest.approx(-scale * gxo[comp][i][t, l, u].item(), rel=1e-6, abs=1e-12)
        if comp == ATTN:
            assert r["predicted"]["magnitude"] == pytest.approx(mag[i][t, l, u].item(), rel=1e-6)
        # IG was computed on the first 2 samples only: the third has no IG prediction
        assert ("ig" in r["predicted"]) == (i < 2)
        assert set(r["predicted"]) - {"ig"} == set(studied_metrics()) - {"ig"}


def test_summary_and_figure(error_run):
    summary, rows, out = error_run["summary"], error_run["rows"], error_run["dir"]
    assert set(summary["correlation"]) == set(studied_metrics())
    assert summary["metric_samples"] == {"gxo": 3, "cor_gxo": 3, "ig": 2, "gradient": 3, "magnitude": 3}
    for metric, per in summary["correlation"].items():
        for comp, stats in per.items():
            have = [r for r in rows if r["component"] == comp and metric in r["predicted"]]
            assert stats["n"] == len(have) > 0
            x = torch.tensor([r["predicted"][metric] for r in have])
            y = torch.tensor([r["delta_loss"] for r in have])
            assert stats["spearman"] == pytest.approx(spearman(x, y), abs=1e-9)
            assert -1 <= stats["spearman"] <= 1
    for name in ("scatter.png", "scatter.pdf"):
        assert (out / name).stat().st_size > 1000
    assert not (out / "rows.json.parts").exists()       # the per-sample checkpoint is cleaned up


def test_other_batch_split_gives_the_same_rows_and_bad_flags_fail_cleanly(error_run, capsys):
    from utils.attribution_error import sample_rows
    import attribution_error as script
    from utils.run import open_run
    from utils.sites import SiteHooks
    from utils.sweep import load_metric_scores

    where = ["--result_dir", str(error_run["result"]), "--device", "cpu"]
    run = open_run(script.build_parser().parse_args(where))
    per_metric, _ = load_metric_scores(run, list(studied_metrics()), explicit=True)
    with SiteHooks(run.model, run.layout) as hooks:
        again = [r for i in range(run.num_data)
                 for r in sample_rows(run, hooks, per_metric, i, num_units=6, num_steps=2, seed=0, batch_size=64)]
    assert len(again) == len(error_run["rows"])
    for a, b in zip(again, error_run["rows"]):   # one pass per step instead of passes of 5: same units, losses
        assert (a["sample"], a["step"], a["component"], a["layer"], a["unit"]) == \
               (b["sample"], b["step"], b["component"], b["layer"], b["unit"])
        assert a["delta_loss"] == pytest.approx(b["delta_loss"], abs=1e-5)
        assert a["predicted"] == pytest.approx(b["predicted"])
    with pytest.raises(SystemExit) as exc:
        attribution_error.main(["--metric_name", "snip", *where])
    assert exc.value.code == 2
    assert "unknown --metric_name snip" in capsys.readouterr().err

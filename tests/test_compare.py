"""compare.py: the paired difference of two sweep curves and its bootstrap interval, against analytic facts
and a slow loop written here; its one-line refusals."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

import compare


def _rows(curve: str, values, kls=None, steps=None, ratio=0.3, ppls=None, samples=None):
    metric, _, source = curve.partition("@")
    n = len(values)
    kls = [0.1] * n if kls is None else kls
    steps = [1] * n if steps is None else steps
    ppls = [2.0] * n if ppls is None else ppls
    samples = range(n) if samples is None else samples
    return [{"sample": s, "metric": metric, "source": source or "oracle", "ratio": ratio, "bleu": v,
             "token_agreement": v / 100, "kl": k, "ppl": q, "masked_steps": t, "kept_weight": 1.0,
             "total_weight": 2.0}
            for s, v, k, t, q in zip(samples, values, kls, steps, ppls)]


def test_identical_curves_differ_by_zero_with_zero_width():
    v = list(np.random.default_rng(1).uniform(0, 100, 40))
    out = compare.compare(_rows("gxo", v) + _rows("ig", v), "gxo", "ig", measures=["bleu", "kl", "ppl"])
    for r in out:
        assert r["difference"] == 0.0 and r["interval"] == [0.0, 0.0] and not r["separable"]


def test_a_constant_shift_is_exact_and_outside_the_noise():
    """b = a - 7 for every sample: every resample's difference is exactly 7, however spread a is."""
    v = np.random.default_rng(2).uniform(10, 90, 50)
    out = compare.compare(_rows("cor_gxo", list(v)) + _rows("magnitude@static", list(v - 7)),
                          "cor_gxo", "magnitude@static", measures=["bleu"])
    (r,) = out
    assert r["difference"] == pytest.approx(7.0) and r["interval"] == pytest.approx([7.0, 7.0])
    assert r["separable"] and r["value_a"] == pytest.approx(v.mean())


def test_matches_a_slow_paired_bootstrap_written_here():
    rng = np.random.default_rng(3)
    a, b = rng.normal(50, 20, 30), rng.normal(48, 20, 30)
    (r,) = compare.compare(_rows("gxo", list(a)) + _rows("wina", list(b)), "gxo", "wina", measures=["bleu"])
    draws = np.random.default_rng(0).integers(0, 30, size=(2000, 30))     # utils/intervals.py: SEED 0, 2000
    diffs = []
    for row in draws:
        diffs.append(sum(a[i] for i in row) / 30 - sum(b[i] for i in row) / 30)
    assert r["difference"] == pytest.approx(a.mean() - b.mean(), abs=1e-12)
    assert r["interval"] == pytest.approx(list(np.quantile(diffs, [0.025, 0.975])), abs=1e-9)


def test_pairing_cancels_what_the_samples_share():
    """Samples of very different difficulty, the same for both curves, and a small consistent gap: the
    paired interval is narrow and excludes 0; resampling the curves independently (the unpaired mistake)
    would see mostly the spread of difficulty."""
    rng = np.random.default_rng(4)
    difficulty = rng.uniform(0, 100, 100)
    a, b = difficulty + 1.0 + rng.normal(0, 0.3, 100), difficulty
    (r,) = compare.compare(_rows("gxo", list(a)) + _rows("ig", list(b)), "gxo", "ig", measures=["bleu"])
    width = r["interval"][1] - r["interval"][0]
    unpaired = 2 * 1.96 * math.sqrt(a.var() / 100 + b.var() / 100)
    assert r["separable"] and width < 0.1 * unpaired
    assert width == pytest.approx(2 * 1.96 * np.std(a - b) / 10, rel=0.2)


def test_kl_is_token_weighted_and_ppl_is_exp_of_the_weighted_log():
    steps = [1, 9, 2]
    rows = (_rows("gxo", [1, 2, 3], kls=[0.0, 1.0, 0.5], steps=steps, ppls=[2.0, 4.0, 8.0])
            + _rows("ig", [1, 2, 3], kls=[0.2, 0.2, 0.2], steps=steps, ppls=[2.0, 2.0, 2.0]))
    kl, ppl = compare.compare(rows, "gxo", "ig", measures=["kl", "ppl"])
    assert kl["value_a"] == pytest.approx((0 * 1 + 1 * 9 + 0.5 * 2) / 12) and kl["value_b"] == pytest.approx(0.2)
    want = math.exp((math.log(2) * 1 + math.log(4) * 9 + math.log(8) * 2) / 12)
    assert ppl["value_a"] == pytest.approx(want) and ppl["difference"] == pytest.approx(want - 2.0)


def test_only_samples_both_curves_have_count():
    rows = _rows("gxo", [10, 20, 30, 40], samples=[0, 1, 2, 3]) + _rows("ig", [0, 0, 0], samples=[1, 2, 9])
    (r,) = compare.compare(rows, "gxo", "ig", measures=["bleu"])
    assert r["samples"] == 2 and r["value_a"] == pytest.approx(25.0) and r["difference"] == pytest.approx(25.0)
    # a sample with no masked step has no KL: it drops out of the KL pair only
    rows = _rows("gxo", [1, 2, 3], kls=[None, 0.5, 0.5]) + _rows("ig", [1, 2, 3], kls=[0.1, 0.1, 0.1])
    bleu, kl = compare.compare(rows, "gxo", "ig", measures=["bleu", "kl"])
    assert bleu["samples"] == 3 and kl["samples"] == 2 and kl["difference"] == pytest.approx(0.4)


def test_cli_reads_a_result_folder_and_writes_json(tmp_path, capsys):
    res = tmp_path / "run" / "res" / "both"
    res.mkdir(parents=True)
    rows = _rows("gxo", [90, 80, 70]) + _rows("gxo@static", [50, 40, 30])
    rows += _rows("gxo", [60, 60, 60], ratio=0.5) + _rows("gxo@static", [60, 60, 60], ratio=0.5)
    (res / "per_sample.json").write_text(json.dumps(rows))
    out = compare.main([str(tmp_path / "run"), "--a", "gxo", "--b", "gxo@static", "--measure", "bleu",
                        "--json", str(tmp_path / "d.json")])
    assert [r["ratio"] for r in out] == [0.3, 0.5] and [r["separable"] for r in out] == [True, False]
    assert json.loads((tmp_path / "d.json").read_text())["rows"][0]["difference"] == pytest.approx(40.0)
    assert "outside the noise" in capsys.readouterr().out


@pytest.mark.parametrize("args, says", [
    (["--a", "gxo", "--b", "nope"], "no curve 'nope'"),
    (["--a", "gxo", "--b", "gxo"], "the same curve"),
    (["--a", "gxo", "--b", "ig", "--ratios", "0.9"], "ratio 0.9 is not in both curves"),
])
def test_bad_requests_are_one_line(tmp_path, capsys, args, says):
    (tmp_path / "per_sample.json").write_text(json.dumps(_rows("gxo", [1, 2]) + _rows("ig", [2, 3])))
    with pytest.raises(SystemExit) as stop:
        compare.main([str(tmp_path)] + args)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and says in err and len(err.strip().splitlines()) == 1


def test_a_folder_without_a_sweep_or_a_foreign_file_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        compare.main([str(tmp_path), "--a", "gxo", "--b", "ig"])
    assert "run main.py" in capsys.readouterr().err
    (tmp_path / "per_sample.json").write_text("[]")
    with pytest.raises(SystemExit):
        compare.main([str(tmp_path), "--a", "gxo", "--b", "ig"])
    assert "holds no per-sample rows" in capsys.readouterr().err
    (tmp_path / "per_sample.json").write_text(json.dumps({"curves": {}}))
    with pytest.raises(SystemExit):
        compare.main([str(tmp_path), "--a", "gxo", "--b", "ig"])
    assert "per-sample rows" in capsys.readouterr().err


def test_a_gzipped_per_sample_file_as_kept_in_docs(tmp_path):
    import gzip
    path = tmp_path / "run_per_sample.json.gz"
    path.write_bytes(gzip.compress(json.dumps(_rows("gxo", [5, 6]) + _rows("ig", [1, 2])).encode()))
    (r,) = compare.main([str(path), "--a", "gxo", "--b", "ig", "--measure", "bleu"])
    assert r["difference"] == pytest.approx(4.0) and r["samples"] == 2


def _eval_results(a_items, b_items, dense_items, nll_a, nll_b, tokens):
    """evaluate.py's results.json, as much of it as compare.py reads: one task, one corpus."""
    def acc_row(curve, ratio, items):
        metric, _, source = curve.partition("@")
        return {"curve": curve, "metric": metric or None, "source": source or None, "ratio": ratio,
                "items": {"acc": items}, "acc": sum(items) / len(items)}

    def ppl_row(curve, ratio, nll):
        return {"curve": curve, "ratio": ratio, "text_nll": nll}

    return {"accuracy": [{"task": "piqa", "metrics": ["acc"],
                          "rows": [acc_row("dense", None, dense_items), acc_row("magnitude@static", 0.3, a_items),
                                   acc_row("wina@static", 0.3, b_items)]}],
            "perplexity": [{"corpus": "wiki", "text_tokens": tokens,
                            "rows": [ppl_row("dense", None, nll_b), ppl_row("magnitude@static", 0.3, nll_a),
                                     ppl_row("wina@static", 0.3, nll_b)]}]}


def test_an_evaluation_is_paired_over_its_rows_and_texts():
    a, b = [1, 1, 0, 1, 0, 1], [1, 0, 0, 1, 0, 0]
    nll_a, nll_b, tokens = [2.0, 9.0, 0.0], [1.0, 3.0, 0.0], [2, 3, 0]      # a text of one token has none
    res = _eval_results([float(x) for x in a], [float(x) for x in b], [1.0] * 6, nll_a, nll_b, tokens)
    acc, ppl = compare.compare_eval(res, "magnitude@static", "wina@static")
    assert acc["measure"] == "piqa:acc" and acc["difference"] == pytest.approx(2 / 6) and acc["samples"] == 6
    # token-weighted: exp(sum nll / sum tokens) over the texts with tokens
    assert ppl["measure"] == "ppl:wiki" and ppl["samples"] == 2
    assert ppl["value_a"] == pytest.approx(math.exp(11 / 5)) and ppl["value_b"] == pytest.approx(math.exp(4 / 5))
    # against dense (no ratio): paired at the other curve's ratio
    (d,) = compare.compare_eval(res, "dense", "magnitude@static", measures=["piqa:acc"])
    assert d["ratio"] == 0.3 and d["difference"] == pytest.approx(2 / 6)


def test_an_evaluation_without_per_row_values_or_a_bad_measure_is_refused(tmp_path, capsys):
    res = _eval_results([1.0], [0.0], [1.0], [1.0], [1.0], [1])
    del res["accuracy"][0]["rows"][1]["items"]
    (tmp_path / "results.json").write_text(json.dumps(res))
    with pytest.raises(SystemExit):
        compare.main([str(tmp_path), "--a", "magnitude@static", "--b", "wina@static"])
    assert "rerun evaluate.py" in capsys.readouterr().err
    (tmp_path / "results.json").write_text(json.dumps(_eval_results([1.0, 0.0], [0.0, 0.0], [1.0, 1.0],
                                                                    [1.0], [1.0], [1])))
    with pytest.raises(SystemExit):
        compare.main([str(tmp_path), "--a", "magnitude@static", "--b", "wina@static", "--measure", "boolq:acc"])
    assert "no measure 'boolq:acc'" in capsys.readouterr().err

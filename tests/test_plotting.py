"""The figures: trade-off panels per source, titles, and quality against measured decode speed-up."""
import json

import pytest

from utils.errors import PipelineError
from utils.plotting import _title, load_speed_rows, plot_speed_quality, plot_tradeoff, speedup_at

ROWS = [{"device": "cpu", "batch": 1, "kept": 1.0, "speedup": 1.0},
        {"device": "cpu", "batch": 1, "kept": 0.5, "speedup": 1.6},
        {"device": "cpu", "batch": 1, "kept": 0.25, "speedup": 2.2}]


def results(samples=(3, 3)):
    def curve(metric, source, n):
        return {"metric": metric, "source": source, "samples": n,
                "points": [{"deactivation_ratio": p, "activation_ratio": 1 - 0.8 * p, "bleu": 100 * (1 - p),
                            "token_agreement": 1 - p, "kl": p, "ppl": 10 + p, "samples": n} for p in (0.0, 0.5, 0.9)]}
    return {"curves": {"gxo": curve("gxo", "oracle", samples[0]), "ig": curve("ig", "oracle", samples[1]),
                       "gxo@prompt": curve("gxo", "prompt", samples[0])},
            "settings": {"labels_settings": {"model": "org/tiny", "dataset": "truthfulqa-offline"},
                         "num_data": 3, "ig_n_steps": 20}}


def test_speedup_is_interpolated_between_measured_points():
    assert speedup_at(ROWS, 0.75) == pytest.approx(1.3)
    assert speedup_at(ROWS, 0.375) == pytest.approx(1.9)
    assert speedup_at(ROWS, 0.5) == pytest.approx(1.6)
    assert speedup_at(ROWS, 0.1) == pytest.approx(2.2)      # below the measured range: clamped
    assert speedup_at(ROWS, 1.0) == pytest.approx(1.0)


def test_figures_are_written(tmp_path):
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"rows": ROWS + [{**r, "device": "cuda"} for r in ROWS]}))
    assert sorted(load_speed_rows(bench)) == [("cpu", 1), ("cuda", 1)]
    plot_speed_quality(results(), bench, tmp_path / "speed")
    plot_tradeoff(results(), tmp_path / "tradeoff_kl", "kl")
    for name in ("speed.png", "speed.pdf", "tradeoff_kl.png", "tradeoff_kl.pdf"):
        assert (tmp_path / name).stat().st_size > 0
    assert (tmp_path / "speed.png").read_bytes()[:4] == b"\x89PNG"


def test_title_names_model_dataset_samples_and_ig_steps():
    assert _title(results()) == "org/tiny, truthfulqa-offline, 3 samples, IG-20"
    no_ig = results()
    del no_ig["curves"]["ig"]
    assert _title(no_ig) == "org/tiny, truthfulqa-offline, 3 samples"


def test_bad_benchmark_json_is_refused(tmp_path):
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps([{"device": "cpu", "kept": 0.5}]))
    with pytest.raises(PipelineError, match="needs rows with 'kept' in \\(0, 1\\] and a finite positive 'speedup'"):
        load_speed_rows(bench)
    for bad in ({"kept": 0.5, "speedup": -1.2}, {"kept": 0.5, "speedup": 0.0}, {"kept": 1.5, "speedup": 1.0}):
        bench.write_text(json.dumps([{"device": "cpu", **bad}]))
        with pytest.raises(PipelineError, match="finite positive 'speedup'"):
            load_speed_rows(bench)
    with pytest.raises(PipelineError, match="cannot read the benchmark JSON"):
        load_speed_rows(tmp_path / "missing.json")


def test_several_benchmark_files_device_from_settings_and_the_fastest_dense_path(tmp_path):
    """bench_decode.py's own JSON: rows without a device (it is in the settings), a fused and an unfused
    path of one batch; the panel keeps the path whose dense decode is fastest."""
    def row(fused, kept, ms, speedup):
        return {"batch": 1, "fused": fused, "compile": "eager", "kept": kept, "ms_per_token": ms, "speedup": speedup}
    cpu = tmp_path / "cpu.json"
    cpu.write_text(json.dumps({"settings": {"device_name": "x86_64", "dtype": "float32"},
                               "rows": [row(False, 1.0, 300.0, 1.0), row(False, 0.5, 200.0, 1.5),
                                        row(True, 1.0, 400.0, 1.0), row(True, 0.5, 200.0, 2.0)]}))
    gpu = tmp_path / "gpu.json"
    gpu.write_text(json.dumps({"settings": {"device_name": "NVIDIA H200", "dtype": "bfloat16"},
                               "rows": [row(True, 1.0, 2.0, 1.0), row(True, 0.5, 1.6, 1.25)]}))
    groups = load_speed_rows([cpu, gpu])
    assert sorted(groups) == [("NVIDIA H200 bfloat16", 1), ("x86_64 float32", 1)]
    assert [r["speedup"] for r in groups[("x86_64 float32", 1)]] == [1.0, 1.5]     # unfused: faster dense
    plot_speed_quality(results(), [cpu, gpu], tmp_path / "speed")
    assert (tmp_path / "speed.png").read_bytes()[:4] == b"\x89PNG"


def test_curve_on_fewer_samples_is_set_apart(tmp_path, monkeypatch):
    """The quick start's IG (1 of 8 questions) is drawn dashed and faded, its legend says it is noise, and
    a note under the figure points to comparable curves; curves on every sample are drawn as before."""
    import utils.plotting

    drawn = []
    monkeypatch.setattr(utils.plotting, "save_figure", lambda fig, path: drawn.append(fig))
    plot_tradeoff(results(samples=(3, 1)), tmp_path / "tradeoff")
    fig = drawn[0]
    lines = {line.get_label(): line for ax in fig.axes for line in ax.get_lines()}
    assert set(lines) == {"GxO", "Integrated gradients (n=1, noise)"}
    ig, gxo = lines["Integrated gradients (n=1, noise)"], lines["GxO"]
    assert (ig.get_linestyle(), ig.get_alpha(), ig.get_linewidth()) == ("--", 0.45, 0.9)
    assert (gxo.get_linestyle(), gxo.get_alpha(), gxo.get_linewidth()) == ("-", None, 1.5)
    note = " ".join(t.get_text() for t in fig.texts if t.get_text() != fig.get_suptitle())
    assert "a curve on 1 sample is noise" in note.lower() and "RESULTS.md" in note and "(n=3)" in note

    drawn.clear()
    plot_tradeoff(results(samples=(3, 2)), tmp_path / "tradeoff")
    labels = [line.get_label() for ax in drawn[0].axes for line in ax.get_lines()]
    assert "Integrated gradients (n=2)" in labels
    assert "noise" not in " ".join(t.get_text() for t in drawn[0].texts)
    assert "not comparable" in " ".join(t.get_text() for t in drawn[0].texts)

    drawn.clear()
    plot_tradeoff(results(), tmp_path / "tradeoff")
    assert [t.get_text() for t in drawn[0].texts] == [drawn[0].get_suptitle()]   # all on every sample: no note


def test_speed_figure_refuses_what_it_cannot_draw(tmp_path, capsys):
    """Only oracle curves (what a sweep gives by default), an unknown source, or a results file of the
    wrong shape: one line naming the fix, and no empty figure."""
    import benchmarks.plot_speed_quality as script

    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"rows": ROWS}))
    only_oracle = results()
    del only_oracle["curves"]["gxo@prompt"]
    with pytest.raises(PipelineError, match=r"hold no curve of prompt, static, online, predictor, teal \(only oracle\); "
                                            r"rerun main.py with --source prompt static online predictor teal, or "
                                            r"draw those it has with --source oracle"):
        plot_speed_quality(only_oracle, bench, tmp_path / "speed")
    with pytest.raises(PipelineError, match="unknown --source nope; choose from oracle, prompt, static"):
        plot_speed_quality(results(), bench, tmp_path / "speed", sources=["nope"])
    assert not (tmp_path / "speed.png").exists()
    wrong = tmp_path / "results.json"
    wrong.write_text(json.dumps({"curves": [1, 2]}))
    with pytest.raises(SystemExit) as exc:
        script.main([str(wrong), str(bench)])
    assert exc.value.code == 2 and "is not a sweep's results.json" in capsys.readouterr().err


def test_kl_and_perplexity_figures_of_one_token_labels(tmp_path):
    """Labels of one token have no masked step, so no KL or perplexity: the figures say so (a log scale
    of nothing used to raise)."""
    empty = results()
    for curve in empty["curves"].values():
        for point in curve["points"]:
            point["kl"] = point["ppl"] = None
    for measure in ("kl", "ppl"):
        plot_tradeoff(empty, tmp_path / measure, measure)
        assert (tmp_path / f"{measure}.png").read_bytes()[:4] == b"\x89PNG"


def test_sparsity_table_walks_each_curve_up_to_its_first_miss(tmp_path, capsys):
    import benchmarks.sparsity_table as script

    def pt(p, act, bleu, kl):
        return {"deactivation_ratio": p, "activation_ratio": act, "bleu": bleu, "kl": kl, "samples": 3}
    curves = {"cor_gxo@teal": {"source": "teal", "points": [pt(0.0, 1.0, 100, 0.0), pt(0.1, 0.9, 97, 0.05),
                                                             pt(0.2, 0.8, 90, 0.2), pt(0.3, 0.7, 99, 0.01)]},
              "wina@static": {"source": "static", "points": [pt(0.0, 1.0, 100, 0.0), pt(0.1, 0.9, 80, 0.3)]}}
    res = tmp_path / "results.json"
    res.write_text(json.dumps({"curves": curves}))
    bench = tmp_path / "b.json"
    bench.write_text(json.dumps([{"kept": 1.0, "speedup": 1.0}, {"kept": 0.5, "speedup": 1.5},
                                 {"kept": 0.5, "kept_heads": 0.5, "speedup": 1.2, "per_token": "teal"}]))
    script.main([str(res), str(bench)])
    lines = capsys.readouterr().out.splitlines()
    # teal: p = 0.3 passes again after p = 0.2 failed, and is not counted; its own tagged rows give the speed
    assert lines[2] == "| cor_gxo@teal | 10% (p = 0.1) | 97 | 10% (p = 0.1) | 0.05 | 1.04× | 1.04× |"
    assert lines[3] == "| wina@static | 0% (p = 0) | 100 | 0% (p = 0) | 0 | 1.00× | 1.00× |"
    res.write_text("[1]")
    with pytest.raises(SystemExit):
        script.main([str(res)])
    assert capsys.readouterr().err.startswith("error: ")

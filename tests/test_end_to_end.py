"""The real scripts, run as a user runs them (one subprocess per step), on tiny local models and a
two-question dataset: every file of METHOD §6 with the released layout, and a sweep whose p = 0 point
reproduces the labels exactly."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import write_qa_file
from utils.labelset import run_id_of

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
METRICS = ["magnitude", "gradient", "gxo", "snip", "cor_gxo", "ig", "wina"]
RATIOS = [k / 10 for k in range(10)]
# (folder, kind, component) of every score file the scripts write
SCORE_FILES = [("magnitude", "magnitude", c) for c in ("attention", "mlp")] + \
              [("ig", k, c) for k in ("gradient", "gxo", "ig", "grad_norm") for c in ("attention", "mlp")]


def run_script(script: str, *args) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, script, *map(str, args)], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"{script} {args} exited {proc.returncode}:\n{proc.stderr[-4000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    return proc


# llama: the prompt format from the tokenizer (its chat template), --dataset passed to every step;
# phi: --prompt_format phi, later steps take dataset and settings from labels.json (only --result_dir)
CASES = {"llama": {"prompt_format": None, "expect_format": "chat", "dataset_every_step": True},
         "phi": {"prompt_format": "phi", "expect_format": "phi", "dataset_every_step": False}}


@pytest.fixture(scope="module", params=sorted(CASES))
def pipeline(request, tiny_model_dirs, tmp_path_factory):
    """One full pipeline run per architecture, shared by the assertions below."""
    arch = request.param
    case = CASES[arch]
    tmp = tmp_path_factory.mktemp(f"e2e_{arch}")
    data = write_qa_file(tmp / "qa.jsonl")
    result = tmp / "result"
    model_dir = tiny_model_dirs[arch]
    where = ["--dataset", data, "--result_dir", result, "--device", "cpu"]
    later = where if case["dataset_every_step"] else ["--result_dir", result, "--device", "cpu"]
    fmt = ["--prompt_format", case["prompt_format"]] if case["prompt_format"] else []
    run_script("folder_creation.py", "--dataset", data, "--result_dir", result)
    for folder in ("ig", "magnitude", "res/both"):
        assert (result / folder).is_dir()
    run_script("label_generation.py", "--model_name", model_dir, "--num_data", 2, *fmt, *where)
    run_script("Mag_attention.py", *later)
    run_script("Mag_mlp.py", *later)
    run_script("attribution_attention.py", "--metric", "gradient", "gxo", *later)
    run_script("attribution_attention.py", "--metric", "ig", "--n_steps", 2, *later)
    sweep = run_script("main.py", *later)
    config = json.loads((model_dir / "config.json").read_text())
    labels = json.loads((result / "labels.json").read_text())
    return SimpleNamespace(arch=arch, case=case, data=data, result=result, model_dir=model_dir, labels=labels,
                           sweep_stdout=sweep.stdout, L=config["num_hidden_layers"],
                           H=config["num_attention_heads"], I=config["intermediate_size"],
                           res=result / "res" / "both")


@pytest.fixture(scope="module")
def tokenizers(tiny_model_dirs):
    from transformers import AutoTokenizer
    return {arch: AutoTokenizer.from_pretrained(str(path)) for arch, path in tiny_model_dirs.items()}


def test_labels_json(pipeline, tokenizers):
    lab = pipeline.labels
    tok = tokenizers[pipeline.arch]
    assert len(lab["labels"]) == 2 and len(lab["label_token_ids"]) == 2
    assert lab["questions"] == ["What colour is the sky on a clear day?", "How many legs does a spider have?"]
    # the second row has no best_answer: its first correct answer is the reference
    assert lab["references"] == ["The sky is blue on a clear day", "Spiders have eight legs"]
    for text, ids, ref in zip(lab["labels"], lab["label_token_ids"], lab["references"]):
        assert ids and all(isinstance(t, int) for t in ids)
        assert len(ids) <= len(tok(ref, add_special_tokens=False)["input_ids"])  # budget = reference length
        assert text == tok.decode(ids, skip_special_tokens=True)
    s = lab["settings"]
    assert s["model"] == str(pipeline.model_dir)
    assert s["dataset"] == str(pipeline.data)
    assert (s["num_data"], s["dtype"], s["seed"]) == (2, "float32", 0)
    assert s["prompt_format"] == pipeline.case["expect_format"]
    assert lab["run_id"] == run_id_of(s, lab["label_token_ids"])
    prompt = tok.decode(lab["prompt_token_ids"][0])
    if pipeline.case["expect_format"] == "phi":
        assert prompt == "Instruct: What colour is the sky on a clear day?\nOutput:"
    else:
        assert "What colour is the sky on a clear day?" in prompt and not prompt.startswith("Instruct:")
        assert prompt == tok.apply_chat_template([{"role": "user", "content": lab["questions"][0]}],
                                                 add_generation_prompt=True, tokenize=False)


@pytest.mark.parametrize("folder,kind,comp", SCORE_FILES, ids=[f"{k}_{c}" for _, k, c in SCORE_FILES])
def test_score_file_layout(pipeline, folder, kind, comp):
    path = pipeline.result / folder / f"{kind}_{comp}_list.pt"
    tensors = torch.load(path, weights_only=True)
    assert type(tensors) is list and len(tensors) == 2
    units = pipeline.H if comp == "attention" else pipeline.I
    for t, ids in zip(tensors, pipeline.labels["label_token_ids"]):
        want = (len(ids), pipeline.L) if kind == "grad_norm" else (len(ids), pipeline.L, units)
        assert isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.device.type == "cpu"
        assert tuple(t.shape) == want
        assert torch.isfinite(t).all()
        if kind in ("magnitude", "grad_norm"):
            assert (t >= 0).all() and (t > 0).any()
        else:
            assert (t != 0).any()
    meta = json.loads((path.parent / f"{kind}_{comp}_list.meta.json").read_text())
    assert meta["run_id"] == pipeline.labels["run_id"]
    assert (meta["kind"], meta["component"], meta["num_samples"]) == (kind, comp, 2)
    assert meta["n_steps"] == (2 if kind == "ig" else None)


def test_sweep_outputs(pipeline):
    res = pipeline.res
    for name in ("results.json", "results.csv", "tradeoff.png", "tradeoff.pdf"):
        assert (res / name).stat().st_size > 0, name
    assert (res / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (res / "tradeoff.pdf").read_bytes()[:5] == b"%PDF-"
    results = json.loads((res / "results.json").read_text())
    assert list(results["curves"]) == METRICS
    for metric in METRICS:
        per = json.loads((res / f"{metric}.json").read_text())
        assert per["metric"] == metric and per["source"] == "oracle"
        assert per["points"] == results["curves"][metric]["points"]
    rows = (res / "results.csv").read_text().strip().splitlines()
    assert rows[0] == ("metric,source,deactivation_ratio,activation_ratio,bleu,token_agreement,kl,ppl,samples,"
                       "bleu_ci_low,bleu_ci_high,token_agreement_ci_low,token_agreement_ci_high,kl_ci_low,kl_ci_high,"
                       "ppl_ci_low,ppl_ci_high")
    assert all(r.split(",")[1] == "oracle" for r in rows[1:])
    assert len(rows) == 1 + len(METRICS) * len(RATIOS)
    s = results["settings"]
    assert s["labels_run_id"] == pipeline.labels["run_id"] and s["num_data"] == 2
    assert (s["layers"], s["heads"], s["neurons"]) == (pipeline.L, pipeline.H, pipeline.I)
    assert s["ratios"] == RATIOS and s["mask_layers"] == "all" and s["cor_gxo_variant"] == "paper"
    for metric in METRICS:
        assert f"\n{metric} " in "\n" + pipeline.sweep_stdout  # one table row per metric


def test_sweep_curves(pipeline):
    results = json.loads((pipeline.res / "results.json").read_text())
    masked_steps = sum(len(ids) - 1 for ids in pipeline.labels["label_token_ids"])
    assert masked_steps > 0  # otherwise nothing below is masked
    for metric, curve in results["curves"].items():
        pts = curve["points"]
        assert curve["samples"] == 2 and len(pts) == 10
        assert [p["deactivation_ratio"] for p in pts] == RATIOS
        assert all(p["samples"] == 2 for p in pts)
        assert pts[0]["activation_ratio"] == 1.0, metric
        assert pts[0]["bleu"] == pytest.approx(100.0), metric
        assert pts[0]["token_agreement"] == 1.0, metric
        assert pts[0]["kl"] == pytest.approx(0.0, abs=1e-6), metric     # p = 0 is the dense model
        assert all(p["kl"] >= -1e-6 and p["ppl"] >= 1.0 for p in pts)
        assert pts[-1]["kl"] > pts[0]["kl"], metric                     # p = 0.9 moves the distribution
        acts = [p["activation_ratio"] for p in pts]
        assert all(a >= b for a, b in zip(acts, acts[1:])), (metric, acts)
        assert acts[-1] < 0.5, (metric, acts)  # p = 0.9 removes most units of the masked steps
        assert all(0.0 <= p["bleu"] <= 100.0 + 1e-9 for p in pts)
    dense_ppl = {curve["points"][0]["ppl"] for curve in results["curves"].values()}
    assert max(dense_ppl) == pytest.approx(min(dense_ppl), rel=1e-6)   # every p = 0 point is the dense model
    # p = 0 regenerates each label exactly, for every metric and sample
    per_sample = json.loads((pipeline.res / "per_sample.json").read_text())
    dense = [r for r in per_sample if r["ratio"] == 0.0]
    assert len(dense) == len(METRICS) * 2
    assert all(r["output"] == pipeline.labels["labels"][r["sample"]] for r in dense)


def test_no_partial_files_left(pipeline):
    leftovers = []
    for folder, dirs, files in os.walk(pipeline.result):
        leftovers += [os.path.join(folder, d) for d in dirs if d.endswith(".parts")]
        leftovers += [os.path.join(folder, f) for f in files if f.endswith(".tmp")]
    assert leftovers == []


def test_offline_default_labels_one_sample(tmp_path, offline_tokenizer):
    from utils.data import load_samples

    result = tmp_path / "result"
    run_script("label_generation.py", "--model_name", "smollm2-135m-instruct", "--dataset", "truthfulqa-offline",
               "--num_data", 1, "--result_dir", result, "--device", "cpu")
    lab = json.loads((result / "labels.json").read_text())
    sample = load_samples("truthfulqa-offline", 1)[0]
    assert lab["questions"] == [sample.question] and lab["references"] == [sample.reference]
    assert len(lab["labels"]) == 1 and lab["labels"][0].strip()
    ids = lab["label_token_ids"][0]
    budget = len(offline_tokenizer(sample.reference, add_special_tokens=False)["input_ids"])
    assert 1 <= len(ids) <= budget
    assert lab["labels"][0] == offline_tokenizer.decode(ids, skip_special_tokens=True)
    s = lab["settings"]
    assert (s["model"], s["dataset"], s["num_data"], s["prompt_format"]) == \
        ("smollm2-135m-instruct", "truthfulqa-offline", 1, "chat")
    assert not any(p.name.endswith(".parts") for p in result.iterdir())


def test_step_batched_attribution_writes_the_same_scores(pipeline, tmp_path):
    """--step_mode batched (the GPU path, forced here on the CPU) writes the same files as cached."""
    import shutil
    copy = tmp_path / "result"
    shutil.copytree(pipeline.result, copy)
    run_script("attribution_attention.py", "--metric", "gradient", "gxo", "--step_mode", "batched",
               "--batch_size", 3, "--result_dir", copy, "--device", "cpu")
    for kind in ("gradient", "gxo", "grad_norm"):
        for comp in ("attention", "mlp"):
            a = torch.load(pipeline.result / "ig" / f"{kind}_{comp}_list.pt")
            b = torch.load(copy / "ig" / f"{kind}_{comp}_list.pt")
            assert len(a) == len(b) == 2
            for x, y in zip(a, b):
                # the suite's tolerance: 1e-4 relative to the largest score (as in test_attribution.py)
                torch.testing.assert_close(y, x, rtol=0, atol=1e-4 * x.abs().max().item())


# -- mask sources, stale files, refusals and the done check (main.py in this process: the model is cached) ----

def sweep_in_process(capsys, *args) -> tuple[int, str]:
    """Run main.py's ``main`` here; returns (exit status, stderr)."""
    import main as sweep_main
    capsys.readouterr()
    try:
        sweep_main.main([str(a) for a in args])
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


@pytest.fixture
def llama_copy(pipeline, tmp_path):
    """A private copy of the Llama pipeline's folder (one architecture is enough here: the sources'
    numerics are tested per architecture in test_sources.py and test_quality.py)."""
    import shutil
    if pipeline.arch != "llama":
        pytest.skip("sweep bookkeeping: one architecture")
    dst = tmp_path / "result"
    shutil.copytree(pipeline.result, dst)
    return dst


def test_sweep_with_every_source(pipeline, llama_copy, capsys):
    from main import parse as parse_sweep
    from utils.paths import ResultPaths
    from utils.sweep_results import sweep_done

    res = llama_copy / "res" / "both"
    ratios = [0.0, 0.5, 0.9]     # three ratios keep the 21 curves' batch small
    argv = ["--source", "all", "--num_data", 1, "--calib_num_data", 1, "--plot_metric", "bleu", "kl",
            "--ratios", *ratios, "--result_dir", llama_copy, "--device", "cpu"]
    code, err = sweep_in_process(capsys, *argv)
    assert code == 0, err
    results = json.loads((res / "results.json").read_text())
    keys = METRICS + [f"{m}@prompt" for m in METRICS] + [f"{m}@static" for m in METRICS]
    keys += [f"{m}@{src}" for src in ("online", "teal") for m in ("magnitude", "wina")]   # no predictor trained
    assert list(results["curves"]) == keys
    for key, curve in results["curves"].items():
        metric, _, source = key.partition("@")
        assert (curve["metric"], curve["source"], curve["samples"]) == (metric, source or "oracle", 1)
        per = json.loads((res / f"{key}.json").read_text())
        assert per["points"] == curve["points"] and per["source"] == curve["source"]
        p0 = curve["points"][0]
        assert (p0["bleu"], p0["activation_ratio"]) == (pytest.approx(100.0), 1.0), key
        assert p0["kl"] == pytest.approx(0.0, abs=1e-6), key
    assert results["settings"]["calibration_samples"] == [1, 1]
    assert results["settings"]["sources"] == ["oracle", "prompt", "static", "online", "predictor", "teal"]
    for name in ("tradeoff.png", "tradeoff.pdf", "tradeoff_kl.png", "tradeoff_kl.pdf"):
        assert (res / name).stat().st_size > 0
    csv_rows = (res / "results.csv").read_text().strip().splitlines()
    assert len(csv_rows) == 1 + len(keys) * len(ratios)
    assert {r.split(",")[1] for r in csv_rows[1:]} == {"oracle", "prompt", "static", "online", "teal"}
    # the oracle rows are today's: the same outputs and weights as the pipeline's oracle-only sweep
    rows = json.loads((res / "per_sample.json").read_text())
    before = [r for r in json.loads((pipeline.res / "per_sample.json").read_text())
              if r["sample"] == 0 and r["ratio"] in ratios]
    oracle = [r for r in rows if r["source"] == "oracle"]
    assert [(r["metric"], r["ratio"], r["output"], r["kept_weight"]) for r in oracle] == \
        [(r["metric"], r["ratio"], r["output"], r["kept_weight"]) for r in before]
    # prompt and static masks are the same at every step: below p = 0 they still mask
    assert any(r["kept_weight"] < r["total_weight"] for r in rows if r["source"] == "static")

    paths = ResultPaths(llama_copy)
    run_id = pipeline.labels["run_id"]
    assert sweep_done(paths, run_id, parse_sweep([str(a) for a in argv])[1])
    assert not sweep_done(paths, run_id, parse_sweep([str(a) for a in argv] + ["--ratios", "0.0", "0.5"])[1])
    assert not sweep_done(paths, run_id, parse_sweep([str(a) for a in argv] + ["--plot_metric", "bleu"])[1])
    assert not sweep_done(paths, "another-run", parse_sweep([str(a) for a in argv])[1])
    gxo = paths.score("gxo", "mlp")
    kept = gxo.read_bytes()
    gxo.write_bytes(kept)                        # rewritten with the same bytes: the sweep read this content
    assert sweep_done(paths, run_id, parse_sweep([str(a) for a in argv])[1])
    torch.save([t * 2 for t in torch.load(gxo)], gxo)    # other content since the sweep: its results are stale
    assert not sweep_done(paths, run_id, parse_sweep([str(a) for a in argv])[1])
    gxo.write_bytes(kept)

    # a later sweep with fewer metrics and sources replaces the results: nothing stale stays beside them
    (res / "notes.txt").write_text("mine")
    code, err = sweep_in_process(capsys, "--metric_name", "gxo", "--ratios", 0.0, 0.5, "--result_dir", llama_copy,
                                 "--device", "cpu")
    assert code == 0, err
    assert list(json.loads((res / "results.json").read_text())["curves"]) == ["gxo"]
    assert sorted(p.name for p in res.iterdir()) == ["gxo.json", "notes.txt", "per_sample.json", "results.csv",
                                                     "results.json", "tradeoff.pdf", "tradeoff.png"]
    assert {r["metric"] for r in json.loads((res / "per_sample.json").read_text())} == {"gxo"}


def _snip_again(comp, s, head_dim, variant):
    return s["gxo"].abs()


def test_a_metric_declared_once_is_swept(pipeline, llama_copy, capsys):
    """One registry declaration is all a metric that ranks from existing files needs: a copy of snip is
    swept (oracle and prompt), written and plotted, and its rows are snip's."""
    from utils.metric_registry import Metric, register_metric, unregister_metric

    register_metric(Metric("snip_again", ("gxo",), _snip_again, "SNIP again", "tab:olive", "*"))
    try:
        code, err = sweep_in_process(capsys, "--metric_name", "snip_again", "gxo", "--source", "oracle", "prompt",
                                     "--ratios", 0.0, 0.5, "--result_dir", llama_copy, "--device", "cpu")
    finally:
        unregister_metric("snip_again")
    assert code == 0, err
    res = llama_copy / "res" / "both"
    results = json.loads((res / "results.json").read_text())
    assert list(results["curves"]) == ["snip_again", "gxo", "snip_again@prompt", "gxo@prompt"]
    assert (res / "snip_again@prompt.json").is_file() and (res / "tradeoff.png").stat().st_size > 0
    rows = json.loads((res / "per_sample.json").read_text())
    before = [r for r in json.loads((pipeline.res / "per_sample.json").read_text())
              if r["metric"] == "snip" and r["ratio"] in (0.0, 0.5)]
    again = [r for r in rows if r["metric"] == "snip_again" and r["source"] == "oracle"]
    assert [(r["sample"], r["ratio"], r["output"], r["kept_weight"]) for r in again] == \
        [(r["sample"], r["ratio"], r["output"], r["kept_weight"]) for r in before]


def test_metric_all_skips_missing_files_only(pipeline, llama_copy, capsys):
    from main import parse as parse_sweep
    from utils.paths import ResultPaths
    from utils.sweep_results import sweep_done

    where = ["--result_dir", llama_copy, "--device", "cpu", "--ratios", 0.0, 0.5]
    ig = llama_copy / "ig"
    for name in ("ig_attention_list.pt", "ig_attention_list.meta.json"):
        (ig / name).rename(llama_copy / name)       # IG not computed (yet)
    code, err = sweep_in_process(capsys, *where)
    assert code == 0, err
    assert f"note: skipping ig: {ig / 'ig_attention_list.pt'} is missing" in err
    curves = json.loads((llama_copy / "res" / "both" / "results.json").read_text())["curves"]
    assert list(curves) == [m for m in METRICS if m != "ig"]
    paths, run_id = ResultPaths(llama_copy), pipeline.labels["run_id"]
    assert sweep_done(paths, run_id, parse_sweep([str(a) for a in where])[1])
    for name in ("ig_attention_list.pt", "ig_attention_list.meta.json"):
        (llama_copy / name).rename(ig / name)       # IG arrives: the sweep is no longer complete
    assert not sweep_done(paths, run_id, parse_sweep([str(a) for a in where])[1])

    path = ig / "gxo_attention_list.pt"             # a damaged file is an error naming it, not a skip
    tensors = torch.load(path, weights_only=True)
    tensors[0][0, 0, 1] = float("nan")
    torch.save(tensors, path)
    code, err = sweep_in_process(capsys, *where)
    assert code == 2                                # changed after it was written: its meta's sha256 tells
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"error: {path} is not the file its gxo_attention_list.meta.json describes (2 samples")
    assert last.endswith("it was replaced or changed after it was written; rerun attribution_attention.py --metric gxo")


@pytest.mark.parametrize("args,expected", [
    (["--mask_layers", "1-0"], "error: --mask_layers '1-0': the range 1-0 is empty; write it low-high, e.g. 0-1"),
    (["--mask_layers", "0,1,1"], "error: --mask_layers '0,1,1' names layer 1 more than once; name each layer once"),
    (["--ratios", "0.1", "0.5", "0.1"], "error: --ratios repeats 0.1; give each ratio once"),
    (["--ratios", "0.5", "1.0"], "error: deactivation ratio 1.0 is outside [0, 1)"),
    (["--source", "label"], "error: unknown --source label; choose from oracle, prompt, static, online, predictor, "
                            "teal or all"),
    (["--calib_num_data", "3"], "error: --calib_num_data only applies to --source static or predictor or teal; drop "
                                "it or add static or predictor or teal"),
    (["--metric_name", "gxo", "gxo"], "error: --metric_name repeats gxo; give each metric once"),
], ids=["layers-reversed", "layers-twice", "ratio-twice", "ratio-one", "source", "calib", "metric-twice"])
def test_sweep_refuses(pipeline, llama_copy, capsys, args, expected):
    code, err = sweep_in_process(capsys, *args, "--result_dir", llama_copy, "--device", "cpu")
    assert (code, err.strip()) == (2, expected)
    assert not (llama_copy / "res" / "both" / ".sweep.parts").exists()


def test_static_needs_disjoint_calibration_samples(pipeline, llama_copy, capsys):
    code, err = sweep_in_process(capsys, "--source", "static", "--metric_name", "gxo", "--result_dir", llama_copy,
                                 "--device", "cpu")
    assert code == 2
    assert err.strip() == (f"error: --source static calibrates on samples 2..101 (after the 2 evaluated: --num_data 2, "
                           f"--calib_num_data 100), but {llama_copy / 'labels.json'} holds 2; give --num_data N with "
                           "N + 100 <= 2, lower --calib_num_data, or rerun label_generation.py --num_data 102 and the "
                           "score steps")


@pytest.mark.parametrize("budget", [None, 1], ids=["together", "memory-split"])
def test_sweep_of_several_samples_at_once_writes_the_same_rows(pipeline, tmp_path, capsys, monkeypatch, budget):
    """--sample_batch 2 (both samples decoded in one padded batch, the GPU default) writes every row the
    one-sample-at-a-time sweep of the pipeline wrote: outputs, BLEU, KL, perplexity, kept weights; so
    does a memory budget too small for two samples' caches (each decoded alone)."""
    import shutil

    import utils.sweep
    monkeypatch.setattr(utils.sweep, "decode_memory_budget", lambda device: budget)
    copy = tmp_path / "result"
    shutil.copytree(pipeline.result, copy)
    code, err = sweep_in_process(capsys, "--result_dir", copy, "--device", "cpu", "--sample_batch", 2)
    assert code == 0, err
    want = json.loads((pipeline.res / "per_sample.json").read_text())
    got = json.loads((copy / "res" / "both" / "per_sample.json").read_text())
    assert len(got) == len(want) == 2 * len(METRICS) * len(RATIOS)
    assert got == want

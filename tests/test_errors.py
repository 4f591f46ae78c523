"""Bad inputs: one clear line that says what is wrong and how to fix it, exit code 2, no traceback, and
nothing half-written.  Scripts run as subprocesses where the command line is what is tested; the library's
checks are also called directly (faster) with their exact messages."""
from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
import torch

from conftest import fails, files_under, in_process, snapshot, write_qa_file
from utils.errors import PipelineError

OFFLINE_HINT = "--model_name smollm2-135m-instruct"


# -- model and dataset names (label_generation.py) ------------------------------------------------------

def test_unknown_local_model_folder(tmp_path, qa_file):
    nope, result = tmp_path / "nope", tmp_path / "result"
    msg = fails("label_generation.py", "--model_name", nope, "--dataset", qa_file, "--num_data", 1,
                "--result_dir", result, "--device", "cpu")
    assert msg == f"error: model folder {nope} does not exist; check the path, or use the offline default: {OFFLINE_HINT}"
    assert files_under(result) == []


def test_unknown_hub_model_offline(tmp_path, qa_file):
    result = tmp_path / "result"
    msg = fails("label_generation.py", "--model_name", "no-such-org/no-such-model", "--dataset", qa_file,
                "--num_data", 1, "--result_dir", result, "--device", "cpu")
    assert msg.startswith("error: could not load model 'no-such-org/no-such-model' as a Hugging Face hub id (")
    assert "HF_HUB_OFFLINE=1 is set; unset it to download, or use the offline default: " + OFFLINE_HINT in msg
    assert files_under(result) == []


def test_unknown_hub_model_without_a_network_fails_at_once(tmp_path, qa_file, monkeypatch):
    """HF_HUB_OFFLINE unset but no hub to reach (an endpoint on a closed local port): one line at once,
    naming the offline models, instead of a minute of the hub client's retries."""
    import time

    from utils.models import hub_reachable

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert not hub_reachable()
    result = tmp_path / "result"
    start = time.perf_counter()
    with pytest.raises(SystemExit) as exc:
        in_process("label_generation", "--model_name", "no-such-org/no-such-model", "--dataset", qa_file,
                   "--num_data", 1, "--result_dir", result, "--device", "cpu")
    assert exc.value.code == 2 and time.perf_counter() - start < 10
    assert files_under(result) == []


def test_hub_probe_message(monkeypatch):
    from utils import models
    from utils.errors import PipelineError

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(models, "hub_reachable", lambda: False)
    with pytest.raises(PipelineError) as err:
        models._load_kwargs("no-such-org/no-such-model")
    assert str(err.value) == ("'no-such-org/no-such-model' is no local folder and no offline model name "
                              "(smollm2-135m-instruct, gemma3-270m), and the Hugging Face hub (https://huggingface.co) "
                              "cannot be reached; give a local folder or .gguf file, use the offline default "
                              "--model_name smollm2-135m-instruct, or connect to the network")
    monkeypatch.setattr(models, "hub_reachable", lambda: True)
    assert models._load_kwargs("no-such-org/no-such-model") == ("no-such-org/no-such-model", {})


def _no_question(tmp):
    (tmp / "noq.jsonl").write_text(json.dumps({"prompt": "What is 2+2?", "best_answer": "Four"}) + "\n")
    return tmp / "noq.jsonl", [f"{tmp / 'noq.jsonl'}, row 0 has no 'question' text",
                               "every row needs a 'question' column"]


def _no_answer(tmp):
    (tmp / "noa.jsonl").write_text(json.dumps({"question": "What is 2+2?", "comment": "Four"}) + "\n")
    return tmp / "noa.jsonl", [f"{tmp / 'noa.jsonl'}, row 0 has no 'best_answer' and no non-empty list of answers",
                               "(correct_answers, answer, answers); add one of those columns"]


def _unknown(tmp):
    return "no-such-dataset", ["unknown dataset 'no-such-dataset': use truthfulqa, truthfulqa-offline, "
                               "or the path of a .json/.jsonl/.csv file"]


@pytest.mark.parametrize("make", [_unknown, _no_question, _no_answer], ids=["unknown", "no_question", "no_answer"])
def test_bad_dataset(make, tmp_path, tiny_model_dirs):
    dataset, fragments = make(tmp_path)
    result = tmp_path / "result"
    msg = fails("label_generation.py", "--model_name", tiny_model_dirs["llama"], "--dataset", dataset,
                "--num_data", 1, "--result_dir", result, "--device", "cpu")
    for fragment in fragments:
        assert fragment in msg
    assert files_under(result) == []


def test_num_data_larger_than_dataset(tmp_path, qa_file, tiny_model_dirs):
    result = tmp_path / "result"
    msg = fails("label_generation.py", "--model_name", tiny_model_dirs["llama"], "--dataset", qa_file,
                "--num_data", 5, "--result_dir", result, "--device", "cpu")
    assert msg == (f"error: --num_data 5 is larger than the dataset (3 samples in {qa_file}); "
                   "use --num_data 3 or less")
    assert files_under(result) == []


# -- steps run out of order ------------------------------------------------------------------------------

@pytest.mark.parametrize("script", ["Mag_attention.py", "attribution_attention.py", "main.py"])
def test_step_before_labels(script, tmp_path, qa_file):
    result = tmp_path / "result"
    msg = fails(script, "--dataset", qa_file, "--result_dir", result, "--device", "cpu")
    assert msg == (f"error: no labels at {result / 'labels.json'}: run label_generation.py first "
                   "(with the same --dataset / --result_dir)")
    assert files_under(result) == []


def test_sweep_before_attribution(run_copy):
    result, where = run_copy
    before = snapshot(result)
    msg = fails("main.py", "--metric_name", "gxo", *where)
    assert msg == f"error: missing {result / 'ig' / 'gxo_attention_list.pt'}: run attribution_attention.py --metric gxo first"
    assert snapshot(result) == before  # no results.json, no figure


# -- bad flags ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("script,args,expected", [
    ("attribution_attention.py", ["--metric", "gxo", "shap"], "error: unknown --metric shap; choose from gradient, gxo, ig"),
    ("attribution_attention.py", ["--metric", "ig", "--n_steps", "0"], "error: --n_steps must be at least 1 (got 0)"),
    ("main.py", ["--metric_name", "gxo", "random"],
     "error: unknown --metric_name random; choose from magnitude, gradient, gxo, snip, cor_gxo, ig, wina or all"),
    ("main.py", ["--mask_layers", "first-ten"], "error: cannot read --mask_layers 'first-ten'; write e.g. 0-23 or 0,2,5-7"),
    ("attribution_attention.py", ["--metric", "ig", "--step_mode", "batched"],
     "error: --step_mode batched does not run integrated gradients; use auto or cached for ig"),
], ids=["metric", "n_steps", "metric_name", "mask_layers", "step_mode"])
def test_bad_flag(script, args, expected, run_copy):
    result, where = run_copy
    before = snapshot(result)
    assert fails(script, *args, *where) == expected
    assert snapshot(result) == before


def test_flag_contradicting_labels(run_copy, scored, tiny_model_dirs, tmp_path):
    result, _ = run_copy
    labels = result / "labels.json"
    before = snapshot(result)
    base = ["--result_dir", result, "--device", "cpu"]
    msg = fails("Mag_attention.py", "--dtype", "bfloat16", *base)
    assert msg == (f"error: --dtype bfloat16 differs from the run that made {labels} (dtype = float32); drop the "
                   "flag to use the labels' setting, or rerun label_generation.py with it")
    msg = fails("attribution_attention.py", "--model_name", tiny_model_dirs["phi"], *base)
    assert msg.startswith(f"error: --model_name {tiny_model_dirs['phi']} differs from the run that made {labels} "
                          f"(model = {scored.model_dir}); drop the flag")
    msg = fails("Mag_mlp.py", "--dataset", "truthfulqa-offline", *base)      # a named dataset: by name
    assert msg.startswith(f"error: --dataset truthfulqa-offline differs from the run that made {labels} (dataset = "
                          f"{scored.data})")
    other = write_qa_file(tmp_path / "other.jsonl")                          # a file: by its samples' content
    other.write_text(other.read_text().replace("blue", "grey"))
    msg = fails("Mag_mlp.py", "--dataset", other, *base)
    assert msg.startswith(f"error: --dataset {other} does not hold the samples {labels} was made from")
    assert snapshot(result) == before


def test_num_data_larger_than_labels(run_copy):
    result, where = run_copy
    msg = fails("Mag_attention.py", "--num_data", 3, *where)
    assert msg == (f"error: --num_data 3, but {result / 'labels.json'} holds 2 samples; "
                   "rerun label_generation.py --num_data 3")


# -- score files that do not belong to the labels or the model ---------------------------------------------

def meta_claims(path):
    """Record ``path``'s present bytes in its meta: a file its meta describes, to reach the checks behind the
    content hash (a file changed behind its meta's back: tests/test_fingerprints.py)."""
    from utils.fingerprint import hash_file
    from utils.provenance import meta_path

    meta = json.loads(meta_path(path).read_text())
    meta_path(path).write_text(json.dumps({**meta, "sha256": hash_file(path)}))


def test_scores_with_wrong_shape(run_copy, scored):
    result, where = run_copy
    path = result / "magnitude" / "magnitude_attention_list.pt"
    T = [len(ids) for ids in scored.labels["label_token_ids"]]
    torch.save([torch.ones(t, 2, 5) for t in T], path)  # 5 heads: the tiny Llama has 4; meta.json kept
    meta_claims(path)
    before = snapshot(result)
    msg = fails("main.py", "--metric_name", "magnitude", *where)
    assert msg == (f"error: {path}: sample 0 has shape ({T[0]}, 2, 5), but this model and label need ({T[0]}, 2, 4); "
                   "the file belongs to another model: rerun Mag_attention.py")
    assert snapshot(result) == before


def test_scores_from_other_labels(run_copy, scored):
    result, where = run_copy
    in_process("label_generation", "--model_name", scored.model_dir, "--num_data", 1, *where)
    new = json.loads((result / "labels.json").read_text())
    assert new["run_id"] != scored.labels["run_id"] and len(new["labels"]) == 1
    # the old scores moved to previous_runs/ with the new labels (a copy put back by hand is refused:
    # test_load_scores_errors), so the sweep asks for the step to rerun
    msg = fails("main.py", "--metric_name", "magnitude", *where)
    path = result / "magnitude" / "magnitude_attention_list.pt"
    assert msg == f"error: missing {path}: run Mag_attention.py first"
    assert (result / "previous_runs" / scored.labels["run_id"] / "magnitude" / path.name).is_file()
    assert not (result / "res" / "both" / "results.json").exists()


def test_non_finite_scores(run_copy):
    result, where = run_copy
    path = result / "magnitude" / "magnitude_mlp_list.pt"
    tensors = torch.load(path, weights_only=True)
    tensors[1][0, 1, 3] = float("nan")
    torch.save(tensors, path)
    meta_claims(path)
    msg = fails("main.py", "--metric_name", "magnitude", *where)
    assert msg == (f"error: {path}: sample 1 holds non-finite scores; rerun Mag_mlp.py "
                   "(with --dtype float32 if it overflowed)")
    assert not (result / "res" / "both" / "results.json").exists()


# -- the library's checks, called directly -----------------------------------------------------------------

def raises(fn, *args, **kwargs) -> str:
    with pytest.raises(PipelineError) as info:
        fn(*args, **kwargs)
    return str(info.value)


def test_load_samples_errors(tmp_path, qa_file):
    from utils.data import load_samples

    assert raises(load_samples, "truthful-qa").startswith("unknown dataset 'truthful-qa': use truthfulqa, ")
    msg = raises(load_samples, str(qa_file), 4)
    assert msg == f"--num_data 4 is larger than the dataset (3 samples in {qa_file}); use --num_data 3 or less"
    csv_file = tmp_path / "qa.csv"
    csv_file.write_text("question,best_answer\nWhat is 2+2?,Four\n,Nothing\n")
    assert raises(load_samples, str(csv_file)) == (f"{csv_file}, row 1 has no 'question' text; "
                                                   "every row needs a 'question' column")
    json_file = tmp_path / "qa.json"
    json_file.write_text(json.dumps({"rows": [{"question": "Why?", "answers": []}]}))
    assert raises(load_samples, str(json_file)).startswith(f"{json_file}, row 0 has no 'best_answer' and no "
                                                          "non-empty list of answers")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"question": "Why?", \n')
    assert raises(load_samples, str(broken)).startswith(f"cannot parse {broken}: ")
    txt = tmp_path / "qa.txt"
    txt.write_text("question\n")
    assert raises(load_samples, str(txt)) == "unsupported dataset file type '.txt'; use .json, .jsonl or .csv"
    # what does load: a list of correct answers (or a ';'-separated string) stands in for best_answer
    samples = load_samples(str(qa_file), 2)
    assert [s.reference for s in samples] == ["The sky is blue on a clear day", "Spiders have eight legs"]
    csv_file.write_text("question,answers\nWhat is 2+2?,Four; 4\n")
    assert load_samples(str(csv_file))[0].reference == "Four"


def test_load_labels_errors(tmp_path):
    from utils.labelset import load_labels

    path = tmp_path / "labels.json"
    assert raises(load_labels, path) == (f"no labels at {path}: run label_generation.py first "
                                         "(with the same --dataset / --result_dir)")
    path.write_text(json.dumps({"labels": ["a"]}))
    assert raises(load_labels, path) == (f"{path} is damaged or not a labels file of this pipeline; rerun "
                                         "label_generation.py")


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["settings"].update(seed=float("nan")), "is damaged or not a labels file"),
    (lambda d: d.update(label_token_ids=[[str(t) for t in ids] for ids in d["label_token_ids"]]),
     "is damaged or not a labels file"),
    (lambda d: d["label_token_ids"][0].append(5), "was edited after it was written"),
    (lambda d: d["settings"].update(model="another/model"), "was edited after it was written"),
])
def test_labels_edited_by_hand_are_refused(run_copy, edit, message):
    """A labels.json edited by hand: damaged types are one line, and a changed label or setting no longer
    matches the run_id hashed from them (every score file is keyed by that id)."""
    from utils.labelset import load_labels

    result, _ = run_copy
    path = result / "labels.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    assert message in raises(load_labels, path)


def test_load_scores_errors(run_copy, scored, tiny_model_dirs):
    from utils.labelset import load_labels
    from utils.provenance import load_scores, meta_path

    result, where = run_copy
    labels = load_labels(result / "labels.json")
    shape = lambda T: (T, 2, 4)  # noqa: E731  (tiny Llama: 2 layers, 4 heads)
    path = result / "magnitude" / "magnitude_attention_list.pt"
    tensors = load_scores(path, labels, shape, "Mag_attention.py")
    assert [tuple(t.shape) for t in tensors] == [shape(len(ids)) for ids in labels.label_ids]

    missing = result / "ig" / "gxo_attention_list.pt"
    assert raises(load_scores, missing, labels, shape, "attribution_attention.py --metric gxo") == \
        f"missing {missing}: run attribution_attention.py --metric gxo first"
    assert raises(load_scores, path, labels, lambda T: (T, 2, 3), "Mag_attention.py").endswith(
        "but this model and label need " f"({len(labels.label_ids[0])}, 2, 3); the file belongs to another model: "
        "rerun Mag_attention.py")
    torch.save(tensors + [tensors[0]], path)  # three tensors for two labels
    assert raises(load_scores, path, labels, shape, "Mag_attention.py") == \
        f"{path} does not hold one tensor per labelled sample; rerun Mag_attention.py"
    meta_path(path).unlink()
    assert raises(load_scores, path, labels, shape, "Mag_attention.py") == \
        f"{path} has no provenance file (magnitude_attention_list.meta.json); rerun Mag_attention.py"

    # labels from another model folder: the MLP scores (with their meta) no longer belong to them; the new
    # labels move them to previous_runs/, and a copy put back by hand is still refused
    in_process("label_generation", "--model_name", tiny_model_dirs["phi"], "--num_data", 2, *where)
    phi_labels = load_labels(result / "labels.json")
    mlp = result / "magnitude" / "magnitude_mlp_list.pt"
    assert not mlp.exists() and not meta_path(mlp).exists()
    moved = result / "previous_runs" / scored.labels["run_id"] / "magnitude"
    shutil.copy(moved / mlp.name, mlp)
    shutil.copy(moved / meta_path(mlp).name, meta_path(mlp))
    msg = raises(load_scores, mlp, phi_labels, lambda T: (T, 2, 48), "Mag_mlp.py")
    assert msg == (f"{mlp} was computed from other labels (run {scored.labels['run_id']}, {tiny_model_dirs['llama']}) "
                   f"than {phi_labels.path} (run {phi_labels.run_id}, {tiny_model_dirs['phi']}); rerun Mag_mlp.py")


def test_write_scores_refuses_non_finite(tmp_path):
    from utils.provenance import meta_path, write_scores

    path = tmp_path / "gxo_attention_list.pt"
    bad = [torch.zeros(2, 2, 4), torch.tensor([[[0.0, float("inf")]]])]
    msg = raises(write_scores, path, bad, {"run_id": "x"})
    assert msg == ("non-finite scores for sample 1 in gxo_attention_list.pt; the model overflowed "
                   "(try --dtype float32) and nothing was written")
    assert list(tmp_path.iterdir()) == []
    assert not meta_path(path).exists()


def test_mask_and_layer_errors():
    from utils.masks import keep_masks, layer_selection, parse_layers, ranking

    scores = torch.arange(8.0).reshape(2, 4)
    assert raises(keep_masks, scores, [0.0, 1.0]) == "deactivation ratio 1.0 is outside [0, 1)"
    assert raises(keep_masks, scores, [-0.1]) == "deactivation ratio -0.1 is outside [0, 1)"
    assert keep_masks(scores, [0.0, 0.5]).sum(dim=(1, 2)).tolist() == [8, 4]  # the valid ratios do work
    assert raises(parse_layers, "0-a") == "cannot read --mask_layers '0-a'; write e.g. 0-23 or 0,2,5-7"
    assert parse_layers("0-2,5") == [0, 1, 2, 5]
    assert raises(layer_selection, [0, 2], 2) == "--mask_layers names layer 2, but the model has layers 0-1"
    s = {"gxo": scores, "magnitude": scores, "grad_norm": scores[..., 0], "gradient": scores}
    assert raises(ranking, "cor_gxo", "attention", s, 8, "bogus") == \
        "unknown --cor_gxo_variant 'bogus'; choose paper, released"
    assert raises(ranking, "shapley", "mlp", s, 8).startswith("unknown metric 'shapley'; choose one of magnitude, ")


def test_device_dtype_and_prompt_format_errors(monkeypatch):
    from utils.models import resolve_device, resolve_dtype
    from utils.prompts import resolve_prompt_format

    assert raises(resolve_dtype, "float8") == ("unknown --dtype 'float8'; choose one of bf16, bfloat16, float16, "
                                               "float32, float64, fp16, fp32")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert raises(resolve_device, "cuda:1") == ("--device cuda:1 asked for, but PyTorch sees no CUDA GPU; "
                                                "use --device cpu")
    no_template = SimpleNamespace(chat_template=None)
    assert raises(resolve_prompt_format, "chat", no_template) == \
        "--prompt_format chat, but this tokenizer has no chat template; use phi"
    assert raises(resolve_prompt_format, "alpaca", no_template).startswith("unknown --prompt_format 'alpaca'")


def test_check_requested(run_copy):
    from utils.labelset import load_labels
    from utils.provenance import check_requested

    result, _ = run_copy
    labels = load_labels(result / "labels.json")
    check_requested({"dtype": "fp32", "seed": 0, "model": None}, labels)  # an alias of the labels' dtype agrees
    check_requested({"dtype": "float32", "prompt_format": "chat"}, labels)
    assert raises(check_requested, {"dtype": "fp16"}, labels).startswith(
        f"--dtype float16 differs from the run that made {labels.path} (dtype = float32)")
    assert raises(check_requested, {"seed": 1}, labels).startswith(
        f"--seed 1 differs from the run that made {labels.path} (seed = 0); drop the flag")
    assert raises(check_requested, {"dtype": "half-ish"}, labels).startswith("unknown --dtype 'half-ish'")


def test_load_model_errors(tmp_path):
    from utils.models import load_model_and_tokenizer

    nope = tmp_path / "nope"
    assert raises(load_model_and_tokenizer, str(nope)) == \
        f"model folder {nope} does not exist; check the path, or use the offline default: {OFFLINE_HINT}"
    assert raises(load_model_and_tokenizer, str(tmp_path / "m.gguf")) == f"GGUF file {tmp_path / 'm.gguf'} not found"
    empty = tmp_path / "empty"
    empty.mkdir()
    msg = raises(load_model_and_tokenizer, str(empty))
    assert msg.startswith(f"could not load model '{empty}' as a local folder (") and msg.endswith(OFFLINE_HINT)

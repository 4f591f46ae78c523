"""evaluate.py (METHOD §11) on the tiny Llama of the scored run: multiple-choice accuracy through lm-eval,
log-likelihoods and perplexity against computations written out here (a plain full forward, the mask
applied by hooks of the test's own), resume, and one-line errors."""
from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import QUESTIONS, exits_2, in_process

CHOICES = ["blue", "eight legs", "Paris"]


@pytest.fixture(scope="module")
def tiny(scored):
    model = AutoModelForCausalLM.from_pretrained(scored.model_dir).eval()
    tok = AutoTokenizer.from_pretrained(scored.model_dir)
    return model, tok


def encode_pair(tok, context, choice):
    """lm-eval's rule: the context alone, and the continuation = tokens of (context + ' ' + choice) after it."""
    whole = tok(context + " " + choice, add_special_tokens=False)["input_ids"]
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    return ctx, whole[len(ctx):]


def reference_ll(model, tok, context, choice, keep=None):
    """Sum of log p(continuation token | everything before it), one full forward.  ``keep``: {"attention":
    [L, heads], "mlp": [L, neurons]} bool, zeroing those units' inputs to o_proj / down_proj at the
    positions from the context's last on (the positions whose outputs are scored)."""
    ctx, cont = encode_pair(tok, context, choice)
    ids = torch.tensor([ctx + cont])
    handles = []
    if keep is not None:
        layers = model.model.layers
        head_dim = model.config.hidden_size // model.config.num_attention_heads
        for i, layer in enumerate(layers):
            for module, mask in ((layer.self_attn.o_proj, keep["attention"][i].repeat_interleave(head_dim)),
                                 (layer.mlp.down_proj, keep["mlp"][i])):
                def hook(mod, args, mask=mask):
                    x = args[0].clone()
                    x[:, len(ctx) - 1:] = x[:, len(ctx) - 1:] * mask.to(x.dtype)
                    return (x,)
                handles.append(module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].double(), -1)
    finally:
        for h in handles:
            h.remove()
    return sum(logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont))


def task_rows(model, tok, golds="best"):
    rows = []
    for q, _ in QUESTIONS[:4]:
        ll = [reference_ll(model, tok, f"Question: {q}\nAnswer:", c) for c in CHOICES]
        best = max(range(3), key=lambda k: ll[k])
        worst = min(range(3), key=lambda k: ll[k])
        rows.append({"query": f"Question: {q}\nAnswer:", "choices": CHOICES, "gold": best if golds == "best" else worst})
    return rows


def write_rows(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def evaluate(where, *args):
    in_process("evaluate", *where, *args)
    return json.loads((where[where.index("--result_dir") + 1] / "eval" / "results.json").read_text())


def test_accuracy_is_one_when_gold_is_the_best_choice_and_drops_with_a_wrong_gold(run_copy, tiny, tmp_path):
    result, where = run_copy
    model, tok = tiny
    good = write_rows(tmp_path / "good.jsonl", task_rows(model, tok))
    rows = task_rows(model, tok)
    wrong = rows[0]["gold"]
    rows[0]["gold"] = (wrong + 1) % 3 if rows[0]["gold"] != (wrong + 1) % 3 else (wrong + 2) % 3
    bad = write_rows(tmp_path / "bad.jsonl", rows)
    res = evaluate(where, "--tasks", good, bad, "--ppl", "none", "--source", "none")
    acc = {t["task"]: t["rows"][0] for t in res["accuracy"]}
    assert acc["good"]["acc"] == 1.0 and acc["good"]["n"] == 4
    assert acc["bad"]["acc"] == 0.75
    # every row's value is kept, in row order, for paired comparisons (compare.py): row 0 is the wrong gold
    assert acc["good"]["items"]["acc"] == [1.0] * 4 and acc["bad"]["items"]["acc"] == [0.0, 1.0, 1.0, 1.0]
    assert acc["bad"]["acc_stderr"] == pytest.approx(math.sqrt(0.75 * 0.25 / 3))   # lm-eval's: sample std / sqrt(n)
    assert (result / "eval" / "results.csv").is_file() and (result / "eval" / "accuracy.png").is_file()


def test_loglikelihoods_equal_a_full_forward_dense_and_masked(scored, tiny):
    from utils.evaluation import MaskBook, Variant, harness_lm
    from utils.sites import SiteHooks

    model, tok = tiny
    hooks = SiteHooks(model)
    g = torch.Generator().manual_seed(0)
    layout = hooks.layout
    keep = {"attention": torch.rand(layout.num_layers, layout.num_heads, generator=g) > 0.4,
            "mlp": torch.rand(layout.num_layers, layout.intermediate, generator=g) > 0.4}
    book = MaskBook(model, hooks, layout, [Variant(), Variant("magnitude", "static", 0.5)])
    book._static[("magnitude", 0.5)] = keep          # a known mask in place of a calibrated one
    lm = harness_lm(model, hooks, tok, book, progress=False)
    requests = [SimpleNamespace(args=(f"Question: {q}\nAnswer:", f" {c}")) for q, _ in QUESTIONS[:2] for c in CHOICES]
    try:
        for variant, mask in ((0, None), (1, keep)):
            lm.variant = variant
            got = [ll for ll, _ in lm.loglikelihood(requests)]
            want = [reference_ll(model, tok, r.args[0], r.args[1][1:], mask) for r in requests]
            assert got == pytest.approx(want, rel=1e-5, abs=1e-5)
    finally:
        hooks.remove()


def test_perplexity_equals_a_full_forward(run_copy, tiny, tmp_path):
    result, where = run_copy
    model, tok = tiny
    texts = ["The cat sat on the mat.", "Rain is water falling from clouds over the hills.", "Hi"]
    corpus = tmp_path / "held.txt"
    corpus.write_text("\n".join(texts) + "\n\n")
    res = evaluate(where, "--tasks", "none", "--ppl", corpus, "--source", "none")
    total, count = 0.0, 0
    for t in texts:
        ids = torch.tensor([tok(t, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].double(), -1)
        total -= sum(logp[i, ids[0, i + 1]].item() for i in range(ids.shape[1] - 1))
        count += ids.shape[1] - 1
    row = res["perplexity"][0]["rows"][0]
    assert row["tokens"] == count
    assert sum(row["text_nll"]) == pytest.approx(total, rel=1e-5) and len(row["text_nll"]) == 3
    assert res["perplexity"][0]["text_tokens"] == [len(tok(t, add_special_tokens=False)["input_ids"]) - 1
                                                   for t in texts]
    assert row["ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert row["ppl_ci"][0] <= row["ppl"] <= row["ppl_ci"][1]


def test_static_and_prompt_masks_run_and_ratio_zero_is_dense(run_copy, tiny, tmp_path, capsys):
    result, where = run_copy
    model, tok = tiny
    good = write_rows(tmp_path / "good.jsonl", task_rows(model, tok)[:2])
    corpus = tmp_path / "held.txt"
    corpus.write_text("The cat sat on the mat.\nRain is water falling from clouds.\n")
    args = ["--tasks", good, "--ppl", corpus, "--source", "static", "prompt", "--metric_name", "magnitude", "wina",
            "--ratios", "0.0", "0.5", "--num_data", "1", "--calib_num_data", "1"]
    res = evaluate(where, *args)
    rows = res["accuracy"][0]["rows"]
    dense = rows[0]
    assert dense["curve"] == "dense" and len(rows) == 1 + 2 * 2 * 2
    for r in rows[1:]:
        if r["ratio"] == 0.0:
            assert r["acc"] == dense["acc"] and r["activation_ratio"] == 1.0
        else:
            assert r["activation_ratio"] < 1.0
    ppl = res["perplexity"][0]["rows"]
    assert [r["source"] for r in ppl] == [None, "static", "static", "static", "static"]   # prompt: no request
    assert ppl[1]["ppl"] == pytest.approx(ppl[0]["ppl"])
    assert res["settings"]["calibration_samples"] == [1, 1]
    # compare.py pairs two of its curves over the same rows and texts; p = 0 is the dense model exactly
    import compare
    diffs = compare.compare_eval(res, "magnitude@static", "dense", ratios=[0.0])
    assert [d["measure"] for d in diffs] == ["good:acc", "ppl:held"]
    assert all(d["difference"] == pytest.approx(0.0, abs=1e-9) and not d["separable"] for d in diffs)
    # resume: the same command reuses every saved task and corpus
    capsys.readouterr()
    saved = {p: p.stat().st_mtime_ns for p in (result / "eval").rglob("*.json") if p.parent.name in ("tasks", "ppl")}
    evaluate(where, *args)
    out = capsys.readouterr().out
    assert out.count("done already") == 2
    assert {p: p.stat().st_mtime_ns for p in saved} == saved
    # another limit is another evaluation
    evaluate(where, *args, "--limit", "1")
    assert "done already" not in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["--tasks", "nosuch"], "unknown task 'nosuch'"),
    (["--source", "oracle"], "does not apply to the evaluation"),
    (["--tasks", "none", "--ppl", "none"], "nothing to evaluate"),
    (["--ppl", "nosuch"], "unknown --ppl corpus"),
    (["--source", "none", "--calib_num_data", "3"], "only applies to --source static"),
    (["--metric_name", "cor_gxo", "--num_data", "1", "--calib_num_data", "1"], "run attribution_attention.py"),
])
def test_bad_inputs_are_one_line_errors(run_copy, capsys, extra, message):
    _, where = run_copy
    base = ["--ppl", "none"] if "--ppl" not in extra else []
    line = exits_2(capsys, "evaluate", *where, *base, *extra)
    assert message in line, line


def test_a_task_file_with_a_bad_gold_is_refused(run_copy, tmp_path, capsys):
    _, where = run_copy
    bad = write_rows(tmp_path / "bad.jsonl", [{"query": "Q?", "choices": ["a", "b"], "gold": 2}])
    line = exits_2(capsys, "evaluate", *where, "--tasks", bad, "--ppl", "none", "--source", "none")
    assert "'gold' must be the index of the right choice, 0 .. 1" in line


def test_relabelling_retires_eval_and_a_rerun_recomputes(run_copy, scored, tiny, tmp_path, capsys):
    result, where = run_copy
    model, tok = tiny
    task = write_rows(tmp_path / "good.jsonl", task_rows(model, tok)[:2])
    corpus = tmp_path / "held.txt"
    corpus.write_text("The cat sat on the mat.\nRain is water falling from clouds.\n")
    args = ["--tasks", task, "--ppl", corpus, "--source", "none"]
    evaluate(where, *args)
    old_id = scored.labels["run_id"]
    before = {p.relative_to(result): p.read_bytes() for p in (result / "eval").rglob("*") if p.is_file()}
    assert {str(p) for p in before} == {"eval/tasks/good.json", "eval/ppl/held.json", "eval/results.json",
                                        "eval/results.csv", "eval/accuracy.png", "eval/accuracy.pdf"}
    in_process("label_generation", "--model_name", scored.model_dir, "--num_data", 1, *where)   # other settings
    new_id = json.loads((result / "labels.json").read_text())["run_id"]
    assert new_id != old_id
    assert not [p for p in (result / "eval").rglob("*") if p.is_file()]
    for path, content in before.items():
        assert (result / "previous_runs" / old_id / path).read_bytes() == content
    # an old task file put back by hand is not adopted: the saved files are keyed by the labels' run
    (result / "eval" / "tasks" / "good.json").write_bytes(before[Path("eval/tasks/good.json")])
    capsys.readouterr()
    res = evaluate(where, *args)
    assert "done already" not in capsys.readouterr().out
    assert res["settings"]["labels_run_id"] == new_id
    for sub in ("tasks/good.json", "ppl/held.json"):
        assert json.loads((result / "eval" / sub).read_text())["key"]["run_id"] == new_id

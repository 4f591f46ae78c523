"""Faults and bad inputs that used to end in a traceback or a silent wrong result: damaged files, damaged
or foreign checkpoints, an edited dataset, replaced labels, bad devices and run_pipeline flags, a
non-causal model, a full disk, a read-only folder, a result folder that is a file."""
from __future__ import annotations

import errno
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ENV, QA_ROWS, ROOT, exits_2, fails, files_under, in_process, snapshot, write_qa_file
from utils.errors import PipelineError


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


# -- damaged result files: one line naming the step to rerun ---------------------------------------------

def test_truncated_score_file(run_copy):
    result, where = run_copy
    path = result / "magnitude" / "magnitude_mlp_list.pt"
    truncate(path)
    msg = fails("main.py", "--metric_name", "magnitude", *where)
    assert msg.startswith(f"error: {path} is damaged (cannot be read: ")
    assert msg.endswith("); rerun Mag_mlp.py")
    assert not (result / "res" / "both" / "results.json").exists()


def test_truncated_meta_file(run_copy):
    from utils.provenance import meta_path

    result, where = run_copy
    path = result / "magnitude" / "magnitude_attention_list.pt"
    truncate(meta_path(path))
    msg = fails("main.py", "--metric_name", "magnitude", *where)
    assert msg == f"error: {meta_path(path)} is damaged (cannot be read); rerun Mag_attention.py"


def test_truncated_labels(run_copy, capsys):
    result, where = run_copy
    truncate(result / "labels.json")
    msg = exits_2(capsys, "Mag_attention", *where)
    assert msg == (f"error: {result / 'labels.json'} is damaged or not a labels file of this pipeline; "
                   "rerun label_generation.py")


def test_scores_done_rejects_damaged_and_non_finite(run_copy, scored):
    """run_pipeline.py's done check: a damaged, non-finite, short or foreign file is not complete."""
    from utils.provenance import meta_path, scores_done

    result, _ = run_copy
    run_id = scored.labels["run_id"]
    att, mlp = (result / "magnitude" / f"magnitude_{c}_list.pt" for c in ("attention", "mlp"))
    assert scores_done(att, run_id, 2) and scores_done(mlp, run_id, 2)
    assert not scores_done(att, run_id, 1) and not scores_done(att, "another-run", 2)
    tensors = torch.load(mlp, weights_only=True)
    tensors[0][0, 0, 0] = float("nan")
    torch.save(tensors, mlp)
    assert not scores_done(mlp, run_id, 2)
    truncate(att)
    assert not scores_done(att, run_id, 2)
    shutil.copy(result / "magnitude" / "magnitude_mlp_list.pt", att)
    truncate(meta_path(att), 0.3)
    assert not scores_done(att, run_id, 2)


# -- per-sample checkpoints: adopted only with the same key, damaged ones recomputed ---------------------

def test_checkpoint_parts_carry_their_key(tmp_path, capsys):
    from utils.distributed import map_samples
    from utils.io import SampleCheckpoint

    final = tmp_path / "scores.pt"
    values = {i: torch.randn(3, 2) for i in range(4)}
    ckpt = SampleCheckpoint(final, "settings A")
    for i in range(3):
        ckpt.save(i, values[i])
    # a part written by a process with other settings (the old race), and a truncated part
    other = SampleCheckpoint(tmp_path / "other.pt", "settings B")
    other.save(1, torch.full((3, 2), 7.0))
    shutil.copy(other.dir / "000001.pt", ckpt.dir / "000001.pt")
    truncate(ckpt.dir / "000002.pt")
    capsys.readouterr()

    computed = []
    reopened = SampleCheckpoint(final, "settings A")

    def compute(i):
        computed.append(i)
        return values[i]

    out = map_samples(reopened, 4, compute)
    assert computed == [1, 2, 3]
    for i in range(4):
        torch.testing.assert_close(out[i], values[i], rtol=0, atol=0)
    err = capsys.readouterr().err
    assert f"note: discarding saved sample 1 in {ckpt.dir} (made with other settings); recomputing it" in err
    assert f"note: discarding saved sample 2 in {ckpt.dir} (damaged (" in err
    # a folder whose key differs is dropped as a whole, with a note
    SampleCheckpoint(final, "settings C")
    assert f"discarding 4 saved sample(s) in {ckpt.dir} made with other settings" in capsys.readouterr().err
    assert sorted(p.name for p in ckpt.dir.iterdir()) == ["key.txt"]


def test_grouped_samples_skip_saved_ones_and_save_each(tmp_path):
    """With a group size (the sweep decoding several samples at once), only missing samples are computed,
    in groups of at most that size and in order, and each is saved on its own: a crash after a group
    loses nothing of it."""
    from utils.distributed import map_samples
    from utils.io import SampleCheckpoint

    final = tmp_path / "rows.pt"
    values = {i: torch.full((2,), float(i)) for i in range(7)}
    ckpt = SampleCheckpoint(final, "k")
    for i in (0, 3):
        ckpt.save(i, values[i])
    groups = []

    def compute(indices):
        groups.append(list(indices))
        if len(groups) == 2:
            raise KeyboardInterrupt          # the second group dies
        return [values[i] for i in indices]

    with pytest.raises(KeyboardInterrupt):
        map_samples(SampleCheckpoint(final, "k"), 7, compute, group=3)
    assert groups == [[1, 2, 4], [5, 6]]
    groups.clear()
    out = map_samples(SampleCheckpoint(final, "k"), 7, lambda idx: groups.append(list(idx)) or [values[i] for i in idx],
                      group=3)
    assert groups == [[5, 6]]                # the first group's samples were saved one by one
    for i in range(7):
        torch.testing.assert_close(out[i], values[i], rtol=0, atol=0)


def _interrupted_labels(monkeypatch, model_dir, data, result, stop_after):
    """label_generation in this process, stopped (Ctrl-C) after ``stop_after`` samples are saved."""
    import utils.steps

    real, real_size, calls = utils.steps.greedy_labels, utils.steps.label_batch_size, []

    def flaky(*args, **kwargs):
        if len(calls) == stop_after:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args, **kwargs)

    # one sample per decoding batch, so the interruption falls between two saved samples
    monkeypatch.setattr(utils.steps, "label_batch_size", lambda model, requested=None: 1)
    monkeypatch.setattr(utils.steps, "greedy_labels", flaky)
    with pytest.raises(SystemExit) as info:
        in_process("label_generation", "--model_name", model_dir, "--dataset", data, "--num_data", 3,
                   "--result_dir", result, "--device", "cpu")
    monkeypatch.setattr(utils.steps, "greedy_labels", real)
    monkeypatch.setattr(utils.steps, "label_batch_size", real_size)
    assert info.value.code == 130
    return result / "labels.json.parts"


def test_damaged_label_part_is_recomputed(tmp_path, tiny_model_dirs, monkeypatch):
    data = write_qa_file(tmp_path / "qa.jsonl")
    straight = tmp_path / "straight"
    in_process("label_generation", "--model_name", tiny_model_dirs["phi"], "--dataset", data, "--num_data", 3,
               "--result_dir", straight, "--device", "cpu")
    parts = _interrupted_labels(monkeypatch, tiny_model_dirs["phi"], data, tmp_path / "r", stop_after=2)
    assert sorted(p.name for p in parts.glob("*.pt")) == ["000000.pt", "000001.pt"]
    truncate(parts / "000000.pt")
    proc = subprocess.run([sys.executable, "label_generation.py", "--model_name", str(tiny_model_dirs["phi"]),
                           "--dataset", str(data), "--num_data", "3", "--result_dir", str(tmp_path / "r"),
                           "--device", "cpu"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"note: discarding saved sample 0 in {parts} (damaged (" in proc.stderr
    assert json.loads((tmp_path / "r" / "labels.json").read_text()) == \
        json.loads((straight / "labels.json").read_text())
    assert not parts.exists()


def test_resumed_labels_never_mix_an_edited_dataset(tmp_path, tiny_model_dirs, monkeypatch, capsys):
    data = write_qa_file(tmp_path / "qa.jsonl")
    parts = _interrupted_labels(monkeypatch, tiny_model_dirs["llama"], data, tmp_path / "r", stop_after=2)
    assert len(list(parts.glob("*.pt"))) == 2
    edited = [dict(row, question=row["question"].replace("?", ", please?")) for row in QA_ROWS]
    data.write_text("\n".join(json.dumps(r) for r in edited) + "\n")      # same path, new content
    capsys.readouterr()
    in_process("label_generation", "--model_name", tiny_model_dirs["llama"], "--dataset", data, "--num_data", 3,
               "--result_dir", tmp_path / "r", "--device", "cpu")
    assert f"discarding 2 saved sample(s) in {parts} made with other settings" in capsys.readouterr().err
    fresh = tmp_path / "fresh"
    in_process("label_generation", "--model_name", tiny_model_dirs["llama"], "--dataset", data, "--num_data", 3,
               "--result_dir", fresh, "--device", "cpu")
    resumed, straight = (json.loads((d / "labels.json").read_text()) for d in (tmp_path / "r", fresh))
    assert resumed == straight
    assert resumed["questions"] == [r["question"] for r in edited]


def test_samples_fingerprint_is_content():
    from utils.data import Sample, samples_fingerprint

    a = [Sample("0", "Why?", "Because"), Sample("1", "How?", "So")]
    assert samples_fingerprint(a) == samples_fingerprint([Sample(s.id, s.question, s.reference) for s in a])
    assert samples_fingerprint(a) != samples_fingerprint([a[0], Sample("1", "How?", "Thus")])
    assert samples_fingerprint(a) != samples_fingerprint([a[0], Sample("2", "How?", "So")])
    assert samples_fingerprint(a) != samples_fingerprint(a[:1])


# -- labels replaced by another run: the old run's files leave the folder, said in one line ---------------

def test_new_labels_move_the_previous_runs_files(run_copy, scored, capsys):
    result, where = run_copy
    old_id = scored.labels["run_id"]
    (result / "res" / "both").mkdir(parents=True, exist_ok=True)
    (result / "res" / "both" / "results.json").write_text(json.dumps({"settings": {"labels_run_id": old_id}}))
    (result / "res" / "both" / "tradeoff.png").write_bytes(b"png")
    before = {p: p.read_bytes() for p in files_under(result)
              if p.name != ".lock" and p.name != "labels.json"}
    old_labels = (result / "labels.json").read_bytes()
    capsys.readouterr()
    in_process("label_generation", "--model_name", scored.model_dir, "--num_data", 1, *where)
    err = capsys.readouterr().err
    new = json.loads((result / "labels.json").read_text())
    assert len(new["labels"]) == 1 and new["run_id"] != old_id
    assert (f"note: {result / 'labels.json'} (run {old_id}: {scored.model_dir}, 2 samples) will be replaced "
            f"(num_data changed); its 2 score file(s) (magnitude) and the 2 sweep file(s) (curves, figures) in "
            f"{result / 'res' / 'both'} will move to {result / 'previous_runs' / old_id}/") in err
    assert f"{result / 'labels.json'} now holds run {new['run_id']}: moved {len(before) + 1} file(s)" in err
    for path, content in before.items():
        assert not path.exists()
        assert (result / "previous_runs" / old_id / path.relative_to(result)).read_bytes() == content
    # the replaced labels go with them: without them the retired files cannot be used
    assert (result / "previous_runs" / old_id / "labels.json").read_bytes() == old_labels
    # the same labels again: nothing to replace, nothing moved
    capsys.readouterr()
    in_process("label_generation", "--model_name", scored.model_dir, "--num_data", 1, *where)
    assert "note:" not in capsys.readouterr().err


def _run_files(root: Path) -> dict:
    """Every file of a result folder but the retired ones and the lock: ``{relative path: bytes}``."""
    return {str(p.relative_to(root)): p.read_bytes() for p in files_under(root)
            if p.name != ".lock" and "previous_runs" not in p.relative_to(root).parts}


def test_every_retirement_keeps_every_file(run_copy, scored, capsys):
    """Labels A -> B -> A -> B: each replaced run, labels included, lands in a folder of its own, so the
    second retirement of a run keeps what the first kept; the attribution error's folder goes with its run."""
    result, where = run_copy
    label = ["label_generation", "--model_name", scored.model_dir, *where]
    kept = {}
    for num_data in (1, 2, 1):
        (result / "attribution_error").mkdir(exist_ok=True)
        run_id = json.loads((result / "labels.json").read_text())["run_id"]
        (result / "attribution_error" / "summary.json").write_text(json.dumps({"run_id": run_id, "n": num_data}))
        (result / "attribution_error" / "scatter.png").write_bytes(f"png {num_data}".encode())
        kept.setdefault(run_id, []).append(_run_files(result))
        in_process(*label, "--num_data", num_data)
    assert "will move to" in capsys.readouterr().err
    retired = result / "previous_runs"
    folders = sorted(p.name for p in retired.iterdir())
    ids = list(kept)
    assert len(ids) == 2 and folders == sorted([ids[0], f"{ids[0]}.2", ids[1]])
    for run_id, snapshots in kept.items():
        for k, files in enumerate(snapshots):
            folder = retired / (run_id if k == 0 else f"{run_id}.{k + 1}")
            assert _run_files(folder) == files, folder


def test_retirements_of_unknown_runs_do_not_overwrite_each_other(run_copy, scored):
    from utils.paths import ResultPaths
    from utils.provenance import retire_previous_run

    result, _ = run_copy
    paths = ResultPaths(result)
    run_id = scored.labels["run_id"]
    for k in (1, 2):
        (result / "res" / "both").mkdir(parents=True, exist_ok=True)
        (result / "res" / "both" / "results.json").write_text("{damaged " + str(k))
        retire_previous_run(paths, run_id)
    retired = result / "previous_runs"
    assert sorted(p.name for p in retired.iterdir()) == ["unknown_run", "unknown_run.2"]
    assert (retired / "unknown_run" / "res" / "both" / "results.json").read_text() == "{damaged 1"
    assert (retired / "unknown_run.2" / "res" / "both" / "results.json").read_text() == "{damaged 2"


def test_a_symlinked_lock_is_refused_and_its_target_untouched(run_copy, capsys, tmp_path):
    result, where = run_copy
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    lock = result / ".lock"
    lock.unlink(missing_ok=True)
    lock.symlink_to(target)
    msg = exits_2(capsys, "Mag_attention", *where)
    assert msg == f"error: {lock} is a symbolic link, not this folder's lock file; remove it (rm) and run the same command again"
    assert target.read_text() == "keep me"


# -- flags validated before any work; devices ------------------------------------------------------------

def test_bad_devices(tmp_path, qa_file, tiny_model_dirs, monkeypatch):
    from utils.models import resolve_device

    result = tmp_path / "result"
    msg = fails("label_generation.py", "--model_name", tiny_model_dirs["llama"], "--dataset", qa_file,
                "--num_data", 1, "--result_dir", result, "--device", "gpu0")
    assert msg == "error: unknown --device 'gpu0'; use auto, cpu, cuda or cuda:N (e.g. cuda:1)"
    assert not result.exists()
    with pytest.raises(PipelineError, match=r"^--device mps: Apple GPUs \(mps\) are not supported by this "
                                            r"pipeline; use --device cpu$"):
        resolve_device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("CPU") == torch.device("cpu")
    with pytest.raises(PipelineError, match=r"^--device cuda:2, but PyTorch sees 2 CUDA GPU\(s\) \(cuda:0 to "
                                            r"cuda:1\); pick one of those$"):
        resolve_device("cuda:2")


def test_run_pipeline_dtype_checked_before_any_step(tmp_path, qa_file):
    result = tmp_path / "r"
    msg = fails("run_pipeline.py", "--dtype", "nonsense", "--dataset", qa_file, "--num_data", 2,
                "--result_dir", result, "--device", "cpu")
    assert msg.startswith("error: unknown --dtype 'nonsense'; choose one of bf16, ")
    assert not result.exists()


@pytest.mark.parametrize("flags,expected", [
    (["--n_steps", "0"], "error: --n_steps must be at least 1 (got 0)"),
    (["--batch_size", "0"], "error: --batch_size must be at least 1 (got 0); leave it out for the automatic size"),
    (["--ig_num_data", "0"], "error: --ig_num_data must be between 1 and the 2 labelled samples (got 0); leave it "
                             "out to run IG on every sample"),
    (["--ig_num_data", "3"], "error: --ig_num_data must be between 1 and the 2 labelled samples (got 3); leave it "
                             "out to run IG on every sample"),
    (["--device", "mps"], "error: --device mps: Apple GPUs (mps) are not supported by this pipeline; use --device cpu"),
    (["--num_data", "0"], "error: --num_data must be at least 1 (got 0)"),
], ids=["n_steps", "batch_size", "ig_num_data_0", "ig_num_data_big", "mps", "num_data"])
def test_run_pipeline_flags_checked_before_any_step(flags, expected, tmp_path, qa_file, capsys):
    result = tmp_path / "r"
    args = ["--dataset", qa_file, "--num_data", 2, "--result_dir", result, "--device", "cpu", *flags]
    assert exits_2(capsys, "run_pipeline", *args) == expected
    assert not result.exists()


def test_attribution_flags_checked_before_the_folder_is_touched(run_copy, capsys):
    result, where = run_copy
    (result / ".lock").unlink(missing_ok=True)
    before = snapshot(result)
    assert exits_2(capsys, "attribution_attention", "--batch_size", 0, *where) == \
        "error: --batch_size must be at least 1 (got 0); leave it out for the automatic size"
    assert exits_2(capsys, "attribution_attention", "--dtype", "fp8", *where).startswith("error: unknown --dtype 'fp8'")
    assert snapshot(result) == before and not (result / ".lock").exists()


def test_empty_dataset_advice(tmp_path):
    from utils.data import load_samples

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    for num in (None, 1):
        with pytest.raises(PipelineError) as info:
            load_samples(str(empty), num)
        assert str(info.value) == (f"{empty} holds no samples; add rows with a 'question' and a 'best_answer' "
                                   "(or a list of answers), or choose another --dataset")


def test_encoder_model_is_refused(tmp_path, qa_file, offline_tokenizer):
    """A BERT encoder loads as BertLMHeadModel through AutoModelForCausalLM but sees later tokens."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(offline_tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=48, max_position_embeddings=256)
    folder = tmp_path / "bert"
    BertForMaskedLM(cfg).save_pretrained(folder)
    offline_tokenizer.save_pretrained(folder)
    result = tmp_path / "result"
    msg = fails("label_generation.py", "--model_name", folder, "--dataset", qa_file, "--num_data", 1,
                "--result_dir", result, "--device", "cpu")
    assert msg == (f"error: model '{folder}' (BertLMHeadModel) is not a causal (left-to-right) language model: "
                   "its outputs depend on later tokens; use a decoder-only model, e.g. "
                   "--model_name smollm2-135m-instruct")
    assert not result.exists()


# -- the file system: a file where the folder should be, no permission, a full disk ----------------------

def test_result_folder_is_a_file(tmp_path, qa_file, tiny_model_dirs):
    result = tmp_path / "result"
    result.write_text("not a folder")
    msg = fails("label_generation.py", "--model_name", tiny_model_dirs["llama"], "--dataset", qa_file,
                "--num_data", 1, "--result_dir", result, "--device", "cpu")
    assert msg == (f"error: cannot create the result folder {result}: {result} or a folder above it is a file, "
                   "not a folder; choose another --result_dir")
    assert result.read_text() == "not a folder"


@pytest.mark.parametrize("code,expected", [
    (errno.ENOSPC, "no space left on the device while writing {path}; free some space and run the same "
                   "command again (finished samples are kept)"),
    (errno.EACCES, "cannot write {path} (Permission denied); make the folder writable or choose another "
                   "--result_dir"),
    (errno.EROFS, "cannot write {path} (Read-only file system); make the folder writable or choose another "
                  "--result_dir"),
], ids=["full_disk", "read_only", "read_only_fs"])
def test_file_system_faults(code, expected, run_copy, monkeypatch, capsys):
    """A write that fails (injected at the OS call: tests run as root, where permissions do not bite, and
    no disk can be filled safely) gives one line, and leaves the existing files and no temporary file."""
    import os
    import utils.io

    result, where = run_copy
    (result / "magnitude" / "magnitude_attention_list.pt").unlink()
    before = snapshot(result)
    real_mkstemp = utils.io.tempfile.mkstemp

    def failing(*args, **kwargs):
        fd, name = real_mkstemp(*args, **kwargs)
        os.close(fd)
        os.unlink(name)
        raise OSError(code, os.strerror(code), name)

    monkeypatch.setattr(utils.io.tempfile, "mkstemp", failing)
    msg = exits_2(capsys, "Mag_attention", *where)
    # the first file the step writes: its checkpoint's key
    assert msg == "error: " + expected.format(path=result / "magnitude" / ".magnitude_attention.parts" / "key.txt")
    after = snapshot(result)
    assert {k: v for k, v in after.items() if ".parts" not in k} == before
    assert not [p for p in result.rglob("*.tmp")]


def test_labels_all_empty_say_nothing_can_be_evaluated(run_copy, capsys):
    """Every evaluated label empty (the model's first token was EOS): one line before the sweep replaces
    anything, not a 'done' sweep of NaN curves."""
    from utils.labelset import run_id_of

    result, where = run_copy
    main_args = ["main", "--metric_name", "magnitude", *where]
    in_process(*main_args)
    capsys.readouterr()
    before = (result / "res" / "both" / "results.json").read_bytes()
    path = result / "labels.json"
    data = json.loads(path.read_text())
    data["labels"] = ["" for _ in data["labels"]]
    data["label_token_ids"] = [[] for _ in data["label_token_ids"]]
    data["run_id"] = run_id_of(data["settings"], data["label_token_ids"])     # a consistent (not edited) file
    path.write_text(json.dumps(data))
    msg = exits_2(capsys, *main_args)
    assert msg == (f"error: all 2 evaluated labels in {path} are empty (the model's first token was its "
                   "end-of-sequence token), so nothing can be evaluated; try another --prompt_format, model or "
                   "dataset, and rerun label_generation.py")
    assert (result / "res" / "both" / "results.json").read_bytes() == before

"""One identity per artefact (METHOD §9): the model's weights by content, score files by their bytes, resume
keys by their inputs' content, the sweep's done check by every file it wrote; over-long prompts and full
disks end in one line."""
from __future__ import annotations

import errno
import json
import os
import shutil

import pytest
import torch

import main as sweep_main
from transformers import GPT2Config, GPT2LMHeadModel

from conftest import QA_ROWS, exits_2, in_process, tiny_llama, write_questions
from utils.fingerprint import sha256_file
from utils.io import SampleCheckpoint
from utils.paths import ResultPaths
from utils.provenance import labels_done, meta_path, scores_done

SAVE = SampleCheckpoint.save


def own_model(tiny_model_dirs, tmp_path, arch="llama"):
    """A private copy of a tiny model folder (its weights get replaced)."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dirs[arch], folder)
    return folder


def replace_weights(folder, seed=7):
    """Other weights of the same architecture and shape in the same folder (what a user's copy does)."""
    config = json.loads((folder / "config.json").read_text())
    model = tiny_llama(vocab=config["vocab_size"], layers=config["num_hidden_layers"], seed=seed)
    model.generation_config.eos_token_id = json.loads((folder / "generation_config.json").read_text())["eos_token_id"]
    model.save_pretrained(folder)


def error_after_progress(capsys, module, *args) -> str:
    """Like conftest.exits_2 for a step that fails midway: its progress bars stand before the one error."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        in_process(module, *args)
    err = capsys.readouterr().err
    errors = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("error: ")]
    assert info.value.code == 2 and "Traceback" not in err and len(errors) == 1, err
    return errors[0]


def saves(monkeypatch, stop_at=None):
    """Record the saved samples; with ``stop_at``, a Ctrl-C once that sample is computed."""
    saved = []

    def save(self, index, value):
        if index == stop_at:
            raise KeyboardInterrupt
        SAVE(self, index, value)
        saved.append(index)

    monkeypatch.setattr(SampleCheckpoint, "save", save)
    return saved


# -- the fingerprint itself ---------------------------------------------------------------------------------

def test_a_remembered_hash_is_never_taken_for_a_changed_file(tmp_path):
    """Same size, modification time set back: the change time still tells, in this process and across
    processes (the persistent cache); an unwritable cache only costs the hashing."""
    f, cache = tmp_path / "w.bin", tmp_path / "cache.json"
    f.write_bytes(b"a" * 1000)
    first = sha256_file(f, persist=cache)
    assert first == __import__("hashlib").sha256(b"a" * 1000).hexdigest()
    assert json.loads(cache.read_text())[os.path.realpath(f)]["sha256"] == first
    st = os.stat(f)
    f.write_bytes(b"b" * 1000)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(f).st_size == st.st_size and os.stat(f).st_mtime_ns == st.st_mtime_ns
    second = sha256_file(f, persist=cache)
    assert second == __import__("hashlib").sha256(b"b" * 1000).hexdigest() != first
    blocked = tmp_path / "file"
    blocked.write_text("x")
    assert sha256_file(f, persist=blocked / "cache.json") == second


# -- 1. the model's weights: content, not path ---------------------------------------------------------------

def test_replaced_weights_refuse_the_later_steps(tmp_path, tiny_model_dirs, capsys):
    model = own_model(tiny_model_dirs, tmp_path)
    data = write_questions(tmp_path / "qa.jsonl", 2)
    where = ["--dataset", data, "--result_dir", tmp_path / "r", "--device", "cpu"]
    in_process("label_generation", "--model_name", model, "--num_data", 2, *where)
    labels = json.loads((tmp_path / "r" / "labels.json").read_text())
    assert len(labels["settings"]["model_sha256"]) == 64
    requested = {"model": str(model), "dataset": str(data), "num_data": 2, "dtype": "float32", "seed": 0,
                 "prompt_format": "auto"}
    assert labels_done(tmp_path / "r" / "labels.json", requested)
    replace_weights(model)
    assert not labels_done(tmp_path / "r" / "labels.json", requested)
    capsys.readouterr()
    msg = exits_2(capsys, "attribution_attention", *where)
    assert msg.startswith(f"error: the weights of {model} changed after {tmp_path / 'r' / 'labels.json'} was made")
    assert msg.endswith("rerun label_generation.py (run_pipeline.py redoes every step)")
    assert not list((tmp_path / "r" / "ig").glob("*"))               # not one sample of the new model


def test_replaced_weights_make_run_pipeline_recompute(tmp_path, tiny_model_dirs, capsys, monkeypatch):
    monkeypatch.setattr(sweep_main, "METRIC_NAME", ["magnitude"])
    monkeypatch.setattr(sweep_main, "RATIOS", [0.0, 0.5])
    model = own_model(tiny_model_dirs, tmp_path)
    data = write_questions(tmp_path / "qa.jsonl", 2)
    r = tmp_path / "r"
    argv = ["--model_name", model, "--dataset", data, "--num_data", 2, "--skip_ig", "--device", "cpu",
            "--result_dir", r]

    def skipped():
        capsys.readouterr()
        in_process("run_pipeline", *argv)
        return sum("skipped" in line for line in capsys.readouterr().out.splitlines())

    assert skipped() == 0
    old = json.loads((r / "labels.json").read_text())
    old_scores = torch.load(r / "magnitude" / "magnitude_mlp_list.pt")
    assert skipped() == 5                                 # labels, 2 magnitudes, gradient + gxo, sweep
    replace_weights(model)
    assert skipped() == 0                                 # every step again, for the new weights
    new = json.loads((r / "labels.json").read_text())
    assert new["settings"]["model_sha256"] != old["settings"]["model_sha256"] and new["run_id"] != old["run_id"]
    assert not torch.equal(torch.load(r / "magnitude" / "magnitude_mlp_list.pt")[0], old_scores[0])
    kept = r / "previous_runs" / old["run_id"]
    assert json.loads((kept / "labels.json").read_text()) == old          # the old run is kept, not lost
    assert torch.equal(torch.load(kept / "magnitude" / "magnitude_mlp_list.pt")[0], old_scores[0])
    assert json.loads((r / "res" / "both" / "results.json").read_text())["settings"]["labels_run_id"] == new["run_id"]


# -- 2. score files: their bytes, not their meta -------------------------------------------------------------

@pytest.mark.parametrize("damage", ["foreign", "short", "empty"])
def test_a_replaced_cut_or_emptied_score_file_is_refused(damage, run_copy, scored, capsys):
    result, where = run_copy
    path = result / "magnitude" / "magnitude_mlp_list.pt"
    tensors = torch.load(path)
    if damage == "foreign":       # same shape, other values: another run's file
        torch.save([t * 2 for t in tensors], path)
    elif damage == "short":       # one sample of the meta's two
        torch.save(tensors[:1], path)
    else:
        path.write_bytes(b"")
    assert not scores_done(path, scored.labels["run_id"], 2)     # run_pipeline.py recomputes it
    capsys.readouterr()
    msg = exits_2(capsys, "main", "--metric_name", "magnitude", "--ratios", "0", "0.5", *where)
    if damage == "empty":
        assert msg.startswith(f"error: {path} is damaged (cannot be read: ")
    else:
        assert msg.startswith(f"error: {path} is not the file its {meta_path(path).name} describes "
                              f"({len(tensors) - (damage == 'short')} samples, content sha256 ")
    assert msg.endswith("rerun Mag_mlp.py")
    assert not (result / "res" / "both" / "results.json").exists()


# -- 3. resume keys carry their inputs' content ------------------------------------------------------------

def copy_of(made, tmp_path, scored):
    dst = tmp_path / "run"
    shutil.copytree(made, dst)
    return dst, ["--dataset", scored.data, "--result_dir", dst, "--device", "cpu"]


@pytest.fixture(scope="module")
def ig_scored(scored, tmp_path_factory):
    """The scored run with IG (2 steps) on both samples, made once."""
    made = tmp_path_factory.mktemp("ig_scored") / "run"
    shutil.copytree(scored.result, made)
    in_process("attribution_attention", "--metric", "ig", "--n_steps", 2, "--dataset", scored.data,
               "--result_dir", made, "--device", "cpu")
    return made


@pytest.fixture
def ig_run(ig_scored, scored, tmp_path):
    """A private copy of :func:`ig_scored`: ``(result_dir, where_args)``."""
    return copy_of(ig_scored, tmp_path, scored)


@pytest.mark.parametrize("step", ["main", "attribution_error"])
def test_resuming_after_ig_was_recomputed_recomputes(step, ig_run, monkeypatch, capsys):
    result, where = ig_run
    args = {"main": ["--metric_name", "ig", "--ratios", "0", "0.5"],
            "attribution_error": ["--metric_name", "ig", "--steps", 1, "--num_units", 4]}[step]
    saves(monkeypatch, stop_at=1)
    with pytest.raises(SystemExit):
        in_process(step, *args, *where)
    monkeypatch.setattr(SampleCheckpoint, "save", SAVE)
    in_process("attribution_attention", "--metric", "ig", "--n_steps", 3, *where)    # other IG scores
    capsys.readouterr()
    saved = saves(monkeypatch)
    in_process(step, *args, *where)
    assert saved == [0, 1]                                  # sample 0 made from the old IG is not adopted
    assert "discarding 1 saved sample(s)" in capsys.readouterr().err
    now = sha256_file(result / "ig" / "ig_attention_list.pt")          # what the results say they read
    if step == "main":
        recorded = json.loads((result / "res" / "both" / "results.json").read_text())["settings"]["score_files"]
        assert recorded["ig/ig_attention_list.pt"]["sha256"] == now
    else:
        recorded = json.loads((result / "attribution_error" / "summary.json").read_text())["score_files"]
        assert recorded["ig/ig_attention_list.pt"] == now


# -- 4. the sweep is done only with every file it wrote intact ---------------------------------------------

SWEEP = ["--metric_name", "magnitude", "--ratios", "0", "0.5"]


@pytest.fixture(scope="module")
def swept(scored, tmp_path_factory):
    """The scored run with a small sweep, made once."""
    made = tmp_path_factory.mktemp("swept") / "run"
    shutil.copytree(scored.result, made)
    in_process("main", *SWEEP, "--dataset", scored.data, "--result_dir", made, "--device", "cpu")
    return made


@pytest.mark.parametrize("damage", ["per_sample_cut", "csv_cut", "png_empty", "foreign_curve", "intact"])
def test_sweep_done_checks_every_file_it_wrote(damage, swept, scored, tmp_path):
    from utils.sweep_results import sweep_done

    result, _ = copy_of(swept, tmp_path, scored)
    _, request = sweep_main.parse([*SWEEP, "--num_data", "2"])
    res = result / "res" / "both"
    if damage.endswith("_cut"):
        f = res / ("per_sample.json" if damage.startswith("per_sample") else "results.csv")
        f.write_bytes(f.read_bytes()[:-20])
    elif damage == "png_empty":
        (res / "tradeoff.png").write_bytes(b"")
    elif damage == "foreign_curve":           # the same curve of another run: other numbers
        curve = json.loads((res / "magnitude.json").read_text())
        curve["points"][1]["bleu"] += 1
        (res / "magnitude.json").write_text(json.dumps(curve))
    assert sweep_done(ResultPaths(result), scored.labels["run_id"], request) == (damage == "intact")


# -- 5. --dataset FILE given to a later step: its content, not its path ------------------------------------

def test_dataset_flag_is_checked_by_content(run_copy, scored, tmp_path, capsys):
    result, where = run_copy
    moved = tmp_path / "elsewhere.jsonl"
    shutil.copy(scored.data, moved)
    in_process("Mag_attention", *where[2:], "--dataset", moved)          # the same samples elsewhere: fine
    moved.write_text("\n".join(json.dumps({**r, "question": r["question"] + " Really?"}) for r in QA_ROWS))
    capsys.readouterr()
    msg = exits_2(capsys, "Mag_attention", *where[2:], "--dataset", moved)
    assert msg == (f"error: --dataset {moved} does not hold the samples {result / 'labels.json'} was made from (its "
                   f"first 2 samples' content differs from the run's, dataset {scored.data}); drop the flag to use "
                   "the labels' samples, or rerun label_generation.py with it")


# -- 6. prompts longer than the model's positions ------------------------------------------------------------

@pytest.fixture
def short_gpt2(tmp_path, offline_tokenizer):
    """A tiny GPT-2 with 48 positions (learned position embeddings: an index past them is an IndexError)."""
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(offline_tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=48)
    model = GPT2LMHeadModel(config).eval()
    model.generation_config.eos_token_id = offline_tokenizer.eos_token_id
    model.save_pretrained(tmp_path / "gpt2")
    offline_tokenizer.save_pretrained(tmp_path / "gpt2")
    return tmp_path / "gpt2"


def test_a_prompt_past_the_positions_is_refused_naming_the_sample(short_gpt2, tmp_path, capsys):
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"question": "Why? " * 60, "best_answer": "Because."}) + "\n")
    msg = exits_2(capsys, "label_generation", "--model_name", short_gpt2, "--dataset", data, "--num_data", 1,
                  "--result_dir", tmp_path / "r", "--device", "cpu", "--prompt_format", "base")
    assert msg.startswith("error: sample 0: its prompt is ")
    assert msg.endswith(f"but {short_gpt2} has 48 positions (prompt and answer together); use a dataset of "
                        "shorter questions or a model with more positions")
    assert not (tmp_path / "r" / "labels.json").exists()


def test_a_label_past_the_positions_is_cut_to_fit(short_gpt2, tmp_path, capsys):
    data = tmp_path / "qa.jsonl"
    data.write_text(json.dumps({"question": "Why?", "best_answer": "Because " * 60}) + "\n")
    where = ["--dataset", data, "--result_dir", tmp_path / "r", "--device", "cpu"]
    in_process("label_generation", "--model_name", short_gpt2, "--num_data", 1, "--prompt_format", "base", *where)
    labels = json.loads((tmp_path / "r" / "labels.json").read_text())
    prompt, label = labels["prompt_token_ids"][0], labels["label_token_ids"][0]
    assert len(prompt) + len(label) <= 48 and len(label) >= 1
    assert "label(s) cut to fit" in capsys.readouterr().err
    in_process("Mag_attention", *where)                       # the later steps fit too (no IndexError)
    assert torch.load(tmp_path / "r" / "magnitude" / "magnitude_attention_list.pt")[0].shape[0] == len(label)


# -- 7. a full disk: one line, nothing half-written ----------------------------------------------------------

class _Full:
    """A file whose every write fails as on a full disk."""

    def __init__(self, handle):
        self.handle = handle

    @classmethod
    def writing(cls, monkeypatch, target: str):
        """Make every write of a file named ``target`` (through utils.io's temporaries) fail."""
        import utils.io

        real_mkstemp, real_fdopen, full = utils.io.tempfile.mkstemp, utils.io.os.fdopen, set()

        def mkstemp(*args, **kwargs):
            fd, name = real_mkstemp(*args, **kwargs)
            if os.path.basename(name).startswith(f".{target}."):
                full.add(fd)
            return fd, name

        def fdopen(fd, *args, **kwargs):
            handle = real_fdopen(fd, *args, **kwargs)
            return cls(handle) if fd in full else handle

        monkeypatch.setattr(utils.io.tempfile, "mkstemp", mkstemp)
        monkeypatch.setattr(utils.io.os, "fdopen", fdopen)

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()


@pytest.mark.parametrize("where_", ["rows.json.parts/000000.pt", "scatter.png"],
                         ids=["saving_a_sample", "writing_the_figure"])
def test_full_disk_during_attribution_error(where_, ig_run, monkeypatch, capsys):
    """The disk fills while a sample is saved (torch.save) or after rows.json, at the figure: summary.json,
    written last, is not there, nor any temporary; with space again the same command finishes."""
    result, where = ig_run
    args = ["--metric_name", "ig", "--steps", 1, "--num_units", 4, *where]
    _Full.writing(monkeypatch, where_.split("/")[-1])
    msg = error_after_progress(capsys, "attribution_error", *args)
    out = result / "attribution_error"
    assert msg == (f"error: no space left on the device while writing {out / where_}; free some space and run "
                   "the same command again (finished samples are kept)")
    assert not (out / "summary.json").exists() and not list(out.rglob("*.tmp"))
    monkeypatch.undo()
    saved = saves(monkeypatch)
    in_process("attribution_error", *args)                        # space again: it resumes and finishes
    assert saved == ([0, 1] if where_.endswith(".pt") else [])
    assert json.loads((out / "summary.json").read_text())["rows"] == len(json.loads((out / "rows.json").read_text()))


def test_full_disk_while_a_checkpoint_is_saved_names_it(tmp_path, monkeypatch):
    """torch.save reports a failed write as a RuntimeError; write_torch gives back the OSError it hid."""
    import utils.io

    _Full.writing(monkeypatch, "x.pt")
    with pytest.raises(OSError) as info:
        utils.io.write_torch(tmp_path / "x.pt", [torch.zeros(1000)])
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(tmp_path / "x.pt")
    assert not list(tmp_path.iterdir())


def test_full_model_cache_during_conversion_keeps_nothing(tmp_path, tiny_model_dirs, offline_tokenizer,
                                                           monkeypatch, capsys):
    """safetensors reports a full disk as its own error type: the conversion's copy is skipped with a
    note (it only makes later loads fast), and no partial folder stays."""
    from safetensors import SafetensorError

    from utils import models

    def full(model, folder):
        (models.Path(folder) / "model.safetensors").write_bytes(b"partial")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(models, "_save_dequantized", full)
    target = tmp_path / "converted" / "tiny"
    models._save_converted(offline_tokenizer, tiny_llama(), target)
    assert "could not keep a converted copy" in capsys.readouterr().out
    assert not list((tmp_path / "converted").iterdir())

"""A long step stopped midway (Ctrl-C or a crash) resumes without redoing finished samples, and the resumed
result equals an uninterrupted run; run_pipeline.py skips the steps whose files are complete.

The interruptions are raised in this process, through the real per-sample loop, at a chosen sample; one
small test sends a real SIGINT to a real process (what a user's Ctrl-C does)."""
import json
import shutil
import signal

import pytest
import torch

import main as sweep_main
from conftest import in_process, start_paused, write_questions
from utils.io import SampleCheckpoint

IG = ["--metric", "ig", "--n_steps", "3", "--device", "cpu"]
RESUME_HINT = "interrupted: finished samples are saved; run the same command again to resume."
SAVE = SampleCheckpoint.save


def parts_dir(result_dir):
    found = list((result_dir / "ig").glob("*.parts"))
    return found[0] if found else None


def saves(monkeypatch, stop_at=None, stop=None):
    """Record the samples the per-sample loop saves; with ``stop_at``, raise ``stop`` once that sample is
    computed, before it is saved (to the files, a Ctrl-C or crash anywhere in that sample)."""
    saved = []

    def save(self, index, value):
        if index == stop_at:
            raise stop
        SAVE(self, index, value)
        saved.append(index)

    monkeypatch.setattr(SampleCheckpoint, "save", save)
    return saved


def label(model_dir, data, num, result_dir):
    in_process("label_generation", "--model_name", model_dir, "--dataset", data, "--num_data", num,
               "--device", "cpu", "--result_dir", result_dir)


def test_interrupted_attribution_resumes_and_matches_uninterrupted_run(tmp_path, tiny_model_dirs, monkeypatch,
                                                                        capsys):
    data = write_questions(tmp_path / "qa.jsonl", 3)
    straight, d = tmp_path / "straight", tmp_path / "interrupted"
    label(tiny_model_dirs["llama"], data, 3, straight)
    shutil.copytree(straight, d)
    in_process("attribution_attention", *IG, "--result_dir", straight)
    capsys.readouterr()

    saved = saves(monkeypatch, stop_at=1, stop=KeyboardInterrupt)             # Ctrl-C in sample 1
    with pytest.raises(SystemExit) as info:
        in_process("attribution_attention", *IG, "--result_dir", d)
    err = capsys.readouterr().err
    assert info.value.code == 130 and RESUME_HINT in err
    assert saved == [0]
    assert not (d / "ig" / "ig_attention_list.pt").exists()                   # nothing half-written
    first = {p.name: p.stat().st_mtime_ns for p in parts_dir(d).glob("*.pt")}
    assert sorted(first) == ["000000.pt"]

    saved = saves(monkeypatch, stop_at=2, stop=RuntimeError("crash"))         # a crash in sample 2
    with pytest.raises(RuntimeError, match="crash"):
        in_process("attribution_attention", *IG, "--result_dir", d)
    assert saved == [1]                                                       # 0 was not redone
    assert all(parts_dir(d).joinpath(name).stat().st_mtime_ns == t for name, t in first.items())

    saved = saves(monkeypatch)
    in_process("attribution_attention", *IG, "--result_dir", d)               # resume to the end
    assert saved == [2]
    assert parts_dir(d) is None
    for comp in ("attention", "mlp"):
        a = torch.load(straight / "ig" / f"ig_{comp}_list.pt")
        b = torch.load(d / "ig" / f"ig_{comp}_list.pt")
        assert len(a) == len(b) == 3
        for x, y in zip(a, b):
            assert x.shape == y.shape and x.shape[0] > 0
            torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_ctrl_c_stops_a_real_process_and_keeps_its_samples(tmp_path, tiny_model_dirs, monkeypatch):
    """SIGINT to a step running as its own process: exit 130 with the one-line hint, no traceback, the
    finished sample kept for the next run."""
    data = write_questions(tmp_path / "qa.jsonl", 2)
    d = tmp_path / "r"
    label(tiny_model_dirs["llama"], data, 2, d)
    proc = start_paused("attribution_attention.py", *IG, "--result_dir", d)
    try:
        assert proc.stdout.readline().split() == ["saved", "0"], proc.stderr.read()[-3000:]
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and RESUME_HINT in err and "Traceback" not in err, err[-3000:]
    assert not (d / "ig" / "ig_attention_list.pt").exists()
    assert sorted(p.name for p in parts_dir(d).glob("*.pt")) == ["000000.pt"]
    saved = saves(monkeypatch)
    in_process("attribution_attention", *IG, "--result_dir", d)
    assert saved == [1] and parts_dir(d) is None
    assert len(torch.load(d / "ig" / "ig_attention_list.pt")) == 2


def test_run_pipeline_skips_the_steps_it_finished(tmp_path, tiny_model_dirs, capsys, monkeypatch):
    """Run again, run_pipeline.py leaves complete files alone; a changed setting redoes what it affects."""
    # two metrics and two ratios keep the sweep short; the sweep still reads IG, so new IG redoes it
    monkeypatch.setattr(sweep_main, "METRIC_NAME", ["gxo", "ig"])
    monkeypatch.setattr(sweep_main, "RATIOS", [0.0, 0.5])
    data = write_questions(tmp_path / "qa.jsonl", 2)
    r = tmp_path / "r"
    base = ["--model_name", tiny_model_dirs["phi"], "--dataset", data, "--num_data", "2", "--n_steps", "2",
            "--device", "cpu", "--result_dir", r]

    def pipeline(*extra):
        capsys.readouterr()
        in_process("run_pipeline", *base, *extra)
        return {line.split("]")[1].split(":")[0].split("  (")[0].strip()
                for line in capsys.readouterr().out.splitlines() if line.startswith("[") and "skipped" in line}

    def stamps():
        files = [r / "labels.json", *sorted(r.rglob("*_list.pt"))]
        return {f.name: f.stat().st_mtime_ns for f in files}

    all_steps = {"labels", "head magnitudes", "neuron magnitudes", "gradient + gxo", "integrated gradients",
                 "sweep + figure"}
    assert pipeline() == set()
    first = stamps()
    assert pipeline() == all_steps
    assert stamps() == first                      # nothing rewritten
    # new IG scores: IG and the sweep that read them run again
    assert pipeline("--n_steps", "3") == all_steps - {"integrated gradients", "sweep + figure"}
    changed = {name for name, t in stamps().items() if t != first[name]}
    assert changed == {"ig_attention_list.pt", "ig_mlp_list.pt"}

    # a damaged file and non-finite scores are not complete: exactly their steps run again
    mlp = r / "magnitude" / "magnitude_mlp_list.pt"
    tensors = torch.load(mlp)
    tensors[0][0, 0, 0] = float("nan")
    torch.save(tensors, mlp)
    gxo = r / "ig" / "gxo_attention_list.pt"
    gxo.write_bytes(gxo.read_bytes()[:100])
    # ... and recomputed, they hold the bytes the sweep read: the sweep (done by content) stays
    assert pipeline("--n_steps", "3") == all_steps - {"neuron magnitudes", "gradient + gxo"}
    assert all(torch.isfinite(t).all() for t in torch.load(mlp)) and len(torch.load(gxo)) == 2

    # the dataset file edited in place: new labels, and the old run's files move out of the way
    old_id = json.loads((r / "labels.json").read_text())["run_id"]
    old_files = sorted(p.relative_to(r) for p in r.rglob("*") if p.is_file() and p.name != ".lock")
    data.write_text(data.read_text().replace("?", "? Explain."))
    assert pipeline("--n_steps", "3") == set()
    labels = json.loads((r / "labels.json").read_text())
    assert labels["run_id"] != old_id and all(q.endswith(" Explain.") for q in labels["questions"])
    assert sorted(p.relative_to(r / "previous_runs" / old_id)
                  for p in (r / "previous_runs" / old_id).rglob("*") if p.is_file()) == old_files
    assert pipeline("--n_steps", "3") == all_steps

"""A long step killed midway (a real signal to a real subprocess) resumes without redoing finished
samples, and the resumed result equals an uninterrupted run."""
import json
import os
import signal
import subprocess
import sys
import time

import torch

from conftest import ROOT

QUESTIONS = [("What colour is the sky?", "The sky is blue on a clear day with sun"),
             ("How many legs does a spider have?", "A spider has eight legs in total"),
             ("What is the capital of France?", "Paris is the capital city of France"),
             ("Why do leaves fall in autumn?", "Trees shed leaves to save water in winter"),
             ("What do bees make?", "Bees make honey and wax in their hives"),
             ("How far is the Moon?", "The Moon is about 384,000 kilometres away"),
             ("What is ice?", "Ice is water frozen solid below zero degrees"),
             ("Who wrote Hamlet?", "William Shakespeare wrote the play Hamlet")]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
IG = ["attribution_attention.py", "--metric", "ig", "--n_steps", "12", "--batch_size", "2", "--device", "cpu"]


def run(args, result_dir):
    proc = subprocess.run([sys.executable, *args, "--result_dir", str(result_dir)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def parts_dir(result_dir):
    found = list((result_dir / "ig").glob("*.parts"))
    return found[0] if found else None


def foreground_signals():
    """In the child: SIGINT as a terminal's foreground process has it.  A suite started as a background
    job of a non-interactive shell (``bash .ci/run &``) inherits SIGINT ignored, Python then installs no
    KeyboardInterrupt handler, and the step would run to the end instead of stopping."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_and_interrupt(result_dir, sig, min_parts):
    """Start the IG step, wait until ``min_parts`` samples are saved, then send ``sig``."""
    proc = subprocess.Popen([sys.executable, *IG, "--result_dir", str(result_dir)], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=foreground_signals)
    deadline = time.time() + 300
    while time.time() < deadline:
        folder = parts_dir(result_dir)
        if folder is not None and len(list(folder.glob("*.pt"))) >= min_parts:
            break
        assert proc.poll() is None, "the step finished before it could be interrupted"
        time.sleep(0.02)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def test_killed_attribution_resumes_and_matches_uninterrupted_run(tmp_path, tiny_model_dirs):
    data = tmp_path / "qa.jsonl"
    data.write_text("\n".join(json.dumps({"question": q, "best_answer": a}) for q, a in QUESTIONS))
    dirs = {name: tmp_path / name for name in ("straight", "interrupted")}
    for d in dirs.values():
        run(["label_generation.py", "--model_name", str(tiny_model_dirs["llama"]), "--dataset", str(data),
             "--num_data", str(len(QUESTIONS)), "--device", "cpu"], d)
    run(IG, dirs["straight"])

    d = dirs["interrupted"]
    code, err = start_and_interrupt(d, signal.SIGINT, min_parts=1)           # Ctrl-C
    assert code == 130 and "run the same command again to resume" in err and "Traceback" not in err
    assert not (d / "ig" / "ig_attention_list.pt").exists()                  # nothing half-written
    first = {p.name: p.stat().st_mtime_ns for p in parts_dir(d).glob("*.pt")}
    assert 1 <= len(first) < len(QUESTIONS)

    code, _ = start_and_interrupt(d, signal.SIGKILL, min_parts=len(first) + 1)   # a crash
    assert code == -signal.SIGKILL
    second = {p.name: p.stat().st_mtime_ns for p in parts_dir(d).glob("*.pt")}
    assert len(second) > len(first)
    assert all(second[name] == mtime for name, mtime in first.items()), "finished samples were redone"

    run(IG, d)                                                                # resume to the end
    assert parts_dir(d) is None
    for comp in ("attention", "mlp"):
        a = torch.load(dirs["straight"] / "ig" / f"ig_{comp}_list.pt")
        b = torch.load(d / "ig" / f"ig_{comp}_list.pt")
        assert len(a) == len(b) == len(QUESTIONS)
        for x, y in zip(a, b):
            assert x.shape == y.shape and x.shape[0] > 0
            torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_run_pipeline_skips_the_steps_it_finished(tmp_path, tiny_model_dirs):
    """Run again, run_pipeline.py leaves complete files alone; a changed setting redoes what it affects."""
    data = tmp_path / "qa.jsonl"
    data.write_text("\n".join(json.dumps({"question": q, "best_answer": a}) for q, a in QUESTIONS[:3]))
    base = [sys.executable, "run_pipeline.py", "--model_name", str(tiny_model_dirs["phi"]), "--dataset", str(data),
            "--num_data", "3", "--n_steps", "2", "--device", "cpu", "--result_dir", str(tmp_path / "r")]

    def pipeline(*extra):
        proc = subprocess.run([*base, *extra], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return {line.split("]")[1].split(":")[0].split("  (")[0].strip()
                for line in proc.stdout.splitlines() if line.startswith("[") and "skipped" in line}

    def stamps():
        files = [tmp_path / "r" / "labels.json", *sorted((tmp_path / "r").rglob("*_list.pt"))]
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
    assert pipeline("--n_steps", "3", "--redo") == set()

    # a damaged file and non-finite scores are not complete: exactly their steps run again
    r = tmp_path / "r"
    mlp = r / "magnitude" / "magnitude_mlp_list.pt"
    tensors = torch.load(mlp)
    tensors[0][0, 0, 0] = float("nan")
    torch.save(tensors, mlp)
    gxo = r / "ig" / "gxo_attention_list.pt"
    gxo.write_bytes(gxo.read_bytes()[:100])
    assert pipeline("--n_steps", "3") == all_steps - {"neuron magnitudes", "gradient + gxo", "sweep + figure"}
    assert all(torch.isfinite(t).all() for t in torch.load(mlp)) and len(torch.load(gxo)) == 3

    # the dataset file edited in place: new labels, and the old run's files move out of the way
    old_id = json.loads((r / "labels.json").read_text())["run_id"]
    old_files = sorted(p.relative_to(r) for p in r.rglob("*") if p.is_file() and p.name != ".lock")
    data.write_text("\n".join(json.dumps({"question": q + " Explain.", "best_answer": a}) for q, a in QUESTIONS[:3]))
    assert pipeline("--n_steps", "3") == set()
    labels = json.loads((r / "labels.json").read_text())
    assert labels["run_id"] != old_id and all(q.endswith(" Explain.") for q in labels["questions"])
    assert sorted(p.relative_to(r / "previous_runs" / old_id)
                  for p in (r / "previous_runs" / old_id).rglob("*") if p.is_file()) == old_files
    assert pipeline("--n_steps", "3") == all_steps

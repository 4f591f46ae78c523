"""The result folder's lock: a second process writing into a folder that a running step writes into is
refused at once with one line; the lock goes with its process (exit, crash, SIGKILL); within one process
it is re-entrant (run_pipeline.py runs every step)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from test_errors import ENV, ROOT, fails
from test_resume import QUESTIONS

IG = ["attribution_attention.py", "--metric", "ig", "--n_steps", "12", "--batch_size", "2", "--device", "cpu"]


def test_second_process_is_refused_while_a_step_runs(tmp_path, tiny_model_dirs):
    data = tmp_path / "qa.jsonl"
    data.write_text("\n".join(json.dumps({"question": q, "best_answer": a}) for q, a in QUESTIONS))
    result = tmp_path / "r"
    proc = subprocess.run([sys.executable, "label_generation.py", "--model_name", str(tiny_model_dirs["llama"]),
                           "--dataset", str(data), "--num_data", str(len(QUESTIONS)), "--device", "cpu",
                           "--result_dir", str(result)], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    first = subprocess.Popen([sys.executable, *IG, "--result_dir", str(result)], cwd=ROOT, env=ENV,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        parts = result / "ig" / ".ig_attention-mlp.parts"
        while not list(parts.glob("0*.pt")):            # the first process is computing
            assert first.poll() is None and time.time() < deadline, "IG finished or stalled before the test"
            time.sleep(0.05)
        # the case of the issue: another IG with other settings would have mixed its samples in
        msg = fails(*IG[:3], "--n_steps", "1", "--device", "cpu", "--result_dir", result)
        assert msg.startswith(f"error: result folder {result} is in use by pid {first.pid} on ")
        assert msg.endswith("(attribution_attention.py --metric ig --n_steps 12 --batch_size 2 --device cpu "
                            f"--result_dir {result}); wait for it to finish (or stop it), or use another --result_dir")
        assert first.poll() is None, "the refused process must not disturb the running one"
        assert fails("main.py", "--result_dir", result, "--device", "cpu").startswith(
            f"error: result folder {result} is in use by pid {first.pid} ")
        first.send_signal(signal.SIGKILL)                # a crash: the OS drops the lock
        first.wait(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
    proc = subprocess.run([sys.executable, "Mag_attention.py", "--result_dir", str(result), "--device", "cpu"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (result / "magnitude" / "magnitude_attention_list.pt").is_file()


HOLDER = """
import sys, time
sys.path.insert(0, {root!r})
from utils.io import lock_folder
lock_folder({folder!r})
lock_folder({folder!r})          # re-entrant
print("locked", flush=True)
time.sleep(600)
"""


def test_lock_is_reentrant_and_released_with_its_process(tmp_path):
    from utils.errors import PipelineError
    from utils.io import lock_folder, release_locks

    folder = tmp_path / "r"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER.format(root=str(ROOT), folder=str(folder))],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(PipelineError, match=f"^result folder {folder} is in use by pid {holder.pid} on "):
            lock_folder(folder)
        holder.send_signal(signal.SIGTERM)
        holder.wait(timeout=30)
    finally:
        if holder.poll() is None:
            holder.kill()
    lock_folder(folder)                       # free again once the holder is gone
    lock_folder(folder)                       # and re-entrant here too
    assert f"pid {os.getpid()} " in (folder / ".lock").read_text()
    release_locks()
    other = subprocess.run([sys.executable, "-c", HOLDER.format(root=str(ROOT), folder=str(folder))
                            .replace("time.sleep(600)", "")], capture_output=True, text=True, timeout=60)
    assert other.returncode == 0 and other.stdout.strip() == "locked", other.stderr

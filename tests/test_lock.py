"""The result folder's lock: a second process writing into a folder that a running step writes into is
refused at once with one line; the lock goes with its process (exit, crash, SIGKILL); within one process
it is re-entrant (run_pipeline.py runs every step)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from conftest import ROOT, exits_2, fails, in_process, start_paused, write_questions

IG = ["attribution_attention.py", "--metric", "ig", "--n_steps", "3", "--device", "cpu"]


def test_second_process_is_refused_while_a_step_runs(tmp_path, tiny_model_dirs, capsys):
    data = write_questions(tmp_path / "qa.jsonl", 2)
    result = tmp_path / "r"
    in_process("label_generation", "--model_name", tiny_model_dirs["llama"], "--dataset", data, "--num_data", 2,
               "--device", "cpu", "--result_dir", result)
    # the first process pauses after its first sample (conftest.start_paused): it is certainly mid-step
    # while the others try, however slow the host
    first = start_paused(*IG, "--result_dir", result)
    try:
        assert first.stdout.readline().split() == ["saved", "0"], first.stderr.read()[-3000:]
        # the case of the issue: another IG with other settings would have mixed its samples in
        msg = fails(*IG[:3], "--n_steps", "1", "--device", "cpu", "--result_dir", result)
        assert msg.startswith(f"error: result folder {result} is in use by pid {first.pid} on ")
        assert msg.endswith(f"(attribution_attention.py --metric ig --n_steps 3 --device cpu --result_dir {result}); "
                            "wait for it to finish (or stop it), or use another --result_dir")
        capsys.readouterr()
        assert exits_2(capsys, "main", "--result_dir", result, "--device", "cpu").startswith(
            f"error: result folder {result} is in use by pid {first.pid} ")
        assert first.poll() is None, "the refused processes must not disturb the running one"
        first.send_signal(signal.SIGKILL)                # a crash: the OS drops the lock
        first.wait(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
    in_process("Mag_attention", "--result_dir", result, "--device", "cpu")
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
        holder.wait(timeout=120)
    finally:
        if holder.poll() is None:
            holder.kill()
    lock_folder(folder)                       # free again once the holder is gone
    lock_folder(folder)                       # and re-entrant here too
    assert f"pid {os.getpid()} " in (folder / ".lock").read_text()
    release_locks()
    other = subprocess.run([sys.executable, "-c", HOLDER.format(root=str(ROOT), folder=str(folder))
                            .replace("time.sleep(600)", "")], capture_output=True, text=True, timeout=300)
    assert other.returncode == 0 and other.stdout.strip() == "locked", other.stderr

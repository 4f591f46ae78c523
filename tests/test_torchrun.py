"""``torchrun --nproc_per_node 2`` (gloo, CPU) shards the samples of every step; the merged files equal a
one-process run's, sample for sample.  One run_pipeline.py under torchrun runs every step (each step waits
for the first process to write its files before the next step reads them)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ENV, ROOT

# torchrun gives each process one OpenMP thread; the one-process run gets the same, so that CPU
# reductions happen in the same order and the files can be compared bit for bit
ENV = dict(ENV, OMP_NUM_THREADS="1")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
# 5 samples: the two processes get 3 and 2
ROWS = [{"question": f"Question {i}: what is {i} plus {i}?", "best_answer": f"The answer is {2 * i}, that is {i} plus {i}"}
        for i in range(5)]
SCORE_FILES = ([f"magnitude/magnitude_{c}_list.pt" for c in ("attention", "mlp")] +
               [f"ig/{k}_{c}_list.pt" for k in ("gradient", "gxo", "ig", "grad_norm") for c in ("attention", "mlp")])


def run(cmd, result_dir):
    proc = subprocess.run([*cmd, "--result_dir", str(result_dir), "--device", "cpu"], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def two_runs(tiny_model_dirs, tmp_path_factory):
    """The whole pipeline in one process and under torchrun: ``(single, sharded, torchrun's stdout)``."""
    tmp = tmp_path_factory.mktemp("torchrun")
    data = tmp / "qa.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in ROWS))
    single, sharded = tmp / "single", tmp / "sharded"
    pipeline = ["run_pipeline.py", "--model_name", str(tiny_model_dirs["llama"]), "--dataset", str(data),
                "--num_data", "5", "--n_steps", "2"]
    run([sys.executable, *pipeline], single)
    proc = run([*TORCHRUN, *pipeline], sharded)
    return single, sharded, proc.stdout


def test_labels_equal_one_process(two_runs):
    single, sharded = (json.loads((d / "labels.json").read_text()) for d in two_runs[:2])
    assert len(single["labels"]) == 5
    assert sharded == single


@pytest.mark.parametrize("path", SCORE_FILES)
def test_score_files_equal_one_process(two_runs, path):
    single, sharded = (torch.load(d / path) for d in two_runs[:2])
    assert len(single) == len(sharded) == 5
    for a, b in zip(single, sharded):
        assert a.shape[0] > 0
        # the same computation of the same sample in another process: bit for bit
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_sweep_equals_one_process(two_runs):
    single, sharded = (json.loads((d / "res" / "both" / "per_sample.json").read_text()) for d in two_runs[:2])
    assert len(single) == 5 * 7 * 10
    assert sharded == single
    single, sharded = (json.loads((d / "res" / "both" / "results.json").read_text()) for d in two_runs[:2])
    assert sharded["curves"] == single["curves"]


def test_one_process_reports_and_no_parts_are_left(two_runs):
    assert two_runs[2].count("[7/7] sweep + figure") == 1
    for d in two_runs[:2]:
        assert not [p for p in d.rglob("*") if p.name.endswith(".parts")]


def test_second_job_on_a_locked_folder_is_refused_by_every_process(two_runs, tmp_path):
    """The processes of one job share the folder (the first holds the lock); another job is refused.
    This test's process holds the lock: nothing races."""
    import shutil

    from utils.io import lock_folder, release_locks

    folder = tmp_path / "run"
    shutil.copytree(two_runs[0], folder)
    (folder / "magnitude" / "magnitude_mlp_list.pt").unlink()
    lock_folder(folder)
    try:
        proc = subprocess.run([*TORCHRUN, "Mag_mlp.py", "--result_dir", str(folder), "--device", "cpu"], cwd=ROOT,
                              env=ENV, capture_output=True, text=True, timeout=600)
    finally:
        release_locks()
    assert proc.returncode != 0
    refusal = f"error: result folder {folder} is in use by pid {os.getpid()} on "
    assert proc.stderr.count(refusal) == 2, proc.stderr[-3000:]      # both processes, the same line
    assert not (folder / "magnitude" / "magnitude_mlp_list.pt").exists()

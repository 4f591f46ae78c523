"""``torchrun --nproc_per_node 2`` (gloo, CPU) shards the samples of every step; the merged files equal a
one-process run's, sample for sample."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

# torchrun gives each process one OpenMP thread; the one-process run gets the same, so that CPU
# reductions happen in the same order and the files can be compared bit for bit
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
# 5 samples: the two processes get 3 and 2
ROWS = [{"question": f"Question {i}: what is {i} plus {i}?", "best_answer": f"The answer is {2 * i}, that is {i} plus {i}"}
        for i in range(5)]


def steps(model_dir, data):
    return [["label_generation.py", "--model_name", model_dir, "--dataset", data, "--num_data", "5"],
            ["Mag_attention.py"], ["Mag_mlp.py"],
            ["attribution_attention.py", "--metric", "gradient", "gxo"],
            ["attribution_attention.py", "--metric", "ig", "--n_steps", "2"],
            ["main.py", "--metric_name", "all"]]


def run(cmd, result_dir):
    proc = subprocess.run([*cmd, "--result_dir", str(result_dir), "--device", "cpu"], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def two_runs(tiny_model_dirs, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("torchrun")
    data = tmp / "qa.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in ROWS))
    single, sharded = tmp / "single", tmp / "sharded"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    for step in steps(str(tiny_model_dirs["llama"]), str(data)):
        run([sys.executable, *step], single)
        run([*torchrun, *step], sharded)
    return single, sharded


def test_labels_equal_one_process(two_runs):
    single, sharded = (json.loads((d / "labels.json").read_text()) for d in two_runs)
    assert len(single["labels"]) == 5
    assert sharded == single


@pytest.mark.parametrize("path", [f"magnitude/magnitude_{c}_list.pt" for c in ("attention", "mlp")] +
                         [f"ig/{k}_{c}_list.pt" for k in ("gradient", "gxo", "ig", "grad_norm")
                          for c in ("attention", "mlp")])
def test_score_files_equal_one_process(two_runs, path):
    single, sharded = (torch.load(d / path) for d in two_runs)
    assert len(single) == len(sharded) == 5
    for a, b in zip(single, sharded):
        assert a.shape[0] > 0
        # the same computation of the same sample in another process: bit for bit
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_sweep_equals_one_process(two_runs):
    single, sharded = (json.loads((d / "res" / "both" / "per_sample.json").read_text()) for d in two_runs)
    assert len(single) == 5 * 7 * 10
    assert sharded == single
    single, sharded = (json.loads((d / "res" / "both" / "results.json").read_text()) for d in two_runs)
    assert sharded["curves"] == single["curves"]


def test_no_parts_left(two_runs):
    for d in two_runs:
        assert not [p for p in d.rglob("*") if p.name.endswith(".parts")]


def test_run_pipeline_under_torchrun_equals_one_process(tiny_model_dirs, tmp_path):
    """run_pipeline.py runs every step in one process; under torchrun each step must wait for the first
    process to write its files before the next step reads them."""
    data = tmp_path / "qa.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in ROWS))
    args = ["run_pipeline.py", "--model_name", str(tiny_model_dirs["phi"]), "--dataset", str(data),
            "--num_data", "5", "--n_steps", "2"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    run([sys.executable, *args], tmp_path / "single")
    proc = run([*torchrun, *args], tmp_path / "sharded")
    assert proc.stdout.count("[7/7] sweep + figure") == 1    # one process reports
    for name in ["labels.json", "res/both/per_sample.json"]:
        single, sharded = (json.loads((tmp_path / d / name).read_text()) for d in ("single", "sharded"))
        assert sharded == single
    for path in (tmp_path / "single").rglob("*.pt"):
        for a, b in zip(torch.load(path), torch.load(tmp_path / "sharded" / path.relative_to(tmp_path / "single"))):
            torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_second_job_on_a_locked_folder_is_refused_by_every_process(two_runs, tmp_path):
    """The processes of one job share the folder (the first holds the lock); another job is refused."""
    import shutil
    import signal

    folder = tmp_path / "run"
    shutil.copytree(two_runs[0], folder)
    (folder / "magnitude" / "magnitude_mlp_list.pt").unlink()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, '.');"
                               f"from utils.io import lock_folder; lock_folder({str(folder)!r}); print('locked', "
                               "flush=True); time.sleep(600)"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        proc = subprocess.run([*torchrun, "Mag_mlp.py", "--result_dir", str(folder), "--device", "cpu"], cwd=ROOT,
                              env=ENV, capture_output=True, text=True, timeout=600)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert proc.returncode != 0
    refusal = f"error: result folder {folder} is in use by pid {holder.pid} on "
    assert proc.stderr.count(refusal) == 2, proc.stderr[-3000:]      # both processes, the same line
    assert not (folder / "magnitude" / "magnitude_mlp_list.pt").exists()

"""GPU checks: skipped on machines without CUDA (CI here); run them on a GPU box with `python -m pytest tests/test_gpu.py`.

They use `--report-to none`: what they check is the device, not the tracker.
"""

import pytest
import torch

from .helpers import check, launch_gpus, results, train_cli

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")


@gpu
@pytest.mark.parametrize("precision", ["no", "bf16", "fp16"])
def test_one_gpu_trains_the_recipe_in_each_precision(precision, tmp_path):
    check(train_cli("--dataset", "mnist-5k", "--mixed-precision", precision, "--report-to", "none", "--output-dir", str(tmp_path)))
    r = results(tmp_path)
    assert r["device_type"] == "cuda" and r["mixed_precision"] == precision
    assert r["test_samples"] == 10000 and r["test_accuracy"] >= 0.88, r["test_accuracy"]


@gpu
def test_device_data_path_on_one_gpu(tmp_path):
    check(train_cli("--dataset", "mnist-5k", "--data-path", "device", "--report-to", "none", "--output-dir", str(tmp_path)))
    r = results(tmp_path)
    assert r["device_type"] == "cuda" and r["test_samples"] == 10000 and r["test_accuracy"] >= 0.88


@two_gpus
def test_two_gpus_train_as_one_ddp_run(tmp_path):
    check(launch_gpus(2, "--dataset", "mnist-5k", "--report-to", "none", "--output-dir", str(tmp_path)))
    r = results(tmp_path)
    assert r["world_size"] == 2 and r["device_type"] == "cuda" and r["test_samples"] == 10000


@gpu
def test_gpu_run_stopped_by_a_signal_resumes_to_identical_weights(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    from .helpers import REPO
    from .test_checkpoint import same_results, same_weights, wait_for_checkpoint

    flags = ["--dataset", "mnist-5k", "--epochs", "2", "--checkpoint-every", "7", "--mixed-precision", "bf16", "--report-to", "none"]
    check(train_cli(*flags, "--output-dir", str(tmp_path / "reference")))
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mnist_dist.train", *flags, "--output-dir", str(out)], cwd=REPO,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    wait_for_checkpoint(out, 30, proc)
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=60) == 75
    check(train_cli(*flags, "--output-dir", str(out), "--resume", "auto"))
    assert results(out)["device_type"] == "cuda"
    same_weights(out, tmp_path / "reference")
    same_results(out, tmp_path / "reference")

"""GPU checks: skipped on machines without CUDA (CI here); run them on a GPU box with `python -m pytest tests/test_gpu.py`."""

import pytest
import torch

from .helpers import check, launch_gpus, results, train_cli

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")


@gpu
@pytest.mark.parametrize("precision", ["no", "bf16", "fp16"])
def test_one_gpu_trains_the_recipe_in_each_precision(precision, tmp_path):
    check(train_cli("--dataset", "mnist-5k", "--mixed-precision", precision, "--output-dir", str(tmp_path)))
    r = results(tmp_path)
    assert r["device_type"] == "cuda" and r["mixed_precision"] == precision
    assert r["test_samples"] == 10000 and r["test_accuracy"] >= 0.88, r["test_accuracy"]


@two_gpus
def test_two_gpus_train_as_one_ddp_run(tmp_path):
    check(launch_gpus(2, "--dataset", "mnist-5k", "--output-dir", str(tmp_path)))
    r = results(tmp_path)
    assert r["world_size"] == 2 and r["device_type"] == "cuda" and r["test_samples"] == 10000

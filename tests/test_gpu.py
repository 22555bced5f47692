"""GPU checks: skipped on machines without CUDA (CI here); run them on a GPU box with `python -m pytest tests/test_gpu.py`.

They use `--report-to none`: what they check is the device, not the tracker.
"""

import re
import sys

import pytest
import torch

from .helpers import REPO, check, launch_gpus, results, run, same_results, same_weights, train_cli, wait_for_checkpoint

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")


@gpu
@pytest.mark.parametrize("precision", ["no", "bf16", "fp16"])
def test_one_gpu_trains_the_recipe_in_each_precision(precision, tmp_path):
    check(train_cli("--dataset", "mnist-5k", "--mixed-precision", precision, "--report-to", "none", "--output-dir", str(tmp_path)))
    r = results(tmp_path)
    assert r["device_type"] == "cuda" and r["mixed_precision"] == precision
    assert r["test_samples"] == 10000 and r["test_accuracy"] >= 0.88, r["test_accuracy"]
    assert r["peak_memory_measured"] == "torch.cuda.max_memory_allocated" and r["peak_memory_mib"][0] > 0
    # --data-path auto: captured epochs where they can run; fp16's grad scaler needs the host
    assert r["data_path"] == ("device" if precision == "fp16" else "graph")
    if r["data_path"] == "graph":
        assert r["timings"]["capture"] > 0


@gpu
def test_device_data_path_on_one_gpu(tmp_path):
    check(train_cli("--dataset", "mnist-5k", "--data-path", "device", "--report-to", "none", "--output-dir", str(tmp_path)))
    r = results(tmp_path)
    assert r["device_type"] == "cuda" and r["test_samples"] == 10000 and r["test_accuracy"] >= 0.88


@gpu
def test_the_graph_path_validates_at_epoch_ends_and_keeps_the_best_model(tmp_path):
    check(train_cli("--dataset", "mnist-5k", "--val-fraction", "0.1", "--epochs", "4", "--report-to", "none",
                    "--output-dir", str(tmp_path)))
    r = results(tmp_path)
    assert r["data_path"] == "graph" and r["validation"]["samples"] == 500 and len(r["history"]) == 4
    assert r["best"]["step"] in [36 * e for e in range(1, 5)] and (tmp_path / "best" / "model.safetensors").is_file()
    assert r["best"]["val_accuracy"] == max(h["val_accuracy"] for h in r["history"])


@gpu
@pytest.mark.parametrize("flags, data_path", [
    ([], "graph"),
    (["--hidden-sizes", "512,512", "--batch-norm", "--dropout", "0.2"], "device"),
    (["--model", "cnn"], "device"),
], ids=["mlp", "mlp-batch-norm-dropout", "cnn"])
def test_each_built_in_model_trains_on_one_gpu_on_the_path_auto_chooses(flags, data_path, tmp_path):
    check(train_cli("--dataset", "mnist-5k", *flags, "--report-to", "none", "--output-dir", str(tmp_path)))
    r = results(tmp_path)
    assert r["device_type"] == "cuda" and r["data_path"] == data_path and r["test_accuracy"] >= 0.88
    assert r["flops_per_sample"] > 0 and r["model_flops_per_second"] > 0


@two_gpus
def test_sync_batch_norm_trains_two_gpus_as_one_ddp_run(tmp_path):
    check(launch_gpus(2, "--dataset", "mnist-5k", "--batch-norm", "--sync-batch-norm", "--epochs", "2",
                      "--report-to", "none", "--output-dir", str(tmp_path)))
    r = results(tmp_path)
    assert r["world_size"] == 2 and r["config"]["sync_batch_norm"] is True and r["test_accuracy"] >= 0.85


@two_gpus
def test_two_gpus_train_as_one_ddp_run(tmp_path):
    check(launch_gpus(2, "--dataset", "mnist-5k", "--report-to", "none", "--output-dir", str(tmp_path)))
    r = results(tmp_path)
    assert r["world_size"] == 2 and r["device_type"] == "cuda" and r["test_samples"] == 10000
    assert r["data_path"] == "device"  # --data-path auto with several GPUs


@gpu
def test_gpu_run_stopped_by_a_signal_resumes_to_identical_weights(tmp_path):
    import os
    import signal
    import subprocess
    import sys

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
    assert same_weights(out, tmp_path / "reference")
    same_results(out, tmp_path / "reference")


def _weights(path):
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


@gpu
@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_graph_path_computes_what_the_eager_device_path_computes(precision, tmp_path):
    # 5 epochs of 40 steps: three warm-up steps with every update skipped, then epoch 1 is captured
    # and replayed, and epochs 2-5 replay it
    common = ["--dataset", "mnist-5k", "--epochs", "5", "--seed", "2", "--mixed-precision", precision,
              "--report-to", "none"]
    check(train_cli(*common, "--data-path", "graph", "--output-dir", str(tmp_path / "graph")))
    check(train_cli(*common, "--data-path", "device", "--output-dir", str(tmp_path / "device")))
    graph, device = results(tmp_path / "graph"), results(tmp_path / "device")
    assert (graph["data_path"], device["data_path"]) == ("graph", "device")
    assert graph["timings"]["capture"] > 0 and device["timings"]["capture"] == 0
    wg, wd = _weights(tmp_path / "graph"), _weights(tmp_path / "device")
    exact = all(torch.equal(wg[k], wd[k]) for k in wd)
    print(f"graph vs device path weights after 200 steps ({precision}): {'bit-identical' if exact else 'close'}")
    for name in wd:  # the same kernels on the same data; allow for a different cuBLAS algorithm in a graph
        torch.testing.assert_close(wg[name], wd[name], rtol=1e-4, atol=1e-5)
    for hg, hd in zip(graph["history"], device["history"], strict=True):
        assert hg["train_loss"] == pytest.approx(hd["train_loss"], rel=1e-4)
        assert abs(hg["test_accuracy"] - hd["test_accuracy"]) <= 0.002
        assert hg["samples"] == hd["samples"] == 5000  # each training digit once per epoch


@gpu
def test_graph_run_resumed_from_a_mid_epoch_checkpoint_ends_where_the_whole_run_does(tmp_path):
    # checkpoints at steps 40, 80, 100, 120, ...: resuming at 100 (epoch 3, step 20 of 40) runs the rest
    # of that epoch eagerly, then warms up (after real eager steps) and captures epoch 4 afresh; the
    # whole run replayed epoch 1's capture, warmed up before any step
    common = ["--dataset", "mnist-5k", "--epochs", "5", "--checkpoint-every", "100", "--keep-checkpoints", "10",
              "--report-to", "none"]
    check(train_cli(*common, "--output-dir", str(tmp_path / "whole")))
    assert results(tmp_path / "whole")["data_path"] == "graph"
    midway = tmp_path / "whole" / "checkpoints" / "step_00000100"
    check(train_cli(*common, "--resume", str(midway), "--output-dir", str(tmp_path / "resumed")))
    whole, resumed = _weights(tmp_path / "whole"), _weights(tmp_path / "resumed")
    for name in whole:
        torch.testing.assert_close(resumed[name], whole[name], rtol=1e-4, atol=1e-5)
    assert results(tmp_path / "resumed")["test_accuracy"] == pytest.approx(results(tmp_path / "whole")["test_accuracy"], abs=0.002)


@gpu
@pytest.mark.parametrize("accumulate", ["1", "2"])
def test_two_deterministic_gpu_runs_of_the_device_path_end_bit_identical(accumulate, tmp_path):
    flags = ["--dataset", "mnist-5k", "--epochs", "2", "--data-path", "device", "--deterministic", "--report-to", "none",
             "--gradient-accumulation-steps", accumulate, "--batch-size", str(128 // int(accumulate))]
    for name in ("a", "b"):
        check(train_cli(*flags, "--output-dir", str(tmp_path / name)))
    r = results(tmp_path / "a")
    assert r["device_type"] == "cuda" and r["deterministic"] is True
    assert same_weights(tmp_path / "a", tmp_path / "b")


@gpu
def test_profile_of_the_graph_path_records_a_replayed_epoch(tmp_path):
    import json

    profile = tmp_path / "profile"
    check(train_cli("--dataset", "mnist-5k", "--epochs", "3", "--data-path", "graph", "--report-to", "none",
                    "--profile", str(profile), "--output-dir", str(tmp_path / "run")))
    names = {e.get("name") for e in json.loads((profile / "trace.json").read_text())["traceEvents"]}
    events = json.loads((profile / "trace.json").read_text())["traceEvents"]
    assert any(n and "Graph" in n for n in names), sorted(n for n in names if n)[:50]  # cudaGraphLaunch
    assert any(e.get("cat") == "kernel" for e in events)  # the replayed kernels themselves, not only the launch


@gpu
def test_the_doctor_on_one_gpu_names_the_device_and_its_free_memory(tmp_path):
    proc = run([sys.executable, "-m", "mnist_dist.doctor", "--dataset", "mnist-5k", "--output-dir", str(tmp_path / "run")])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"^ok\s+0\s+\S+\s+0\s+cuda:0\s+[\d.]+ GiB", proc.stdout, re.M), proc.stdout


@two_gpus
def test_a_stalled_nccl_peer_leaves_stacks_and_the_flight_recorders_dump(tmp_path):
    """NCCL's watchdog aborts where gloo raises: the stacks come from StallWatch's watchdog, the collectives
    from the flight recorder (TORCH_FR_DUMP_TEMP_FILE in the run's stacks/), readable by torch's fr_trace."""
    proc = launch_gpus(2, "--dataset", "mnist-5k", "--epochs", "1000", "--log-every", "5", "--timeout", "20",
                       "--data-path", "device", "--model", "tests.models:StallsOnRank", "--report-to", "none",
                       "--output-dir", str(tmp_path), timeout=300)
    assert proc.returncode != 0
    stacks = tmp_path / "stacks"
    assert "stall_forever" in (stacks / "rank-1.txt").read_text()
    assert "train_step" in (stacks / "rank-0.txt").read_text()
    assert (stacks / "nccl_trace_rank_0").stat().st_size > 0, sorted(p.name for p in stacks.iterdir())
    read = run([sys.executable, "-m", "torch.distributed.flight_recorder.fr_trace", str(stacks), "-p", "nccl_trace_rank_",
                "--allow-incomplete-ranks", "-j"])
    assert read.returncode == 0 and "all_reduce" in read.stdout.lower(), read.stdout[-3000:] + read.stderr[-3000:]

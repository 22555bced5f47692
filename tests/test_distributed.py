"""Real multi-process runs over gloo on the CPU: sharding, exact evaluation, DDP equivalence, launch guard."""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
from safetensors.torch import load_file

from mnist_dist import checkpoint
from mnist_dist import launch as launcher
from mnist_dist.metrics import evaluate
from mnist_dist.model import MLP, load_model

from .helpers import REPO, check, free_port, launch, launch_script, results, train_cli, train_here
from .workers.shards import EPOCHS, indexed

N_TRAIN, N_TEST, BATCH = 1001, 1001, 64


_shard_reports = {}  # world size -> report: one launch each, however pytest orders the tests


@pytest.fixture(params=[2, pytest.param(3, marks=pytest.mark.slow)])
def shard_report(request, tmp_path_factory):
    world = request.param
    if world not in _shard_reports:
        out = tmp_path_factory.mktemp(f"shards{world}") / "report.json"
        check(launch_script(world, REPO / "tests" / "workers" / "shards.py", str(N_TRAIN), str(N_TEST), str(BATCH),
                            str(out)))
        _shard_reports[world] = json.loads(out.read_text())
    report = _shard_reports[world]
    assert report["world_size"] == world, "the launch did not connect the processes it started"
    return report


def test_every_training_sample_is_used_once_per_epoch(shard_report):
    for epoch in shard_report["epochs"]:
        used = [i for rank in epoch for batch in rank for i in batch]
        assert sorted(used) == list(range(N_TRAIN))


def test_every_process_takes_the_same_number_of_steps(shard_report):
    for epoch in shard_report["epochs"]:
        assert len({len(rank) for rank in epoch}) == 1


def test_shards_follow_one_seeded_permutation_reshuffled_each_epoch(shard_report):
    world = shard_report["world_size"]
    orders = []
    for e, epoch in enumerate(shard_report["epochs"]):
        # global batch i is process 0's batch i, then process 1's, ...
        order = [idx for i in range(len(epoch[0])) for r in range(world) for idx in epoch[r][i]]
        expected = torch.randperm(N_TRAIN, generator=torch.Generator().manual_seed(7 + e)).tolist()
        assert order == expected, f"epoch {e}: not the permutation seeded by seed + epoch"
        orders.append(order)
    assert len(orders) == EPOCHS and orders[0] != orders[1]


def test_device_path_cuts_the_same_batches_as_the_dataloader_path(shard_report):
    # same permutation, same shard, same real samples, batch by batch on every process
    assert shard_report["device_epochs"] == shard_report["epochs"]


def test_device_path_evaluation_counts_each_test_image_once(shard_report):
    dev, ref = shard_report["device_metrics"], shard_report["metrics"]
    assert dev["samples"] == N_TEST and dev["accuracy"] == ref["accuracy"]
    assert dev["loss"] == pytest.approx(ref["loss"], rel=1e-6)


def test_every_test_image_counts_exactly_once(shard_report):
    assert sorted(shard_report["evaluated"]) == list(range(N_TEST))


def test_distributed_evaluation_equals_single_process_evaluation(shard_report):
    torch.manual_seed(0)
    model = MLP(hidden_sizes=(16,))
    test_set = indexed(N_TEST)
    batches = [(test_set.images[i : i + 100], test_set.labels[i : i + 100]) for i in range(0, N_TEST, 100)]
    expected = evaluate(model, batches)
    got = shard_report["metrics"]
    assert got["samples"] == expected["samples"] == N_TEST
    assert got["accuracy"] == expected["accuracy"]
    assert got["loss"] == pytest.approx(expected["loss"], rel=1e-6)


# ---------------------------------------------------------------- the real entry point


def test_two_process_run_trains_on_all_processes_and_tests_on_all_10000_digits(tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    proc = check(launch(2, "--dataset", "mnist-5k", "--epochs", "3", "--output-dir", str(out), "--cache-dir", str(cache)))
    r = results(out)
    # one process decoded the data and wrote the cache; the other waited and read it
    assert proc.stdout.count("mnist_dist: decoded mnist-5k") == 1
    assert len(list(cache.glob("*.safetensors"))) == 1
    assert r["world_size"] == 2 and r["global_batch_size"] == 256 and r["per_process_batch_size"] == 128
    assert r["test_samples"] == 10000 and r["train_samples"] == 5000
    assert [h["samples"] for h in r["history"]] == [5000, 5000, 5000]
    assert r["test_accuracy"] > 0.8
    # each process's peak resident set (a CPU process with torch holds well over 50 MiB), by rank
    assert len(r["peak_memory_mib"]) == 2 and min(r["peak_memory_mib"]) > 50
    assert r["peak_memory_measured"] == "peak resident set of the process"
    assert all(len(h["peak_memory_mib"]) == 2 for h in r["history"])
    # FlopCounterMode's count of one sample: forward 2 x 784 x 256 + 2 x 256 x 10 multiply-adds, backward the
    # same for the weights' gradients and 2 x 256 x 10 for the hidden layer's (the pixels need none)
    assert r["flops_per_sample"] == 4 * 784 * 256 + 6 * 256 * 10 == 818_176
    assert r["model_flops_per_second"] == pytest.approx(r["flops_per_sample"] * 15000 / r["train_seconds"])
    # only the main process reports: one summary line per epoch
    assert proc.stdout.count("epoch 1/3:") + proc.stderr.count("epoch 1/3:") == 1


@pytest.mark.slow
def test_three_process_accuracy_counts_each_of_1001_test_images_once(tmp_path, small_subset):
    out = tmp_path / "out"
    check(launch(3, "--data-dir", str(small_subset), "--epochs", "1", "--batch-size", "32", "--output-dir", str(out)))
    r = results(out)
    assert r["world_size"] == 3 and r["test_samples"] == 1001
    # the saved model, evaluated in one process, gives the accuracy the 3 processes reported
    model, _ = load_model(out)
    from mnist_dist.sources import find_idx_files, load_idx

    test = load_idx(find_idx_files(small_subset))["test"]
    expected = evaluate(model, [(test.images, test.labels)])
    assert r["test_accuracy"] == expected["accuracy"]
    assert r["test_loss"] == pytest.approx(expected["loss"], rel=1e-5)


def test_two_processes_end_with_the_weights_of_one_process_on_the_same_global_batches(tmp_path, small_subset):
    # 2 x 32 per step against 1 x 64 per step, over the same seeded permutation; 1,000 samples make
    # the last global batch of each epoch partial (40 real samples: 32 + 8 real, 24 fillers)
    common = ["--data-dir", str(small_subset), "--epochs", "2", "--seed", "3"]
    check(launch(2, *common, "--batch-size", "32", "--output-dir", str(tmp_path / "ddp")))
    check(train_here(*common, "--batch-size", "64", "--cpu", "--output-dir", str(tmp_path / "one")))
    ddp, one = load_file(tmp_path / "ddp" / "model.safetensors"), load_file(tmp_path / "one" / "model.safetensors")
    assert ddp.keys() == one.keys()
    # Same function, different summation order (DDP adds two half-batch gradients). Adam divides by
    # sqrt(v), so in the few weights whose gradient is pure rounding noise it turns that noise into
    # steps of up to ~lr * noise / eps: measured here, at most 2.1e-5 in 3 of 200,704 weights after
    # 32 steps. Averaging the two processes' mean losses instead (the usual bug with a partial last
    # batch) moves most weights by more than 1e-3, so atol=5e-5 separates the two by 20x or more.
    for name in one:
        torch.testing.assert_close(ddp[name], one[name], rtol=1e-5, atol=5e-5)
    r_ddp, r_one = results(tmp_path / "ddp"), results(tmp_path / "one")
    assert r_ddp["steps"] == r_one["steps"] == 32
    assert r_ddp["history"][-1]["train_loss"] == pytest.approx(r_one["history"][-1]["train_loss"], rel=1e-5)


def test_unconnected_multi_process_launch_is_stopped_before_writing_anything(tmp_path):
    # a MULTI_GPU launch on a machine without GPUs: N processes that each think they are alone
    out = tmp_path / "out"
    proc = launch(2, "--dataset", "mnist-5k", "--output-dir", str(out), cpu_flag=False, env={"ACCELERATE_USE_CPU": None})
    assert proc.returncode != 0
    assert proc.stderr.count("the launcher started 2 processes (WORLD_SIZE=2) but Accelerate connected 1") == 1
    assert "each would run mnist_dist.train alone" in proc.stderr and "--cpu" in proc.stderr
    assert not out.exists()


@pytest.mark.slow
def test_unconnected_launch_of_evaluate_speaks_of_evaluate_once(tmp_path):
    proc = launch(2, "--model", str(tmp_path / "model"), module="mnist_dist.evaluate", cpu_flag=False,
                  env={"ACCELERATE_USE_CPU": None})
    assert proc.returncode != 0 and proc.stderr.count("mnist_dist.evaluate: error: the launcher started 2") == 1
    assert "-m mnist_dist.evaluate ... --cpu" in proc.stderr and "mnist_dist.train" not in proc.stderr


@pytest.mark.slow
def test_bad_data_stops_every_process_with_the_file_named(tmp_path, small_subset):
    # the local main process decodes while the others wait at a barrier: its error must end them all
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in small_subset.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    labels = broken / "train-labels-idx1-ubyte.gz"
    labels.write_bytes(labels.read_bytes()[:30])
    out = tmp_path / "out"
    proc = launch(2, "--data-dir", str(broken), "--output-dir", str(out), "--cache-dir", str(tmp_path / "c"), timeout=120)
    assert proc.returncode != 0
    assert f"error: {labels}: corrupt or truncated gzip file" in proc.stderr
    assert not out.exists() and not (tmp_path / "c").exists()


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2])
def test_device_path_trains_to_the_weights_of_the_dataloader_path(world, tmp_path, small_subset):
    common = ["--data-dir", str(small_subset), "--epochs", "2", "--batch-size", "32", "--report-to", "none"]
    for path in ("dataloader", "device"):
        flags = [*common, "--data-path", path, "--output-dir", str(tmp_path / path)]
        check(launch(2, *flags) if world == 2 else train_cli(*flags, "--cpu"))
    a, b = load_file(tmp_path / "dataloader" / "model.safetensors"), load_file(tmp_path / "device" / "model.safetensors")
    for name in a:  # the same batches in the same order: only summation order can differ
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=5e-5)
    ra, rb = results(tmp_path / "dataloader"), results(tmp_path / "device")
    assert ra["steps"] == rb["steps"] and ra["test_samples"] == rb["test_samples"] == 1001
    assert rb["test_accuracy"] == pytest.approx(ra["test_accuracy"], abs=2 / 1001)


# ---------------------------------------------------------------- a stalled peer, a lost launcher


def start_launch(out, *flags: str) -> subprocess.Popen:
    """`accelerate launch` of 2 CPU processes in the background, as a user starts one."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "accelerate_configs" / "cpu.yaml"), "--num_processes", "2", "--main_process_port",
           str(free_port()), "-m", "mnist_dist.train", "--cpu", "--dataset", "mnist-5k", "--report-to", "none",
           "--output-dir", str(out), *flags]
    return subprocess.Popen(cmd, cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def training_workers(proc: subprocess.Popen, out, timeout: float = 120) -> list[psutil.Process]:
    """The launch's two training processes, once they log their first steps (metrics.jsonl)."""
    deadline = time.monotonic() + timeout
    while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.05)
    workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if "mnist_dist.train" in " ".join(p.cmdline())]
    assert len(workers) == 2, workers
    return sorted(workers, key=lambda p: int(p.environ()["RANK"]))


@pytest.mark.slow
def test_a_stalled_peer_ends_the_run_after_timeout_naming_it_and_each_process_says_where_it_was(tmp_path):
    """Rank 1's 20th training step never returns (tests/models.py:StallsOnRank): rank 0 waits in the step's
    all-reduce until --timeout, names rank 1 and the last step both took together (15: --log-every 5); both
    processes' stacks show where they were."""
    out = tmp_path / "out"
    proc = start_launch(out, "--epochs", "1000", "--log-every", "5", "--timeout", "10",
                        "--model", "tests.models:StallsOnRank")
    rank0, rank1 = training_workers(proc, out)
    try:
        rank0.wait(timeout=120)
    finally:
        with contextlib.suppress(psutil.NoSuchProcess):  # what torchrun does too, after a grace of 30 s
            rank1.kill()
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert re.search(r"error: process 0 waited more than --timeout 10 s for the other processes \(rank 1 on [^)]+\) "
                     r"after step 15: rank 1 on \S+ did not come \(stalled or gone\)\. Each process's Python stack: "
                     rf"{re.escape(str(out))}/stacks/rank-N.txt", output), output[-3000:]
    assert not (out / "results.json").exists()
    stalled, waiting = (out / "stacks" / "rank-1.txt").read_text(), (out / "stacks" / "rank-0.txt").read_text()
    assert "Timeout (0:00:08)!" in stalled and re.search(r'tests/models.py", line \d+ in stall_forever', stalled), stalled
    # rank 0: the watchdog's stack inside the step, then the collective's error and where it was raised
    assert "Timeout (0:00:08)!" in waiting and re.search(r'mnist_dist/steps.py", line \d+ in train_step', waiting), waiting
    assert "mnist_dist: rank 0: a collective failed after step 15:" in waiting and "Traceback" in waiting


@pytest.mark.slow
def test_workers_whose_launcher_died_stop_with_a_checkpoint_instead_of_training_on(tmp_path):
    out = tmp_path / "out"
    proc = start_launch(out, "--epochs", "1000", "--log-every", "5")
    workers = training_workers(proc, out)
    proc.send_signal(signal.SIGUSR1)  # its default action kills the launcher, and only the launcher
    proc.wait(timeout=60)
    gone, alive = psutil.wait_procs(workers, timeout=120)
    for p in alive:
        p.kill()
    assert not alive, "training processes went on without their launcher"
    output = proc.stdout.read()
    assert re.search(r"stopped by the loss of its launcher \(process \d+\) after step \d+; checkpoint", output), output[-3000:]
    (saved,) = checkpoint.complete_checkpoints(out)[-1:]
    state = checkpoint.read_state(saved)
    assert state["world_size"] == 2 and state["global_step"] % 5 == 0  # at a check point (--log-every 5)
    assert not (out / "results.json").exists() and not (out / ".lock.json").exists()


def test_a_bad_command_on_two_processes_says_its_error_once(tmp_path, monkeypatch):
    message = f"error: --resume {tmp_path / 'nowhere'}: no such checkpoint directory"
    proc = launch(2, "--dataset", "mnist-5k", "--resume", str(tmp_path / "nowhere"), timeout=120)
    assert proc.returncode != 0 and "rank      : 1 (local_rank: 1)" in proc.stderr  # two processes were started
    assert proc.stderr.count(message) == 1
    # mnist_dist.launch ends the launch with the processes' own 2, without the launcher's ChildFailedError page
    proc = launch(2, "--dataset", "mnist-5k", "--resume", str(tmp_path / "nowhere"), launcher="mnist_dist.launch",
                  timeout=120)
    assert proc.returncode == 2 and proc.stderr.count(message) == 1, proc.stderr[-2000:]
    assert "ChildFailedError" not in proc.stderr and "Traceback" not in proc.stderr
    # the second process, whether or not the launcher stopped it first, says nothing of it
    monkeypatch.setenv("RANK", "1")
    proc = check(train_here("--dataset", "mnist-5k", "--resume", str(tmp_path / "nowhere")), rc=2)
    assert proc.stderr == ""


@pytest.mark.parametrize("value", ["soon", "0", "99999"])
def test_a_bad_waiting_note_is_refused_naming_the_variable(value, monkeypatch, capsys):
    monkeypatch.setenv("MNIST_DIST_WAITING_NOTE", value)
    assert launcher.main(["--cpu", "-m", "mnist_dist.train"]) == 2
    assert f"MNIST_DIST_WAITING_NOTE={value!r}: must be a whole number of seconds" in capsys.readouterr().err


@pytest.mark.slow
def test_a_node_waiting_for_the_others_says_where_and_a_signal_ends_its_wait(tmp_path):
    port = free_port()
    cmd = [sys.executable, "-m", "mnist_dist.launch", "--multi_gpu", "--num_machines", "2", "--num_processes", "2",
           "--machine_rank", "0", "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
           "--rdzv_backend", "static", "--same_network", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "mnist_dist.train", "--cpu", "--dataset", "mnist-5k", "--output-dir", str(tmp_path / "o")]
    proc = subprocess.Popen(cmd, cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "ACCELERATE_USE_CPU": "1",
                                 "MNIST_DIST_WAITING_NOTE": "2"})
    waiting = f"mnist_dist.launch: node 0 of 2 has waited 2 s for the others at 127.0.0.1:{port} (the rendezvous)"
    lines = []
    for line in proc.stdout:  # the second node never comes
        lines.append(line)
        if waiting in line:
            break
    assert waiting in "".join(lines), "".join(lines)[-3000:]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM  # nothing had started, nothing was saved
    assert not (tmp_path / "o" / "checkpoints").exists()


@pytest.mark.slow
def test_a_stalled_main_process_is_named_by_the_others_within_the_barriers_wait(tmp_path):
    """StallWatch.missing on rank 1 while rank 0 never comes (tests/workers/missing_main.py): rank 1 names rank 0
    after a quarter of --timeout and a little more, not after torch's default group timeout of 30 minutes."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), str(REPO / "tests" / "workers" / "missing_main.py"), str(tmp_path), "3"]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "ACCELERATE_USE_CPU": "1"}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    said = tmp_path / "rank-1.json"
    try:
        deadline = time.monotonic() + 120
        while not said.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        for worker in psutil.Process(proc.pid).children(recursive=True):
            worker.kill()
        output, _ = proc.communicate(timeout=60)
    result = json.loads(said.read_text())
    print(f"rank 1 named rank 0 after {result['waited']:.1f} s (--timeout 3)")
    assert result["missing"] == [0], output[-3000:]
    assert result["waited"] < 3 + 2 + 10, result

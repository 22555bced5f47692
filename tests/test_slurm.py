"""`sbatch slurm/train.sh` on a real (throw-away, local) SLURM cluster with two nodes."""

import os
import re
import sys
import time
from pathlib import Path

import pytest

from .helpers import REPO, check, close_weights, results, run, same_results, same_weights, train_cli, train_cmd
from . import slurm_cluster
from .slurm_cluster import Cluster

pytestmark = pytest.mark.slow  # the quick loop (-m "not slow") leaves these out
SCRIPT = REPO / "slurm" / "train.sh"
FLAGS = ["--dataset", "mnist-5k", "--epochs", "2", "--report-to", "none"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if not slurm_cluster.installed():
        needs = f"SLURM is not installed: apt-get install {' '.join(slurm_cluster.PACKAGES)} (as .ci/run does)"
        pytest.fail(needs) if os.environ.get("CI") else pytest.skip(needs)
    with Cluster(tmp_path_factory.mktemp("slurm"), nodes=2) as c:
        yield c


def job_env(**extra) -> dict:
    # the job runs this interpreter's environment: its python first on PATH
    path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"
    return {"PATH": path, "MNIST_DIST_CPU": "1", **extra}


def submit(cluster, workdir: Path, *sbatch_args: str, flags=FLAGS, env=None, wait=True):
    """sbatch the script; with `wait`, return once the job has ended, its exit status as the returncode."""
    args = ["sbatch", "--parsable", f"--chdir={workdir}", *sbatch_args, str(SCRIPT), *flags]
    proc = cluster.run(*args, env=env or job_env())
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip().split(";")[0]
    if wait:  # polled here: `sbatch --wait` polls ever more slowly (a 9 s job returned after 42 s)
        state, _ = wait_for_job(cluster, job_id)
        proc.returncode = 0 if state == "COMPLETED" else 1
    return proc, job_id


def wait_for_job(cluster, job_id: str, timeout: float = 240) -> tuple[str, str]:
    """(final JobState, `scontrol show job` text) once the job has ended."""
    deadline = time.monotonic() + timeout
    while True:
        info = cluster.run("scontrol", "show", "job", job_id).stdout
        state = re.search(r"JobState=(\S+)", info).group(1)
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return state, info
        assert time.monotonic() < deadline, f"job {job_id} still {state} after {timeout} s"
        time.sleep(0.25)


def job_log(workdir: Path, job_id: str) -> str:
    return (workdir / f"mnist_dist-{job_id}.out").read_text()


def test_one_node_cpu_job(cluster, tmp_path):
    proc, job_id = submit(cluster, tmp_path, "--nodes=1")
    log = job_log(tmp_path, job_id)
    assert proc.returncode == 0, log[-3000:]
    r = results(tmp_path / "outputs" / f"slurm-{job_id}")
    assert r["world_size"] == 1 and r["test_samples"] == 10000 and r["device_type"] == "cpu"
    assert f"rendezvous 127.0.0.1:{20000 + int(job_id) % 20000}" in log


def test_two_node_job_is_one_run_over_both_nodes(cluster, tmp_path):
    proc, job_id = submit(cluster, tmp_path, "--nodes=2")
    log = job_log(tmp_path, job_id)
    assert proc.returncode == 0, log[-3000:]
    r = results(tmp_path / "outputs" / f"slurm-{job_id}")
    assert r["world_size"] == 2 and r["global_batch_size"] == 256 and r["test_samples"] == 10000
    assert "on 2 node(s): node[1-2]" in log
    assert log.count("epoch 2/2:") == 1  # one main process reports


def test_usr1_checkpoints_requeues_and_finishes_like_an_uninterrupted_run(cluster, tmp_path):
    flags = [*FLAGS, "--epochs", "3", "--checkpoint-every", "5", "--seed", "9"]
    reference = tmp_path / "reference"
    check(train_cli(*flags, "--cpu", "--output-dir", str(reference)))

    proc, job_id = submit(cluster, tmp_path, "--nodes=1", flags=flags, wait=False)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "outputs" / f"slurm-{job_id}"
    deadline = time.monotonic() + 120
    while not list((out / "checkpoints").glob("step_*[0-9]")):
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.05)
    check_signal = cluster.run("scancel", "--signal=USR1", "--batch", job_id)
    assert check_signal.returncode == 0, check_signal.stderr

    state, info = wait_for_job(cluster, job_id)
    log = job_log(tmp_path, job_id)
    assert state == "COMPLETED", log[-3000:]
    assert "Restarts=1" in info
    assert "USR1 received" in log and "requeueing job" in log and "resuming from" in log
    assert same_weights(out, reference)
    same_results(out, reference)


def test_a_job_preempted_on_2_nodes_resumes_on_the_1_node_left_to_the_same_trajectory(cluster, tmp_path):
    flags = [*FLAGS, "--epochs", "20", "--checkpoint-every", "5", "--seed", "4"]  # 400 steps: preempted twice before the end
    proc, job_id = submit(cluster, tmp_path, "--nodes=2", flags=flags, wait=False)
    out = tmp_path / "outputs" / f"slurm-{job_id}"
    deadline = time.monotonic() + 120
    while not list((out / "checkpoints").glob("step_*[0-9]")):
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.05)
    assert "on 2 node(s)" in job_log(tmp_path, job_id)
    try:  # node2 is lost while the job is preempted; it is requeued, and given the node that is left
        cluster.run("scontrol", "update", "NodeName=node2", "State=DRAIN", "Reason=test")
        assert cluster.run("scancel", "--signal=USR1", "--batch", job_id).returncode == 0
        while "JobState=PENDING" not in cluster.run("scontrol", "show", "job", job_id).stdout:
            assert time.monotonic() < deadline + 120, "the job was not requeued"
            time.sleep(0.1)
        shrunk = cluster.run("scontrol", "update", f"JobId={job_id}", "NumNodes=1", "NumTasks=1")
        assert shrunk.returncode == 0, shrunk.stderr
        while "the world size changed from 2 to 1" not in job_log(tmp_path, job_id):
            assert time.monotonic() < deadline + 240, "the job did not resume on one node"
            time.sleep(0.05)
        # preempted again on the same node: the same command resumes it, at the same world size
        assert cluster.run("scancel", "--signal=USR1", "--batch", job_id).returncode == 0
        state, info = wait_for_job(cluster, job_id)
    finally:
        cluster.run("scontrol", "update", "NodeName=node2", "State=RESUME")
    log = job_log(tmp_path, job_id)
    assert state == "COMPLETED" and "Restarts=2" in info, log[-3000:]
    assert "on 1 node(s): node1" in log and log.count("resuming from") == 2
    assert log.count("the world size changed") == 1
    # the reference takes the same world sizes at the same steps by hand, without SLURM: 2 processes x 128
    # up to the first stop, then 1 x 128 x 2. (Against a run on 1 process throughout, 400 Adam steps amplify
    # the different order of the float sums to ~3e-2 on some CPUs; test_checkpoint compares short runs so.)
    first_stop = int(re.search(r"stopped by signal \w+ after step (\d+)", log).group(1))
    reference = tmp_path / "reference"
    check(run(train_cmd(2, *flags, "--max-steps", str(first_stop), "--output-dir", str(reference))))
    check(run(train_cmd(1, "--resume", "auto", "--max-steps", "none", "--output-dir", str(reference))))
    resumed, ref = results(out), results(reference)
    # the batch each process began with is kept, and 2 batches accumulated a step make up the global batch
    assert (resumed["world_size"], resumed["per_process_batch_size"], resumed["config"]["gradient_accumulation_steps"],
            ref["world_size"]) == (1, 128, 2, 1)
    print(f"2 nodes -> 1: weights within {close_weights(out, reference, 1e-5):.1e} of the same resize by hand")
    assert (resumed["steps"], resumed["samples_seen"]) == (ref["steps"], ref["samples_seen"])
    assert abs(resumed["test_accuracy"] - ref["test_accuracy"]) <= 0.002


def test_an_array_job_gives_each_task_its_own_directory_seed_and_log(cluster, tmp_path):
    proc, job_id = submit(cluster, tmp_path, "--nodes=1", "--array=0-1", "--output=%x-%A_%a.out",
                          flags=[*FLAGS, "--max-steps", "5"], wait=False)
    for task in (0, 1):
        state, _ = wait_for_job(cluster, f"{job_id}_{task}")
        log = (tmp_path / f"mnist_dist-{job_id}_{task}.out").read_text()
        assert state == "COMPLETED", log[-3000:]
        r = results(tmp_path / "outputs" / f"slurm-{job_id}_{task}")
        assert (r["config"]["seed"], r["steps"]) == (task, 5)


def test_two_array_tasks_are_two_workers_of_one_sweep(cluster, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("dir: sweep\nflags:\n  dataset: mnist-5k\n  cpu: true\n  max-steps: 5\n  val-fraction: 0.1\n"
                    "  report-to: none\nspace:\n  hidden-sizes: [16, 32]\n  lr: [0.001, 0.002]\n")
    args = ["sbatch", "--parsable", f"--chdir={tmp_path}", "--array=0-1", str(REPO / "slurm" / "sweep.sh"), str(spec)]
    proc = cluster.run(*args, env=job_env())
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip().split(";")[0]
    logs = []
    for task in (0, 1):
        state, _ = wait_for_job(cluster, f"{job_id}_{task}")
        logs.append((tmp_path / f"mnist_dist-sweep-{job_id}_{task}.out").read_text())
        assert state == "COMPLETED", logs[-1][-3000:]
    ran = [re.findall(r"trial (\d+) seed 0", log) for log in logs]
    assert all(ran) and sorted(sum(ran, [])) == ["0", "1", "2", "3"], logs  # both worked, each trial once
    assert "(array task 1)" in logs[1]
    assert (tmp_path / "sweep" / "summary.md").read_text().count("**Chosen on validation:**") == 1


def test_an_accelerate_config_file_is_passed_through_with_the_rendezvous_from_slurm(cluster, tmp_path):
    config = tmp_path / "bf16.yaml"
    config.write_text((REPO / "accelerate_configs" / "cpu.yaml").read_text().replace("mixed_precision: 'no'",
                                                                                    "mixed_precision: bf16"))
    proc, job_id = submit(cluster, tmp_path, "--nodes=2", flags=[*FLAGS, "--max-steps", "5"],
                          env=job_env(MNIST_DIST_ACCELERATE_CONFIG=str(config)))
    log = job_log(tmp_path, job_id)
    assert proc.returncode == 0, log[-3000:]
    r = results(tmp_path / "outputs" / f"slurm-{job_id}")
    assert (r["world_size"], r["mixed_precision"]) == (2, "bf16")


def test_a_gpu_job_that_finds_no_gpu_says_what_to_do(cluster, tmp_path):
    env = {k: v for k, v in job_env().items() if k != "MNIST_DIST_CPU"}
    proc, job_id = submit(cluster, tmp_path, "--nodes=1", env={**env, "MNIST_DIST_CPU": "0"})
    log = job_log(tmp_path, job_id)
    assert proc.returncode != 0
    assert "mnist_dist: no GPU on" in log and "MNIST_DIST_CPU=1" in log and "command not found" not in log


def test_the_doctor_checks_both_nodes_as_the_run_would_launch(cluster, tmp_path):
    proc, job_id = submit(cluster, tmp_path, "--nodes=2", flags=["--doctor", "--dataset", "mnist-5k"])
    log = job_log(tmp_path, job_id)
    assert proc.returncode == 0, log[-3000:]
    assert "mnist_dist.doctor: 2 process(es), backend gloo" in log and "all well" in log
    assert re.search(r"^ok\s+0\s+\S+\s+0\s+cpu", log, re.M) and re.search(r"^ok\s+1\s+\S+\s+0\s+cpu", log, re.M)
    assert re.search(r"all-reduce \(gloo\) of 64 MiB: [\d.]+ ms, bus bandwidth [\d.]+ GB/s", log)
    assert not (tmp_path / "outputs" / f"slurm-{job_id}").exists()  # the doctor trains nothing, writes nothing

"""Checkpoints, exact resume and preemption, with real processes killed and signalled mid-run."""

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
import torch
from safetensors.torch import load_file

from mnist_dist import checkpoint
from mnist_dist.config import TrainConfig, parse_args
from mnist_dist.resume import Resume
from mnist_dist.stopping import EXIT_PREEMPTED

from .helpers import (COMPARED, REPO, check, close_weights, free_port, launch, mnist5k, results, run, same_results,
    same_weights, start, stopped_in, train_cmd, train_here, unmeasured, wait_for_checkpoint, write_dataset)

pytestmark = pytest.mark.slow  # the quick loop (-m "not slow") leaves these out
RUN = ["--dataset", "mnist-5k", "--epochs", "2", "--checkpoint-every", "7", "--seed", "5"]


def kill_launch(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and every training process: torchrun starts each worker in a session of its
    own, out of the launcher's process group."""
    everyone = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for process in everyone:
        process.kill()
    psutil.wait_procs(everyone, timeout=30)
    proc.wait()


def resume_matches(world: int, out, ref) -> subprocess.CompletedProcess:
    """`--resume auto` in `out` finishes with the weights and results of the uninterrupted `ref`."""
    proc = check(run(train_cmd(world, *RUN, "--output-dir", str(out), "--resume", "auto")))
    assert "resuming from" in proc.stdout
    assert same_weights(out, ref)
    same_results(out, ref)
    return proc


def signal_mid_run(world: int, out, sig: int, times: int = 1, launcher: str = "accelerate.commands.launch",
                   stacks_first: bool = False) -> subprocess.Popen:
    """Start a run, signal it once a checkpoint exists, wait for it to end. With `stacks_first`, SIGUSR2 first,
    and the signal once every process has written its stack."""
    proc = start(world, *RUN, "--output-dir", str(out), launcher=launcher)
    wait_for_checkpoint(out, 7, proc)
    if stacks_first:
        proc.send_signal(signal.SIGUSR2)
        stacks = [out / "stacks" / f"rank-{rank}.txt" for rank in range(world)]
        deadline = time.monotonic() + 60
        while not all(path.exists() and "most recent call first" in path.read_text() for path in stacks):
            assert time.monotonic() < deadline and proc.poll() is None, "no stacks after SIGUSR2"
            time.sleep(0.02)
    for _ in range(times):
        proc.send_signal(sig)
    proc.output, _ = proc.communicate(timeout=60)
    return proc


_references = {}  # world size -> output dir: one run each, however pytest orders the tests


@pytest.fixture(params=[1, 2], ids=["1proc", "2procs"])
def reference(request, tmp_path_factory):
    """An uninterrupted run to compare interrupted ones with."""
    world = request.param
    if world not in _references:
        out = tmp_path_factory.mktemp(f"reference{world}")
        check(run(train_cmd(world, *RUN, "--output-dir", str(out))))
        _references[world] = out
    return world, _references[world]


def test_checkpoints_are_complete_and_only_the_newest_are_kept(reference):
    _, out = reference
    names = sorted(os.listdir(out / "checkpoints"))
    assert len(names) == 2 and not any(n.endswith(".tmp") for n in names)
    steps = [checkpoint.read_state(out / "checkpoints" / n)["global_step"] for n in names]
    last = results(out)["steps"]
    assert steps[-1] == last  # the epoch-end checkpoint of the last epoch


def test_kill_9_at_a_random_step_then_resume_auto_ends_bit_identical(reference, tmp_path):
    world, ref = reference
    kill_after = random.Random(world).randrange(8, 70)  # steps 1..80 (40 x 2 epochs on 1 process)
    if world == 2:
        kill_after //= 2
    out = tmp_path / "out"
    proc = start(world, *RUN, "--output-dir", str(out))
    wait_for_checkpoint(out, kill_after, proc)
    kill_launch(proc)  # the whole launch, no chance to clean up
    assert not (out / "results.json").exists()
    resume_matches(world, out, ref)


@pytest.mark.parametrize("reference", [1], indirect=True, ids=["1proc"])
def test_sigusr1_saves_a_checkpoint_and_exits_with_the_preempted_code(reference, tmp_path):
    _, ref = reference
    out = tmp_path / "out"
    proc = signal_mid_run(1, out, signal.SIGUSR1, times=2)  # a second signal changes nothing
    assert proc.returncode == EXIT_PREEMPTED, proc.output[-2000:]
    stopped_at = int(re.search(r"stopped by signal SIGUSR1 after step (\d+);", proc.output)[1])
    assert checkpoint.read_state(checkpoint.complete_checkpoints(out)[-1])["global_step"] == stopped_at
    assert not (out / "results.json").exists()
    resume_matches(1, out, ref)


@pytest.mark.parametrize("reference", [1], indirect=True, ids=["1proc"])
def test_ctrl_c_stops_as_sigterm_does_and_later_stop_signals_keep_the_status(reference, tmp_path):
    _, ref = reference
    out = tmp_path / "out"
    proc = start(1, *RUN, "--output-dir", str(out))
    wait_for_checkpoint(out, 7, proc)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGTERM):  # the later ones during its exit
        proc.send_signal(sig)
        time.sleep(0.1)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_PREEMPTED, output[-2000:]
    assert "Traceback" not in output and "KeyboardInterrupt" not in output
    stopped_at = int(re.search(r"stopped by signal SIGINT after step (\d+);", output)[1])
    assert checkpoint.read_state(checkpoint.complete_checkpoints(out)[-1])["global_step"] == stopped_at
    resume_matches(1, out, ref)


@pytest.mark.parametrize("reference", [1], indirect=True, ids=["1proc"])
def test_a_second_ctrl_c_ends_the_run_at_once_and_the_newest_checkpoint_resumes(reference, tmp_path):
    _, ref = reference
    out = tmp_path / "out"
    proc = run([sys.executable, str(REPO / "tests" / "workers" / "stop_in.py"), "--cpu", *RUN, "--output-dir",
                str(out)], env={"STOP_IN": "stretch:3", "STOP_SIGNAL": "SIGINT,SIGINT"})  # steps 14-21
    assert proc.returncode == 128 + signal.SIGINT, proc.stderr[-2000:]
    assert "second Ctrl-C: stopped at once" in proc.stderr and "Traceback" not in proc.stderr
    assert [checkpoint.read_state(p)["global_step"] for p in checkpoint.complete_checkpoints(out)] == [7, 14]
    resume_matches(1, out, ref)


def test_a_second_ctrl_c_to_the_launcher_ends_two_processes_at_once(tmp_path):
    out = tmp_path / "out"
    proc = start(2, *RUN, "--epochs", "20", "--output-dir", str(out), launcher="mnist_dist.launch")
    wait_for_checkpoint(out, 7, proc)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGINT, output[-3000:]
    assert "second Ctrl-C: training processes killed" in output and "Traceback" not in output
    assert checkpoint.resolve("auto", out) is not None  # the newest complete checkpoint loads: --resume auto works


# each launcher docs/resume.md lists, the signal, the launcher's exit status (its table)
LAUNCHER_STATUS = [
    ("mnist_dist.launch", signal.SIGTERM, EXIT_PREEMPTED),
    ("mnist_dist.launch", signal.SIGUSR1, EXIT_PREEMPTED),
    ("mnist_dist.launch", signal.SIGINT, EXIT_PREEMPTED),
    ("accelerate.commands.launch", signal.SIGTERM, 128 + signal.SIGTERM),
    ("accelerate.commands.launch", signal.SIGINT, 128 + signal.SIGINT),  # its agent sends each worker SIGINT
    ("torch.distributed.run", signal.SIGTERM, 1),
]


@pytest.fixture(scope="module")
def every_step(tmp_path_factory):
    """The uninterrupted 2-process run of RUN with a checkpoint after every step, all kept: what a run stopped
    at any step must have saved."""
    out = tmp_path_factory.mktemp("every_step")
    flags = ["--checkpoint-every", "1", "--keep-checkpoints", "100", "--output-dir", str(out)]
    check(run(train_cmd(2, *RUN, *flags)))  # the later --checkpoint-every wins
    return out


# what two checkpoints of the same trajectory may differ in: when they were taken and the checkpoint flags
TIMES = ("train_seconds", "seconds_to_first_step", "validation_seconds", "seconds", "eval_seconds",
         "peak_memory_mib", "model_flops_per_second")


def same_checkpoint(a, b) -> None:
    """Checkpoints `a` and `b` hold the same training state (but its times, run id and checkpoint flags),
    weights, optimizer state and every process's random states, bit for bit."""
    def same(x, y) -> bool:  # nested state dicts of tensors and arrays
        if isinstance(x, (torch.Tensor, np.ndarray)):
            return type(x) is type(y) and x.shape == y.shape and bool((x == y).all())
        if isinstance(x, dict):
            return isinstance(y, dict) and x.keys() == y.keys() and all(same(x[k], y[k]) for k in x)
        if isinstance(x, (list, tuple)):
            return len(x) == len(y) and all(same(u, v) for u, v in zip(x, y))
        return x == y

    def state(path) -> dict:
        kept = {k: v for k, v in checkpoint.read_state(path).items() if k not in (*TIMES, "run_id", "config")}
        return kept | {"history": [{k: v for k, v in h.items() if k not in TIMES} for h in kept["history"]]}

    assert state(a) == state(b)
    assert same(load_file(a / "model.safetensors"), load_file(b / "model.safetensors"))
    load = lambda path: torch.load(path, map_location="cpu", weights_only=False)
    for name in ["optimizer.bin", *(f"random_states_{rank}.pkl" for rank in range(state(a)["world_size"]))]:
        assert same(load(a / name), load(b / name)), name


@pytest.mark.parametrize("reference", [2], indirect=True, ids=["2procs"])
@pytest.mark.parametrize("launcher, sig, status", LAUNCHER_STATUS,
                         ids=[f"{l.split('.')[0]}-{s.name}" for l, s, _ in LAUNCHER_STATUS])
def test_a_signal_to_the_launcher_checkpoints_every_process_at_the_same_step(reference, every_step, tmp_path, launcher,
                                                                             sig, status):
    _, ref = reference
    out = tmp_path / "out"
    # to the launcher, which forwards it to every worker; mnist_dist.launch's SIGTERM case gets a SIGUSR2 first: the
    # stacks, and a run that goes on as if nothing came (its checkpoint and its end below are the uninterrupted run's)
    stacks = (launcher, sig) == ("mnist_dist.launch", signal.SIGTERM)
    proc = signal_mid_run(2, out, sig, launcher=launcher, stacks_first=stacks)
    assert proc.returncode == status, proc.output[-3000:]
    if launcher == "mnist_dist.launch" or sig == signal.SIGINT:
        assert "Traceback" not in proc.output and "KeyboardInterrupt" not in proc.output
    # the main process reports; mnist_dist.launch sends Ctrl-C on as SIGTERM
    said = signal.SIGTERM if launcher == "mnist_dist.launch" and sig == signal.SIGINT else sig
    assert len(re.findall(rf"stopped by signal {said.name} after step \d+;", proc.output)) == 1, proc.output[-3000:]
    saved = checkpoint.complete_checkpoints(out)[-1]
    state = checkpoint.read_state(saved)
    assert state["world_size"] == 2
    # what every launcher saved at the signal is the uninterrupted run's state at that step; that such a
    # checkpoint resumes to the uninterrupted run's end is shown once, with the launcher slurm/train.sh uses
    same_checkpoint(saved, every_step / "checkpoints" / f"step_{state['global_step']:08d}")
    if stacks:
        for rank in (0, 1):
            stack = (out / "stacks" / f"rank-{rank}.txt").read_text()
            assert re.search(r'mnist_dist/loop.py", line \d+ in run', stack), stack
        resume_matches(2, out, ref)


@pytest.mark.parametrize("reference", [2], indirect=True, ids=["2procs"])
def test_torchrun_restarts_the_group_after_a_kill_9_and_the_run_resumes_by_itself(reference, tmp_path):
    _, ref = reference
    out = tmp_path / "out"
    # one restart allowed: the first one must succeed
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--max-restarts", "1",
                "--master-port", str(free_port()), "-m", "mnist_dist.train", "--cpu", *RUN, "--resume", "auto",
                "--output-dir", str(out)]
    proc = subprocess.Popen(torchrun, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1", "ACCELERATE_USE_CPU": "1"},
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_checkpoint(out, 14, proc)
    workers = [p for p in psutil.Process(proc.pid).children(recursive=True)
               if "mnist_dist.train" in p.cmdline() and "torch.distributed.run" not in p.cmdline()]
    assert len(workers) == 2
    workers[1].kill()
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, output[-3000:]
    assert len(re.findall(r"resuming from \S+step_000000\d\d \(step (\d+)\)", output)) == 1
    assert results(out)["world_size"] == 2
    assert same_weights(out, ref)
    same_results(out, ref)


# ---------------------------------------------------------------- refusals


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished")
    check(train_here(*RUN, "--cpu", "--output-dir", str(out)))
    return out


def test_truncated_checkpoint_is_refused_and_nothing_is_written(finished, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(checkpoint.complete_checkpoints(finished)[-1], damaged)
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    out = tmp_path / "out"
    proc = check(train_here(*RUN, "--cpu", "--output-dir", str(out), "--resume", str(damaged)), rc=2)
    assert f"error: {damaged / 'model.safetensors'}: damaged checkpoint file" in proc.stderr
    assert not out.exists()


def test_checkpoint_without_its_state_file_is_refused(finished, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(checkpoint.complete_checkpoints(finished)[-1], partial)
    (partial / checkpoint.STATE_NAME).unlink()
    proc = check(train_here(*RUN, "--cpu", "--output-dir", str(tmp_path / "o"), "--resume", str(partial)), rc=2)
    assert f"{partial}: incomplete checkpoint (no training_state.json)" in proc.stderr


def test_checkpoint_whose_state_lacks_a_field_is_refused_naming_it(finished, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(checkpoint.complete_checkpoints(finished)[-1], damaged)
    state_file = damaged / checkpoint.STATE_NAME
    state = json.loads(state_file.read_text())
    del state["history"]
    state_file.write_text(json.dumps(state))
    proc = check(train_here(*RUN, "--cpu", "--output-dir", str(tmp_path / "o"), "--resume", str(damaged)), rc=2)
    assert f"{damaged}: training_state.json of this checkpoint lacks history" in proc.stderr


def test_resume_auto_skips_incomplete_checkpoints(finished, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(finished / "checkpoints", out / "checkpoints")
    older, newer = checkpoint.complete_checkpoints(out)
    (newer / checkpoint.STATE_NAME).unlink()  # as if killed before the state was written
    (out / "checkpoints" / "step_99999999.tmp").mkdir()  # as if killed mid-save
    assert checkpoint.resolve("auto", out) == older


def test_resume_auto_without_checkpoints_starts_fresh(tmp_path):
    check(train_here("--dataset", "mnist-5k", "--cpu", "--max-steps", "3", "--resume", "auto", "--output-dir", str(tmp_path)))
    assert results(tmp_path)["steps"] == 3


def test_a_run_cut_short_by_max_steps_resumes_with_more_steps_as_if_never_cut(tmp_path):
    flags = ("--dataset", "mnist-5k", "--cpu", "--seed", "5")  # 40 steps an epoch
    check(train_here(*flags, "--max-steps", "50", "--output-dir", str(tmp_path / "whole")))
    check(train_here(*flags, "--max-steps", "25", "--output-dir", str(tmp_path / "cut")))
    cut = results(tmp_path / "cut")
    assert (cut["steps"], cut["samples_seen"], cut["epochs"]) == (25, 25 * 128, 1)  # evaluated where it stopped
    proc = check(train_here(*flags, "--max-steps", "50", "--output-dir", str(tmp_path / "cut"), "--resume", "auto"))
    assert "epoch 1/2:" in proc.stdout and "epoch 2/2:" in proc.stdout  # the rest of epoch 1, then epoch 2
    whole, resumed = results(tmp_path / "whole"), results(tmp_path / "cut")
    assert {k: resumed[k] for k in COMPARED} == {k: whole[k] for k in COMPARED}
    assert [unmeasured(h) for h in resumed["history"]] == [unmeasured(h) for h in whole["history"]]
    a, b = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "cut" / "model.safetensors")
    assert all(a[name].equal(b[name]) for name in a)


def test_resume_on_a_world_size_that_does_not_divide_the_global_batch_is_refused(finished, tmp_path):
    saved = checkpoint.complete_checkpoints(finished)[-1]
    proc = check(launch(3, *RUN, "--output-dir", str(tmp_path / "o"), "--resume", str(saved)), rc=1)  # the launcher's status
    assert (f"{saved} was trained with a global batch of 128 (1 processes x 128); 3 processes cannot split it evenly. "
            "Resume on a number of processes that divides it: 1, 2, 4, 8, 16, 32, 64, 128") in proc.stderr
    assert not (tmp_path / "o").exists()


def test_resume_with_a_batch_size_that_cannot_make_the_global_batch_is_refused(finished, tmp_path):
    ckpt = checkpoint.complete_checkpoints(finished)[-1]  # 1 x 128; --batch-size 64 would accumulate 2 batches
    proc = check(train_here(*RUN, "--cpu", "--batch-size", "96", "--output-dir", str(tmp_path), "--resume", str(ckpt)),
                 rc=2)
    assert (f"--batch-size=96 on 1 process(es) cannot make the global batch of 128 that {ckpt} was trained with; "
            "resume with one of: --batch-size 128 --gradient-accumulation-steps 1;") in proc.stderr


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_good_checkpoint(tmp_path):
    # a learning rate of 1e30 blows the weights up within a few steps
    proc = check(train_here("--dataset", "mnist-5k", "--cpu", "--lr", "1e30", "--checkpoint-every", "1",
                           "--output-dir", str(tmp_path)), rc=1)
    assert "error: non-finite training loss or gradients at step" in proc.stderr
    step = int(proc.stderr.split("non-finite training loss or gradients at step ")[1].split()[0])
    kept = checkpoint.complete_checkpoints(tmp_path)
    assert [checkpoint.read_state(p)["global_step"] for p in kept] == [s for s in (step - 2, step - 1) if s >= 1]
    if kept:
        assert f"hold the last good state (step {step - 1})" in proc.stderr
    assert not (tmp_path / "results.json").exists()
    # without per-step checkpoints the processes only compare notes every --log-every steps, yet the
    # error still names the first bad step: the device counted the steps it skipped since then
    proc = check(train_here("--dataset", "mnist-5k", "--cpu", "--lr", "1e30", "--log-every", "30",
                           "--output-dir", str(tmp_path / "later")), rc=1)
    assert f"non-finite training loss or gradients at step {step} " in proc.stderr
    assert "no checkpoint was saved before it" in proc.stderr and "hold the last good state" not in proc.stderr


@pytest.mark.parametrize(
    "extra",
    # the tuned recipe: the one-cycle schedule's position, and the Adam betas it cycles, come back too
    [["--data-path", "device"], ["--data-path", "device", "--recipe", "tuned"]],
    ids=["device-path", "device-path-tuned-recipe"],
)
def test_run_killed_mid_epoch_resumes_bit_identical(extra, tmp_path):
    flags = [*RUN, *extra]
    check(run(train_cmd(1, *flags, "--output-dir", str(tmp_path / "reference"))))
    out = tmp_path / "out"
    proc = start(1, *flags, "--output-dir", str(out))
    wait_for_checkpoint(out, 21, proc)  # a mid-epoch checkpoint (40 steps per epoch)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    check(run(train_cmd(1, *flags, "--output-dir", str(out), "--resume", "auto")))
    assert same_weights(out, tmp_path / "reference")
    same_results(out, tmp_path / "reference")


def test_resume_that_would_stretch_a_schedule_is_refused(tmp_path):
    flags = ["--dataset", "mnist-5k", "--cpu", "--schedule", "cosine", "--max-steps", "5", "--output-dir", str(tmp_path)]
    check(train_here(*flags))
    ckpt = checkpoint.complete_checkpoints(tmp_path)[-1]
    proc = check(train_here(*flags[:-4], "--max-steps", "9", "--output-dir", str(tmp_path / "o"), "--resume", str(ckpt)), rc=2)
    assert f"--max-steps=9, but {ckpt} was trained with 5" in proc.stderr


def test_run_stopped_at_an_epoch_end_resumes_to_identical_weights(tmp_path):
    # with --log-every above the epoch length the processes only check for signals at epoch ends, so
    # the stop lands there: the checkpoint holds a finished epoch whose evaluation has not run yet
    flags = ["--dataset", "mnist-5k", "--epochs", "12", "--log-every", "1000", "--seed", "1"]
    check(run(train_cmd(1, *flags, "--output-dir", str(tmp_path / "reference"))))
    out = tmp_path / "out"
    check(stopped_in("stretch:3", *flags, "--output-dir", str(out)), rc=EXIT_PREEMPTED)  # a stretch is an epoch here
    saved = checkpoint.complete_checkpoints(out)[-1]
    state = checkpoint.read_state(saved)
    assert (state["batch_in_epoch"], state["global_step"]) == (40, 120)
    check(run(train_cmd(1, *flags, "--output-dir", str(out), "--resume", "auto")))
    assert same_weights(out, tmp_path / "reference")
    same_results(out, tmp_path / "reference")



def test_a_stop_during_an_evaluation_ends_the_run_after_it_without_another_epoch(tmp_path):
    flags = ["--dataset", "mnist-5k", "--epochs", "3", "--log-every", "1000", "--seed", "1"]
    check(run(train_cmd(1, *flags, "--output-dir", str(tmp_path / "reference"))))
    out = tmp_path / "out"
    proc = check(stopped_in("evaluation:1", *flags, "--output-dir", str(out)), rc=EXIT_PREEMPTED)
    assert "epoch 1/3:" in proc.stdout and "epoch 2/3:" not in proc.stdout
    assert "stopped by signal SIGUSR1 after step 40" in proc.stdout
    state = checkpoint.read_state(checkpoint.complete_checkpoints(out)[-1])
    assert (state["epoch"], state["batch_in_epoch"], state["global_step"]) == (1, 0, 40)  # evaluated
    check(run(train_cmd(1, *flags, "--output-dir", str(out), "--resume", "auto")))
    assert same_weights(out, tmp_path / "reference")
    same_results(out, tmp_path / "reference")

# ---------------------------------------------------------------- damaged, re-saved, other data, full disk


def copy_run(finished, out):
    """The finished run's directory without its results.json: a run that still has its last steps to take."""
    shutil.copytree(finished, out)
    (out / "results.json").unlink()
    (out / "model.safetensors").unlink()  # the resumed run must write it again
    return out


def test_resume_auto_falls_back_past_a_damaged_newest_checkpoint(finished, tmp_path):
    out = copy_run(finished, tmp_path / "out")
    older, newer = checkpoint.complete_checkpoints(out)
    weights = newer / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    proc = check(train_here(*RUN, "--cpu", "--output-dir", str(out), "--resume", "auto"))  # as `finished` ran
    assert f"warning: skipping {newer}: {weights}: damaged checkpoint file" in proc.stdout
    assert f"resuming from {older}" in proc.stdout
    assert same_weights(out, finished)  # the steps after the older checkpoint, taken again


def test_damaged_random_states_are_an_error_naming_the_file(finished, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(checkpoint.complete_checkpoints(finished)[-1], damaged)
    rng = damaged / "random_states_0.pkl"
    rng.write_bytes(rng.read_bytes()[:50])  # Accelerate's load_state would skip it without a word
    proc = check(train_here(*RUN, "--cpu", "--output-dir", str(tmp_path / "o"), "--resume", str(damaged)), rc=2)
    assert f"error: {rng}: damaged checkpoint file" in proc.stderr


def test_resume_auto_when_no_checkpoint_loads_is_an_error_not_a_fresh_start(finished, tmp_path):
    out = copy_run(finished, tmp_path / "out")
    for path in checkpoint.complete_checkpoints(out):
        (path / "optimizer.bin").write_bytes(b"garbage")
    proc = check(train_here(*RUN, "--cpu", "--output-dir", str(out), "--resume", "auto"), rc=2)
    assert "--resume auto: no checkpoint in" in proc.stderr and "--overwrite" in proc.stderr


def test_resume_on_other_data_is_refused_naming_both(finished, tmp_path):
    ckpt = checkpoint.complete_checkpoints(finished)[-1]
    digits = mnist5k()
    other = write_dataset(tmp_path / "other", (digits["train"].images[:4000], digits["train"].labels[:4000]),
                          (digits["test"].images, digits["test"].labels))
    proc = check(train_here(*RUN, "--cpu", "--data-dir", str(other), "--output-dir", str(tmp_path / "o"),
                            "--resume", str(ckpt)), rc=2)
    assert f"{ckpt} was trained on other data" in proc.stderr
    assert "gave 5000 train images" in proc.stderr and "gives 4000 train images" in proc.stderr


def test_a_resave_killed_between_its_two_renames_keeps_the_step_and_resumes_bit_identical(tmp_path):
    # stopped at an epoch end, the run saves step 80 before its evaluation; the resumed run evaluates,
    # then saves step 80 again: killed half-way through that re-save, the old copy must still count
    flags = ["--dataset", "mnist-5k", "--epochs", "3", "--log-every", "1000", "--seed", "2", "--keep-checkpoints", "1"]
    check(run(train_cmd(1, *flags, "--output-dir", str(tmp_path / "reference"))))
    out = tmp_path / "out"
    check(stopped_in("stretch:2", *flags, "--output-dir", str(out)), rc=EXIT_PREEMPTED)  # at epoch 2's end
    (stopped,) = checkpoint.complete_checkpoints(out)
    assert checkpoint.read_state(stopped)["global_step"] == 80
    killed = run([sys.executable, str(REPO / "tests" / "workers" / "kill_in_resave.py"), "--cpu", *flags,
                  "--output-dir", str(out), "--resume", "auto"])
    assert killed.returncode == -signal.SIGKILL and "kill_in_resave: killed after renaming" in killed.stdout
    assert not stopped.exists() and checkpoint.complete_checkpoints(out) == [stopped.with_name(stopped.name + ".old")]
    check(run(train_cmd(1, *flags, "--output-dir", str(out), "--resume", "auto")))
    assert same_weights(out, tmp_path / "reference")
    same_results(out, tmp_path / "reference")
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000120"]


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs: room for one checkpoint of the MLP (2.4 MB), not two."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def test_a_full_disk_is_an_error_naming_the_path_and_the_earlier_checkpoint_stays(small_disk):
    out = small_disk / "out"
    proc = check(train_here("--dataset", "mnist-5k", "--cpu", "--checkpoint-every", "5", "--max-steps", "20",
                            "--report-to", "none", "--output-dir", str(out)), rc=74)  # a cause outside the run: resume once mended
    assert f"error: could not write {out}/checkpoints/step_00000010.tmp: the disk is full" in proc.stderr
    assert "Traceback" not in proc.stderr
    (kept,) = checkpoint.complete_checkpoints(out)
    assert checkpoint.read_state(kept)["global_step"] == 5
    checkpoint.check_loads(kept)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000005"]


# ---------------------------------------------------------------- another world size

RESIZE = ["--dataset", "mnist-5k", "--epochs", "2", "--batch-size", "48", "--seed", "3"]  # global batch 96: 53 steps an epoch


@pytest.fixture(scope="module")
def cut_on_2(tmp_path_factory):
    """(an uninterrupted 2-process run, a 2-process run cut short inside its first epoch, at step 30)"""
    whole, cut = tmp_path_factory.mktemp("whole2"), tmp_path_factory.mktemp("cut2")
    check(run(train_cmd(2, *RESIZE, "--output-dir", str(whole))))
    check(run(train_cmd(2, *RESIZE, "--max-steps", "30", "--output-dir", str(cut))))
    return whole, cut


def same_losses(resumed: dict, ref: dict) -> None:
    """Each epoch's training loss (the loss sums carried through the checkpoint) as the uninterrupted run's."""
    for a, b in zip(resumed["history"], ref["history"], strict=True):
        assert abs(a["train_loss"] - b["train_loss"]) <= 1e-6, (a["train_loss"], b["train_loss"])


def test_a_resume_with_another_optimizer_or_weight_decay_is_refused(tmp_path):
    config = {**parse_args(["--dataset", "mnist-5k"]).to_dict()}
    Resume(tmp_path, {"config": config}).check_compatible(config)
    with pytest.raises(checkpoint.CheckpointError, match="--optimizer='adamw', but .* was trained with 'adam'"):
        Resume(tmp_path, {"config": config}).check_compatible({**config, "optimizer": "adamw"})
    with pytest.raises(checkpoint.CheckpointError, match="--weight-decay=0.1, but .* was trained with 0.0"):
        Resume(tmp_path, {"config": config}).check_compatible({**config, "weight_decay": 0.1})


def test_the_batch_flag_a_run_began_with_keeps_working_after_it_resumed_on_another_world_size(tmp_path):
    # began on 2 processes x 128, resumed on 1 x 256 (before accumulation): requeued again, the same command resumes
    state = {"world_size": 1, "global_batch_size": 256, "batch_size_flag": 128, "accumulation_flag": 1,
             "config": {"batch_size": 256, "gradient_accumulation_steps": 1}}
    given = TrainConfig(batch_size=128, given=frozenset())  # the batch the run began with, not given again
    assert Resume(tmp_path, state).batch_for_world(given, 1) == (128, 2)  # its batch kept, 2 steps accumulated
    assert Resume(tmp_path, state).batch_for_world(given, 4) == (64, 1)  # 4 x 128 is past 256
    flag = TrainConfig(batch_size=64, given=frozenset({"batch_size"}))
    assert Resume(tmp_path, state).batch_for_world(flag, 4) == (64, 1)  # global / world, said explicitly
    assert Resume(tmp_path, state).batch_for_world(flag, 1) == (64, 4)


@pytest.mark.parametrize("world", [1, 3])
def test_a_2_process_run_resumes_on_another_world_size_to_the_same_trajectory(cut_on_2, world, tmp_path):
    whole, cut = cut_on_2
    out = tmp_path / "out"
    shutil.copytree(cut, out)
    # the cut run's --max-steps 30 is lifted: a resume keeps every limit it is not told otherwise
    proc = check(run(train_cmd(world, *RESIZE, "--output-dir", str(out), "--resume", "auto", "--max-steps", "none")))
    # on 1 process the batch of 48 is kept, 2 accumulated a step; on 3, 48 x 3 is past 96: 32 a step
    now = "48 samples per batch, 2 batches per step" if world == 1 else "32 samples per step"
    assert f"the world size changed from 2 to {world}: each process now takes {now} (was 48), so the global batch (96)" \
        in proc.stdout
    resumed, ref = results(out), results(whole)
    assert resumed["world_size"] == world and resumed["global_batch_size"] == 96
    print(f"2 -> {world} processes: weights within {close_weights(out, whole, 1e-5):.1e} of the uninterrupted run")
    # each sample once: the rest of the interrupted epoch, then the next, as on 2 processes
    assert (resumed["steps"], resumed["samples_seen"]) == (ref["steps"], ref["samples_seen"]) == (106, 10000)
    assert [h["samples"] for h in resumed["history"]] == [h["samples"] for h in ref["history"]] == [5000, 5000]
    assert abs(resumed["test_accuracy"] - ref["test_accuracy"]) <= 0.002
    same_losses(resumed, ref)


def test_a_1_process_run_resumes_on_2_processes_to_the_same_trajectory(tmp_path):
    whole, out = tmp_path / "whole", tmp_path / "out"
    flags = [*RESIZE, "--batch-size", "96", "--epochs", "1"]
    check(run(train_cmd(1, *flags, "--output-dir", str(whole))))
    check(run(train_cmd(1, *flags, "--max-steps", "30", "--output-dir", str(out))))
    proc = check(run(train_cmd(2, *flags, "--output-dir", str(out), "--resume", "auto", "--max-steps", "none")))
    assert "the world size changed from 1 to 2: each process now takes 48 samples per step (was 96)" in proc.stdout
    resumed, ref = results(out), results(whole)
    assert resumed["world_size"] == 2 and resumed["per_process_batch_size"] == 48
    print(f"1 -> 2 processes: weights within {close_weights(out, whole, 1e-5):.1e} of the uninterrupted run")
    assert [h["samples"] for h in resumed["history"]] == [h["samples"] for h in ref["history"]] == [5000]
    assert abs(resumed["test_accuracy"] - ref["test_accuracy"]) <= 0.002
    same_losses(resumed, ref)


# one run's settings that touch every place a thread count could round differently: evaluation, AdamW,
# accumulation, checkpoints, and an epoch's short last batch (4,500 % 214 = 6 rows: MKL's small products)
THREADED = ["--dataset", "mnist-5k", "--max-steps", "24", "--batch-size", "107", "--val-fraction", "0.1",
            "--eval-every", "8", "--optimizer", "adamw", "--weight-decay", "0.01", "--gradient-accumulation-steps",
            "2", "--checkpoint-every", "6", "--report-to", "none"]


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores for 2 threads")
def test_the_weights_do_not_depend_on_the_thread_count_even_across_a_kill_and_resume(tmp_path):
    one, two, cut = tmp_path / "one", tmp_path / "two", tmp_path / "cut"
    check(run(train_cmd(1, *THREADED, "--data-path", "dataloader", "--cpu-threads", "1", "--output-dir", str(one))))
    check(run(train_cmd(1, *THREADED, "--data-path", "dataloader", "--cpu-threads", "2", "--output-dir", str(two))))
    assert (results(one)["cpu_threads"], results(two)["cpu_threads"]) == (1, 2)
    assert results(two)["cpu_threads_reproducible"] is True
    assert same_weights(one, two)
    # the device path (the same batches) killed at 2 threads and resumed at 1
    flags = [*THREADED, "--data-path", "device"]
    proc = run([sys.executable, str(REPO / "tests" / "workers" / "stop_in.py"), "--cpu", *flags, "--cpu-threads", "2",
                "--output-dir", str(cut)], env={"STOP_IN": "checkpoint:3", "STOP_SIGNAL": "SIGKILL"})
    assert proc.returncode == -signal.SIGKILL
    check(run(train_cmd(1, *flags, "--cpu-threads", "1", "--output-dir", str(cut), "--resume", "auto")))
    assert same_weights(cut, one)

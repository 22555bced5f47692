"""Gradient accumulation, clipping and deterministic runs: real runs on mnist-5k, compared weight by weight."""

import json
import math

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors.torch import load_file

from mnist_dist import checkpoint
from mnist_dist.config import TrainConfig, parse_args
from mnist_dist.graphs import graph_unsupported
from mnist_dist.model import MLP
from mnist_dist.stopping import EXIT_PREEMPTED
from mnist_dist.resume import Resume
from mnist_dist.steps import NonFiniteGuard, make_optimizer, train_step

from .helpers import (check, close_weights, launch, results, run, same_results, same_weights, stopped_in, train_cmd,
    train_here)

RUN = ["--dataset", "mnist-5k", "--epochs", "2", "--report-to", "none"]  # 40 steps of 128 an epoch, the last of 8


def weights(output_dir):
    return load_file(output_dir / "model.safetensors")


def logged(output_dir, key: str) -> dict[int, float]:
    """{step: value} of `key` in the run's metrics.jsonl."""
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in records if key in r}


def counts(count_dir) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(count_dir.glob("rank-*.json"))]


@pytest.fixture(scope="module")
def whole_batches(tmp_path_factory):
    """The reference: 1 process, batch 128, no accumulation."""
    out = tmp_path_factory.mktemp("whole") / "run"
    check(train_here(*RUN, "--cpu", "--output-dir", str(out)))
    return out


@pytest.mark.slow
def test_accumulating_2_batches_of_64_updates_as_2_processes_of_64_do_bit_for_bit(whole_batches, tmp_path):
    """Both add two half-batches' gradients, each scaled by 1 / the 128 samples of the step: the loss is
    normalised over the whole accumulated batch (transformers#34191), and the steps are counted whole."""
    accumulated, split = tmp_path / "accumulated", tmp_path / "split"
    # the DataLoader path here, the device path (auto) on 2 processes: the same batches
    check(train_here(*RUN, "--cpu", "--data-path", "dataloader", "--batch-size", "64",
                    "--gradient-accumulation-steps", "2", "--output-dir", str(accumulated)))
    check(launch(2, *RUN, "--batch-size", "64", "--output-dir", str(split)))
    assert results(split)["world_size"] == 2
    assert same_weights(accumulated, split)
    # against one batch of 128: only the order in which the float sums are added differs, as for DDP
    worst = close_weights(accumulated, whole_batches, 1e-5)
    print(f"1 x 64 x 2 against 1 x 128 x 1: weights within {worst:.2e}")
    got, ref = results(accumulated), results(whole_batches)
    assert (got["steps"], got["samples_seen"], got["global_batch_size"]) == (80, 10000, 128) == (
        ref["steps"], ref["samples_seen"], ref["global_batch_size"])
    assert got["config"]["gradient_accumulation_steps"] == 2 and got["per_process_batch_size"] == 64
    assert logged(accumulated, "train/loss").keys() == logged(whole_batches, "train/loss").keys() == {50}
    assert "global batch 128 (1 x 64 x 2 accumulated)" in check(train_here(
        *RUN, "--cpu", "--batch-size", "64", "--gradient-accumulation-steps", "2", "--max-steps", "1",
        "--output-dir", str(tmp_path / "banner"))).stdout


@pytest.mark.slow
@pytest.mark.parametrize("steps", [2, 4])
def test_2_processes_accumulating_all_reduce_once_per_optimizer_step(whole_batches, steps, tmp_path):
    out, count_dir = tmp_path / "run", tmp_path / "counts"
    count_dir.mkdir()
    check(launch(2, *RUN, "--batch-size", str(64 // steps), "--gradient-accumulation-steps", str(steps),
                 "--output-dir", str(out), module="tests.workers.count_steps", env={"COUNT_DIR": str(count_dir)}))
    r = results(out)
    assert (r["world_size"], r["global_batch_size"], r["steps"]) == (2, 128, 80)
    # 39 full steps an epoch and a last one of 8 samples, which takes one batch: 64 // steps >= 8
    batches = 2 * (39 * steps + 1)
    assert counts(count_dir) == [{"all_reduces": 80, "batches": batches}] * 2  # one bucket: the MLP is 0.8 MB
    print(f"2 x {64 // steps} x {steps} against 1 x 128: weights within {close_weights(out, whole_batches, 1e-5):.2e}")


@pytest.mark.slow
def test_4_processes_resume_on_1_accumulating_4_batches_of_the_same_size(tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"  # global batch 512: 10 steps an epoch
    check(run(train_cmd(4, *RUN, "--output-dir", str(whole))))
    check(run(train_cmd(4, *RUN, "--max-steps", "15", "--output-dir", str(cut))))  # mid-epoch 2
    assert results(whole)["world_size"] == 4
    proc = check(run(train_cmd(1, "--resume", "auto", "--max-steps", "none", "--output-dir", str(cut))))
    assert ("the world size changed from 4 to 1: each process now takes 128 samples per batch, 4 batches per step "
            "(was 128), so the global batch (512)") in proc.stdout
    resumed = results(cut)
    assert (resumed["world_size"], resumed["per_process_batch_size"], resumed["config"]["gradient_accumulation_steps"],
            resumed["steps"], resumed["samples_seen"]) == (1, 128, 4, 20, 10000)
    print(f"4 x 128 -> 1 x 128 x 4 at step 15: weights within {close_weights(cut, whole, 1e-5):.2e}")


@pytest.mark.slow
@pytest.mark.parametrize("data_path", ["device", "dataloader"])
def test_a_stop_inside_an_optimizer_step_checkpoints_after_it_and_resumes_to_identical_weights(data_path, tmp_path):
    flags = [*RUN, "--batch-size", "64", "--gradient-accumulation-steps", "2", "--log-every", "5", "--seed", "1",
             "--data-path", data_path]
    check(train_here(*flags, "--cpu", "--output-dir", str(tmp_path / "reference")))
    out = tmp_path / "out"
    # batch 13: the first of step 7's two; the processes look at the step 10 log point
    proc = check(stopped_in("batch:13", *flags, "--output-dir", str(out)), rc=EXIT_PREEMPTED)
    assert "stopped by signal SIGUSR1 after step 10" in proc.stdout
    assert checkpoint.read_state(checkpoint.complete_checkpoints(out)[-1])["global_step"] == 10
    check(train_here(*flags, "--cpu", "--output-dir", str(out), "--resume", "auto"))
    assert same_weights(out, tmp_path / "reference")
    same_results(out, tmp_path / "reference")


def test_a_resume_whose_batches_cannot_make_the_global_batch_is_refused_listing_what_can(tmp_path):
    state = {"world_size": 4, "global_batch_size": 512, "batch_size_flag": 128, "accumulation_flag": 1,
             "config": {"batch_size": 128, "gradient_accumulation_steps": 1}}

    def cut(world, *flags):
        cfg = TrainConfig(given=frozenset(f.split("=")[0] for f in flags),
                          **{f.split("=")[0]: int(f.split("=")[1]) for f in flags})
        return Resume(tmp_path, state).batch_for_world(cfg, world)

    assert cut(1) == (128, 4)  # the batch the run began with, the steps to make up the rest
    assert cut(2, "batch_size=128") == (128, 2)  # a requeued job's command line, unchanged: the same
    assert cut(2, "batch_size=256") == (256, 1)
    assert cut(1, "batch_size=64") == (64, 8)
    assert cut(1, "gradient_accumulation_steps=2") == (256, 2)
    assert cut(8) == (64, 1)  # 128 x 8 processes is past 512: the largest batch below 128 that makes it
    with pytest.raises(checkpoint.CheckpointError) as err:
        cut(1, "batch_size=96", "gradient_accumulation_steps=2")
    assert (f"--batch-size=96 --gradient-accumulation-steps=2 on 1 process(es) cannot make the global batch of 512 "
            f"that {tmp_path} was trained with; resume with one of: --batch-size 512 --gradient-accumulation-steps 1; "
            "--batch-size 256 --gradient-accumulation-steps 2;") in str(err.value)
    with pytest.raises(checkpoint.CheckpointError, match="^--batch-size=96 on 1 process"):
        cut(1, "batch_size=96")
    state.update(world_size=1, global_batch_size=100, batch_size_flag=50,
                 config={"batch_size": 50, "gradient_accumulation_steps": 2})
    assert cut(4) == (25, 1)  # began as 1 x 50 x 2: on 4 processes 25 each, the largest batch up to 50
    with pytest.raises(checkpoint.CheckpointError, match="3 processes cannot split it evenly"):
        cut(3)


@pytest.mark.parametrize("flag, value, why", [
    ("--gradient-accumulation-steps", "0", "must be an integer >= 1"),
    ("--max-grad-norm", "-1", "must be a finite number > 0"),
    ("--max-grad-norm", "0", "must be a finite number > 0"),
    ("--max-grad-norm", "inf", "must be a finite number > 0"),
])
def test_bad_accumulation_and_clipping_values_are_refused_naming_the_flag(flag, value, why, capsys):
    with pytest.raises(SystemExit) as exit:
        parse_args(["--dataset", "mnist-5k", flag, value])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and f"{flag}=" in err and why in err


def test_the_graph_path_refuses_accumulation_and_clipping_and_says_what_runs_them():
    cuda = torch.device("cuda")
    for cfg in (TrainConfig(gradient_accumulation_steps=2), TrainConfig(max_grad_norm=1.0)):
        why = graph_unsupported(cfg, cuda, 1, "no")
        assert "captures one batch per optimizer step, unclipped" in why and "--data-path device runs it" in why
    assert graph_unsupported(TrainConfig(), cuda, 1, "no") is None


def test_clipping_bounds_the_norm_the_optimizer_steps_with_and_returns_the_norm_before():
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = MLP(hidden_sizes=(16,))
    model, optimizer = accelerator.prepare(model, make_optimizer(model.parameters(), 1e-3, accelerator.device))
    seen = []
    optimizer.optimizer.register_step_pre_hook(lambda opt, args, kwargs: seen.append(torch.nn.utils.get_total_norm(
        [p.grad for group in opt.param_groups for p in group["params"]]).item()))
    images, labels = torch.randn(32, 784), torch.randint(0, 10, (32,))
    returned = [train_step(accelerator, model, optimizer, NonFiniteGuard(accelerator, optimizer), images, labels,
                           1 / 32, max_grad_norm=max_norm)[1].item() for max_norm in (None, 1e-3)]
    assert seen[0] == returned[0] and returned[1] > 0.1  # the norm before clipping
    assert seen[1] <= 1e-3 * (1 + 1e-5)  # what the optimizer stepped with


@pytest.mark.slow
def test_a_tiny_max_grad_norm_logs_the_norms_before_it_and_clips_alike_on_2_processes(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    clip = ["--max-grad-norm", "1e-4", "--log-every", "10"]
    check(train_here(*RUN, "--cpu", *clip, "--batch-size", "64", "--gradient-accumulation-steps", "2",
                    "--output-dir", str(one)))
    check(launch(2, *RUN, *clip, "--batch-size", "64", "--output-dir", str(two)))
    assert results(two)["world_size"] == 2
    assert same_weights(one, two)  # as unclipped (above): the same sums, and the clip sees the same norm
    check(train_here(*RUN, "--cpu", "--log-every", "10", "--output-dir", str(tmp_path / "unclipped")))
    assert not same_weights(one, tmp_path / "unclipped")  # the clip changed the updates
    norms = logged(one, "train/grad_norm")
    assert norms.keys() == set(range(10, 81, 10)) and min(norms.values()) > 1e-4
    assert logged(two, "train/grad_norm") == norms
    # Adam moves each weight by at most about lr a step, whatever the gradients' scale
    set_seed(0)
    initial = MLP().state_dict()
    moved = max((weights(one)[k] - initial[k]).abs().max().item() for k in initial)
    assert moved <= 1e-3 * 80


def test_the_gradient_norm_is_logged_at_each_log_point_without_clipping(tmp_path):
    check(train_here("--dataset", "mnist-5k", "--cpu", "--max-steps", "20", "--log-every", "5", "--report-to", "none",
                     "--output-dir", str(tmp_path)))
    norms = logged(tmp_path, "train/grad_norm")
    assert norms.keys() == {5, 10, 15, 20} and all(0 < v < math.inf for v in norms.values())


def test_a_deterministic_cpu_run_says_so_and_is_repeatable(tmp_path):
    flags = ["--dataset", "mnist-5k", "--cpu", "--max-steps", "10", "--deterministic", "--report-to", "none"]
    try:
        for name in ("a", "b"):
            check(train_here(*flags, "--output-dir", str(tmp_path / name)))
    finally:
        torch.use_deterministic_algorithms(False)  # a process-wide setting: the tests after this one run without it
    assert results(tmp_path / "a")["deterministic"] is True and results(tmp_path / "a")["config"]["deterministic"]
    assert same_weights(tmp_path / "a", tmp_path / "b")


"""--augment: each training sample transformed by its own draws, the same on every path, world size and resume."""

from types import SimpleNamespace

import pytest
import torch

from mnist_dist.augment import epoch_draws, transform
from mnist_dist.config import TrainConfig, parse_args
from mnist_dist.data import epoch_order, normalize
from mnist_dist.graphs import graph_unsupported
from mnist_dist.steps import EagerSteps
from mnist_dist.stopping import EXIT_PREEMPTED

from .helpers import check, mnist5k, same_weights, stopped_in, train_here

SHORT = ["--dataset", "mnist-5k", "--cpu", "--augment", "--max-steps", "30", "--log-every", "10", "--report-to", "none"]


def runner(world: int, rank: int, epoch: int, cfg: TrainConfig) -> EagerSteps:
    """An eager runner's input side for process `rank` of `world` (what `EagerSteps.inputs` reads)."""
    steps = object.__new__(EagerSteps)
    steps.accelerator = SimpleNamespace(num_processes=world, process_index=rank, device=torch.device("cpu"))
    steps.cfg, steps.stats, steps.train_len = cfg, (0.5, 0.5), 5000
    steps.augment = (epoch_order(5000, cfg.seed, epoch), epoch_draws(5000, cfg.seed, epoch))
    return steps


def test_a_sample_is_transformed_alike_on_any_world_size_and_batch():
    images, cfg = mnist5k()["train"].images, TrainConfig(augment=True, batch_size=4)
    order = epoch_order(5000, 0, 3)
    one = runner(1, 0, 3, TrainConfig(augment=True, batch_size=8)).inputs(images[order[8:16]], 1)
    for rank in (0, 1):  # batch 1 of 2 processes x 4: the samples the first process's batch 1 of 8 holds
        two = runner(2, rank, 3, cfg).inputs(images[order[8 + 4 * rank : 12 + 4 * rank]], 1)
        assert torch.equal(two, one[4 * rank : 4 * rank + 4])
    assert not torch.equal(one, normalize(images[order[8:16]]))  # transformed
    assert not torch.equal(epoch_draws(5000, 0, 3), epoch_draws(5000, 0, 4))  # a new transform every epoch


def test_no_amount_leaves_the_image_as_it_was():
    pixels = mnist5k()["test"].images[:16].float() / 255
    moved = transform(pixels, torch.rand(16, 4), rotation=0, translation=0, scale=0)
    torch.testing.assert_close(moved, pixels, rtol=0, atol=1e-5)  # bilinear sampling at the pixels' centres


def test_the_dataloader_and_device_paths_train_on_the_same_augmented_batches(tmp_path):
    for path in ("dataloader", "device"):
        check(train_here(*SHORT, "--data-path", path, "--output-dir", str(tmp_path / path)))
    assert same_weights(tmp_path / "dataloader", tmp_path / "device")
    check(train_here(*SHORT[:3], *SHORT[4:], "--output-dir", str(tmp_path / "plain")))
    assert not same_weights(tmp_path / "plain", tmp_path / "device")


@pytest.mark.slow
def test_an_augmented_run_resumes_bit_identically(tmp_path):
    flags = [*SHORT[:-6], "--epochs", "2", "--log-every", "10", "--report-to", "none"]
    check(train_here(*flags, "--output-dir", str(tmp_path / "whole")))
    check(stopped_in("stretch:3", *flags, "--output-dir", str(tmp_path / "out")), rc=EXIT_PREEMPTED)
    check(train_here("--resume", "auto", "--output-dir", str(tmp_path / "out")))
    assert same_weights(tmp_path / "out", tmp_path / "whole")


@pytest.mark.parametrize("flags, message", [
    (["--augment", "--augment-rotation", "200"], "--augment-rotation=200.0: must be from 0 to 180 (degrees)"),
    (["--augment", "--augment-translation", "-1"], "--augment-translation=-1.0: must be from 0 to 14 (pixels)"),
    (["--augment", "--augment-scale", "0.5"], "--augment-scale=0.5: must be in [0, 0.5) (a fraction)"),
    (["--augment-rotation", "20"], "--augment-rotation=20.0: is an amount of --augment, which this run does not have"),
])
def test_bad_augmentation_amounts_are_refused_naming_the_flag(flags, message, capsys):
    with pytest.raises(SystemExit):
        parse_args(flags)
    assert message in capsys.readouterr().err


def test_the_graph_path_leaves_augmentation_to_the_device_path():
    why = graph_unsupported(TrainConfig(augment=True), torch.device("cuda"), 1, "no")
    assert "--augment transforms every batch anew" in why

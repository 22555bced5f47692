"""Every test runs against a private dataset cache and never reaches for the Hub.

The suite runs on pytest-xdist's workers (pyproject.toml): tests that share an expensive fixture
(a training run, the SLURM cluster) run on one worker, so that the fixture is built once.
"""

import os
import time

import pytest
import torch

from .helpers import check, mnist5k, results, train_cli, write_dataset


SHARED_FIXTURES = ("recipe_run", "reference", "finished", "shard_report", "runs", "cluster", "cut_on_2")


def pytest_itemcollected(item):
    """One xdist group per shared fixture (--dist loadgroup), set as each test is collected: before the
    collection hooks, where xdist reads the groups."""
    shared = [name for name in SHARED_FIXTURES if name in item.fixturenames]
    if shared:
        group = shared[0] if shared[0] == "recipe_run" else f"{item.module.__name__}:{shared[0]}"
        item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    # tests never touch the user's cache; subprocesses inherit this
    os.environ["MNIST_DIST_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # W&B stays out of the way except in the tests about it, which set their own mode
    os.environ["WANDB_MODE"] = "disabled"
    os.environ["WANDB_SILENT"] = "true"
    # one thread per training process: the xdist workers already keep every core busy
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    yield


@pytest.fixture(scope="session")
def small_subset(tmp_path_factory):
    """1,000 train / 1,001 test real digits: neither divides by the batch sizes used below."""
    splits = mnist5k()
    g = torch.Generator().manual_seed(0)
    pick = lambda s, n: torch.randperm(len(splits[s]), generator=g)[:n]
    tr, te = pick("train", 1000), pick("test", 1001)
    return write_dataset(
        tmp_path_factory.mktemp("subset"),
        (splits["train"].images[tr], splits["train"].labels[tr]),
        (splits["test"].images[te], splits["test"].labels[te]),
    )


@pytest.fixture(scope="session")
def recipe_run(tmp_path_factory):
    """The recipe of record, 10 epochs on mnist-5k, in one CPU process: (output dir, results, process)."""
    out = tmp_path_factory.mktemp("recipe")
    started = time.time()
    proc = check(train_cli("--dataset", "mnist-5k", "--cpu", "--pictures", "--output-dir", str(out)))  # as a user runs it
    proc.wall_seconds = time.time() - started  # as this test process saw it, spawn to exit
    return out, results(out), proc

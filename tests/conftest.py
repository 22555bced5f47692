"""Every test runs against a private dataset cache and never reaches for the Hub."""

import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    # tests never touch the user's cache; subprocesses inherit this
    os.environ["MNIST_DIST_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # W&B stays out of the way except in the tests about it, which set their own mode
    os.environ["WANDB_MODE"] = "disabled"
    os.environ["WANDB_SILENT"] = "true"
    yield

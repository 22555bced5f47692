"""Train an MNIST classifier (--model) with Hugging Face Accelerate on one CPU, one GPU, many GPUs or many nodes.

    python -m mnist_dist.train --dataset mnist-5k --cpu          # one process: laptop / debugging
    python -m mnist_dist.train                                   # one process, GPU if there is one
    accelerate launch --config_file accelerate_configs/single_gpu.yaml -m mnist_dist.train
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml -m mnist_dist.train
    accelerate launch --config_file accelerate_configs/cpu.yaml -m mnist_dist.train --cpu   # N CPU processes

`python -m mnist_dist.train --help` lists every flag with its default and unit. This module only reads
the flags: --help and a bad value are answered before torch loads (seconds; an unknown --model is looked up
in the model registry, which loads it); the loop is `loop.py`.
"""

from __future__ import annotations

from .config import TrainConfig, parse_args
from .stopping import QuickExit, StopSignals


def main(cfg: TrainConfig, signals: StopSignals | None = None) -> int:
    """Train as `cfg` says (from `parse_args`); return the exit status (`loop.main`)."""
    from . import loop

    return loop.main(cfg, signals)


if __name__ == "__main__":
    EXIT = QuickExit()  # first, so that its handler runs last: no teardown of torch once the run has ended (seconds)
    SIGNALS = StopSignals().__enter__()  # from here on a stop signal ends the run cleanly, exit 75
    EXIT.end(lambda: main(parse_args(), SIGNALS), then=SIGNALS.ignore_from_now)  # --help, a bad flag: exit 0, 2

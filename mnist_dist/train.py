"""Train an MNIST classifier (--model) with Hugging Face Accelerate on one CPU, one GPU, many GPUs or many nodes.

    python -m mnist_dist.train --dataset mnist-5k --cpu          # one process: laptop / debugging
    python -m mnist_dist.train                                   # one process, GPU if there is one
    accelerate launch --config_file accelerate_configs/single_gpu.yaml -m mnist_dist.train
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml -m mnist_dist.train
    accelerate launch --config_file accelerate_configs/cpu.yaml -m mnist_dist.train --cpu   # N CPU processes

`python -m mnist_dist.train --help` lists every flag with its default and unit. This module only reads
the flags, so that --help and a bad value of most flags are answered before torch loads (seconds); the
check of --model's name, in the model registry, loads it. The loop is `loop.py`.
"""

from __future__ import annotations

from .config import TrainConfig, parse_args
from .stopping import QuickExit, StopSignals


def main(cfg: TrainConfig, signals: StopSignals | None = None) -> int:
    """Train as `cfg` says (from `parse_args`); return the exit status (`loop.main`)."""
    from . import loop

    return loop.main(cfg, signals)


def command(signals: StopSignals) -> int:
    """`python -m mnist_dist.train FLAGS`: the flags, then the run, in a process of its own."""
    cfg = parse_args()  # --help, a bad flag: exit 0, 2
    from .resources import keep_freed_memory

    keep_freed_memory()  # the process is the run's: malloc keeps what a step frees for the next
    return main(cfg, signals)


if __name__ == "__main__":
    EXIT = QuickExit()  # first, so that its handler runs last: no teardown of torch once the run has ended (seconds)
    SIGNALS = StopSignals().__enter__()  # from here on a stop signal ends the run cleanly, exit 75
    EXIT.end(lambda: command(SIGNALS), then=SIGNALS.ignore_from_now)

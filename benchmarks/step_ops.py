"""Count the ops one training step dispatches, on the CPU: the graph path's captured step and the reference step.

    python benchmarks/step_ops.py [--by-op]

A CUDA graph replays exactly the kernels its step launched while it was recorded, so the ops a step
dispatches are what a replayed epoch pays for, step after step. Counted with a dispatch mode at the
ATen level, on one process (no DDP), after a few steps so that Adam's state exists; "kernels" leaves
out the ops that only make views or metadata (view, slice, t, detach, ...), which launch nothing.
"""

import argparse
import collections
import json

import torch
from accelerate import Accelerator
from torch.utils._python_dispatch import TorchDispatchMode

from mnist_dist.graphs import EpochGraph
from mnist_dist.model import MLP
from mnist_dist.config import TrainConfig
from mnist_dist.steps import EagerSteps, NonFiniteGuard, make_optimizer

NO_KERNEL = {"aten.view", "aten.slice", "aten.select", "aten.t", "aten.detach", "aten.split", "aten.alias",
             "aten._unsafe_view", "aten.expand", "aten.as_strided", "aten.unsqueeze", "aten.squeeze"}


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def counted(run_one_step) -> dict:
    with CountOps() as mode:
        run_one_step()
    ops = {k: v for k, v in mode.ops.items() if not k.startswith("profiler.")}
    return {"ops": sum(ops.values()), "kernels": sum(v for k, v in ops.items() if k not in NO_KERNEL), "by_op": ops}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--by-op", action="store_true", help="also list each op with its count")
    args = parser.parse_args()
    accelerator = Accelerator(cpu=True)
    images, labels = torch.randn(1280, 784), torch.randint(0, 10, (1280,))
    counts = {}
    for path in ("graph", "device"):
        torch.manual_seed(0)
        model = MLP()
        model, optimizer = accelerator.prepare(model, make_optimizer(model.parameters(), 1e-3, accelerator.device))
        guard = NonFiniteGuard(accelerator, optimizer)
        if path == "graph":
            runner = EpochGraph(model, optimizer, guard, images, labels, 128, 0, capture=False)
        else:
            batches = [(images[i:i + 128], labels[i:i + 128]) for i in range(0, 1280, 128)]
            runner = EagerSteps(accelerator, model, optimizer, scheduler=None, guard=guard, batches=batches,
                                cfg=TrainConfig(), train_len=1280, stats=(0.0, 1.0))
            runner.epoch_batches = iter(batches)
        if path == "graph":
            runner.begin_epoch(0)
        runner.run(0, 3)
        counts[path] = counted(lambda: runner.run(3, 4))
    for path, c in counts.items():
        print(f"{path:>6} step: {c['ops']} ops dispatched, {c['kernels']} of them kernels")
        if args.by_op:
            print(json.dumps(c["by_op"], indent=2))


if __name__ == "__main__":
    main()

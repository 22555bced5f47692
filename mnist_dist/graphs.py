"""`--data-path graph`: whole epochs of training captured once in a CUDA graph and replayed.

At batch 128 this model's step is a few dozen tiny kernels; launched one by one from Python, the
GPU spends most of an epoch waiting for the host. A CUDA graph records the kernels of a whole
epoch once and replays them with one launch (https://pytorch.org/docs/stable/notes/cuda.html#cuda-graphs).

For that, every step of every epoch must read and write the same memory. So each epoch the
normalized training set is shuffled into one static buffer, with the same permutation as the
device path (`distributed.DeviceBatches`), and step j's batch is always the slice
[j * batch, (j + 1) * batch) of it. The training step itself is the eager one, passed in: the
graph holds exactly the kernels the eager loop would launch, and anything but a whole epoch
runs that same step eagerly on the same slices: the rest of a resumed epoch, stretches cut by
--checkpoint-every.

A capture needs a few eager steps first, for CUDA's lazy set-up (cuBLAS handles and workspaces,
Adam's state, the caching allocator). Those warm-up steps run with every update skipped, through
the same on-device skip that guards against non-finite steps, so they change no weight, moment or
step count, and the run's first epoch is already a replay.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import torch

from .config import TrainConfig
from .distributed import StepHealth

# the optimizer and finite check work on views of this many elements (distributed.fused_adam_in_views):
# measured on an H200, the fused Adam kernel took 28 us per step on the whole tensors
ADAM_VIEW_ELEMENTS = 4096
# step(inputs, labels, real samples in the batch, step in epoch): one optimizer step, no host sync
StepFn = Callable[[torch.Tensor, torch.Tensor, int, int], None]
# eager steps before a capture, all skipped ("a few", torch's CUDA-graph notes)
WARMUP_STEPS = 3


def graph_unsupported(cfg: TrainConfig, device: torch.device, world: int, precision: str,
                      compiled: str = "no") -> str | None:
    """Why this run cannot replay captured epochs, or None when it can. `compiled`: the torch.compile
    backend of the prepared model (`distributed.compiled_with`), "no" for none."""
    if device.type != "cuda":
        return f"needs a CUDA GPU, and this run is on the {device.type}"
    if world > 1:
        return (f"runs one process, and this launch has {world}: capturing DDP's all-reduce is not supported "
                "here; --data-path device keeps the data on each GPU without per-step host syncs")
    if cfg.schedule != "constant":
        return (f"needs --schedule constant (got {cfg.schedule!r}): a replayed epoch would repeat the learning "
                "rates of the epoch it was captured in")
    if precision == "fp16":
        return "does not support --mixed-precision fp16, whose grad scaler checks for overflow on the host; use bf16 or no"
    if compiled != "no":
        return (f"does not run a model compiled by torch.compile (Accelerate's dynamo_backend is {compiled}): "
                "capturing compiled kernels in the epoch's graph is not supported here; --data-path device runs it, "
                "or launch with --dynamo_backend no")
    return None


class EpochGraph:
    """One process's training steps over a static, per-epoch shuffled copy of the training set.

    `run(0, steps)` (a whole epoch) is captured into a CUDA graph the first time, after `warm_up`,
    and replayed from then on; any other stretch runs eagerly. With `capture=False` (the CPU, in
    tests) every stretch runs eagerly, which computes the same thing. `health` is the one `step`
    updates: `warm_up` skips its steps through it.
    """

    def __init__(self, step: StepFn, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int,
                 health: StepHealth, capture: bool = True):
        self.step, self.inputs, self.labels, self.health = step, inputs, labels, health  # inputs: normalized, on the device
        self.shuffled_inputs, self.shuffled_labels = torch.empty_like(inputs), torch.empty_like(labels)
        self.n, self.batch_size, self.seed = len(labels), batch_size, seed
        self.steps = math.ceil(self.n / batch_size)
        self.capture = capture
        self.cut_at_log_points = False  # a whole epoch is one launch; its log windows are written after it
        self.first_step_alone = False  # the first stretch is a whole epoch, so that it can be captured
        self.graph: torch.cuda.CUDAGraph | None = None
        self.capture_seconds = 0.0

    def begin_epoch(self, epoch: int, start: int = 0) -> None:
        """Shuffle into the static buffers: the permutation torch.randperm draws from seed + epoch on the CPU."""
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))
        order = order.to(self.inputs.device)
        torch.index_select(self.inputs, 0, order, out=self.shuffled_inputs)
        torch.index_select(self.labels, 0, order, out=self.shuffled_labels)

    def run(self, start: int, stop: int) -> None:
        """Steps [start, stop) of the current epoch."""
        if not (self.capture and (start, stop) == (0, self.steps)):
            self._eager(start, stop)
            return
        if self.graph is None:
            began = time.perf_counter()
            self.warm_up()
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):  # records the kernels, runs none of them
                self._eager(0, self.steps)
            self.capture_seconds = time.perf_counter() - began
        self.graph.replay()

    def warm_up(self) -> None:
        """Run the first steps of the current epoch eagerly with every update skipped: all their
        kernels run, and nothing they would change does. `found_inf` set makes the optimizer step
        leave weights, Adam's moments and its step count as they were (`distributed.optimizer_step`);
        the health counters are then put back. Each step's loss still goes to its slot, which the
        real step overwrites."""
        found_inf, bad_steps = self.health.found_inf.clone(), self.health.bad_steps.clone()
        self.health.found_inf.fill_(1)
        self._eager(0, min(WARMUP_STEPS, self.steps))
        self.health.found_inf.copy_(found_inf)
        self.health.bad_steps.copy_(bad_steps)

    def _eager(self, start: int, stop: int) -> None:
        for j in range(start, stop):
            lo, hi = j * self.batch_size, min((j + 1) * self.batch_size, self.n)
            self.step(self.shuffled_inputs[lo:hi], self.shuffled_labels[lo:hi], hi - lo, j)

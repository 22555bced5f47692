"""What training costs: a process's peak memory (and the memory a step frees, kept for the next), the
model FLOP/s it achieved and, with --profile, where a stretch of steps spends its time. No distributed code."""

from __future__ import annotations

import atexit
import copy
import ctypes
import os
import sys
from pathlib import Path

import psutil
import torch
from accelerate.utils import ProfileKwargs
from torch.utils.flop_counter import FlopCounterMode

from .steps import StepRunner

# how `training_flops_per_sample` counts, as results.json names it
FLOPS_COUNTED_BY = "torch.utils.flop_counter.FlopCounterMode, forward and backward of one batch"
# what `peak_memory_mib` measures on each kind of device, as results.json names it
MEMORY_MEASURED = {"cuda": "torch.cuda.max_memory_allocated", "cpu": "peak resident set of the process"}


# mallopt(3)'s parameters, glibc's numbers
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MALLOC_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")  # a user's own choice


def keep_freed_memory() -> bool:
    """Let glibc's malloc keep the blocks a step or an evaluation frees for the next one: it hands blocks over
    128 KiB (the CNN's activations: MBs) back to the OS, and the next batch faults them in again page by page.
    Kept (up to 1 GiB; blocks over 32 MiB, the datasets, still go back), `--model cnn` on mnist-5k took 3.6-4.0
    s to evaluate instead of 6.2-8.6 on the 2-core CPU VM (docs/speed.md). For a process of the run's own
    (`python -m mnist_dist.train`): Linux with glibc, and no malloc setting of the user's; returns whether it
    applied. The numbers computed are the same."""
    if sys.platform != "linux" or any(name in os.environ for name in MALLOC_SETTINGS):
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)  # None: another C library (musl)
    if mallopt is None:
        return False
    return all([mallopt(M_MMAP_THRESHOLD, 32 * 2**20), mallopt(M_TRIM_THRESHOLD, 2**30)])  # 1: set


def peak_memory_mib(device: torch.device) -> float:
    """This process's peak memory so far, MiB: on a GPU its tensors' peak (torch.cuda.max_memory_allocated),
    elsewhere the process's peak resident set (the OS's count: the interpreter, torch and the data too)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    if sys.platform == "win32":
        return psutil.Process().memory_info().peak_wset / 2**20
    import resource  # POSIX only

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def training_flops_per_sample(model: torch.nn.Module, input_size: int) -> float | None:
    """FLOPs of training on one sample, forward and backward, as torch's FlopCounterMode counts them (matrix
    products and convolutions) on a batch of two, run through a copy of `model` in eval mode: no running
    statistics move, no random numbers are drawn, the model itself is untouched. None, with a warning, for
    a model that cannot be counted so (one that cannot be copied, say): a figure never fails a run."""
    try:
        twin = copy.deepcopy(model).eval()
        with FlopCounterMode(display=False) as counter:
            twin(torch.zeros(2, input_size)).float().sum().backward()
    except Exception as err:  # a model of yours can fail in any way here; the run checked what it needs
        print(f"mnist_dist: warning: the model's FLOPs are not counted ({type(err).__name__}: {err}); "
              "results.json's flops_per_sample is null", file=sys.stderr)
        return None
    return counter.get_total_flops() / 2


def model_flops_per_second(flops_per_sample: float | None, samples: int, seconds: float) -> float | None:
    """Training FLOP/s: `training_flops_per_sample` x samples / seconds (None where the FLOPs were not counted)."""
    return None if flops_per_sample is None else flops_per_sample * samples / seconds


class ProfiledSteps(StepRunner):
    """--profile DIR: a runner (`steps.EagerSteps`, `graphs.EpochGraph`) whose stretches of steps (from
    one check to the next: --log-every steps on the eager paths, an epoch on the graph path) run under
    Accelerate's torch profiler: the first is left out (start-up; the graph path captures its epoch in
    it), the second warms the profiler up, the third alone is recorded, up to its last GPU kernel. Then
    the main process writes DIR/trace.json (a Chrome trace: chrome://tracing, Perfetto) and
    DIR/top_ops.txt (the ops by their own time)."""

    def __init__(self, runner: StepRunner, directory: str, main: bool, device: torch.device):
        self.runner, self.device, self.stretches = runner, device, 0
        # the device's activities only: asked for CUDA's on a machine without a GPU, torch prints an error
        kwargs = ProfileKwargs(activities=["cpu", "cuda"] if device.type == "cuda" else ["cpu"],
                               schedule_option={"wait": 0, "warmup": 1, "active": 1, "repeat": 1},
                               on_trace_ready=self.write, record_shapes=True)
        self.profiler = kwargs.build()
        # what atexit keeps: not the runner (the model, the data on the device)
        self.outcome = {"directory": Path(directory), "main": main, "written": False}
        atexit.register(say_if_unwritten, self.outcome)

    @property
    def logs_live(self) -> bool:
        return self.runner.logs_live

    @property
    def capture_seconds(self) -> float:
        return self.runner.capture_seconds

    @property
    def seconds_to_first_step(self) -> float | None:
        return self.runner.seconds_to_first_step

    def begin_epoch(self, epoch: int, start: int) -> None:
        self.runner.begin_epoch(epoch, start)

    def step_losses(self, start: int, stop: int) -> list[float]:
        return self.runner.step_losses(start, stop)

    def step_norms(self) -> list[float]:
        return self.runner.step_norms()

    def run(self, start: int, stop: int) -> None:
        self.stretches += 1
        if self.stretches == 2:
            self.profiler.start()  # warm-up: traced, then dropped
        if self.stretches == 3:
            self.profiler.step()  # from here on recorded: not the checks between the two stretches
        self.runner.run(start, stop)
        if self.stretches == 3:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # the stretch's kernels, not only their launches
            self.profiler.step()  # recorded: `write` runs, and the profiler stops

    def write(self, profiler) -> None:
        """Torch's on_trace_ready, after the recorded stretch. A profile that cannot be written is said,
        and the run goes on (on the main process only: stopping there would leave the others waiting)."""
        self.outcome["written"] = True
        directory = self.outcome["directory"]
        if not self.outcome["main"]:
            return
        try:
            directory.mkdir(parents=True, exist_ok=True)
            if (directory / "trace.json").exists():  # allowed with --resume or --overwrite (TrainConfig.validate)
                print(f"mnist_dist: replacing the earlier profile in {directory}")
            profiler.export_chrome_trace(str(directory / "trace.json"))
            table = profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
            (directory / "top_ops.txt").write_text(table + "\n")
        except OSError as err:
            print(f"mnist_dist: warning: --profile could not write to {directory} ({err}); training goes on",
                  file=sys.stderr)
            return
        print(f"mnist_dist: wrote the profile of one stretch of steps to {directory}/trace.json and top_ops.txt")


def say_if_unwritten(outcome: dict) -> None:
    """At exit: a --profile that recorded nothing says so (the run took fewer than 3 stretches)."""
    if outcome["main"] and not outcome["written"]:
        print(f"mnist_dist: --profile wrote nothing to {outcome['directory']}: the run took fewer than 3 "
              "stretches of steps (lower --log-every, or take more steps)", file=sys.stderr)

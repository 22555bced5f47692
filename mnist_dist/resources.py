"""What training costs: a process's peak memory, the model FLOP/s it achieved and, with --profile,
where a stretch of steps spends its time. No distributed code."""

from __future__ import annotations

import atexit
import sys
from pathlib import Path

import psutil
import torch
from accelerate.utils import ProfileKwargs

# what `peak_memory_mib` measures on each kind of device, as results.json names it
MEMORY_MEASURED = {"cuda": "torch.cuda.max_memory_allocated", "cpu": "peak resident set of the process"}


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


def model_flops_per_second(parameters: int, samples: int, seconds: float) -> float:
    """Training FLOP/s estimated as 6 x parameters x samples / seconds: a multiply-add (2 FLOPs) per weight
    and sample forward, twice that backward (the estimate of nanoGPT's and PaLM's MFU). For the MLP it
    counts the bias additions as multiply-adds, 0.1% of its parameters."""
    return 6 * parameters * samples / seconds


class ProfiledSteps:
    """--profile DIR: a runner (`train.EagerSteps`, `graphs.EpochGraph`) whose stretches of steps (from
    one check to the next: --log-every steps on the eager paths, an epoch on the graph path) run under
    Accelerate's torch profiler, on torch's schedule counted in stretches: the first is left out
    (start-up; the graph path captures its epoch in it), the second warms the profiler up, the third
    is recorded. Then the main process writes DIR/trace.json (a Chrome trace: chrome://tracing,
    Perfetto) and DIR/top_ops.txt (the ops by their own time)."""

    def __init__(self, runner, directory: str, main: bool):
        self.runner, self.directory, self.main, self.written = runner, Path(directory), main, False
        kwargs = ProfileKwargs(schedule_option={"wait": 1, "warmup": 1, "active": 1, "repeat": 1},
                               on_trace_ready=self.write, record_shapes=True)
        self.profiler = kwargs.build()
        self.profiler.start()
        atexit.register(self.say_if_unwritten)

    def __getattr__(self, name: str):  # losses, begin_epoch, logs_live, ...: the runner's
        return getattr(self.runner, name)

    def run(self, start: int, stop: int) -> None:
        self.runner.run(start, stop)
        self.profiler.step()

    def write(self, profiler) -> None:
        """Torch's on_trace_ready, after the recorded stretch."""
        self.written = True
        if not self.main:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        profiler.export_chrome_trace(str(self.directory / "trace.json"))
        table = profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
        (self.directory / "top_ops.txt").write_text(table + "\n")
        print(f"mnist_dist: wrote the profile of one stretch of steps to {self.directory}/trace.json and top_ops.txt")

    def say_if_unwritten(self) -> None:
        if self.main and not self.written:
            print(f"mnist_dist: --profile wrote nothing to {self.directory}: the run took fewer than 3 stretches "
                  "of steps (lower --log-every, or more steps)", file=sys.stderr)

"""The one place that knows about processes: the Accelerator, launch and precision checks, stop
signals, the processes' agreement to stop, and which samples of a batch are real. Gradients are
averaged by the DDP that `accelerator.prepare` wraps the model in: gloo on CPUs, NCCL on GPUs.
"""

from __future__ import annotations

import contextlib
import faulthandler
import math
import os
import re
import socket
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

import psutil
import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import (AutocastKwargs, DataLoaderConfiguration, DistributedDataParallelKwargs,
                              GradientAccumulationPlugin, InitProcessGroupKwargs, ProjectConfiguration,
                              broadcast_object_list, gather_object)

from . import tracking
from .config import ConfigError, TrainConfig
from .stopping import stacks_to


class LaunchError(RuntimeError):
    """The processes were started in a way that cannot work; every process raises it."""


def build_accelerator(cfg: TrainConfig) -> Accelerator:
    """An Accelerator for `cfg`, after checking that the launch and the precision can work."""
    join_restarted_group(cfg)
    if cfg.deterministic:  # cuBLAS reads it when CUDA starts (torch's reproducibility notes)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # NCCL's flight recorder: the last collectives of each process, dumped when one times out (docs/hangs.md);
    # read when the process group starts. Yours win.
    if not ({"TORCH_FR_BUFFER_SIZE", "TORCH_NCCL_TRACE_BUFFER_SIZE"} & set(os.environ)):  # the second: its old name
        os.environ["TORCH_FR_BUFFER_SIZE"] = "2000"  # collectives kept per process group
    os.environ.setdefault("TORCH_NCCL_DUMP_ON_TIMEOUT", "1")
    accelerator = Accelerator(
        cpu=cfg.cpu,
        log_with=tracking.log_with(cfg) or None,  # trackers run on the main process only
        # the run's directory is known once the main process has claimed one (`use_output_dir`)
        project_config=ProjectConfiguration(logging_dir="tensorboard"),
        mixed_precision=cfg.mixed_precision,  # None: what `accelerate launch` was configured with
        # no cache of cast weights: CUDA graphs need it off (torch's CUDA-graph notes), and each weight
        # is cast once per forward pass anyway
        kwargs_handlers=[
            AutocastKwargs(cache_enabled=False),
            # DDP all-reduces the gradients in place, in its buckets: no copy in before, none out after
            DistributedDataParallelKwargs(gradient_as_bucket_view=True),
            # a collective that waits longer for a stalled or lost peer raises (gloo; NCCL's watchdog aborts)
            InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.timeout)),
        ],
        # every process draws the same permutation, seeded by seed + epoch, then takes its shard
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
        # the loop tells Accelerate which batch ends each optimizer step (EagerSteps), also on the device
        # path, which has no DataLoader whose end Accelerate could see; a resume that re-cuts the global
        # batch sets the steps again there
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=cfg.gradient_accumulation_steps,
                                                                sync_with_dataloader=False),
    )
    check_coupled(accelerator, "mnist_dist.train")
    check_precision(accelerator, from_flag=cfg.mixed_precision is not None)
    warn_if_no_gpu(accelerator, cfg)
    if accelerator.device.type == "cpu":
        threads, why = cpu_threads(cfg)
        torch.set_num_threads(threads)
        if accelerator.is_main_process:
            print(f"mnist_dist: {threads} torch thread(s) per process ({why})", flush=True)
    return accelerator


def join_restarted_group(cfg: TrainConfig) -> None:
    """Workers that torchrun's elastic agent restarted on one node join the process group through keys of
    their own attempt. The agent keeps its store across restarts, and a group reading the addresses its
    predecessor left there fails to connect (pytorch/pytorch#135712); Accelerate then uses this group."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    shared_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    # across nodes the agents count restarts apart, so only one node's attempt number is the same everywhere
    if attempt == "0" or not shared_store or os.environ.get("GROUP_WORLD_SIZE") != "1" or dist.is_initialized():
        return
    timeout = timedelta(seconds=cfg.timeout)
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout)
    on_cpu = cfg.cpu or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    backend = "gloo" if on_cpu or not torch.cuda.is_available() else "nccl"
    dist.init_process_group(backend, store=dist.PrefixStore(f"mnist_dist/attempt_{attempt}", store),
                            rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]), timeout=timeout)


IDLE_BELOW_PERCENT = 50  # a core busier than this (%) during the start-up probe counts as taken
PROBE_S = 0.2  # how long the probe watches the cores (s)


def cpu_threads(cfg: TrainConfig) -> tuple[int, str]:
    """Torch threads for a CPU process, and why: --cpu-threads, else $OMP_NUM_THREADS, else this
    process's share of the cores it may use that are idle now: OpenMP threads beside a busy core spin
    waiting on it (benchmarks/README.md)."""
    source, allowed = threads_from(cfg), allowed_cores()
    if source != "idle cores":
        asked = cfg.cpu_threads or int(os.environ["OMP_NUM_THREADS"].split(",")[0])  # "4,2": nested levels
        if asked > len(allowed):  # threads beyond the cores only wait on each other
            return len(allowed), f"{source} {asked}, capped at the {len(allowed)} allowed cores"
        return asked, source
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # torchrun's: the processes of this node
    if not threads_reproducible():  # a count that follows the load would change the weights
        return threads_for(len(allowed), len(allowed), local), (
            f"{len(allowed)} allowed cores, {local} process(es) on this node; not by load: this BLAS may round "
            "differently at another thread count")
    busy = psutil.cpu_percent(interval=PROBE_S, percpu=True)
    idle = sum(1 for core in allowed if core < len(busy) and busy[core] < IDLE_BELOW_PERCENT)
    return threads_for(len(allowed), idle, local), (f"{idle} of {len(allowed)} allowed cores idle, "
                                                    f"{local} process(es) on this node")


# MKL (2024.2) keeps strict reproducibility only for products of at least this many rows: with fewer
# (an epoch's short last batch), 1 and 2 threads round differently (benchmarks/README.md)
FEWEST_REPRODUCIBLE_ROWS = 16


@contextlib.contextmanager
def threads_for_rows(rows: int, device: torch.device):
    """Run a CPU step of `rows` samples on one torch thread where the BLAS would round it differently on
    more (fewer than FEWEST_REPRODUCIBLE_ROWS rows); otherwise on the threads set."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or rows >= FEWEST_REPRODUCIBLE_ROWS or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def threads_reproducible() -> bool:
    """Whether torch's CPU matrix products give the same bits at any thread count: MKL in its strict
    reproducibility mode (MKL_CBWR, set in mnist_dist/config.py). Then the thread count may follow
    the machine's load without changing a run's weights."""
    return torch.backends.mkl.is_available() and "STRICT" in os.environ.get("MKL_CBWR", "").upper()


def allowed_cores() -> list[int]:
    """The cores this process may run on: taskset's and SLURM's --cpus-per-task limits count."""
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


RECHECK_S = 1.0  # the least time between two looks at the cores (s): shorter readings are noisy


class CoreWatch:
    """Re-chooses a lone CPU process's torch threads as other programs start and stop: one that
    starts after the run keeps a core busy, and threads beside it wait on it."""

    def __init__(self):
        self.allowed, self.me, self.since = allowed_cores(), psutil.Process(), time.monotonic()
        self.me.cpu_percent(), psutil.cpu_percent(percpu=True)  # both readings run from here

    def recheck(self, say) -> None:
        """At a log point: set the threads that the cores free of other work allow; `say` it if they change."""
        if time.monotonic() - self.since < RECHECK_S:
            return
        busy = psutil.cpu_percent(percpu=True)
        others = sum(busy[core] for core in self.allowed if core < len(busy)) - self.me.cpu_percent()  # %
        idle = len(self.allowed) - round(max(0.0, others) / 100)
        self.since, after = time.monotonic(), threads_for(len(self.allowed), idle, 1)
        if after != torch.get_num_threads():
            torch.set_num_threads(after)
            say(f"mnist_dist: {after} torch thread(s) from now ({idle} of {len(self.allowed)} allowed cores free "
                "of other programs' work)")


def core_watch(cfg: TrainConfig, device: torch.device) -> CoreWatch | None:
    """A CoreWatch where the threads came from the idle cores and the process is alone on its node (with
    several, each one's reading counts the others' work): else None, the threads stay as they were set."""
    alone = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) == 1
    chosen_by_load = threads_from(cfg) == "idle cores" and threads_reproducible()
    return CoreWatch() if device.type == "cpu" and chosen_by_load and alone else None


def threads_from(cfg: TrainConfig) -> str:
    """Where a CPU process's thread count comes from: --cpu-threads, OMP_NUM_THREADS or idle cores."""
    value = os.environ.get("OMP_NUM_THREADS", "").split(",")[0]
    if cfg.cpu_threads:
        return "--cpu-threads"
    return "OMP_NUM_THREADS" if value.isdigit() and int(value) > 0 else "idle cores"


def threads_for(allowed: int, idle: int, local: int) -> int:
    """One process's share of the idle cores among the `local` processes of a node, at least 1. The
    other processes, starting at the same time, keep cores busy: each counts as one core of theirs."""
    return max(1, min(allowed, idle + local - 1) // local)


def use_output_dir(accelerator: Accelerator, output_dir: str) -> None:
    """Point Accelerate's project (TensorBoard's logs) at the run's directory."""
    accelerator.project_configuration.set_directories(output_dir)
    accelerator.project_configuration.logging_dir = str(Path(output_dir) / "tensorboard")


def decided_by_main(accelerator: Accelerator, decide, *args):
    """`decide(*args)` run on the main process, its result given to every process; an exception it
    raises there is raised on every process (results and exceptions must pickle)."""
    outcome = [None]
    if accelerator.is_main_process:
        try:
            outcome = [(True, decide(*args))]
        except Exception as err:  # raised everywhere below, so that no process waits for the others
            outcome = [(False, err)]
    broadcast_object_list(outcome)
    ok, value = outcome[0]
    if not ok:
        raise value
    return value


def any_process(accelerator: Accelerator, flag: bool) -> bool:
    """Whether `flag` is true on any process (a collective: every process must call it)."""
    return bool(accelerator.reduce(torch.tensor(float(flag), device=accelerator.device), reduction="max").item())


def per_process(accelerator: Accelerator, value: float) -> list[float]:
    """Every process's `value`, by rank (a collective)."""
    return accelerator.gather(torch.tensor([value], dtype=torch.float32, device=accelerator.device)).tolist()


def process_hosts(accelerator: Accelerator) -> list[str]:
    """Every process's host name, by rank (a collective), for messages that name a peer."""
    return gather_object([socket.gethostname()])


class StallWatch:
    """Where each process is when a run stalls: its Python stack, all threads, into OUTPUT_DIR/stacks/rank-N.txt
    (faulthandler, so also while the main thread waits inside a collective). Written on SIGUSR2 at any time
    (training goes on), and by a watchdog thread when this process has taken no training step for most of
    --timeout: before the collective that waits for it gives up. NCCL's flight recorder dumps beside them.
    Files left empty are removed at the end."""

    REARM_S = 1.0  # the watchdog is re-armed at most once a second: re-arming starts a thread (~50 us)
    MISSING_WAIT_S = 30  # at most, at the monitored barrier that names who is missing

    def __init__(self, accelerator: Accelerator, run_dir: str | Path, timeout: int, step: int):
        self.accelerator, self.timeout = accelerator, timeout
        self.dir = Path(run_dir) / "stacks"
        self.dir.mkdir(exist_ok=True)
        self.path = self.dir / f"rank-{accelerator.process_index}.txt"
        self.file = open(self.path, "a")  # appended: an earlier start's stacks stay, after a line of this one's
        if self.path.stat().st_size:
            self.file.write(f"\nmnist_dist: rank {accelerator.process_index}: a new start of the run, at step {step}, "
                            f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n")
            self.file.flush()
        stacks_to(self.file)
        use_flight_recorder_dir(self.dir)
        # a group of its own to name who is missing: the run's may be broken after a timeout (a collective).
        # Its timeout bounds how long the others wait for rank 0's answer there, rank 0 stalled included
        self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=self.missing_wait + 2)) \
            if accelerator.num_processes > 1 else None
        # fire before the collective's own timeout, so that a waiting process's stack shows the wait
        self.after = max(1.0, timeout - min(5.0, timeout / 5))
        self.rearm_every = min(self.REARM_S, self.after / 4)  # the deadline: after - rearm_every to after
        self.armed_at = -math.inf

    @property
    def missing_wait(self) -> int:
        """Seconds at the monitored barrier after a failed collective: the processes that waited in it arrive
        within moments of each other, so a quarter of --timeout, at most 30 s."""
        return max(1, min(self.timeout // 4, self.MISSING_WAIT_S))

    def step(self) -> None:
        """A training step began: the watchdog's count starts again (cheap; called every step)."""
        now = time.monotonic()
        if now - self.armed_at >= self.rearm_every:
            faulthandler.dump_traceback_later(self.after, file=self.file)
            self.armed_at = now

    def pause(self) -> None:
        """Between stretches of steps: evaluations and checkpoints may take longer than --timeout."""
        faulthandler.cancel_dump_traceback_later()
        self.armed_at = -math.inf

    def dump(self, why: str, err: BaseException) -> None:
        """A line that says why, and where `err` was raised: the collective this process waited in."""
        self.file.write(f"mnist_dist: rank {self.accelerator.process_index}: {why}:\n")
        self.file.writelines(traceback.format_exception(err))
        self.file.flush()

    def missing(self) -> list[int]:
        """After a collective failed: the ranks that do not come to a monitored barrier within `missing_wait`
        seconds, as this process sees it (the main process names every one; another only the main, if missing)."""
        if self.group is None:
            return []
        try:
            dist.monitored_barrier(group=self.group, timeout=timedelta(seconds=self.missing_wait), wait_all_ranks=True)
        except RuntimeError as err:
            return failed_ranks(err)
        return []

    def close(self) -> None:
        """SIGUSR2 back to stderr (stopping.StopSignals), the file closed, and removed if nothing was written."""
        self.pause()
        stacks_to(sys.stderr)
        self.file.close()
        with contextlib.suppress(OSError):
            if self.path.stat().st_size == 0:
                self.path.unlink()
            self.dir.rmdir()  # fails where another process's file, or a dump, is left: kept


FLIGHT_RECORDER_FILE = ("TORCH_FR_DUMP_TEMP_FILE", "TORCH_NCCL_DEBUG_INFO_TEMP_FILE")  # the second: its old name
_flight_recorder_dir: str | None = None  # what this process set it to, for the next run in it


def use_flight_recorder_dir(stacks: Path) -> None:
    """NCCL's flight recorder dumps into the run's stacks/ (read when it dumps), unless you named a place."""
    global _flight_recorder_dir
    set_here = _flight_recorder_dir is not None and os.environ.get(FLIGHT_RECORDER_FILE[0]) == _flight_recorder_dir
    if any(name in os.environ for name in FLIGHT_RECORDER_FILE) and not set_here:
        return
    _flight_recorder_dir = os.environ[FLIGHT_RECORDER_FILE[0]] = str(stacks / "nccl_trace_rank_")


def failed_ranks(err: BaseException) -> list[int]:
    """The ranks torch's monitored barrier names in its error: on rank 0 'Ranks 1, 2 failed to pass
    monitoredBarrier', elsewhere '... received errors while waiting for send/recv from rank 0' (rank 0 missing)."""
    found = re.search(r"Ranks? ([\d, ]+) failed to pass monitoredBarrier", str(err))
    if found:
        return [int(r) for r in found.group(1).replace(",", " ").split()]
    found = re.search(r"while waiting for send/recv from rank (\d+)", str(err))
    return [int(found.group(1))] if found else []


class LostPeers(RuntimeError):
    """A collective failed (`lost_peer`): the message names the step and the processes waited for."""


def lost_peer(err: BaseException) -> bool:
    """Whether `err` is a collective that timed out or lost its connection (gloo's are plain RuntimeErrors)."""
    return isinstance(err, torch.distributed.DistError) or "gloo/transport" in str(err)


def peers_message(accelerator: Accelerator, hosts: list[str], timeout: int, step: int, err: BaseException,
                  missing: list[int], stacks: Path) -> str:
    """What a process tells when a collective failed (`lost_peer`): where, whom it waited for, which of them
    did not come to the monitored barrier after it (`StallWatch.missing`), and where the stacks are."""
    rank = accelerator.process_index
    others = ", ".join(f"rank {r} on {host}" for r, host in enumerate(hosts) if r != rank)
    what = f"waited more than --timeout {timeout} s for" if "Timed out" in str(err) else "lost its connection to"
    named = ", ".join(f"rank {r} on {hosts[r]}" for r in missing if r < len(hosts))
    who = f"{named} did not come (stalled or gone)" if named else "one of them is stalled or gone"
    return (f"process {rank} {what} the other processes ({others}) after step {step}: {who}. Each process's "
            f"Python stack: {stacks}/rank-N.txt (docs/hangs.md). The checkpoints hold the last saved state; resume "
            "with --resume auto once every node is healthy")


def compiled_with(accelerator: Accelerator) -> str:
    """The torch.compile backend Accelerate compiles prepared models with (its dynamo_backend, from
    `accelerate launch --dynamo_backend` or the config file), lower case; "no" when it does not."""
    return accelerator.state.dynamo_plugin.backend.value.lower()


def check_coupled(accelerator: Accelerator, program: str) -> None:
    """Refuse to run `program` (mnist_dist.train, mnist_dist.evaluate) when the launcher started N processes
    that are not connected (a MULTI_GPU launch without GPUs): each would work alone on all the data and
    overwrite the others' output."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise LaunchError(
            f"the launcher started {launched} processes (WORLD_SIZE={launched}) but Accelerate connected "
            f"{accelerator.num_processes} (device: {accelerator.device.type}): each would run {program} alone and "
            f"overwrite the others' output. No GPU is visible here. To run it on {launched} CPU processes, add "
            f"--cpu to its flags (accelerate launch --config_file accelerate_configs/cpu.yaml -m {program} ... "
            f"--cpu) or set ACCELERATE_USE_CPU=1; for one process use `python -m {program} ... --cpu`."
        )


def check_precision(accelerator: Accelerator, from_flag: bool) -> None:
    """Mixed precision that cannot work on this device is an error, never a silent fp32 run."""
    precision, device = accelerator.mixed_precision, accelerator.device
    source = "--mixed-precision" if from_flag else "the accelerate config's mixed_precision"
    if precision == "fp16" and device.type == "cpu":
        raise ConfigError(f"{source}=fp16 needs a GPU, but this run is on the CPU; use bf16 (CPU autocast) or 'no'")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"{source}=bf16: {torch.cuda.get_device_name(device)} has no bf16 support; use fp16 or 'no'")


def warn_if_no_gpu(accelerator: Accelerator, cfg: TrainConfig) -> None:
    """A launch whose accelerate config asks for GPUs (use_cpu: false) on a machine with none trains
    on the CPU: say so, rather than run single_gpu.yaml's bf16 on the CPU without a word."""
    asked_for_gpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() == "false"  # what accelerate launch sets
    if asked_for_gpu and not cfg.cpu and accelerator.device.type == "cpu" and accelerator.is_main_process:
        print(f"mnist_dist: warning: the accelerate config asks for a GPU (use_cpu: false) but torch sees none: "
              f"training on the CPU, precision {accelerator.mixed_precision}; for the CPU use "
              "accelerate_configs/cpu.yaml or --cpu", file=sys.stderr, flush=True)


def global_real(batch_index: int, dataset_len: int, batch_size: int, world: int) -> int:
    """Real samples in the global batch number `batch_index` of an epoch (the last one may be short)."""
    return min(world * batch_size, dataset_len - batch_index * world * batch_size)


def local_real(batch_index: int, batch_len: int, dataset_len: int, batch_size: int, accelerator: Accelerator) -> int:
    """Real samples in this process's batch at step `batch_index` of an epoch: a prefix of it.

    Accelerate gives process r batch `batch_index * world + r` of the shuffled epoch and, so that
    every process takes the same number of steps, fills the last steps up with samples from the
    start of the epoch, after the real ones. Cutting them off uses each sample once per epoch.
    """
    world, rank = accelerator.num_processes, accelerator.process_index
    real = global_real(batch_index, dataset_len, batch_size, world)
    return min(max(real - rank * batch_size, 0), batch_len)


def agree_to_stop(accelerator: Accelerator, stop_requested: bool, bad_steps: torch.Tensor, step: int,
                  first_bad_loss: int | None = None) -> tuple[bool, int | None]:
    """(some process was asked to stop, the first step whose loss or gradients were not finite, or None),
    the same on every process.

    `step` is the global step just taken; `bad_steps` (a 0-d device tensor) counts the steps skipped
    since the first non-finite gradients; `first_bad_loss` is the first step at which this process saw
    a non-finite loss, if any. One tiny all-reduce and one host sync; the loop calls it whenever the
    host looks (every --log-every steps on the eager paths, before checkpoints, at epoch ends).
    """
    flags = torch.stack([
        torch.tensor(float(stop_requested), device=bad_steps.device),
        bad_steps,  # the same on every process: gradients are all-reduced before the check
        # steps since the first non-finite loss, so that the max over processes is the earliest
        torch.tensor(float(step - first_bad_loss + 1 if first_bad_loss else 0), device=bad_steps.device),
    ])
    stop, skipped, since_bad_loss = accelerator.reduce(flags, reduction="max").tolist()
    bad = [step - int(n) + 1 for n in (skipped, since_bad_loss) if n]
    return stop > 0, min(bad) if bad else None

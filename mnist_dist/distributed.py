"""The one place that knows about processes and ranks.

The training loop calls these helpers; model, data and evaluation code stay plain PyTorch.
"""

from __future__ import annotations

import math
import os
import select
import shutil
import signal
import socket
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import (
    AutocastKwargs, DataLoaderConfiguration, DistributedDataParallelKwargs, DistributedType, ProjectConfiguration,
)

from . import tracking
from .config import ConfigError, TrainConfig
from .evaluation import evaluate_sums


class LaunchError(RuntimeError):
    """The processes were started in a way that cannot train correctly."""


def build_accelerator(cfg: TrainConfig) -> Accelerator:
    """An Accelerator for `cfg`, after checking that the launch and the precision can work."""
    accelerator = Accelerator(
        cpu=cfg.cpu,
        log_with=tracking.log_with(cfg) or None,  # trackers run on the main process only
        project_config=ProjectConfiguration(
            project_dir=cfg.output_dir, logging_dir=str(Path(cfg.output_dir) / "tensorboard")
        ),
        mixed_precision=cfg.mixed_precision,  # None: what `accelerate launch` was configured with
        # no cache of cast weights: CUDA graphs need it off (torch's CUDA-graph notes), and each weight is
        # cast once per forward pass anyway, so the eager paths lose nothing and compute the same
        kwargs_handlers=[
            AutocastKwargs(cache_enabled=False),
            # gradients live in DDP's communication buckets: no copy into them before the all-reduce
            # and none back out after it
            DistributedDataParallelKwargs(gradient_as_bucket_view=True),
        ],
        dataloader_config=DataLoaderConfiguration(
            # every process draws the same permutation, seeded by seed + epoch, then takes its shard
            use_seedable_sampler=True,
            data_seed=cfg.seed,
        ),
    )
    check_coupled(accelerator)
    check_precision(accelerator, from_flag=cfg.mixed_precision is not None)
    return accelerator


def compiled_with(accelerator: Accelerator) -> str:
    """The torch.compile backend Accelerate compiles prepared models with (its dynamo_backend, from
    `accelerate launch --dynamo_backend` or the config file), lower case; "no" when it does not."""
    return accelerator.state.dynamo_plugin.backend.value.lower()


def check_coupled(accelerator: Accelerator) -> None:
    """Refuse to run when the launcher started N processes but they are not connected.

    A MULTI_GPU launch on a machine without GPUs starts N processes that each see a world
    of one: they would all train alone on the full data and overwrite each other's output.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise LaunchError(
            f"the launcher started {launched} processes (WORLD_SIZE={launched}) but Accelerate connected "
            f"{accelerator.num_processes} (device: {accelerator.device.type}): each would train alone and "
            f"overwrite the others' output. No GPU is visible here. To train with {launched} CPU processes, "
            f"add --cpu to the training flags (accelerate launch --config_file accelerate_configs/cpu.yaml "
            f"-m mnist_dist.train --cpu) or set ACCELERATE_USE_CPU=1; for one process use "
            f"`python -m mnist_dist.train --cpu`."
        )


def check_precision(accelerator: Accelerator, from_flag: bool) -> None:
    """Mixed precision that cannot work on this device is an error, never a silent fp32 run."""
    precision, device = accelerator.mixed_precision, accelerator.device
    source = "--mixed-precision" if from_flag else "the accelerate config's mixed_precision"
    if precision == "fp16" and device.type == "cpu":
        raise ConfigError(
            f"{source}=fp16 needs a GPU, but this run is on the CPU; use bf16 (CPU autocast) or 'no'"
        )
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"{source}=bf16: {torch.cuda.get_device_name(device)} has no bf16 support; use fp16 or 'no'")


def shard_counts(batch_index: int, batch_len: int, dataset_len: int, batch_size: int, accelerator: Accelerator):
    """(real samples in this process's batch, real samples in the global batch) at `batch_index` of an epoch.

    Accelerate gives process r batch number `batch_index * world + r` of the shuffled epoch and,
    so that every process takes the same number of steps, fills the last steps up with samples
    from the start of the epoch. Those fillers come after the real samples, so the real ones
    are a prefix of the batch and each training sample is used exactly once per epoch.
    """
    world, rank = accelerator.num_processes, accelerator.process_index
    global_real = min(world * batch_size, dataset_len - batch_index * world * batch_size)
    local_real = min(max(global_real - rank * batch_size, 0), batch_len)
    return local_real, global_real


# exit status of a run that stopped on SIGTERM/SIGUSR1 after saving a checkpoint: "try again"
# (EX_TEMPFAIL); a scheduler or wrapper requeues the job and `--resume auto` continues it
EXIT_PREEMPTED = 75
STOP_SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)) if s)


class StopSignals:
    """Turn SIGTERM / SIGUSR1 (what SLURM sends before a time limit or preemption) into a flag.

    The handler only records the signal; the training loop checks the flag between steps,
    so a signal never interrupts a step or a checkpoint, and a second signal changes nothing.
    """

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def __enter__(self) -> "StopSignals":
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        self.received = self.received or signum


def agree_to_stop(
    accelerator: Accelerator, stop_requested: bool, health: "StepHealth", step: int, first_bad_loss: int | None = None
) -> tuple[bool, int | None]:
    """(some process was asked to stop, the first step whose loss or gradients were not finite, or None),
    the same on every process.

    `step` is the global step just taken; `first_bad_loss` the first step at which this process saw a
    non-finite loss, if any. One tiny all-reduce and one host sync; the loop calls it every --log-every
    steps, before each checkpoint and at each epoch end, never every step.
    """
    device = health.bad_steps.device
    flags = torch.stack(
        [
            torch.tensor(float(stop_requested), device=device),
            health.bad_steps,  # the same on every process: gradients are all-reduced before the check
            # steps since the first non-finite loss, so that the max over processes is the earliest
            torch.tensor(float(step - first_bad_loss + 1 if first_bad_loss else 0), device=device),
        ]
    )
    stop, bad_steps, bad_loss_steps = accelerator.reduce(flags, reduction="max").tolist()
    bad = [step - int(n) + 1 for n in (bad_steps, bad_loss_steps) if n]
    return stop > 0, min(bad) if bad else None


# --gradient-sync auto: up to this many CPU processes share (or exchange) whole buckets; each process then
# reads (or receives) world - 1 copies of the gradients, against about 2 for a ring all-reduce
WHOLE_BUCKET_MAX_PROCESSES = 4


@dataclass
class GradientSync:
    """How this run averages gradients over its processes (`setup_gradient_sync`)."""

    mode: str  # none (one process), allreduce (DDP's own), shared-memory (`SharedGradients`) or exchange
    model: torch.nn.Module  # what the training step runs: the DDP-wrapped model, or the module itself
    average: Callable[[], None] | None = None  # after backward; None where DDP averages during backward


def setup_gradient_sync(accelerator: Accelerator, model, mode: str) -> GradientSync:
    """Choose how the prepared (DDP-wrapped) `model` averages its gradients, per --gradient-sync. Every
    process must call it.

    'allreduce' and 'exchange' run inside DDP's backward (a DDP communication hook for the exchange).
    'shared-memory' bypasses DDP: the step runs the module itself and calls `average` after backward.
    DDP's forward and its reducer cost about 0.25 ms of a 3 ms step on this project's 2-core VM, and
    with memory that every process maps, the reducer's buckets only add a copy.
    """
    world = accelerator.num_processes
    if world == 1:
        return GradientSync("none", model)
    on_gloo = accelerator.device.type == "cpu" and dist.get_backend() == "gloo"
    if mode in ("exchange", "shared-memory") and not on_gloo:
        raise ConfigError(
            f"--gradient-sync {mode} is for CPU processes over gloo, and this run's {world} processes use "
            f"{dist.get_backend()} on the {accelerator.device.type}; use allreduce or auto"
        )
    if mode == "auto" and not (on_gloo and world <= WHOLE_BUCKET_MAX_PROCESSES):
        mode = "allreduce"
    if mode in ("auto", "shared-memory"):
        shared, why_not = SharedGradients.open(accelerator.unwrap_model(model, keep_torch_compile=False))
        if shared is not None:
            # the module inside DDP, with Accelerate's autocast on its forward (fp16/bf16). A model compiled by
            # Accelerate (dynamo_backend) is torch.compile's wrapper around DDP; unwrapping it keeps the wrapper
            # and puts the bare module inside it in DDP's place, so it is done only once DDP is not needed
            return GradientSync("shared-memory", accelerator.unwrap_model(model, keep_torch_compile=True), shared.average)
        if mode == "shared-memory":
            raise ConfigError(f"--gradient-sync shared-memory: {why_not}; use exchange, allreduce or auto")
        if accelerator.is_main_process:
            print(f"mnist_dist: no shared-memory gradient sync ({why_not})", flush=True)
        mode = "exchange"
    if mode == "exchange":
        model.register_comm_hook(GradientExchange(), exchange_gradients)
    return GradientSync(mode, model)


def _sum_in_rank_order(parts: list[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """parts[0] + parts[1] + ... into `out`: the same additions in the same order on every process."""
    torch.add(parts[0], parts[1], out=out)
    for part in parts[2:]:
        out.add_(part)
    return out


def _done(tensor: torch.Tensor) -> torch.futures.Future:
    future = torch.futures.Future()
    future.set_result(tensor)
    return future


class GradientExchange:
    """The state of `exchange_gradients`: each DDP bucket's receive buffers, reused every step."""

    def __init__(self):
        self.buffers: dict[int, list[torch.Tensor]] = {}


def exchange_gradients(state: GradientExchange, bucket):
    """A DDP communication hook (dist.GradBucket in, Future of the averaged bucket out): the mean of every
    process's gradients, with one message each way between each pair of processes.

    gloo's ring all-reduce passes a bucket round the processes in 2 (world - 1) rounds of chunks, each
    round waiting on a peer. On this project's 2-core VM it takes about 2.5 ms for anything from 4 kB to
    1.6 MB, this model's 0.8 MB included, while sending the whole bucket each way takes about 0.6 ms.
    Like DDP's own hook, each process divides its gradients by the world size; it then sends them to every
    other process, and every process adds the same tensors in rank order, so all get the same sum. With
    two processes it is bit for bit the all-reduce's: g0 / 2 + g1 / 2 is one addition, and addition commutes.
    (No type annotations: DDP compares them with its own classes, and this module's are strings.)
    """
    grads = bucket.buffer()
    world, rank = dist.get_world_size(), dist.get_rank()
    grads.div_(world)
    buffers = state.buffers.get(bucket.index())
    if buffers is None or buffers[0].shape != grads.shape:  # DDP may rebuild its buckets after the first step
        buffers = state.buffers[bucket.index()] = [torch.empty_like(grads) for _ in range(world)]
    requests = []
    for peer in range(world):
        if peer != rank:
            requests += [dist.isend(grads, peer), dist.irecv(buffers[peer], peer)]
    for request in requests:
        request.wait()
    parts = [grads if r == rank else buffers[r] for r in range(world)]
    return _done(_sum_in_rank_order(parts, out=buffers[rank]))  # the slot nobody sends to holds the sum


class SharedGradients:
    """The mean of every process's gradients through memory that all the processes on one host map, and
    one pipe (a FIFO) from each process to each other one, to say "my gradients are in".

    The region holds two rounds of one slot per process, each slot as large as all the model's gradients.
    `average` call k uses round k % 2: a process writes round k only after every other has said it
    finished call k - 1, and so has finished reading round k - 2. The pipes carry one byte per call. A
    byte read from a pipe went through the kernel after the writer's gradients were stored, so the reader
    sees them on any CPU, however weakly it orders memory. The files are deleted as soon as every process
    has them open: nothing is left behind, however the run ends.
    """

    SPIN_SECONDS = 0.005  # poll a pipe this long (yielding the core) before sleeping on it
    TIMEOUT_SECONDS = 1800.0  # gloo's default: a process silent this long is stuck

    def __init__(self, params: list[tuple[str, torch.Tensor]], region: torch.Tensor, inbox: dict[int, int],
                 outbox: dict[int, int]):
        self.params = params  # (name, parameter): the trainable ones, in the module's order
        self.inbox, self.outbox = inbox, outbox  # peer -> file descriptor of the pipe from / to it
        self.world, self.rank = region.shape[1], dist.get_rank()
        offsets, _ = _slot_layout([p for _, p in params])

        def place(slot: torch.Tensor) -> list[torch.Tensor]:  # each parameter's bytes of a slot, as its tensor
            return [slot[at : at + p.numel() * p.element_size()].view(p.dtype).view(p.shape)
                    for at, (_, p) in zip(offsets, params)]

        # slots[round][process][i]: parameter i's gradient in that process's slot of that round
        self.slots = [[place(region[round_, process]) for process in range(self.world)] for round_ in (0, 1)]
        self.calls = 0

    @classmethod
    def open(cls, module: torch.nn.Module) -> tuple["SharedGradients | None", str]:
        """(state, "") for `module`'s trainable parameters when every process is on this host and the
        region fits, else (None, why not); the same answer on every process (a collective: every process
        calls it)."""
        world, rank = dist.get_world_size(), dist.get_rank()
        params = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
        _, slot = _slot_layout([p for _, p in params])
        made = [None]
        if rank == 0:
            made = [cls._make_files(world, 2 * world * slot)]
        dist.broadcast_object_list(made, src=0)
        directory, host, token, why_not = made[0]
        try:  # the same host, and its files visible here: not another node sharing a file system
            here = directory is not None and host == socket.gethostname() and \
                (Path(directory) / "token").read_text() == token
        except OSError:
            here = False
        together = torch.tensor(float(here))
        dist.all_reduce(together, op=dist.ReduceOp.MIN)
        if not together.item():
            if rank == 0 and directory:
                shutil.rmtree(directory, ignore_errors=True)
            return None, why_not or "the processes are not all on one host"
        region = torch.from_file(str(Path(directory) / "region"), shared=True, size=2 * world * slot,
                                 dtype=torch.uint8).view(2, world, slot)
        peers = [p for p in range(world) if p != rank]
        inbox = {p: os.open(Path(directory) / f"{p}-to-{rank}", os.O_RDONLY | os.O_NONBLOCK) for p in peers}
        dist.barrier()  # every read end is open: opening a write end no longer waits
        outbox = {p: os.open(Path(directory) / f"{rank}-to-{p}", os.O_WRONLY | os.O_NONBLOCK) for p in peers}
        dist.barrier()
        if rank == 0:
            shutil.rmtree(directory)
        return cls(params, region, inbox, outbox), ""

    @staticmethod
    def _make_files(world: int, region_bytes: int) -> tuple[str | None, str, str, str]:
        """On process 0: a private directory with the region (its memory reserved now, so that a full
        /dev/shm is an error here and not a crash mid-run), the pipes and a token for the others to read."""
        if not hasattr(os, "mkfifo"):
            return None, "", "", "this system has no named pipes"
        shm = Path("/dev/shm")
        directory = None
        try:  # any failure here is an answer for every process, never an exception on this one alone
            directory = tempfile.mkdtemp(prefix="mnist_dist-gradients-", dir=shm if shm.is_dir() else None)
            with open(Path(directory) / "region", "wb") as f:
                for start in range(0, region_bytes, 1 << 20):
                    f.write(bytes(min(1 << 20, region_bytes - start)))
            for a in range(world):
                for b in range(world):
                    if a != b:
                        os.mkfifo(Path(directory) / f"{a}-to-{b}")
            token = uuid.uuid4().hex
            (Path(directory) / "token").write_text(token)
        except OSError as e:
            if directory:
                shutil.rmtree(directory, ignore_errors=True)
            where = directory or (shm if shm.is_dir() else tempfile.gettempdir())
            return None, "", "", f"could not set up {region_bytes / 2**20:.1f} MB in {where}: {e}"
        return directory, socket.gethostname(), token, ""

    def signal_and_wait(self) -> None:
        """Tell every other process this one's gradients are in; wait until each has said the same."""
        for fd in self.outbox.values():
            os.write(fd, b"\0")
        for peer, fd in self.inbox.items():
            spin_until = time.monotonic() + self.SPIN_SECONDS
            while True:
                try:
                    if os.read(fd, 1):
                        break
                    raise RuntimeError(f"process {peer} stopped during the gradient sync (its pipe closed)")
                except BlockingIOError:
                    if time.monotonic() < spin_until:
                        os.sched_yield()  # a few microseconds per poll; lets a peer on this core run
                    elif not select.select([fd], [], [], self.TIMEOUT_SECONDS)[0]:
                        raise RuntimeError(f"no gradients from process {peer} in {self.TIMEOUT_SECONDS:.0f} s")

    def average(self) -> None:
        """Replace each process's gradients with the mean over the processes; call it after backward.

        Each process divides its gradients by the world size into its slot, says so down the pipes,
        waits for the others, then adds all the slots in rank order into its gradients: the same sum on
        every process, and with two processes bit for bit DDP's all-reduce (as `exchange_gradients`).
        Nothing goes through sockets: on this project's 2-core VM the division and the sum take about
        0.1 ms each per step, the signal about 20 µs, against 1.2-1.8 ms for the exchange's messages.
        """
        self.calls += 1
        slots = self.slots[self.calls % 2]
        for (name, p), mine in zip(self.params, slots[self.rank]):
            if p.grad is None:  # DDP, too, needs every parameter in every step unless told otherwise
                raise RuntimeError(f"parameter {name!r} got no gradient in this step; the shared-memory "
                                   f"gradient sync needs one for every trainable parameter")
            torch.div(p.grad, self.world, out=mine)
        self.signal_and_wait()
        for i, (_, p) in enumerate(self.params):
            _sum_in_rank_order([slot[i] for slot in slots], out=p.grad)


def _slot_layout(tensors: list[torch.Tensor]) -> tuple[list[int], int]:
    """(byte offset of each tensor in a slot, the slot's size): each tensor starts on a cache line."""
    offsets, size = [], 0
    for t in tensors:
        offsets.append(size)
        size += -(-t.numel() * t.element_size() // 64) * 64
    return offsets, size


class StepHealth:
    """Non-finite gradients, tracked on the device so that no step waits for the host.

    Once a step's gradients are not finite, `found_inf` stays 1 and the optimizer skips every update
    from then on (`optimizer_step`), so the weights stay those of the last good step until the next
    `agree_to_stop` ends the run naming that step. Both are float32 scalars on the device.
    """

    def __init__(self, device: torch.device):
        self.found_inf = torch.zeros((), device=device)  # 1.0 from the first non-finite step on (sticky)
        self.bad_steps = torch.zeros((), device=device)  # steps skipped since then
        self.unit_scale = torch.ones((), device=device)


class DeviceBatches:
    """The DataLoader path's training batches, cut from tensors already on the device.

    Same permutation as Accelerate's seedable sampler (torch.randperm seeded by seed + epoch,
    drawn on the CPU so every process and device type gets the same one), same shard: at step
    s process r takes positions [(s * world + r) * batch, +batch) of it, real samples only.
    No DataLoader, no collation, no host-to-device copy per step.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int, accelerator: Accelerator):
        self.images, self.labels = images.to(accelerator.device), labels.to(accelerator.device)
        self.n, self.batch_size, self.seed = len(labels), batch_size, seed
        self.world, self.rank = accelerator.num_processes, accelerator.process_index

    def __len__(self) -> int:
        return math.ceil(self.n / (self.world * self.batch_size))

    def epoch(self, epoch: int, start: int = 0):
        """Yield (step, images, labels, real samples in the global batch) from step `start` of `epoch`."""
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))
        order = order.to(self.images.device)
        per_step = self.world * self.batch_size
        for step in range(start, len(self)):
            lo = min(step * per_step + self.rank * self.batch_size, self.n)
            index = order[lo : min(lo + self.batch_size, self.n)]
            # index_select copies whole rows: on a CPU ~10x faster than images[index] for a batch
            images, labels = torch.index_select(self.images, 0, index), torch.index_select(self.labels, 0, index)
            yield step, images, labels, min(per_step, self.n - step * per_step)


def device_test_shard(images: torch.Tensor, labels: torch.Tensor, batch_size: int, accelerator: Accelerator):
    """This process's contiguous share of the test set, on the device, in batches; together they cover it once."""
    per_process = math.ceil(len(labels) / accelerator.num_processes)
    lo = min(accelerator.process_index * per_process, len(labels))
    hi = min(lo + per_process, len(labels))
    images, labels = images[lo:hi].to(accelerator.device), labels[lo:hi].to(accelerator.device)
    return [(images[i : i + batch_size], labels[i : i + batch_size]) for i in range(0, hi - lo, batch_size)]


def evaluate_sharded(accelerator: Accelerator, model, shard: list, normalization: tuple[float, float]) -> dict:
    """Evaluate this process's `device_test_shard` and add up the totals across processes:
    every test image counts exactly once (no padding, no duplicates)."""
    return reduce_eval_sums(accelerator, evaluate_sums(model, shard, normalization=normalization))


def reduce_eval_sums(accelerator: Accelerator, sums: dict) -> dict:
    """Add up every process's evaluation totals (device path: no padding, so a plain sum is exact)."""
    confusion = torch.tensor(sums["confusion"], dtype=torch.int64, device=accelerator.device)
    loss_sum = torch.tensor([sums["loss_sum"]], dtype=torch.float64, device=accelerator.device)
    confusion = accelerator.reduce(confusion, reduction="sum").cpu()
    loss_sum = accelerator.reduce(loss_sum, reduction="sum").item()
    return {"correct": int(confusion.trace()), "loss_sum": loss_sum, "samples": int(confusion.sum()),
            "confusion": confusion.tolist()}


def backward(accelerator: Accelerator, loss: torch.Tensor, scale: torch.Tensor) -> None:
    """`accelerator.backward(loss * scale)`, with `scale` (a 0-d float32 tensor on the device) seeding
    the backward pass instead: the same gradients bit for bit, five kernels fewer per step.

    `loss * scale` costs a multiplication forward, a fill of the seed and a multiplication backward,
    and Accelerate's backward divides the loss by `gradient_accumulation_steps` even when it is 1 (a
    division and its backward). At batch 128 a step is a couple of dozen tiny kernels, each bound by
    its launch, so five fewer count. Accelerate's own path stays where it does more than that: a
    grad scaler (fp16), gradient accumulation, DeepSpeed or Megatron-LM.
    """
    if (accelerator.scaler is not None or accelerator.gradient_accumulation_steps != 1
            or accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM)):
        accelerator.backward(loss * scale)
    else:
        loss.backward(gradient=scale)


def optimizer_step(accelerator: Accelerator, optimizer, health: StepHealth, view_elements: int | None = None) -> None:
    """`optimizer.step()` for an Accelerate-prepared optimizer that skips non-finite steps without a host sync.

    The gradients are all-reduced by now, so every process sees the same ones and makes the same
    decision. A fused torch optimizer takes the decision as a device tensor (`found_inf`, the
    interface torch's GradScaler uses) and leaves weights, moments and step count untouched.
    With a grad scaler (fp16) the scaler does this itself. The direct call also skips
    AcceleratedOptimizer.step's two importlib lookups per step (~15% of a CPU step here).
    `view_elements`: see `fused_adam_in_views` (the captured-epoch path on CUDA).
    """
    inner = optimizer.optimizer
    if accelerator.scaler is not None or accelerator.distributed_type == DistributedType.XLA:
        optimizer.step()
        return
    grads = [p.grad for group in inner.param_groups for p in group["params"] if p.grad is not None]
    if view_elements and inner.state:  # the kernels below get many small tensors instead of a few large ones
        grads = _views(grads, view_elements)
    # one multi-tensor kernel (GradScaler's): sets found_inf to 1 if any gradient is inf or nan, never back
    # to 0; with a scale of 1 the gradients stay as they are
    torch._amp_foreach_non_finite_check_and_unscale_(grads, health.found_inf, health.unit_scale)
    health.bad_steps += health.found_inf
    if inner.defaults.get("fused"):
        if view_elements and inner.state:
            fused_adam_in_views(inner, health.found_inf, view_elements, grads)  # the views cut above
            return
        inner.found_inf = health.found_inf
        try:
            inner.step()
        finally:
            del inner.found_inf
    elif not health.found_inf.item():  # unfused optimizer (a device without fused Adam): one host sync
        inner.step()


def fused_adam_in_views(adam: torch.optim.Adam, found_inf: torch.Tensor, view_elements: int,
                        grad_views: list[torch.Tensor] | None = None) -> None:
    """Exactly `adam.step()` of a fused Adam whose state exists (torch.optim.adam._fused_adam's three
    calls), with every parameter, gradient and moment cut into views of `view_elements` elements.

    torch's multi-tensor kernels give each thread block one 65,536-element chunk of a tensor, so this
    model's 203,530 parameters keep 7 of a GPU's 132 multiprocessors busy and the fused Adam kernel
    takes ~28 us, a quarter of a captured step on an H200. Views of 4,096 elements give it ~50 blocks.
    The arithmetic per element is unchanged: the weights are bit-identical (tested).

    `grad_views`: the gradients of every parameter that has one, all groups in order, already cut
    this way (`optimizer_step` cuts them for the finite check); cut here when not given. The views
    of the weights and moments are kept on the optimizer and cut again only when one of those
    tensors changes (a loaded state dict, a parameter that got no gradient): cutting a list of them
    takes ~0.1 ms of host time, which on a GPU is longer than the kernels of a step, and a capture
    runs the step's Python once per step of the epoch.
    """
    cache = adam.__dict__.setdefault("_mnist_dist_views", {})  # param group index -> (tensors, views)
    offset = 0
    for index, group in enumerate(adam.param_groups):
        if group["amsgrad"] or group.get("decoupled_weight_decay") or not group["fused"]:
            raise ValueError("fused_adam_in_views supports fused Adam without amsgrad or decoupled weight decay")
        params = [p for p in group["params"] if p.grad is not None]
        states = [adam.state[p] for p in params]
        steps = [state["step"] for state in states]
        tensors = [t for p, s in zip(params, states) for t in (p, s["exp_avg"], s["exp_avg_sq"], s["step"])]
        key = [(t, t.data_ptr()) for t in tensors]
        kept = cache.get(index)
        if kept is None or len(kept[0]) != len(key) or any(a is not b or pa != pb for (a, pa), (b, pb) in zip(kept[0], key)):
            per_param = [len(range(0, p.numel(), view_elements)) for p in params]
            kept = cache[index] = (key, {
                "params": _views([p.detach() for p in params], view_elements),
                "exp_avgs": _views([s["exp_avg"] for s in states], view_elements),
                "exp_avg_sqs": _views([s["exp_avg_sq"] for s in states], view_elements),
                "steps": [step for step, n in zip(steps, per_param) for _ in range(n)],  # each view reads its tensor's step
            })
        views = kept[1]
        count = len(views["params"])
        if grad_views is None:
            grads = _views([p.grad for p in params], view_elements)
        else:
            grads, offset = grad_views[offset:offset + count], offset + count
        torch._foreach_add_(steps, 1)
        torch._fused_adam_(
            views["params"], grads, views["exp_avgs"], views["exp_avg_sqs"], [], views["steps"],
            lr=group["lr"], beta1=group["betas"][0], beta2=group["betas"][1], weight_decay=group["weight_decay"],
            eps=group["eps"], amsgrad=False, maximize=group["maximize"], grad_scale=None, found_inf=found_inf,
        )
        torch._foreach_sub_(steps, [found_inf] * len(steps))  # a skipped step does not count
    if grad_views is not None and offset != len(grad_views):
        raise ValueError(f"grad_views holds {len(grad_views)} views; the parameters with gradients make {offset}")


def _views(tensors: list[torch.Tensor], elements: int) -> list[torch.Tensor]:
    """Each tensor, flattened and cut into views of at most `elements` elements (sharing its storage)."""
    return [view for t in tensors for view in t.view(-1).split(elements)]

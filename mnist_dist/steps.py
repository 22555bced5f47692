"""The training step and what runs it: the reference step (`train_step`), its non-finite guard, the eager
runner that launches it batch by batch, and the optimizer and schedule it updates.

Every runner (`EagerSteps` here, `graphs.EpochGraph`, `resources.ProfiledSteps` around either) is a
`StepRunner`: the loop asks it for a stretch of steps, then for their loss sums and gradient norms, so
that the host looks at the device only where the loop checks (a log point, a checkpoint, an epoch's end).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .clock import since_process_start
from .config import TrainConfig
from .augment import epoch_draws, transform
from .data import DeviceBatches, epoch_order, normalize
from .distributed import local_real, threads_for_rows

PLAIN_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@contextlib.contextmanager
def batch_norm_frozen(model, rows: int):
    """With fewer than 2 rows (a process's share of an epoch's last step, cut to its real samples) BatchNorm
    has no batch statistics to take: its layers normalize those rows with their running statistics. torch's
    SyncBatchNorm is left as it is: it takes the statistics of every process's rows, and waits for them."""
    frozen = [m for m in model.modules() if isinstance(m, PLAIN_BATCH_NORMS) and m.training] if rows < 2 else []
    for layer in frozen:
        layer.eval()
    try:
        yield
    finally:
        for layer in frozen:
            layer.train()


class StepRunner(Protocol):
    """What the loop drives: an epoch's optimizer steps in stretches, [start, stop) at a time."""

    logs_live: bool  # True: the loop stops at every --log-every step; False: an epoch is one launch
    capture_seconds: float  # time spent capturing a CUDA graph, counted in the training time (s)
    seconds_to_first_step: float | None  # from the OS starting the process to the first step's end (s)
    on_step: Callable[[], None]  # called as each step begins (an epoch on the graph path): StallWatch.step

    def begin_epoch(self, epoch: int, start: int) -> None:
        """Get ready for optimizer steps from `start` of `epoch` on (the epoch's shuffle)."""

    def run(self, start: int, stop: int) -> None:
        """Optimizer steps [start, stop) of the epoch, without waiting for the device."""

    def step_losses(self, start: int, stop: int) -> list[float]:
        """The loss sums (this process's) of steps [start, stop): a host sync."""

    def step_norms(self) -> list[float]:
        """The gradient norms (before clipping) of the steps run since the last call, or none: a host sync."""


class NonFiniteGuard:
    """Skips, on the device, the update of the first step whose gradients are not finite and of every
    step after it, so that the weights stay those of the last good step until the processes next
    compare notes (`agree_to_stop`) and stop naming that step. Only an optimizer without `found_inf`
    (torch's unfused Adam) makes the guard wait for the host, once a step. With fp16 the grad scaler
    skips the steps that overflow instead.
    """

    def __init__(self, accelerator, optimizer):
        device = accelerator.device
        self.found_inf = torch.zeros((), device=device)  # 1.0 from the first non-finite step on
        self.bad_steps = torch.zeros((), device=device)  # steps skipped since then
        self.scaler = accelerator.scaler is not None  # fp16: the grad scaler skips overflowing steps itself
        self.fused = bool(optimizer.optimizer.defaults.get("fused")) and not self.scaler
        if self.fused:  # fused Adam skips its update while found_inf is 1: the interface GradScaler uses
            optimizer.optimizer.found_inf = self.found_inf

    def check(self, optimizer, norm: torch.Tensor) -> None:
        """After backward, before `optimizer.step()`: mark this step bad if the gradients' total norm
        (`grad_norm`) is not finite."""
        if self.scaler:
            return
        finite = norm.isfinite()
        torch.maximum(self.found_inf, ~finite, out=self.found_inf)
        self.bad_steps += self.found_inf
        if not self.fused and self.found_inf.item():  # an optimizer without found_inf: one host sync a step
            optimizer.zero_grad(set_to_none=True)  # torch's optimizers leave a parameter without gradient alone


def train_step(accelerator, model, optimizer, guard: NonFiniteGuard, images: torch.Tensor, labels: torch.Tensor,
               scale: float, label_smoothing: float = 0.0,
               max_grad_norm: float | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One batch of an optimizer step, on normalized images: forward and backward, and after the step's
    last batch (Accelerate's sync_gradients) the update. Returns the batch's loss sum and, after the last
    batch, the gradients' total norm before clipping (both 0-d, on the device; the norm else None).
    `scale` is world size x accumulation steps / real samples in the step's global batch: DDP averages
    the gradients over the processes and `accelerator.backward` divides by the accumulation steps, so the
    update follows the mean loss of the step's global batch, as one process with one batch would."""
    with accelerator.accumulate(model):  # DDP all-reduces in the backward of the step's last batch only
        logits = model(images)
        loss_sum = F.cross_entropy(logits.float(), labels, reduction="sum", label_smoothing=label_smoothing)
        accelerator.backward(loss_sum * scale)
        norm = None
        if accelerator.sync_gradients:
            norm = grad_norm(accelerator, optimizer, max_grad_norm)
            guard.check(optimizer, norm)
        optimizer.step()  # Accelerate's optimizer steps and zeroes only after the step's last batch
        optimizer.zero_grad(set_to_none=True)
    return loss_sum.detach(), norm


def grad_norm(accelerator, optimizer, max_norm: float | None) -> torch.Tensor:
    """The gradients' total L2 norm (0-d, on the device); then, if `max_norm` is given, they are clipped to it."""
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if max_norm is not None:
        return accelerator.clip_grad_norm_(params, max_norm)  # unscales fp16 gradients first (accelerate#641)
    accelerator.unscale_gradients()  # fp16: the norm of the true gradients; nothing to do otherwise
    return torch.nn.utils.get_total_norm([p.grad for p in params])


class EagerSteps(StepRunner):
    """--data-path dataloader and device: the reference step, launched from Python batch by batch,
    --gradient-accumulation-steps batches an optimizer step. Each batch's loss sum goes to
    `losses[batch]`, on the device; each step's gradient norm to `norms` until the loop reads them."""

    logs_live = True  # the loop stops at every --log-every step to log
    capture_seconds = 0.0
    on_step = staticmethod(lambda: None)

    def __init__(self, accelerator, model, optimizer, *, scheduler, guard: NonFiniteGuard, batches, cfg: TrainConfig,
                 train_len: int, stats: tuple[float, float]):
        """`batches`: the prepared DataLoader, or `data.DeviceBatches`."""
        self.accelerator, self.model, self.optimizer, self.scheduler, self.guard = accelerator, model, optimizer, scheduler, guard
        self.batches, self.cfg, self.train_len, self.stats = batches, cfg, train_len, stats
        self.losses = torch.zeros(len(batches), device=accelerator.device)
        self.norms: list[torch.Tensor] = []
        # a resume on another world size may have re-cut the global batch after the Accelerator was built
        accelerator.gradient_accumulation_steps = cfg.gradient_accumulation_steps
        self.epoch_batches = iter(())
        self.seconds_to_first_step: float | None = None
        self.augment: tuple[torch.Tensor, torch.Tensor] | None = None  # --augment: (epoch order, draws) on the device

    def begin_epoch(self, epoch: int, start: int) -> None:
        """Batches from optimizer step `start` of `epoch` on."""
        if self.cfg.augment:  # which sample each batch row is, and each sample's draws (augment.epoch_draws)
            device, seed = self.accelerator.device, self.cfg.seed
            self.augment = (epoch_order(self.train_len, seed, epoch).to(device),
                            epoch_draws(self.train_len, seed, epoch).to(device))
        start *= self.cfg.gradient_accumulation_steps
        if isinstance(self.batches, DeviceBatches):
            self.epoch_batches = self.batches.epoch(epoch, start)
            return
        self.batches.set_epoch(epoch)  # reshuffle: the permutation seeded by seed + epoch, the same everywhere
        loader = self.accelerator.skip_first_batches(self.batches, start) if start else self.batches
        loader.set_epoch(epoch)  # resumed mid-epoch: the same permutation, minus the batches done
        self.epoch_batches = iter(loader)

    def run(self, start: int, stop: int) -> None:
        """Optimizer steps [start, stop) of the epoch."""
        world, batch_size, n = self.accelerator.num_processes, self.cfg.batch_size, self.cfg.gradient_accumulation_steps
        for step in range(start, stop):
            self.on_step()
            batches = range(step * n, min(step * n + n, len(self.batches)))  # an epoch's last step may have fewer
            scale = world * n / step_samples(step, self.train_len, world * batch_size * n)
            # accumulate() adds 1 to Accelerate's batch count and syncs where it reaches a multiple of n:
            # from n - k it syncs on the k-th batch, this step's last, also in an epoch's short last step
            self.accelerator.step = n - len(batches)
            for index in batches:
                images, labels = next(self.epoch_batches)
                real = local_real(index, len(labels), self.train_len, batch_size, self.accelerator)  # fillers last
                # the same bits at any thread count; BatchNorm on fewer than 2 rows: the running statistics
                with threads_for_rows(real, self.accelerator.device), batch_norm_frozen(self.model, real):
                    self.losses[index], norm = train_step(self.accelerator, self.model, self.optimizer, self.guard,
                                                          self.inputs(images[:real], index), labels[:real], scale,
                                                          self.cfg.label_smoothing, self.cfg.max_grad_norm)
            self.norms.append(norm)  # a reference: no copy, no kernel
            if self.scheduler is not None:
                self.scheduler.step()
            if self.seconds_to_first_step is None:
                self.seconds_to_first_step = since_process_start()

    def inputs(self, images: torch.Tensor, batch: int) -> torch.Tensor:
        """This process's batch `batch` of the epoch (uint8, its real samples) as the model's inputs: normalized
        and, with --augment, each sample transformed by its own draws."""
        if self.augment is None:
            return normalize(images, *self.stats)
        order, draws = self.augment
        first = (batch * self.accelerator.num_processes + self.accelerator.process_index) * self.cfg.batch_size
        samples = order[first : first + len(images)]  # as data.DeviceBatches and Accelerate's sampler cut the epoch
        pixels = transform(images.to(torch.float32).div(255), draws[samples], self.cfg.augment_rotation,
                           self.cfg.augment_translation, self.cfg.augment_scale)
        return pixels.sub_(self.stats[0]).div_(self.stats[1])

    def step_losses(self, start: int, stop: int) -> list[float]:
        """The loss sums of optimizer steps [start, stop), from their batches' (a host sync)."""
        n = self.cfg.gradient_accumulation_steps
        per_batch = self.losses[start * n : stop * n].tolist()
        return [sum(per_batch[i : i + n]) for i in range(0, len(per_batch), n)]

    def step_norms(self) -> list[float]:
        """The gradient norms (before clipping) of the steps run since the last call (a host sync)."""
        norms, self.norms = self.norms, []
        return torch.stack(norms).tolist() if norms else []


def make_optimizer(params, lr: float, device: torch.device, name: str = "adam",
                   weight_decay: float = 0.0) -> torch.optim.Adam | torch.optim.AdamW:
    """Adam or AdamW (--optimizer), fused into one kernel per step where torch has one for the device;
    on CUDA also capturable (its step count stays on the GPU), so that `--data-path graph` can record it."""
    # fused only where its skip of a non-finite step (found_inf) is tested: MPS's fused Adam ignored
    # found_inf until mid-2026 (pytorch/pytorch#186360)
    fused = device.type in ("cuda", "cpu")
    kind = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
    return kind(params, lr=lr, weight_decay=weight_decay, fused=fused, capturable=device.type == "cuda")


def make_scheduler(cfg: TrainConfig, accelerator, optimizer, total_steps: int):
    """The --schedule over `total_steps` optimizer steps, saved with the checkpoints; None for a constant
    learning rate. Not passed to `accelerator.prepare`: Accelerate's wrapper steps the schedule once per
    process per step, which would end a multi-process schedule early."""
    inner = optimizer.optimizer  # the torch optimizer, whose learning rate the schedule sets
    if cfg.schedule == "constant":
        return None
    if cfg.schedule == "onecycle":
        scheduler = torch.optim.lr_scheduler.OneCycleLR(inner, max_lr=cfg.lr, total_steps=total_steps,
                                                        pct_start=cfg.warmup_fraction)
    else:
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(inner, T_max=total_steps)
    accelerator.register_for_checkpointing(scheduler)
    return scheduler


def step_samples(step: int, train_len: int, step_batch: int) -> int:
    """Real samples in optimizer step `step` of an epoch, all processes: the last step may be short."""
    return min(step_batch, train_len - step * step_batch)

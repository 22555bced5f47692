"""Train the MNIST MLP with Hugging Face Accelerate on one CPU, one GPU, many GPUs or many nodes.

    python -m mnist_dist.train --dataset mnist-5k --cpu          # one process: laptop / debugging
    python -m mnist_dist.train                                   # one process, GPU if there is one
    accelerate launch --config_file accelerate_configs/single_gpu.yaml -m mnist_dist.train
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml -m mnist_dist.train
    accelerate launch --config_file accelerate_configs/cpu.yaml -m mnist_dist.train --cpu   # N CPU processes

`python -m mnist_dist.train --help` lists every flag with its default and unit.
"""

from __future__ import annotations

import gc
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from . import checkpoint, data, plots, tracking
from .clock import since_process_start
from .config import ConfigError, TrainConfig, parse_args
from .data import DataError, make_loaders, normalize
from .checkpoint import CheckpointError
from .distributed import (
    EXIT_PREEMPTED, DeviceBatches, LaunchError, StepHealth, StopSignals, agree_to_stop, backward, build_accelerator,
    compiled_with, device_test_shard, evaluate_sharded, optimizer_step, setup_gradient_sync, shard_counts,
)
from .evaluation import evaluate, predict, summarize
from .graphs import ADAM_VIEW_ELEMENTS, EpochGraph, graph_unsupported
from .model import CONFIG_NAME, MLP, model_config


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss); the message names the step."""


def train(cfg: TrainConfig) -> dict:
    """Train as `cfg` says; write results.json and the model (main process); return the results.

    Raises `Preempted` after saving a checkpoint when SIGTERM or SIGUSR1 arrives.
    """
    cfg.validate()
    timings = {}  # seconds: where a run's wall time goes, reported in results.json
    accelerator = build_accelerator(cfg)
    timings["startup"] = since_process_start()  # interpreter, imports, process group
    main = accelerator.is_main_process
    world = accelerator.num_processes
    config = {**cfg.to_dict(), "mixed_precision": accelerator.mixed_precision,  # resolved
              "torch_compile": compiled_with(accelerator)}
    resume_from = checkpoint.resolve(cfg.resume, cfg.output_dir)  # a bad --resume PATH stops here
    state = checkpoint.read_state(resume_from) if resume_from else None
    if state:
        checkpoint.check_compatible(state, config, world, resume_from)

    data_start = time.perf_counter()
    # one process per node decodes the data and writes the cache; the others then read the cache
    with accelerator.local_main_process_first():
        splits = data.load_splits(cfg.dataset, cfg.data_dir, cfg.cache_dir)
    train_set, test_set = splits["train"], splits["test"]
    output_dir = Path(cfg.output_dir)
    # (mean, std) on the 0..1 pixel scale; saved with the model so evaluate and predict scale alike
    stats = data.pixel_stats(train_set.images) if cfg.normalization == "dataset" else (data.MEAN, data.STD)
    mark = time.perf_counter()
    timings["data_load"] = mark - data_start

    set_seed(cfg.seed)  # same initial weights everywhere (DDP also broadcasts rank 0's)
    model = MLP(train_set.images.shape[1], cfg.hidden_size, data.NUM_CLASSES)
    # config.json beside every saved model: what rebuilds it and how its inputs are scaled
    model_cfg = model_config(
        model, normalization={"mean": stats[0], "std": stats[1], "pixel_scale": 255}, dataset=cfg.dataset,
        data_dir=str(Path(cfg.data_dir).resolve()) if cfg.data_dir else None,  # evaluate's default test set
        class_names=data.class_names(cfg.dataset),
    )
    data_path = resolve_data_path(cfg, accelerator)
    optimizer = make_optimizer(model.parameters(), cfg.lr, accelerator.device)
    train_loader, test_loader = make_loaders(
        train_set, test_set, cfg.batch_size, cfg.eval_batch_size, cfg.num_workers, cfg.seed
    )
    model, optimizer, train_loader, test_loader = accelerator.prepare(model, optimizer, train_loader, test_loader)
    # how the processes average gradients; with shared memory the step runs the module outside DDP
    sync = setup_gradient_sync(accelerator, model, cfg.gradient_sync)
    if data_path != "dataloader":  # the same batches, cut on the device instead of loaded
        device_test = device_test_shard(test_set.images, test_set.labels, cfg.eval_batch_size, accelerator)
    if data_path == "device":
        device_train = DeviceBatches(train_set.images, train_set.labels, cfg.batch_size, cfg.seed, accelerator)

    def epoch_batches(epoch: int, start: int):
        """(step in epoch, images, labels, real samples in the global batch): this process's real samples."""
        if data_path == "device":
            yield from device_train.epoch(epoch, start)
            return
        train_loader.set_epoch(epoch)  # reshuffle: permutation seeded by seed + epoch, same everywhere
        loader = train_loader
        if start:  # resumed mid-epoch: the same permutation, minus what was done
            loader = accelerator.skip_first_batches(train_loader, start)
            loader.set_epoch(epoch)
        for index, (images, labels) in enumerate(loader, start=start):
            local_real, global_real = shard_counts(index, len(labels), len(train_set), cfg.batch_size, accelerator)
            yield index, images[:local_real], labels[:local_real], global_real

    def test_metrics() -> dict:
        if data_path != "dataloader":
            return summarize(evaluate_sharded(accelerator, model, device_test, stats))
        return evaluate(model, test_loader, gather=accelerator.gather_for_metrics, normalization=stats)

    steps_per_epoch = len(train_loader)  # per process; the same on every process
    total_steps = min(cfg.epochs * steps_per_epoch, cfg.max_steps or math.inf)
    epochs = math.ceil(total_steps / steps_per_epoch)
    scheduler = make_scheduler(cfg, optimizer, total_steps)
    if scheduler is not None:
        accelerator.register_for_checkpointing(scheduler)  # saved and restored with the checkpoints
    # everything a resumed run needs to continue as if never stopped; saved with each checkpoint
    progress = {
        "global_step": 0, "epoch": 0, "batch_in_epoch": 0, "samples_seen": 0, "train_seconds": 0.0,
        # per-process running loss sums (one entry per process), so that a resumed run adds up
        # exactly what an uninterrupted one would
        "epoch_loss_sums": [0.0] * world, "epoch_samples": 0, "window_loss_sums": [0.0] * world, "window_samples": 0,
        "best_test_accuracy": None, "history": [], "seconds_to_first_step": None,
    }
    if state:
        try:
            accelerator.load_state(str(resume_from))
        except Exception as err:  # truncated or damaged files: refuse, naming the checkpoint
            raise CheckpointError(f"{resume_from}: damaged checkpoint ({type(err).__name__}: {err})") from err
        progress.update({k: state[k] for k in progress})
        for group in optimizer.param_groups:  # loading restores the saving run's flags; keep this device's
            group["capturable"] = optimizer.optimizer.defaults["capturable"]
    if main:  # only now: bad data, flags or checkpoints have all been refused by this point
        output_dir.mkdir(parents=True, exist_ok=True)
    tracker_config = {
        **config, "world_size": world, "global_batch_size": cfg.batch_size * world,
        "train_samples": len(train_set), "device_type": accelerator.device.type, **tracking.run_metadata(),
    }
    run_id = tracking.start(accelerator, cfg, tracker_config, state["tracker_run_id"] if state else None)
    metrics_log = tracking.MetricsLog(output_dir, main, progress["global_step"] if state else None)
    if state:
        tracking.replay(accelerator, metrics_log.records())

    def log(values: dict, step: int) -> None:
        accelerator.log(values, step=step)  # main process only
        metrics_log.write(step, values)

    bar = tqdm(
        total=total_steps, initial=progress["global_step"], unit="step", dynamic_ncols=True,
        # the bar is for people at a terminal; batch logs (SLURM) get the one line per epoch below
        disable=not (main and sys.stderr.isatty()),
    )
    say = bar.write if main else (lambda _: None)
    say(
        f"mnist_dist: {len(train_set)} train / {len(test_set)} test samples, {world} process(es) on "
        f"{accelerator.device.type}, global batch {cfg.batch_size * world}, precision {accelerator.mixed_precision}, "
        + (f"torch.compile {config['torch_compile']}, " if config["torch_compile"] != "no" else "")
        + f"data path {data_path}" + (f", gradient sync {sync.mode}" if world > 1 else "")
        + (f"; resuming from {resume_from} (step {progress['global_step']})" if state else "")
    )

    def save_checkpoint() -> Path:
        state = {**progress, "world_size": world, "config": config, "tracker_run_id": run_id}
        return checkpoint.save(accelerator, output_dir, state, cfg.keep_checkpoints, model_cfg)

    # this process's loss sum of each step of the current epoch, on the device; read at each check
    step_losses = torch.zeros(steps_per_epoch, device=accelerator.device)
    health = StepHealth(accelerator.device)

    def global_real(batch_index: int) -> int:  # real samples in the global batch at this step of an epoch
        per_step = world * cfg.batch_size
        return min(per_step, len(train_set) - batch_index * per_step)

    # the sync averages gradients over processes; scaling each process's sum by world / global_real
    # makes the update the mean over the real samples of the global batch, as on one process. One
    # 0-d device tensor per batch size an epoch has (full, and a shorter last one), made before any capture
    step_scales = {real: torch.full((), world / real, device=accelerator.device)
                   for real in {global_real(index) for index in range(steps_per_epoch)}}

    def take_step(inputs: torch.Tensor, labels: torch.Tensor, global_real: int, index: int) -> None:
        train_step(accelerator, sync.model, optimizer, scheduler, health, inputs, labels, step_scales[global_real],
                   cfg.label_smoothing, step_losses[index], ADAM_VIEW_ELEMENTS if data_path == "graph" else None,
                   sync.average)

    if data_path == "graph":
        device = accelerator.device
        runner = EpochGraph(take_step, normalize(train_set.images.to(device), *stats), train_set.labels.to(device),
                            cfg.batch_size, cfg.seed, health)
    else:
        runner = EagerSteps(epoch_batches, take_step, stats)

    metrics, first_segment = None, True
    # Python's full garbage collections walk every object the imports made (torch, sympy, ...): ~0.2 s
    # each on a 2-core VM, a few times a run. Frozen, those objects are never walked again; without
    # this, each pause also stalls every other process at the next gradient sync.
    gc.freeze()
    timings["setup"] = time.perf_counter() - mark  # model, optimizer, prepare, device copies, trackers
    with StopSignals() as signals:
        try:
            while progress["global_step"] < total_steps:
                epoch = progress["epoch"]
                model.train()
                rank = accelerator.process_index
                # this process's running loss sums, added up step by step in float32 as the device would
                sums = {"epoch": np.float32(progress["epoch_loss_sums"][rank]),
                        "window": np.float32(progress["window_loss_sums"][rank])}
                resumed_seconds = progress["train_seconds"]
                epoch_start = time.perf_counter()

                def sync_progress():  # every process calls this: it gathers the loss sums
                    mine = torch.tensor([[sums["epoch"], sums["window"]]], dtype=torch.float32, device=accelerator.device)
                    gathered = accelerator.gather(mine).cpu()
                    progress["epoch_loss_sums"], progress["window_loss_sums"] = gathered[:, 0].tolist(), gathered[:, 1].tolist()
                    progress["train_seconds"] = resumed_seconds + time.perf_counter() - epoch_start

                def fold(first: int, stop: int) -> tuple[list, int | None]:
                    """Add steps [first, stop) of this epoch to the sums (one host sync); return the log
                    windows they closed, as (step, this process's loss sum, samples), and the first step
                    whose loss was not finite."""
                    windows, first_bad = [], None
                    for index, value in enumerate(step_losses[first:stop].tolist(), start=first):
                        at = progress["global_step"] - (stop - 1 - index)  # global step of this batch
                        sums["epoch"] = np.float32(sums["epoch"] + np.float32(value))
                        sums["window"] = np.float32(sums["window"] + np.float32(value))
                        progress["epoch_samples"] += global_real(index)
                        progress["window_samples"] += global_real(index)
                        if first_bad is None and not math.isfinite(value):
                            first_bad = at
                        if at % cfg.log_every == 0:
                            windows.append((at, float(sums["window"]), progress["window_samples"]))
                            sums["window"], progress["window_samples"] = np.float32(0), 0
                    return windows, first_bad

                runner.begin_epoch(epoch, progress["batch_in_epoch"])
                folded = progress["batch_in_epoch"]  # steps of this epoch already in `sums`
                while True:
                    begin, step_before = progress["batch_in_epoch"], progress["global_step"]
                    # run up to the next point where something needs the host: the epoch's end, a
                    # checkpoint, a log (the eager paths; the graph path logs each epoch's windows after it)
                    end = min(steps_per_epoch, begin + total_steps - step_before)
                    if runner.cut_at_log_points:
                        end = min(end, begin + cfg.log_every - step_before % cfg.log_every)
                    if cfg.checkpoint_every:
                        end = min(end, begin + cfg.checkpoint_every - step_before % cfg.checkpoint_every)
                    if first_segment and runner.first_step_alone:  # time to first step
                        end = min(end, begin + 1)
                    runner.run(begin, end)
                    first_segment = first_segment and end == begin  # until this process has taken a step
                    if progress["seconds_to_first_step"] is None:
                        progress["seconds_to_first_step"] = since_process_start()
                    progress["global_step"] += end - begin
                    progress["batch_in_epoch"] = end
                    bar.update(end - begin)
                    step = progress["global_step"]
                    end_of_epoch = end == steps_per_epoch or step >= total_steps
                    checkpoint_due = bool(cfg.checkpoint_every) and step % cfg.checkpoint_every == 0 and not end_of_epoch
                    log_due = step // cfg.log_every > step_before // cfg.log_every
                    if not (log_due or checkpoint_due or end_of_epoch):
                        continue
                    # the processes agree (one host sync) only here, never every step
                    windows, first_bad_loss = fold(folded, end)
                    folded = end
                    stop, first_bad = agree_to_stop(accelerator, signals.received is not None, health, step, first_bad_loss)
                    if first_bad is not None:
                        raise TrainingError(
                            f"non-finite training loss or gradients at step {first_bad} (epoch {epoch + 1}); "
                            f"the weights are those of step {first_bad - 1}, nothing after it was applied or "
                            f"saved. Lower --lr or try --mixed-precision no; the checkpoints in "
                            f"{checkpoint.checkpoints_root(output_dir)} hold the last good state."
                        )
                    if windows:
                        mine = torch.tensor([w[1] for w in windows], dtype=torch.float32, device=accelerator.device)
                        totals = accelerator.reduce(mine, reduction="sum").tolist()
                        rate = (progress["samples_seen"] + progress["epoch_samples"]) / (
                            resumed_seconds + time.perf_counter() - epoch_start
                        )
                        for (at, _, samples), total in zip(windows, totals):
                            log(
                                {
                                    "train/loss": total / samples, "train/lr": optimizer.param_groups[0]["lr"],
                                    "train/samples_per_second": rate, "train/epoch": at / steps_per_epoch,
                                },
                                at,
                            )
                        bar.set_postfix(epoch=epoch + 1, loss=f"{totals[-1] / windows[-1][2]:.4f}", samples_s=f"{rate:,.0f}")
                    if stop or checkpoint_due:
                        sync_progress()
                        path = save_checkpoint()
                        if stop:
                            say(f"mnist_dist: stopped by signal after step {step}; checkpoint {path}")
                            raise Preempted(path)
                        epoch_start, resumed_seconds = time.perf_counter(), progress["train_seconds"]
                    if end_of_epoch:
                        break

                mine = torch.tensor(sums["epoch"], dtype=torch.float32, device=accelerator.device)
                train_loss = accelerator.reduce(mine, reduction="sum").item() / progress["epoch_samples"]
                sync_progress()
                if progress["history"] and progress["history"][-1]["epoch"] == epoch + 1:
                    progress["history"].pop()  # this epoch's first part, up to an earlier run's --max-steps
                seconds = progress["train_seconds"] - sum(h["seconds"] for h in progress["history"])
                eval_start = time.perf_counter()
                metrics = test_metrics()
                progress["history"].append(
                    {
                        "epoch": epoch + 1,
                        "train_loss": train_loss,
                        "test_accuracy": metrics["accuracy"],
                        "test_loss": metrics["loss"],
                        "seconds": seconds,
                        "eval_seconds": time.perf_counter() - eval_start,
                        "samples": progress["epoch_samples"],
                    }
                )
                best = progress["best_test_accuracy"]
                progress["best_test_accuracy"] = max(best, metrics["accuracy"]) if best is not None else metrics["accuracy"]
                say(
                    f"epoch {epoch + 1}/{epochs}: train_loss {train_loss:.4f}  test_loss {metrics['loss']:.4f}  "
                    f"test_accuracy {metrics['accuracy']:.4f}  ({seconds:.2f} s, {progress['epoch_samples'] / seconds:,.0f} samples/s)"
                )
                log(
                    {
                        "test/accuracy": metrics["accuracy"], "test/loss": metrics["loss"], "train/epoch_loss": train_loss,
                        "epoch": epoch + 1, "epoch_seconds": seconds,
                    },
                    progress["global_step"],
                )
                if progress["batch_in_epoch"] == steps_per_epoch:
                    progress["samples_seen"] += progress["epoch_samples"]
                    progress.update(epoch=epoch + 1, batch_in_epoch=0, epoch_loss_sums=[0.0] * world, epoch_samples=0)
                # else --max-steps ended the run inside the epoch: its checkpoint stays there, so that resuming
                # with more steps finishes this epoch rather than skipping to the next
                save_checkpoint()
        except (Preempted, TrainingError):  # every process raises these at the same step
            bar.close()
            _shutdown(accelerator)
            raise
    bar.close()

    if metrics is None:  # resumed from a checkpoint of a run that had already finished its steps
        metrics = test_metrics()
    history = progress["history"]
    samples_seen = progress["samples_seen"] + progress["epoch_samples"]  # epoch_samples: a cut-short epoch's
    results = {
        "dataset": cfg.dataset,
        "test_accuracy": metrics["accuracy"],
        "test_loss": metrics["loss"],
        "test_samples": metrics["samples"],
        "best_test_accuracy": progress["best_test_accuracy"],
        "train_samples": len(train_set),
        "epochs": len(history),
        "steps": progress["global_step"],
        "samples_seen": samples_seen,
        "world_size": world,
        "per_process_batch_size": cfg.batch_size,
        "global_batch_size": cfg.batch_size * world,
        "mixed_precision": accelerator.mixed_precision,
        "torch_compile": config["torch_compile"],  # Accelerate's dynamo_backend, lower case; "no" when off
        "data_path": data_path,  # resolved: --data-path auto picks one
        "gradient_sync": sync.mode,  # resolved: none (one process), allreduce, shared-memory or exchange
        "device_type": accelerator.device.type,
        "train_seconds": progress["train_seconds"],
        "samples_per_second": samples_seen / progress["train_seconds"],
        "seconds_to_first_step": progress["seconds_to_first_step"],
        # this process's wall time by phase, seconds (train and eval: all epochs, across resumes)
        "timings": {**timings, "train": progress["train_seconds"], "capture": runner.capture_seconds,  # part of train
                    "eval": sum(h["eval_seconds"] for h in history)},
        "normalization": {"mean": stats[0], "std": stats[1]},
        "per_class_accuracy": dict(zip(model_cfg["class_names"], metrics["per_class_accuracy"])),
        "confusion_matrix": metrics["confusion_matrix"],  # [true class][predicted class], counts
        "history": history,
        "config": cfg.to_dict(),
    }
    outputs_start = time.perf_counter()
    accelerator.wait_for_everyone()
    # the plain module, never its torch.compile wrapper: that one's weights are saved as "_orig_mod.fc1.weight"
    # (pytorch/pytorch#101107), and unwrapping it while keeping the wrapper puts the bare module inside it
    plain_model = accelerator.unwrap_model(model, keep_torch_compile=False)
    accelerator.save_model(plain_model, output_dir)  # model.safetensors, written by the main process
    if main:
        _write_json(output_dir / CONFIG_NAME, model_cfg)
        pictures = draw_pictures(output_dir, results, plain_model, test_set, stats, model_cfg)
        tracking.log_images(accelerator, pictures, progress["global_step"])
        results["timings"]["outputs"] = time.perf_counter() - outputs_start  # model file, pictures, W&B images
        _write_json(output_dir / "results.json", results)  # last: its presence marks a finished run
        say(f"mnist_dist: test_accuracy {results['test_accuracy']:.4f}; wrote {output_dir}/results.json and "
            f"{', '.join(p.name for p in pictures.values())}")
    tracking.finish(
        accelerator, {"best_test_accuracy": results["best_test_accuracy"], "final_test_accuracy": results["test_accuracy"]}
    )
    _shutdown(accelerator)
    return results


def draw_pictures(output_dir: Path, results: dict, model, test_set, stats, model_cfg: dict) -> dict[str, Path]:
    """The run's PNGs: training curves, confusion matrix, misclassified test digits (main process)."""
    names = model_cfg["class_names"]
    config = results["config"]
    title = f"{results['dataset']}, {results['epochs']} epochs, recipe {config['recipe']}"
    predicted = predict(model, test_set.images.to(next(model.parameters()).device), stats).argmax(1).cpu()
    return {
        "training_curves": plots.training_curves(
            results["history"], output_dir / "training_curves.png", title, config["label_smoothing"]
        ),
        "confusion_matrix": plots.confusion_matrix(
            results["confusion_matrix"], names, output_dir / "confusion_matrix.png", title
        ),
        "misclassified": plots.misclassified_grid(
            test_set.images, test_set.labels, predicted, names, output_dir / "misclassified.png"
        ),
    }


def make_optimizer(params, lr: float, device: torch.device) -> torch.optim.Adam:
    """Adam, fused into one kernel per step where torch has one for the device; on CUDA also
    capturable (its step count stays on the GPU), so that `--data-path graph` can record it."""
    # only where its skip of a non-finite step (found_inf) is tested: MPS's fused Adam ignored
    # found_inf until mid-2026 (pytorch/pytorch#186360); other devices take one host sync per step
    fused = device.type in ("cuda", "cpu")
    return torch.optim.Adam(params, lr=lr, fused=fused, capturable=device.type == "cuda")


def resolve_data_path(cfg: TrainConfig, accelerator) -> str:
    """The --data-path this run uses: 'auto' is 'graph' where it can run (one CUDA process, constant
    schedule, precision no or bf16, no torch.compile), else 'device' on a GPU and 'dataloader' (the
    reference) on a CPU."""
    why_not = graph_unsupported(cfg, accelerator.device, accelerator.num_processes, accelerator.mixed_precision,
                                compiled_with(accelerator))
    if cfg.data_path == "graph" and why_not:
        raise ConfigError(f"--data-path graph {why_not}")
    if cfg.data_path != "auto":
        return cfg.data_path
    if why_not is None:
        return "graph"
    return "device" if accelerator.device.type != "cpu" else "dataloader"


def train_step(accelerator, model, optimizer, scheduler, health: StepHealth, inputs: torch.Tensor,
               labels: torch.Tensor, scale: torch.Tensor, label_smoothing: float, loss_out: torch.Tensor,
               view_elements: int | None = None, average_gradients: Callable[[], None] | None = None) -> None:
    """One optimizer step on a batch of normalized inputs, with no host sync: the gradients are of
    the batch's loss sum times `scale` (a 0-d float32 tensor on the device), and that loss sum goes
    to the 0-d device tensor `loss_out`.
    `average_gradients`: called after backward where DDP does not average them (`GradientSync`).

    Every data path runs this function; `--data-path graph` records its kernels and replays them.
    """
    logits = model(inputs)
    loss_sum = F.cross_entropy(logits.float(), labels, reduction="sum", label_smoothing=label_smoothing)
    backward(accelerator, loss_sum, scale)  # the gradients of loss_sum * scale
    if average_gradients is not None:
        average_gradients()
    optimizer_step(accelerator, optimizer, health, view_elements)  # skips, on the device, a non-finite step
    # torch's own: Accelerate's wrapper looks up the optimizer's signature on every call (~28 µs on a CPU)
    optimizer.optimizer.zero_grad(set_to_none=True)
    if scheduler is not None:
        scheduler.step()
    loss_out.copy_(loss_sum.detach())


class EagerSteps:
    """The dataloader and device paths: each step launched from Python as its batch comes."""

    cut_at_log_points = True  # the loop stops at every --log-every step to log live
    first_step_alone = True  # a process's first stretch is one step: its time to first step
    capture_seconds = 0.0

    def __init__(self, epoch_batches, step, stats: tuple[float, float]):
        self.epoch_batches, self.step, self.stats = epoch_batches, step, stats
        self.batches = iter(())

    def begin_epoch(self, epoch: int, start: int) -> None:
        self.batches = self.epoch_batches(epoch, start)

    def run(self, start: int, stop: int) -> None:
        for _ in range(start, stop):
            index, images, labels, global_real = next(self.batches)
            self.step(normalize(images, *self.stats), labels, global_real, index)


def make_scheduler(cfg: TrainConfig, optimizer, total_steps: int):
    """The --schedule over `total_steps` optimizer steps, or None for a constant learning rate.

    Deliberately not passed to `accelerator.prepare`: Accelerate's scheduler wrapper steps the
    schedule once per process per step, which would end a multi-process schedule early.
    """
    inner = optimizer.optimizer  # the torch optimizer, whose step() the loop calls
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            inner, max_lr=cfg.lr, total_steps=total_steps, pct_start=cfg.warmup_fraction
        )
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(inner, T_max=total_steps)
    return None


class Preempted(Exception):
    """Stopped by SIGTERM/SIGUSR1 after saving the checkpoint at `path`."""

    def __init__(self, path: Path):
        super().__init__(str(path))
        self.path = path


def _shutdown(accelerator) -> None:
    accelerator.end_training()  # finishes the trackers, destroys the process group
    accelerator.free_memory()  # drops the accelerator's references to the model and loaders


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)  # readers see the old file or the new one, never half of one


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    try:
        train(cfg)
    except (ConfigError, DataError, LaunchError, CheckpointError) as err:
        print(f"mnist_dist.train: error: {err}", file=sys.stderr)
        return 2
    except TrainingError as err:
        print(f"mnist_dist.train: error: {err}", file=sys.stderr)
        return 1
    except Preempted:
        return EXIT_PREEMPTED
    finally:
        # free the DDP model, which holds the process group, while Python is fully alive: left
        # to interpreter shutdown, gloo's threads can abort a finished run with SIGABRT
        gc.collect()
    return 0


if __name__ == "__main__":
    sys.exit(main())

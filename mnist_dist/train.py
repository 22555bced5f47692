"""Train the MNIST MLP with Hugging Face Accelerate on one CPU, one GPU, many GPUs or many nodes.

    python -m mnist_dist.train --dataset mnist-5k --cpu          # one process: laptop / debugging
    python -m mnist_dist.train                                   # one process, GPU if there is one
    accelerate launch --config_file accelerate_configs/single_gpu.yaml -m mnist_dist.train
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml -m mnist_dist.train
    accelerate launch --config_file accelerate_configs/cpu.yaml -m mnist_dist.train --cpu   # N CPU processes

`python -m mnist_dist.train --help` lists every flag with its default and unit.
"""

from __future__ import annotations

import sys

from .config import ConfigError, TrainConfig, parse_args
from .stopping import EXIT_PREEMPTED, StopSignals

if __name__ == "__main__":  # --help and bad flags are answered before torch loads (seconds)
    CLI_CONFIG = parse_args()
    SIGNALS = StopSignals().__enter__()  # from here on a stop signal ends the run cleanly, exit 75

import gc  # noqa: E402
import itertools  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from dataclasses import MISSING, asdict, dataclass, field, fields, replace  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from accelerate.utils import set_seed  # noqa: E402
from safetensors import SafetensorError  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from . import checkpoint, data, runs, tracking  # noqa: E402
from .checkpoint import CheckpointError, DiskError  # noqa: E402
from .clock import since_process_start  # noqa: E402
from .data import VALIDATION, DataError, DeviceBatches, Split, normalize  # noqa: E402
from .distributed import (  # noqa: E402
    LaunchError, agree_to_stop, any_process, build_accelerator, compiled_with, core_watch, decided_by_main,
    local_real, lost_peer, peers_message, per_process, process_hosts, threads_for_rows, threads_from,
    threads_reproducible, use_output_dir,
)
from .graphs import EpochGraph, graph_unsupported  # noqa: E402
from .model import CONFIG_NAME, MLP, WEIGHTS_NAME, model_config, parameter_count  # noqa: E402
from .resources import MEMORY_MEASURED, ProfiledSteps, model_flops_per_second, peak_memory_mib  # noqa: E402
from .selection import EvaluationError, ModelSelection, Scorer  # noqa: E402


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, a stalled peer); the message names the step."""


class Preempted(Exception):
    """Stopped by SIGTERM/SIGUSR1 or a lost launcher; `path`: where the run can go on from."""

    def __init__(self, path: Path | None):
        super().__init__(str(path))
        self.path = path


@dataclass
class TrainState:
    """Where the run is and what it has added up, saved with every checkpoint: a resumed run continues
    as if never stopped. Loss sums are this process's, added in float32."""

    global_step: int = 0  # optimizer steps taken
    epoch: int = 0  # epochs finished
    batch_in_epoch: int = 0  # steps of the current epoch taken
    samples_seen: int = 0  # training samples of the finished epochs, all processes
    epoch_samples: int = 0  # real samples of the current epoch's steps, all processes
    epoch_loss_sum: float = 0.0  # this process's loss sum over them
    window_samples: int = 0  # real samples since the last --log-every point
    window_loss_sum: float = 0.0  # this process's loss sum over them
    window_norm_sum: float = 0.0  # the finite gradient norms of the window's steps, added (the same everywhere)
    window_norm_steps: int = 0  # how many
    train_seconds: float = 0.0  # training time across resumes, evaluation and checkpoints excluded (s)
    seconds_to_first_step: float | None = None  # from the OS starting the process (s)
    history: list[dict] = field(default_factory=list)  # one entry per evaluated epoch
    # model selection on the validation split (selection.py); accuracies are fractions 0..1
    best_val_accuracy: float | None = None
    best_step: int | None = None  # the step it was measured at
    evals_since_best: int = 0  # validation evaluations since then
    last_validation: dict | None = None  # the newest: {"step", "accuracy", "loss", "samples"}
    stopped_early: bool = False  # --early-stopping-patience ran out
    validation_seconds: float = 0.0  # the --eval-every evaluations inside epochs, across resumes (s)

    def add_steps(self, losses: list[float], samples: list[int], log_every: int,
                  norms: list[float]) -> tuple[list, int | None]:
        """Count the steps just taken from their loss sums (this process's), real samples (the global
        batch's) and gradient norms (none on the graph path); return the log windows they closed, as
        (step, loss sum, samples, mean finite gradient norm or None), and the first step whose loss was
        not finite, or None."""
        windows, first_bad = [], None
        for loss, n, norm in itertools.zip_longest(losses, samples, norms):  # norms: as many, or none
            if norm is not None and math.isfinite(norm):  # fp16: an overflow the grad scaler skipped
                self.window_norm_sum, self.window_norm_steps = self.window_norm_sum + norm, self.window_norm_steps + 1
            self.global_step, self.batch_in_epoch = self.global_step + 1, self.batch_in_epoch + 1
            self.epoch_loss_sum = float(np.float32(self.epoch_loss_sum) + np.float32(loss))
            self.window_loss_sum = float(np.float32(self.window_loss_sum) + np.float32(loss))
            self.epoch_samples, self.window_samples = self.epoch_samples + n, self.window_samples + n
            if first_bad is None and not math.isfinite(loss):
                first_bad = self.global_step
            if self.global_step % log_every == 0:
                mean_norm = self.window_norm_sum / self.window_norm_steps if self.window_norm_steps else None
                windows.append((self.global_step, self.window_loss_sum, self.window_samples, mean_norm))
                self.window_loss_sum, self.window_samples, self.window_norm_sum, self.window_norm_steps = 0.0, 0, 0.0, 0
        return windows, first_bad

    def validated(self, metrics: dict, min_delta: float, patience: int | None) -> None:
        """Note a validation evaluation at this step: a new best if it beats the best by more than
        `min_delta`; stopped early once `patience` evaluations in a row have not."""
        self.last_validation = {"step": self.global_step, "accuracy": metrics["accuracy"], "loss": metrics["loss"],
                                "samples": metrics["samples"]}
        if self.best_val_accuracy is None or metrics["accuracy"] > self.best_val_accuracy + min_delta:
            self.best_val_accuracy, self.best_step, self.evals_since_best = metrics["accuracy"], self.global_step, 0
        else:
            self.evals_since_best += 1
        self.stopped_early = patience is not None and self.evals_since_best >= patience

    def evaluated(self) -> bool:
        """Whether the position reached has been evaluated: an epoch's start, or where --max-steps or early
        stopping ended one.
        A checkpoint saved on a stop signal at an epoch's or the run's end has not."""
        last = self.history[-1] if self.history else None
        return self.batch_in_epoch == 0 or (last is not None and last["epoch"] == self.epoch + 1
                                            and last["samples"] == self.epoch_samples)

    def saved(self, accelerator) -> dict:
        """This state as training_state.json holds it, with every process's loss sums (a collective)."""
        mine = torch.tensor([[self.epoch_loss_sum, self.window_loss_sum]], device=accelerator.device)
        sums = accelerator.gather(mine).cpu().tolist()
        state = {k: v for k, v in asdict(self).items() if k not in ("epoch_loss_sum", "window_loss_sum")}
        return {**state, "epoch_loss_sums": [s[0] for s in sums], "window_loss_sums": [s[1] for s in sums]}

    @classmethod
    def restored(cls, saved: dict, rank: int, world: int) -> "TrainState":
        """The state in a checkpoint's training_state.json (`saved`), as process `rank` of `world` continues
        it. On another world size than the checkpoint's, process 0 carries the loss sums' totals."""
        names = [k for k in cls.__dataclass_fields__ if k not in ("epoch_loss_sum", "window_loss_sum")]
        sums = [saved["epoch_loss_sums"], saved["window_loss_sums"]]
        if len(sums[0]) == world:
            mine = [s[rank] for s in sums]
        else:  # added in float32, as the processes' sums are when an epoch ends
            mine = [float(np.sum(s, dtype=np.float32)) if rank == 0 else 0.0 for s in sums]
        # the fields newer than the checkpoint: their defaults
        defaults = {f.name: f.default_factory() if f.default is MISSING else f.default for f in fields(cls)}
        return cls(**{k: saved.get(k, defaults[k]) for k in names}, epoch_loss_sum=mine[0], window_loss_sum=mine[1])


def train(cfg: TrainConfig, signals: StopSignals | None = None) -> dict:
    """Train as `cfg` says into a run directory of its own; write results.json and the model (main
    process); return the results. Raises `Preempted` when SIGTERM or SIGUSR1 arrives (or the launcher
    dies), after saving a checkpoint if training had begun. `signals`: handlers the CLI installed early."""
    cfg, taken = runs.continued(cfg.validate())  # a resume takes the checkpoint's value of every flag not given
    source, local = data.dataset_source(cfg.dataset)
    if local:  # a dataset directory, made absolute: the same run (and resume) from any working directory
        cfg = replace(cfg, dataset=source)
    with signals or StopSignals() as signals:
        accelerator = build_accelerator(cfg)
        try:
            plan = decided_by_main(accelerator, runs.claim, cfg)  # the run's directory, locked, and what it holds
        except BaseException:
            _shutdown(accelerator)
            raise
        try:
            if plan.finished:  # --resume auto on a run that has taken every step asked for
                return say_finished(accelerator, plan)
            if taken and plan.resume_from and accelerator.is_main_process:
                print(f"mnist_dist: continuing with the checkpoint's settings for the flags not given: {as_flags(taken)}")
            use_output_dir(accelerator, plan.output_dir)
            return run(replace(cfg, output_dir=plan.output_dir), accelerator, plan, signals)
        finally:
            plan.lock.release()


def run(cfg: TrainConfig, accelerator, plan: runs.Plan, signals: StopSignals) -> dict:
    """The run in `plan.output_dir`, from its checkpoint `plan.resume_from` or from step 0."""
    timings = {"startup": since_process_start()}  # seconds: interpreter, imports, process group
    world = accelerator.num_processes
    cfg, resume_from, saved = resume_point(cfg, plan, world)
    config = run_config(cfg, accelerator, saved, resume_from)

    began = time.perf_counter()
    run_data = load_data(cfg, accelerator)
    train_set, test_set, val_set, stats = run_data.train, run_data.test, run_data.validation, run_data.stats
    if saved:
        checkpoint.check_data(saved, run_data.fingerprint, config, resume_from)
    timings["data_load"] = time.perf_counter() - began

    began = time.perf_counter()
    set_seed(cfg.seed, deterministic=cfg.deterministic)  # the same initial weights everywhere (DDP broadcasts them too)
    model = MLP(train_set.images.shape[1], cfg.hidden_size, len(train_set.class_names))
    model_cfg = saved_model_config(model, cfg, stats, train_set.class_names)
    data_path = resolve_data_path(cfg, accelerator)
    optimizer = make_optimizer(model.parameters(), cfg.lr, accelerator.device, cfg.optimizer, cfg.weight_decay)
    loader = data.train_loader(train_set, cfg.batch_size, cfg.num_workers, cfg.seed)
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, loader)
    steps_per_epoch = math.ceil(len(train_loader) / cfg.gradient_accumulation_steps)  # the same on every process
    total_steps = min(cfg.epochs * steps_per_epoch, cfg.max_steps or math.inf)
    scheduler = make_scheduler(cfg, accelerator, optimizer, total_steps)
    state = restore(accelerator, resume_from, saved, optimizer, cfg.seed) if saved else TrainState()
    guard = NonFiniteGuard(accelerator, optimizer)
    runner = make_runner(cfg, data_path, accelerator, model, optimizer, scheduler, guard, train_set, train_loader, stats)
    watch = core_watch(cfg, accelerator.device)  # None unless a lone CPU process took its threads from idle cores
    scorer = Scorer(accelerator, {"test": test_set, **({VALIDATION: val_set} if val_set else {})}, data_path,
                    cfg.eval_batch_size, cfg.num_workers, stats)
    selection = ModelSelection(cfg, accelerator, scorer, model_cfg, val_set is not None)
    if saved:
        selection.resumed(model, state, resume_from)  # its best model, checked

    if accelerator.is_main_process:  # only now: bad data, flags and checkpoints have all been refused
        runs.clear(plan)
    hosts = process_hosts(accelerator)  # to name a peer that stalls
    run_id = start_tracking(cfg, accelerator, config, saved, plan, len(train_set))
    report = Reporter(accelerator, cfg.output_dir, total_steps, state.global_step if saved else None)
    selection.write_best(state)  # resumed: the checkpoint's best model, into this run's best/ (a fresh run: none)
    epochs = math.ceil(total_steps / steps_per_epoch)
    report.say(banner(cfg, accelerator, config, run_data, data_path, resume_from, saved, state))
    step_batch = global_batch(cfg, world)  # samples per optimizer step, all processes
    checkpoint_extra = {"world_size": world, "global_batch_size": step_batch, "config": config, "run_id": run_id,
                        **checkpoint.began_with(saved, cfg), "data": run_data.fingerprint}
    real_samples = [step_samples(i, len(train_set), step_batch) for i in range(steps_per_epoch)]

    gc.freeze()  # full collections no longer walk the imports' objects: no process stalls the all-reduce for one
    timings["setup"] = time.perf_counter() - began  # model, optimizer, prepare, device copies, trackers
    epoch_test = None  # the test metrics of the last epoch, without a validation split
    try:
        if any_process(accelerator, signals.reason() is not None):  # stopped during start-up: nothing to save yet
            report.say(f"mnist_dist: stopped by {stop_reason(signals)} during start-up; nothing new to save")
            raise Preempted(resume_from)
        for _ in range(state.epoch, epochs):  # bounded: whatever a checkpoint said, no epoch is evaluated twice
            if (state.global_step >= total_steps or state.stopped_early) and state.evaluated():
                break
            timed_since = time.perf_counter()  # training time runs from here to the next checkpoint
            runner.begin_epoch(state.epoch, state.batch_in_epoch)
            model.train()
            while state.batch_in_epoch < steps_per_epoch and state.global_step < total_steps and not state.stopped_early:
                start = state.batch_in_epoch
                stop = start + steps_to_next_check(state, cfg, runner.logs_live, steps_per_epoch, total_steps)
                runner.run(start, stop)  # steps [start, stop) of this epoch, no host sync between them
                windows, first_bad_loss = state.add_steps(
                    runner.step_losses(start, stop), real_samples[start:stop], cfg.log_every, runner.step_norms())
                if state.seconds_to_first_step is None:  # a fresh run's first stretch
                    state.seconds_to_first_step = runner.seconds_to_first_step
                report.advance(stop - start)
                # the processes compare notes (one host sync) only here, never every step
                stop, first_bad = agree_to_stop(accelerator, signals.reason() is not None, guard.bad_steps,
                                                state.global_step, first_bad_loss)
                if first_bad is not None:
                    raise TrainingError(non_finite_message(first_bad, state.epoch, cfg.output_dir))
                report.log_windows(windows, state, optimizer, steps_per_epoch, time.perf_counter() - timed_since)
                if watch:  # a program that started or stopped since changes the threads worth using
                    watch.recheck(report.say)
                if selection.due(state, steps_per_epoch, total_steps):  # an --eval-every point
                    seconds = selection.validate(model, state, report)
                    state.validation_seconds += seconds
                    timed_since += seconds  # not training time
                if stop or checkpoint_due(state, cfg, steps_per_epoch, total_steps):
                    state.train_seconds += time.perf_counter() - timed_since
                    path = save_checkpoint(accelerator, cfg, state, checkpoint_extra, model_cfg, selection, plan.reported_step)
                    timed_since = time.perf_counter()
                    if stop:
                        preempt(signals, report, state.global_step, path)
            state.train_seconds += time.perf_counter() - timed_since
            epoch_test = end_epoch(accelerator, state, model, scorer, selection, report, epochs, steps_per_epoch)
            path = save_checkpoint(accelerator, cfg, state, checkpoint_extra, model_cfg, selection, plan.reported_step)
            if state.batch_in_epoch or state.stopped_early:  # --max-steps or early stopping ended the run here
                break
            if state.epoch < epochs and any_process(accelerator, signals.reason() is not None):  # during evaluation
                preempt(signals, report, state.global_step, path)
    except (Preempted, TrainingError, DiskError, EvaluationError):  # every process raises these at the same step
        report.close()
        _shutdown(accelerator)
        raise
    except RuntimeError as err:
        if not lost_peer(err):
            raise
        report.close()  # a collective timed out (a peer stalled) or its connection broke (a peer died)
        raise TrainingError(peers_message(accelerator, hosts, cfg.timeout, state.global_step, err)) from err
    report.close()

    # the final model's: the last epoch's score, unless that was the validation split's (or nothing was trained)
    metrics = epoch_test if epoch_test is not None else scorer.score(model, "test")
    timings |= {"train": state.train_seconds, "capture": runner.capture_seconds,  # capture: part of train
                "eval": sum(h["eval_seconds"] for h in state.history) + state.validation_seconds}
    results = results_of(cfg, accelerator, state, metrics, timings, data_path, run_data, model_cfg, total_steps)
    results |= selection.results(model, state, run_data)
    write_outputs(accelerator, model, cfg.output_dir, results, test_set, stats, model_cfg, report)
    tracking.finish(accelerator, cfg, run_summary(results))
    stopped = any_process(accelerator, signals.reason() is not None)  # a signal while the outputs were written
    _shutdown(accelerator)
    if stopped:
        report.say(f"mnist_dist: stopped by {stop_reason(signals)} after writing the outputs; the run is complete")
        raise Preempted(Path(cfg.output_dir))
    return results


@dataclass
class RunData:
    """The splits a run trains, validates and tests on, their fingerprint and the input scaling."""

    train: Split
    test: Split
    validation: Split | None
    validation_source: str | None  # where the validation split came from, in words
    fingerprint: dict  # data.fingerprint: what checkpoints record and resumes check
    stats: tuple[float, float]  # (mean, std) on the 0..1 pixel scale, saved with the model


def load_data(cfg: TrainConfig, accelerator) -> RunData:
    """The run's splits: the dataset's validation split if it has one, else --val-fraction of the training
    split held out, else none. Refuses the model-selection flags without a validation split."""
    with accelerator.local_main_process_first():  # one process per node decodes and caches, the others read
        splits = data.load_splits(cfg.dataset, cfg.data_dir, cfg.cache_dir, cfg.image_column, cfg.label_column)
    train_set, val_set, held_out, source = splits["train"], splits.get(VALIDATION), None, None
    if val_set is not None:
        source = f"the dataset's {VALIDATION} split" + (f"; --val-fraction {cfg.val_fraction} is not used" if cfg.val_fraction else "")
    elif cfg.val_fraction:
        train_set, val_set, indices = data.hold_out(train_set, cfg.val_fraction, cfg.seed)
        held_out = {"fraction": cfg.val_fraction, "seed": cfg.seed, "indices_sha256": data.indices_digest(indices)}
        source = f"{100 * cfg.val_fraction:g}% of the training split, each class alike, chosen by --seed {cfg.seed}"
    check_selection_flags(cfg, val_set is not None)
    used = {"train": train_set, "test": splits["test"], **({VALIDATION: val_set} if val_set is not None else {})}
    stats = data.pixel_stats(train_set.images) if cfg.normalization == "dataset" else (data.MEAN, data.STD)
    return RunData(train_set, splits["test"], val_set, source, data.fingerprint(used, held_out), stats)


def check_selection_flags(cfg: TrainConfig, has_validation: bool) -> None:
    """The model-selection flags choose on a validation split: refused without one."""
    if has_validation:
        return
    for name, given in (("eval_every", cfg.eval_every is not None), ("keep_best", cfg.keep_best is True),
                        ("early_stopping_patience", cfg.early_stopping_patience is not None),
                        ("early_stopping_min_delta", cfg.early_stopping_min_delta != 0)):
        if given:
            raise ConfigError(f"--{name.replace('_', '-')}={getattr(cfg, name)!r}: needs a validation split, and "
                              f"{cfg.dataset} has none; hold one out with --val-fraction (0.1, say)")


def run_summary(results: dict) -> dict:
    """The W&B run summary: the final test accuracy and, with a validation split, the best model's."""
    best = results.get("best") or {}
    return {"final_test_accuracy": results["test_accuracy"], "stopped": results["stopped"]["reason"],
            **({"best_val_accuracy": best["val_accuracy"], "best_step": best["step"]} if best else {}),
            **({"best_model_test_accuracy": best["test_accuracy"]} if "test_accuracy" in best else {})}


def start_tracking(cfg: TrainConfig, accelerator, config: dict, saved: dict | None, plan: runs.Plan,
                   train_len: int) -> str:
    """Start the trackers (W&B); return the run's id, which a checkpoint resumed in place keeps."""
    # a checkpoint resumed into another directory starts a run of its own
    run_id = saved["run_id"] if saved and plan.continues else uuid.uuid4().hex[:16]
    world = accelerator.num_processes
    tracking.start(accelerator, cfg, {**config, "world_size": world, "global_batch_size": global_batch(cfg, world),
                                      "train_samples": train_len, "device_type": accelerator.device.type,
                                      **tracking.run_metadata()}, run_id)
    return run_id


def resume_point(cfg: TrainConfig, plan: runs.Plan, world: int) -> tuple[TrainConfig, Path | None, dict | None]:
    """(`cfg`, the checkpoint to resume from, its training state), or (`cfg`, None, None) for a fresh run.
    The checkpoint's global batch is cut into `world` processes x batch x accumulation steps."""
    if not plan.resume_from:
        return cfg, None, None
    path = Path(plan.resume_from)
    saved = checkpoint.read_state(path)
    batch_size, steps = checkpoint.batch_for_world(saved, cfg, world, path)
    return replace(cfg, batch_size=batch_size, gradient_accumulation_steps=steps), path, saved


def as_flags(values: dict) -> str:
    """{"dataset": "mnist-5k", "cpu": True} -> "--dataset mnist-5k --cpu", as on a command line."""
    flags = [f"--{'' if value else 'no-'}{name}" if isinstance(value, bool) else f"--{name} {value}"
             for name, value in ((name.replace("_", "-"), value) for name, value in values.items())]
    return " ".join(flags)


def run_config(cfg: TrainConfig, accelerator, saved: dict | None, resume_from: Path | None) -> dict:
    """The config that checkpoints, results and trackers record, precision and compiler resolved; on a
    resume, checked against the checkpoint's."""
    config = {**cfg.to_dict(), "mixed_precision": accelerator.mixed_precision, "torch_compile": compiled_with(accelerator)}
    if saved:
        checkpoint.check_compatible(saved, config, resume_from)
    return config


def stop_reason(signals: StopSignals) -> str:
    return signals.reason() or "another process's stop request"


def banner(cfg: TrainConfig, accelerator, config: dict, splits: RunData, data_path: str,
           resume_from: Path | None, saved: dict | None, state: TrainState) -> str:
    """What this run is, said just before it trains; a resumed run on another world size says so too."""
    world, n = accelerator.num_processes, cfg.gradient_accumulation_steps
    val = f" / {len(splits.validation)} validation ({splits.validation_source})" if splits.validation else ""
    text = (f"mnist_dist: {len(splits.train)} train{val} / {len(splits.test)} test samples, {world} process(es) on "
            f"{accelerator.device.type}, global batch {global_batch(cfg, world)}"
            + (f" ({world} x {cfg.batch_size} x {n} accumulated)" if n > 1 else "")
            + f", precision {accelerator.mixed_precision}, "
            + (f"torch.compile {config['torch_compile']}, " if config["torch_compile"] != "no" else "")
            + f"data path {data_path}; {cfg.output_dir}"
            + (f", resuming from {resume_from} (step {state.global_step})" if resume_from else ""))
    was_n = saved["config"].get("gradient_accumulation_steps", 1) if saved else n
    if saved and saved["world_size"] != world:
        was = f"{saved['global_batch_size'] // saved['world_size'] // was_n}" + (f" x {was_n}" if was_n > 1 else "")
        text += (f"\nmnist_dist: the world size changed from {saved['world_size']} to {world}: each process now takes "
                 + (f"{cfg.batch_size} samples per " + ("step" if n == 1 else f"batch, {n} batches per step"))
                 + f" (was {was}), so the global batch ({global_batch(cfg, world)}), the data order and the "
                 "trajectory stay the same, up to the order in which floating-point sums are added")
    return text


def say_finished(accelerator, plan: runs.Plan) -> dict:
    """--resume auto on a finished run: say so and change nothing."""
    results = plan.finished
    early = runs.stopped_early(results)
    if accelerator.is_main_process:
        further = ("it stopped early (--early-stopping-patience)" if early else "to train further, raise --epochs or "
                   "--max-steps with --resume auto (--schedule constant only: a schedule is laid over all the steps)")
        print(f"mnist_dist: {plan.output_dir} holds a finished run ({results['steps']} steps, test accuracy "
              f"{results['test_accuracy']:.4f}); nothing to resume. {further[0].upper()}{further[1:]}; to start "
              "over, use --overwrite.")
    _shutdown(accelerator)
    return results


def make_runner(cfg: TrainConfig, data_path: str, accelerator, model, optimizer, scheduler, guard, train_set,
                train_loader, stats):
    """What runs the steps of an epoch on `data_path`: the captured epoch, or the reference step; with
    --profile, under the profiler."""
    device = accelerator.device
    if data_path == "graph":
        runner = EpochGraph(model, optimizer, guard, normalize(train_set.images.to(device), *stats),
                            train_set.labels.to(device), cfg.batch_size, cfg.seed, cfg.label_smoothing)
    else:
        batches = train_loader if data_path == "dataloader" else DeviceBatches(
            train_set, cfg.batch_size, cfg.seed, accelerator.process_index, accelerator.num_processes, device)
        runner = EagerSteps(accelerator, model, optimizer, scheduler, guard, batches, cfg, len(train_set), stats)
    return ProfiledSteps(runner, cfg.profile, accelerator.is_main_process, device) if cfg.profile else runner


def saved_model_config(model: MLP, cfg: TrainConfig, stats: tuple[float, float], class_names) -> dict:
    """config.json, saved beside every model: what rebuilds it, how its inputs are scaled, and its test set."""
    return model_config(
        model, normalization={"mean": stats[0], "std": stats[1], "pixel_scale": 255}, dataset=cfg.dataset,
        data_dir=str(Path(cfg.data_dir).resolve()) if cfg.data_dir else None,
        image_column=cfg.image_column, label_column=cfg.label_column, class_names=list(class_names),
    )


def resolve_data_path(cfg: TrainConfig, accelerator) -> str:
    """The --data-path this run uses: 'auto' is 'graph' where it can run (one CUDA process, constant
    schedule, precision no or bf16, no torch.compile), else 'device': the same batches as the
    DataLoader (the reference), and faster on a CPU too (benchmarks/README.md)."""
    why_not = graph_unsupported(cfg, accelerator.device, accelerator.num_processes, accelerator.mixed_precision,
                                compiled_with(accelerator))
    if cfg.data_path == "graph" and why_not:
        raise ConfigError(f"--data-path graph {why_not}")
    if cfg.data_path != "auto":
        return cfg.data_path
    if why_not is None:
        return "graph"
    return "device"


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


def restore(accelerator, path: Path, saved: dict, optimizer, seed: int) -> TrainState:
    """Load the checkpoint at `path` into the prepared objects (all processes); return its TrainState."""
    try:
        accelerator.load_state(str(path))  # model, optimizer, schedule, sampler, every process's RNG state
    except Exception as err:  # truncated or damaged files: refuse, naming the checkpoint
        raise CheckpointError(f"{path}: damaged checkpoint ({type(err).__name__}: {err})") from err
    if accelerator.process_index >= saved["world_size"]:  # a process the checkpoint has no RNG state for
        set_seed(seed, device_specific=True)  # seed + rank: deterministic, and not another process's stream
    for group in optimizer.param_groups:  # loading restores the saving run's flags; keep this device's
        group["capturable"], group["fused"] = (optimizer.optimizer.defaults[k] for k in ("capturable", "fused"))
    return TrainState.restored(saved, accelerator.process_index, accelerator.num_processes)  # checked by read_state


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


class EagerSteps:
    """--data-path dataloader and device: the reference step, launched from Python batch by batch,
    --gradient-accumulation-steps batches an optimizer step. Each batch's loss sum goes to
    `losses[batch]`, on the device; each step's gradient norm to `norms` until the loop reads them."""

    logs_live = True  # the loop stops at every --log-every step to log
    capture_seconds = 0.0

    def __init__(self, accelerator, model, optimizer, scheduler, guard, batches, cfg: TrainConfig, train_len: int,
                 stats: tuple[float, float]):
        """`batches`: the prepared DataLoader, or `data.DeviceBatches`."""
        self.accelerator, self.model, self.optimizer, self.scheduler, self.guard = accelerator, model, optimizer, scheduler, guard
        self.batches, self.cfg, self.train_len, self.stats = batches, cfg, train_len, stats
        self.losses = torch.zeros(len(batches), device=accelerator.device)
        self.norms: list[torch.Tensor] = []
        # a resume on another world size may have re-cut the global batch after the Accelerator was built
        accelerator.gradient_accumulation_steps = cfg.gradient_accumulation_steps
        self.epoch_batches = iter(())
        self.seconds_to_first_step: float | None = None

    def begin_epoch(self, epoch: int, start: int) -> None:
        """Batches from optimizer step `start` of `epoch` on."""
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
            batches = range(step * n, min(step * n + n, len(self.batches)))  # an epoch's last step may have fewer
            scale = world * n / step_samples(step, self.train_len, world * batch_size * n)
            # accumulate() adds 1 to Accelerate's batch count and syncs where it reaches a multiple of n:
            # from n - k it syncs on the k-th batch, this step's last, also in an epoch's short last step
            self.accelerator.step = n - len(batches)
            for index in batches:
                images, labels = next(self.epoch_batches)
                real = local_real(index, len(labels), self.train_len, batch_size, self.accelerator)  # fillers last
                with threads_for_rows(real, self.accelerator.device):  # the same bits at any thread count
                    self.losses[index], norm = train_step(self.accelerator, self.model, self.optimizer, self.guard,
                                                          normalize(images[:real], *self.stats), labels[:real], scale,
                                                          self.cfg.label_smoothing, self.cfg.max_grad_norm)
            self.norms.append(norm)  # a reference: no copy, no kernel
            if self.scheduler is not None:
                self.scheduler.step()
            if self.seconds_to_first_step is None:
                self.seconds_to_first_step = since_process_start()

    def step_losses(self, start: int, stop: int) -> list[float]:
        """The loss sums of optimizer steps [start, stop), from their batches' (a host sync)."""
        n = self.cfg.gradient_accumulation_steps
        per_batch = self.losses[start * n : stop * n].tolist()
        return [sum(per_batch[i : i + n]) for i in range(0, len(per_batch), n)]

    def step_norms(self) -> list[float]:
        """The gradient norms (before clipping) of the steps run since the last call (a host sync)."""
        norms, self.norms = self.norms, []
        return torch.stack(norms).tolist() if norms else []


def global_batch(cfg: TrainConfig, world: int) -> int:
    """Training samples of one optimizer step, all processes."""
    return world * cfg.batch_size * cfg.gradient_accumulation_steps


def step_samples(step: int, train_len: int, step_batch: int) -> int:
    """Real samples in optimizer step `step` of an epoch, all processes: the last step may be short."""
    return min(step_batch, train_len - step * step_batch)


def steps_to_next_check(state: TrainState, cfg: TrainConfig, logs_live: bool, steps_per_epoch: int,
                        total_steps: int) -> int:
    """Steps from here to the next point where the host looks: the epoch's end or the run's, a
    checkpoint, a validation, or (where the path logs live) a log point."""
    step = state.global_step
    ends = [steps_per_epoch - state.batch_in_epoch, total_steps - step]
    # --eval-every is None without a validation split (refused with --eval-every)
    for every in ([cfg.log_every] if logs_live else []) + [e for e in (cfg.checkpoint_every, cfg.eval_every) if e]:
        ends.append(every - step % every)
    return min(ends)


def checkpoint_due(state: TrainState, cfg: TrainConfig, steps_per_epoch: int, total_steps: int) -> bool:
    """A --checkpoint-every point inside an epoch (epoch ends always get one, after their evaluation)."""
    inside = state.batch_in_epoch < steps_per_epoch and state.global_step < total_steps
    return bool(cfg.checkpoint_every) and state.global_step % cfg.checkpoint_every == 0 and inside


def non_finite_message(step: int, epoch: int, output_dir: str) -> str:
    try:
        saved = checkpoint.complete_checkpoints(output_dir)[-1:]
        where = (f"the checkpoints in {checkpoint.checkpoints_root(output_dir)} hold the last good state (step "
                 f"{checkpoint.read_state(saved[0])['global_step']})" if saved else "no checkpoint was saved before it")
    except CheckpointError:
        where = f"see {checkpoint.checkpoints_root(output_dir)} for the last good state"
    return (f"non-finite training loss or gradients at step {step} (epoch {epoch + 1}); the weights are those "
            f"of step {step - 1}, nothing after it was applied or saved. Lower --lr or try --mixed-precision no; "
            f"{where}.")


def save_checkpoint(accelerator, cfg: TrainConfig, state: TrainState, extra: dict, model_cfg: dict,
                    selection: ModelSelection, reported_step: int | None) -> Path:
    """A checkpoint of `state`, the prepared objects and the best model so far (all processes call this).
    The checkpoint of `reported_step` (what results.json there describes) outlives the rotation."""
    return checkpoint.save(accelerator, cfg.output_dir, {**state.saved(accelerator), **extra}, cfg.keep_checkpoints,
                           model_cfg, selection.checkpoint_copy(), spare=reported_step)


def end_epoch(accelerator, state: TrainState, model, scorer: Scorer, selection: ModelSelection, report: "Reporter",
              epochs: int, steps_per_epoch: int) -> dict | None:
    """Evaluate (the validation split if there is one, else the test set), add the epoch to the history, say
    and log it; move the state to the next epoch unless --max-steps or early stopping ended this one early.
    Returns the test metrics, or None where the validation split was scored."""
    mine = torch.tensor(state.epoch_loss_sum, dtype=torch.float32, device=accelerator.device)
    train_loss = accelerator.reduce(mine, reduction="sum").item() / state.epoch_samples
    if state.history and state.history[-1]["epoch"] == state.epoch + 1:
        state.history.pop()  # this epoch's first part, up to an earlier run's --max-steps
    seconds = state.train_seconds - sum(h["seconds"] for h in state.history)
    began = time.perf_counter()
    if selection.active:
        selection.validate(model, state, report)  # logged there, as val/*
        split, scored, test = "val", state.last_validation, {}
    else:
        split, scored = "test", scorer.score(model, "test")
        test = {"test/accuracy": scored["accuracy"], "test/loss": scored["loss"]}
    memory = per_process(accelerator, peak_memory_mib(accelerator.device))  # MiB, by rank
    flops = model_flops_per_second(sum(p.numel() for p in model.parameters()), state.epoch_samples, seconds)
    state.history.append({"epoch": state.epoch + 1, "train_loss": train_loss, f"{split}_accuracy": scored["accuracy"],
                          f"{split}_loss": scored["loss"], "seconds": seconds,
                          "eval_seconds": time.perf_counter() - began, "samples": state.epoch_samples,
                          "peak_memory_mib": memory, "model_flops_per_second": flops})
    report.say(f"epoch {state.epoch + 1}/{epochs}: train_loss {train_loss:.4f}  {split}_loss {scored['loss']:.4f}  "
               f"{split}_accuracy {scored['accuracy']:.4f}  ({seconds:.2f} s, {state.epoch_samples / seconds:,.0f} samples/s, "
               f"{flops / 1e9:,.2f} model GFLOP/s, peak memory {max(memory):,.0f} MiB)")
    report.log({**test, "train/epoch_loss": train_loss, "epoch": state.epoch + 1, "epoch_seconds": seconds,
                "perf/model_flops_per_second": flops, "perf/peak_memory_mib": max(memory)}, state.global_step)
    if state.batch_in_epoch == steps_per_epoch:
        state.samples_seen += state.epoch_samples
        state.epoch, state.batch_in_epoch, state.epoch_loss_sum, state.epoch_samples = state.epoch + 1, 0, 0.0, 0
    # else --max-steps or early stopping ended the run inside the epoch: its checkpoint stays there, so that
    # resuming with more steps finishes this epoch rather than skipping to the next
    return None if selection.active else scored


class Reporter:
    """What the main process tells people and trackers: a progress bar at a terminal, one line per
    epoch, Accelerate's trackers and metrics.jsonl. The other processes stay quiet."""

    def __init__(self, accelerator, output_dir: str, total_steps: int, resumed_at: int | None):
        self.accelerator, self.main = accelerator, accelerator.is_main_process
        self.metrics_log = tracking.MetricsLog(output_dir, self.main, resumed_at)
        if resumed_at is not None:
            tracking.replay(accelerator, self.metrics_log.records())
        # the bar is for people at a terminal; batch logs (SLURM) get the one line per epoch
        self.bar = tqdm(total=total_steps, initial=resumed_at or 0, unit="step", dynamic_ncols=True,
                        disable=not (self.main and sys.stderr.isatty()))

    def say(self, text: str) -> None:
        if self.main:
            self.bar.write(text)

    def log(self, values: dict, step: int) -> None:
        self.accelerator.log(values, step=step)  # main process only
        self.metrics_log.write(step, values)

    def advance(self, steps: int) -> None:
        self.bar.update(steps)

    def log_windows(self, windows: list, state: TrainState, optimizer, steps_per_epoch: int, seconds: float) -> None:
        """Log the --log-every windows just closed (`TrainState.add_steps`): loss over every process, and
        the mean gradient norm (the same on every process: gradients are all-reduced before it)."""
        if not windows:
            return
        mine = torch.tensor([w[1] for w in windows], dtype=torch.float32, device=self.accelerator.device)
        totals = self.accelerator.reduce(mine, reduction="sum").tolist()
        rate = (state.samples_seen + state.epoch_samples) / (state.train_seconds + seconds)
        for (step, _, samples, grad_norm), total in zip(windows, totals):
            norm = {"train/grad_norm": grad_norm} if grad_norm is not None else {}
            self.log({"train/loss": total / samples, "train/lr": optimizer.param_groups[0]["lr"],
                      "train/samples_per_second": rate, "train/epoch": step / steps_per_epoch, **norm}, step)
        self.bar.set_postfix(loss=f"{totals[-1] / windows[-1][2]:.4f}", samples_s=f"{rate:,.0f}")

    def close(self) -> None:
        self.bar.close()


def results_of(cfg: TrainConfig, accelerator, state: TrainState, metrics: dict, timings: dict, data_path: str,
               splits: RunData, model_cfg: dict, total_steps: int) -> dict:
    """results.json: the run's final test metrics, its history and what it ran on (a collective: each
    process's peak memory). Every test_* number is the final model's; the history's per-epoch numbers are
    the validation split's (val_*) where there is one, else the test set's (test_*)."""
    world, train_len, stats = accelerator.num_processes, len(splits.train), splits.stats
    reason = "early_stopping" if state.stopped_early else "max_steps" if cfg.max_steps == total_steps else "epochs"
    samples_seen = state.samples_seen + state.epoch_samples  # epoch_samples: a cut-short epoch's
    peak_memory = per_process(accelerator, peak_memory_mib(accelerator.device))  # MiB, by rank
    return {
        "dataset": cfg.dataset, "test_accuracy": metrics["accuracy"], "test_loss": metrics["loss"],
        "test_samples": metrics["samples"], "stopped": {"reason": reason, "step": state.global_step},
        "train_samples": train_len, "epochs": len(state.history), "steps": state.global_step,
        "samples_seen": samples_seen, "world_size": world, "per_process_batch_size": cfg.batch_size,
        "global_batch_size": global_batch(cfg, world), "mixed_precision": accelerator.mixed_precision,
        "torch_compile": compiled_with(accelerator),  # Accelerate's dynamo_backend, lower case; "no" when off
        "data_path": data_path,  # resolved: --data-path auto picks one
        "device_type": accelerator.device.type, "train_seconds": state.train_seconds,
        "cpu_threads": torch.get_num_threads() if accelerator.device.type == "cpu" else None,
        "cpu_threads_from": threads_from(cfg) if accelerator.device.type == "cpu" else None,
        # MKL in strict reproducibility mode: the same weights at any thread count (distributed.threads_reproducible)
        "cpu_threads_reproducible": threads_reproducible() if accelerator.device.type == "cpu" else None,
        "samples_per_second": samples_seen / state.train_seconds,
        # 6 x parameters x samples / train_seconds (resources.model_flops_per_second)
        "model_flops_per_second": model_flops_per_second(parameter_count(model_cfg), samples_seen, state.train_seconds),
        "peak_memory_mib": peak_memory, "peak_memory_measured": MEMORY_MEASURED.get(accelerator.device.type,
                                                                                   MEMORY_MEASURED["cpu"]),
        "deterministic": torch.are_deterministic_algorithms_enabled(),  # --deterministic
        "seconds_to_first_step": state.seconds_to_first_step,
        "timings": timings,  # this process's wall time by phase, seconds (train and eval: across resumes)
        "normalization": {"mean": stats[0], "std": stats[1]},
        "per_class_accuracy": dict(zip(model_cfg["class_names"], metrics["per_class_accuracy"])),
        "confusion_matrix": metrics["confusion_matrix"],  # [true class][predicted class], counts
        "history": state.history, "config": cfg.to_dict(),
    }


def write_outputs(accelerator, model, output_dir: str, results: dict, test_set, stats, model_cfg: dict,
                  report: Reporter) -> None:
    """The model, config.json, the pictures (also to the trackers) and, last, results.json, whose
    presence marks a finished run. All processes call this; the main process writes."""
    bad = non_finite(results)
    if bad:  # before anything is written: results.json is strict JSON
        raise TrainingError(f"the final evaluation gave a non-finite {bad} (the model's outputs overflow); nothing was "
                            f"written to {output_dir}. Lower --lr, or resume an earlier checkpoint with fewer steps")
    failure = None
    try:
        write_model_and_pictures(accelerator, model, Path(output_dir), results, test_set, stats, model_cfg, report)
    # torch and safetensors report a full disk as RuntimeError too; ValueError: a non-finite number for JSON
    except (OSError, RuntimeError, SafetensorError, ValueError) as err:
        failure = checkpoint.write_failure(Path(output_dir), err)
    if any_process(accelerator, failure is not None):  # the main process writes; every process stops alike
        raise DiskError(failure or f"the main process could not write the outputs to {output_dir}")


def non_finite(value, name: str = "") -> str | None:
    """The name of the first NaN or infinite number in `value` (nested dicts and lists), or None."""
    if isinstance(value, float):
        return None if math.isfinite(value) else name or "number"
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    return next((bad for key, item in items if (bad := non_finite(item, f"{name}.{key}" if name else str(key)))), None)


def write_model_and_pictures(accelerator, model, output_dir: Path, results: dict, test_set, stats, model_cfg: dict,
                             report: Reporter) -> None:
    """`write_outputs` without the translation of a full disk into an error."""
    began = time.perf_counter()
    accelerator.wait_for_everyone()
    # the plain module, never its torch.compile wrapper: that one's weights are saved as "_orig_mod.fc1.weight"
    # (pytorch/pytorch#101107), and unwrapping it while keeping the wrapper puts the bare module inside it
    plain_model = accelerator.unwrap_model(model, keep_torch_compile=False)
    accelerator.save_model(plain_model, output_dir)  # model.safetensors, written by the main process
    if not accelerator.is_main_process:
        return
    checkpoint.write_json(output_dir / CONFIG_NAME, model_cfg)
    from . import plots  # matplotlib and torchvision: about 1 s of start-up that only the main process needs, at the end

    epochs = results["epochs"]
    title = f"{results['dataset']}, {epochs} epoch{'s' if epochs != 1 else ''}, recipe {results['config']['recipe']}"
    pictures = {"training_curves": plots.training_curves(results["history"], output_dir / "training_curves.png",
                                                         title, results["config"]["label_smoothing"]),
                **plots.test_pictures(output_dir, results["confusion_matrix"], model_cfg["class_names"], plain_model,
                                      test_set, stats, title)}
    tracking.log_images(accelerator, pictures, results["steps"])
    results["timings"]["outputs"] = time.perf_counter() - began  # model file, pictures, W&B images
    # last, naming the model files it describes: a kill before it leaves the earlier results.json, which
    # `runs.check_results` then finds out of step with them
    results["model_sha256"] = runs.weights_sha256(output_dir / WEIGHTS_NAME)
    if results.get("best", {}).get("model_dir"):
        results["best"]["model_sha256"] = runs.weights_sha256(output_dir / checkpoint.BEST_DIR / WEIGHTS_NAME)
    checkpoint.write_json(output_dir / runs.RESULTS_NAME, results)
    checkpoint.rotate_after_outputs(output_dir, results["config"]["keep_checkpoints"])  # a spared one may go now
    report.say(f"mnist_dist: test_accuracy {results['test_accuracy']:.4f}; wrote {output_dir}/results.json and "
               f"{', '.join(p.name for p in pictures.values())}")


def preempt(signals: StopSignals, report, step: int, path: Path):
    """Stop the run at a check after a stop signal: its checkpoint at `path` is saved."""
    report.say(f"mnist_dist: stopped by {stop_reason(signals)} after step {step}; checkpoint {path}")
    raise Preempted(path)


def _shutdown(accelerator) -> None:
    accelerator.end_training()  # finishes the trackers, destroys the process group
    accelerator.free_memory()  # drops the accelerator's references to the model and loaders


def main(cfg: TrainConfig, signals: StopSignals | None = None) -> int:
    """Train as `cfg` says (from `parse_args`); return the exit status."""
    try:
        train(cfg, signals)
    except (ConfigError, DataError, LaunchError, CheckpointError, runs.RunDirError, TrainingError, DiskError,
            EvaluationError) as err:
        failed = isinstance(err, (TrainingError, DiskError, EvaluationError))  # 1: the training failed; 2: fix the command
        if failed or os.environ.get("RANK", "0") == "0":  # a bad command fails alike everywhere: said once
            print(f"mnist_dist.train: error: {err}", file=sys.stderr)
        return 1 if failed else 2
    except RuntimeError as err:
        if not lost_peer(err):
            raise
        print(f"mnist_dist.train: error: the processes lost each other while starting or ending ({err}); "
              "see --timeout", file=sys.stderr)
        return 1
    except Preempted:
        return EXIT_PREEMPTED
    finally:
        # free the DDP model, which holds the process group, while Python is fully alive: left
        # to interpreter shutdown, gloo's threads can abort a finished run with SIGABRT
        gc.unfreeze()
        gc.collect()
    return 0


if __name__ == "__main__":
    status = main(CLI_CONFIG, SIGNALS)
    SIGNALS.ignore_from_now()
    sys.exit(status)

"""The training loop: `train` sets a run up (its directory, a resume's checkpoint, the accelerator) and
`run` trains it, top to bottom: data, model, optimizer, the epochs, the outputs. `python -m
mnist_dist.train` (`train.py`) answers --help before this module loads torch.
"""

from __future__ import annotations

import gc
import math
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from accelerate.utils import set_seed

from . import checkpoint, data, reporting, resume, runs, sources, tracking
from .checkpoint import CheckpointError, DiskError
from .clock import since_process_start
from .config import SCORES, ConfigError, TrainConfig
from .data import DataError, DeviceBatches, normalize
from .distributed import (
    CoreWatch, LaunchError, LostPeers, StallWatch, agree_to_stop, any_process, build_accelerator, compiled_with, core_watch, decided_by_main,
    lost_peer, peers_message, per_process, process_hosts, use_output_dir,
)
from .graphs import EpochGraph, resolve_data_path
from .model import INPUT_SIZE, left_as_found, new_model
from .reporting import Reporter, TrainingError
from .resources import ProfiledSteps, peak_memory_mib, training_flops_per_sample
from .resume import Resume
from .selection import EvaluationError, ModelSelection, RunData, Scorer, load_run_data
from .steps import EagerSteps, NonFiniteGuard, StepRunner, make_optimizer, make_scheduler, step_samples
from .stopping import EXIT_OUTSIDE, EXIT_PREEMPTED, StopSignals, StoppedAtOnce
from .train_state import TrainState


class Preempted(Exception):
    """Stopped by SIGTERM/SIGUSR1 or a lost launcher; `path`: where the run can go on from."""

    def __init__(self, path: Path | None):
        super().__init__(str(path))
        self.path = path


@dataclass
class Run:
    """What a run sets up once and the loop, its reports and its checkpoints read; what changes as it
    trains is in `TrainState`."""

    cfg: TrainConfig  # a resume's: the checkpoint's global batch cut for this world size
    accelerator: object
    config: dict  # `cfg` as checkpoints, results and trackers record it: precision and compiler resolved
    data: RunData
    data_path: str  # resolved: --data-path auto picks one
    model: torch.nn.Module  # prepared: DDP, torch.compile
    optimizer: torch.optim.Optimizer  # prepared
    model_cfg: dict  # config.json
    flops_per_sample: float | None  # training, forward and backward (`resources.training_flops_per_sample`)
    steps_per_epoch: int  # optimizer steps, the same on every process
    total_steps: int  # of the whole run: --epochs, or fewer with --max-steps
    signals: StopSignals
    guard: NonFiniteGuard
    watch: CoreWatch | None  # None unless a lone CPU process took its threads from idle cores
    reported_step: int | None  # the checkpoint results.json describes: it outlives the rotation
    stalls: StallWatch | None = None  # once the run directory is cleared: where each process is on a stall

    @property
    def epochs(self) -> int:
        return math.ceil(self.total_steps / self.steps_per_epoch)

    def stop_requested(self) -> bool:
        """Whether any process got a stop signal (a collective)."""
        return any_process(self.accelerator, self.signals.reason() is not None)


def train(cfg: TrainConfig, signals: StopSignals | None = None) -> dict:
    """Train as `cfg` says into a run directory of its own; write results.json and the model (main
    process); return the results. Raises `Preempted` when SIGTERM or SIGUSR1 arrives (or the launcher
    dies), after saving a checkpoint if training had begun. `signals`: handlers the CLI installed early."""
    cfg, taken = resume.continued(cfg.validate())  # a resume takes the checkpoint's value of every flag not given
    source, local = sources.dataset_source(cfg.dataset)
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
                results = reporting.say_finished(accelerator, plan)
                _shutdown(accelerator)
                return results
            if taken and plan.resume_from and accelerator.is_main_process:
                print("mnist_dist: continuing with the checkpoint's settings for the flags not given: "
                      f"{reporting.as_flags(taken)}")
            use_output_dir(accelerator, plan.output_dir)
            resumed = Resume.read(plan.resume_from) if plan.resume_from else None  # read once: see train_state.read
            return run(replace(cfg, output_dir=plan.output_dir), accelerator, plan, resumed, signals)
        finally:
            plan.lock.release()


def run(cfg: TrainConfig, accelerator, plan: runs.Plan, resumed: Resume | None, signals: StopSignals) -> dict:
    """The run in `plan.output_dir`, from the checkpoint `resumed` or from step 0."""
    timings = {"startup": since_process_start()}  # seconds: interpreter, imports, process group
    began = time.perf_counter()
    cfg = resumed.for_world(cfg, accelerator.num_processes) if resumed else cfg  # the checkpoint's global batch
    config = run_config(cfg, accelerator, resumed)
    run_data = load_run_data(cfg, accelerator)
    if resumed:
        resumed.check_data(run_data.fingerprint, config)
    timings["data_load"] = time.perf_counter() - began

    began = time.perf_counter()
    set_seed(cfg.seed, deterministic=cfg.deterministic)  # the same initial weights everywhere (DDP broadcasts them too)
    model, model_cfg, flops_per_sample = model_for_run(cfg, run_data, accelerator, resumed, signals)
    optimizer = make_optimizer(model.parameters(), cfg.lr, accelerator.device, cfg.optimizer, cfg.weight_decay)
    loader = data.train_loader(run_data.train, cfg.batch_size, cfg.num_workers, cfg.seed)
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, loader)
    steps_per_epoch = math.ceil(len(train_loader) / cfg.gradient_accumulation_steps)
    r = Run(cfg, accelerator, config, run_data, data_path=resolve_data_path(cfg, accelerator), model=model,
            optimizer=optimizer, model_cfg=model_cfg, flops_per_sample=flops_per_sample, steps_per_epoch=steps_per_epoch,
            total_steps=min(cfg.epochs * steps_per_epoch, cfg.max_steps or math.inf), signals=signals,
            guard=NonFiniteGuard(accelerator, optimizer), watch=core_watch(cfg, accelerator.device),
            reported_step=plan.reported_step)
    scheduler = make_scheduler(cfg, accelerator, optimizer, r.total_steps)
    state = resumed.restore(accelerator, optimizer, cfg.seed) if resumed else TrainState()
    runner = make_runner(r, scheduler, train_loader)
    scorer = Scorer.for_run(accelerator, run_data, r.data_path, cfg)
    selection = ModelSelection(cfg, accelerator, scorer, model_cfg, run_data.validation is not None)
    if resumed:
        selection.resumed(model, state, resumed)  # its best model, checked

    if accelerator.is_main_process:  # only now: bad data, flags and checkpoints have all been refused
        runs.clear(plan)
    hosts = process_hosts(accelerator)  # to name a peer that stalls
    run_id = tracking.start_run(cfg, accelerator, config, resumed.state["run_id"] if plan.continues else None,
                                len(run_data.train))
    report = Reporter(accelerator, cfg.output_dir, r.total_steps, state.global_step if resumed else None,
                      flops_per_sample)
    selection.write_best(state)  # resumed: the checkpoint's best model, into this run's best/ (a fresh run: none)
    report.say(reporting.banner(r, resumed, state))
    extra = {"world_size": accelerator.num_processes, "global_batch_size": cfg.global_batch(accelerator.num_processes),
             "config": config, "run_id": run_id, **resume.began_with(resumed, cfg), "data": run_data.fingerprint}
    gc.freeze()  # full collections no longer walk the imports' objects: no process stalls the all-reduce for one
    timings["setup"] = time.perf_counter() - began  # model, optimizer, prepare, device copies, trackers

    r.stalls = StallWatch(accelerator, cfg.output_dir, cfg.timeout, state.global_step)  # closed below, in any case
    runner.on_step = r.stalls.step
    epoch_test = None  # the test metrics of the last epoch, without a validation split
    try:
        if r.stop_requested():  # stopped during start-up: nothing to save yet
            report.say(f"mnist_dist: stopped by {stop_reason(signals)} during start-up; nothing new to save")
            raise Preempted(resumed and resumed.path)
        for _ in range(state.epoch, r.epochs):  # bounded: whatever a checkpoint said, no epoch is evaluated twice
            if (state.global_step >= r.total_steps or state.stopped_early) and state.evaluated():
                break
            train_epoch(r, state, runner, selection, report, extra)
            epoch_test = end_epoch(r, state, selection, report)
            path = save_checkpoint(r, state, selection, extra)
            if state.batch_in_epoch or state.stopped_early:  # --max-steps or early stopping ended the run here
                break
            if state.epoch < r.epochs and r.stop_requested():  # during evaluation
                preempt(signals, report, state.global_step, path)
    except (Preempted, TrainingError, DiskError, EvaluationError):  # every process raises these at the same step
        _shutdown(accelerator)
        raise
    except RuntimeError as err:  # a collective timed out (a peer stalled) or its connection broke (a peer died)
        if not lost_peer(err):
            raise
        r.stalls.dump(f"a collective failed after step {state.global_step}", err)
        raise LostPeers(peers_message(accelerator, hosts, cfg.timeout, state.global_step, err, r.stalls.missing(),
                                      r.stalls.dir)) from err
    finally:
        r.stalls.close()
        report.close()

    timings |= {"train": state.train_seconds, "capture": runner.capture_seconds,  # capture: part of train
                "eval": sum(h["eval_seconds"] for h in state.history) + state.validation_seconds}
    return finish(r, state, selection, report, epoch_test, timings)


def train_epoch(r: Run, state: TrainState, runner: StepRunner, selection: ModelSelection, report: Reporter,
                extra: dict) -> None:
    """The optimizer steps of an epoch from `state`'s position, in stretches between checks: each check
    logs, compares notes with the other processes, validates (--eval-every) and checkpoints when due."""
    cfg, model, total, per_epoch = r.cfg, r.model, r.total_steps, r.steps_per_epoch
    timed_since = time.perf_counter()  # training time runs from here to the next checkpoint
    runner.begin_epoch(state.epoch, state.batch_in_epoch)
    model.train()
    while state.batch_in_epoch < per_epoch and state.global_step < total and not state.stopped_early:
        start = state.batch_in_epoch
        stop = start + steps_to_next_check(r, state, runner.logs_live)
        runner.run(start, stop)  # steps [start, stop) of this epoch, no host sync between them
        real_samples = [step_samples(i, len(r.data.train), cfg.global_batch(r.accelerator.num_processes))
                        for i in range(start, stop)]
        windows, first_bad_loss = state.add_steps(runner.step_losses(start, stop), real_samples, cfg.log_every,
                                                  runner.step_norms())
        if state.seconds_to_first_step is None:  # a fresh run's first stretch
            state.seconds_to_first_step = runner.seconds_to_first_step
        report.advance(stop - start)
        # the processes compare notes (one host sync) only here, never every step
        stop, first_bad = agree_to_stop(r.accelerator, r.signals.reason() is not None, r.guard.bad_steps,
                                        state.global_step, first_bad_loss)
        r.stalls.pause()  # logs, evaluations and checkpoints may take longer than --timeout: no steps there
        if first_bad is not None:
            raise TrainingError(reporting.non_finite_message(first_bad, state.epoch, cfg.output_dir))
        report.log_windows(windows, state, r.optimizer, per_epoch, time.perf_counter() - timed_since)
        if r.watch:  # a program that started or stopped since changes the threads worth using
            r.watch.recheck(report.say)
        if selection.due(state, per_epoch, total):  # an --eval-every point
            timed_since += validate_inside_epoch(selection, model, state, report)  # not training time
        if stop or checkpoint_due(r, state):
            state.train_seconds += time.perf_counter() - timed_since
            path = save_checkpoint(r, state, selection, extra)
            timed_since = time.perf_counter()
            if stop:
                preempt(r.signals, report, state.global_step, path)
    state.train_seconds += time.perf_counter() - timed_since


def steps_to_next_check(r: Run, state: TrainState, logs_live: bool) -> int:
    """Steps from here to the next point where the host looks: the epoch's end or the run's, a
    checkpoint, a validation, or (where the runner logs live) a log point."""
    cfg, step = r.cfg, state.global_step
    ends = [r.steps_per_epoch - state.batch_in_epoch, r.total_steps - step]
    # --eval-every is None without a validation split (refused with --eval-every)
    for every in ([cfg.log_every] if logs_live else []) + [e for e in (cfg.checkpoint_every, cfg.eval_every) if e]:
        ends.append(every - step % every)
    return min(ends)


def checkpoint_due(r: Run, state: TrainState) -> bool:
    """A --checkpoint-every point inside an epoch (epoch ends always get one, after their evaluation)."""
    inside = state.batch_in_epoch < r.steps_per_epoch and state.global_step < r.total_steps
    return bool(r.cfg.checkpoint_every) and state.global_step % r.cfg.checkpoint_every == 0 and inside


def finish(r: Run, state: TrainState, selection: ModelSelection, report: Reporter, epoch_test: dict | None,
           timings: dict) -> dict:
    """The final model's results, its files and pictures, the trackers' summary; returns the results."""
    # the final model's: the last epoch's score, unless that was the validation split's (or nothing was trained)
    metrics = epoch_test if epoch_test is not None else selection.scorer.score(r.model, "test")
    results = reporting.results_of(r, state, metrics, timings) | selection.results(r.model, state, r.data)
    reporting.write_outputs(r, results, report)
    tracking.finish(r.accelerator, r.cfg, reporting.run_summary(results))
    stopped = r.stop_requested()  # a signal while the outputs were written
    _shutdown(r.accelerator)
    if stopped:
        report.say(f"mnist_dist: stopped by {stop_reason(r.signals)} after writing the outputs; the run is complete")
        raise Preempted(Path(r.cfg.output_dir))
    return results


def end_epoch(r: Run, state: TrainState, selection: ModelSelection, report: Reporter) -> dict | None:
    """Evaluate (the validation split if there is one, else the test set), add the epoch to the history, say
    and log it; move the state to the next epoch unless --max-steps or early stopping ended this one early.
    Returns the test metrics, or None where the validation split was scored."""
    accelerator = r.accelerator
    mine = torch.tensor(state.epoch_loss_sum, dtype=torch.float32, device=accelerator.device)
    train_loss = accelerator.reduce(mine, reduction="sum").item() / state.epoch_samples
    if state.history and state.history[-1]["epoch"] == state.epoch + 1:
        state.history.pop()  # this epoch's first part, up to an earlier run's --max-steps
    seconds = state.train_seconds - sum(h["seconds"] for h in state.history)
    began = time.perf_counter()
    if selection.active:  # None: validated at this step already (an --eval-every point), and logged then
        split, scored = "val", selection.validate(r.model, state, report)
        logged, scored = scored is None, scored or state.last_validation
        best = {} if logged else {"val/best_accuracy": state.best_val_accuracy}
    else:
        split, scored, best, logged = "test", selection.scorer.score(r.model, "test"), {}, False
    memory = per_process(accelerator, peak_memory_mib(accelerator.device))  # MiB, by rank
    flops = report.flops_per_second(state.epoch_samples, seconds)
    state.history.append({"epoch": state.epoch + 1, "train_loss": train_loss,
                          **{f"{split}_{name}": scored[name] for name in SCORES}, "seconds": seconds,
                          "eval_seconds": time.perf_counter() - began, "samples": state.epoch_samples,
                          "peak_memory_mib": memory, "model_flops_per_second": flops})
    said = (f"epoch {state.epoch + 1}/{r.epochs}: train_loss {train_loss:.4f}",
            f"({seconds:.2f} s, {state.epoch_samples / seconds:,.0f} samples/s, "
            + (f"{flops / 1e9:,.2f} model GFLOP/s, " if flops is not None else "")
            + f"peak memory {max(memory):,.0f} MiB)")
    report.evaluation(split, scored, state.global_step, {
        **best, "train/epoch_loss": train_loss, "epoch": state.epoch + 1, "epoch_seconds": seconds,
        **({"perf/model_flops_per_second": flops} if flops is not None else {}), "perf/peak_memory_mib": max(memory)},
        said, logged_before=logged)
    if state.batch_in_epoch == r.steps_per_epoch:
        state.samples_seen += state.epoch_samples
        state.epoch, state.batch_in_epoch, state.epoch_loss_sum, state.epoch_samples = state.epoch + 1, 0, 0.0, 0
    # else --max-steps or early stopping ended the run inside the epoch: its checkpoint stays there, so that
    # resuming with more steps finishes this epoch rather than skipping to the next
    return None if selection.active else scored


def validate_inside_epoch(selection: ModelSelection, model, state: TrainState, report: Reporter) -> float:
    """An --eval-every validation, logged; returns the seconds it took (not training time)."""
    began = time.perf_counter()
    scored = selection.validate(model, state, report)
    if scored is not None:
        report.evaluation("val", scored, state.global_step, {"val/best_accuracy": state.best_val_accuracy})
    seconds = time.perf_counter() - began
    state.validation_seconds += seconds
    return seconds


def save_checkpoint(r: Run, state: TrainState, selection: ModelSelection, extra: dict) -> Path:
    """A checkpoint of `state`, the prepared objects and the best model so far (all processes call this);
    `extra`: what every checkpoint of the run records besides."""
    return checkpoint.save(r.accelerator, r.cfg.output_dir, {**state.gather_for_checkpoint(r.accelerator), **extra},
                           r.cfg.keep_checkpoints, r.model_cfg, selection.checkpoint_copy(), spare=r.reported_step)


def make_runner(r: Run, scheduler, train_loader) -> StepRunner:
    """What runs the steps of an epoch on the run's data path: the captured epoch, or the reference step;
    with --profile, under the profiler."""
    cfg, accelerator, train_set, stats = r.cfg, r.accelerator, r.data.train, r.data.stats
    device = accelerator.device
    if r.data_path == "graph":
        runner = EpochGraph(r.model, r.optimizer, r.guard, normalize(train_set.images.to(device), *stats),
                            train_set.labels.to(device), cfg.batch_size, cfg.seed, cfg.label_smoothing)
    else:
        batches = train_loader if r.data_path == "dataloader" else DeviceBatches(
            train_set, cfg.batch_size, cfg.seed, accelerator.process_index, accelerator.num_processes, device)
        runner = EagerSteps(accelerator, r.model, r.optimizer, scheduler=scheduler, guard=r.guard, batches=batches,
                            cfg=cfg, train_len=len(train_set), stats=stats)
    return ProfiledSteps(runner, cfg.profile, accelerator.is_main_process, device) if cfg.profile else runner


def run_config(cfg: TrainConfig, accelerator, resumed: Resume | None) -> dict:
    """The config that checkpoints, results and trackers record, precision and compiler resolved; on a
    resume, checked against the checkpoint's."""
    config = {**cfg.to_dict(), "mixed_precision": accelerator.mixed_precision, "torch_compile": compiled_with(accelerator)}
    if resumed:
        resumed.check_compatible(config)
    return config


def model_for_run(cfg: TrainConfig, run_data, accelerator, resumed: Resume | None, signals: StopSignals):
    """The model the run trains (checked on batches; a resume's must be its checkpoint's network), its
    config.json and the FLOPs of training on a sample (counted once, on a copy)."""
    # code of yours may never return (a stop ends it there), and must leave the process as it found it
    with signals.at_once(f"building --model {cfg.model}"), left_as_found(cfg.model):
        model, model_cfg = new_model(cfg, run_data.train.class_names, run_data.stats, accelerator.device)
        flops_per_sample = training_flops_per_sample(model, INPUT_SIZE)
    if resumed:
        resumed.check_model(model, cfg.model)
    return model, model_cfg, flops_per_sample


def stop_reason(signals: StopSignals) -> str:
    return signals.reason() or "another process's stop request"


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
    except (ConfigError, DataError, LaunchError, CheckpointError, runs.RunDirError, TrainingError,
            EvaluationError) as err:
        failed = isinstance(err, (TrainingError, EvaluationError))  # 1: the training failed; 2: fix the command
        if failed or os.environ.get("RANK", "0") == "0":  # a bad command fails alike everywhere: said once
            print(f"mnist_dist.train: error: {err}", file=sys.stderr)
        return 1 if failed else 2
    except (DiskError, LostPeers) as err:  # nothing the command did: the checkpoints stay, resume once it is mended
        print(f"mnist_dist.train: error: {err}", file=sys.stderr)
        return EXIT_OUTSIDE
    except RuntimeError as err:
        if not lost_peer(err):
            raise
        print(f"mnist_dist.train: error: the processes lost each other while starting or ending ({err}); "
              "see --timeout", file=sys.stderr)
        return EXIT_OUTSIDE
    except Preempted:
        return EXIT_PREEMPTED
    except StoppedAtOnce as stop:
        print(f"mnist_dist: stopped by {stop}", file=sys.stderr)
        return EXIT_PREEMPTED
    finally:
        # free the DDP model, which holds the process group, while Python is fully alive: left
        # to interpreter shutdown, gloo's threads can abort a finished run with SIGABRT
        gc.unfreeze()
        gc.collect()
    return 0


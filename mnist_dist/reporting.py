"""What a run tells people and keeps: the progress bar and the lines it says, the trackers and
metrics.jsonl (`Reporter`), and at the end results.json, the model and its pictures (`write_outputs`);
results.json read back and checked (`read_results`), as a resume and a sweep decide by it.

Only the main process says or writes anything; collectives (the loss sums, each process's peak memory)
are taken by every process.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from tqdm.auto import tqdm

from . import atomic, checkpoint, tracking
from .checkpoint import CheckpointError, DiskError
from .config import SCORES
from .distributed import any_process, compiled_with, per_process, threads_from, threads_reproducible
from .model import CONFIG_NAME, WEIGHTS_NAME, describe, weights_sha256
from .readback import UnreadableFile, read_json, shown
from .resources import FLOPS_COUNTED_BY, MEMORY_MEASURED, model_flops_per_second, peak_memory_mib
from .train_state import TrainState

if TYPE_CHECKING:  # only named in annotations: `runs` reads results.json through this module
    from .loop import Run
    from .resume import Resume
    from .runs import Plan

RESULTS_NAME = "results.json"  # written last: a run with one that describes its model is finished


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, a stalled peer); the message names the step."""


class Reporter:
    """What the main process tells people and trackers: a progress bar at a terminal, one line per
    epoch, Accelerate's trackers and metrics.jsonl. The other processes stay quiet."""

    def __init__(self, accelerator, output_dir: str, total_steps: int, resumed_at: int | None,
                 flops_per_sample: float):
        self.accelerator, self.main, self.flops_per_sample = accelerator, accelerator.is_main_process, flops_per_sample
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

    def evaluation(self, split: str, scored: dict, step: int, values: dict, line: tuple[str, str] | None = None,
                   logged_before: bool = False) -> None:
        """An evaluation of `split` at `step`: its scores logged as {split}/loss, {split}/accuracy (`SCORES`;
        unless `logged_before`) with `values` (the epoch's, the best accuracy so far) and, given `line` (what
        comes before and after them), said: "{before}  {split}_loss L  {split}_accuracy A  {after}"."""
        scores = {} if logged_before else {f"{split}/{name}": scored[name] for name in SCORES}
        self.log({**scores, **values}, step)
        if line:
            before, after = line
            self.say("  ".join([before, *(f"{split}_{name} {scored[name]:.4f}" for name in SCORES), after]))

    def flops_per_second(self, samples: int, seconds: float) -> float:
        """Training FLOP/s of `samples` trained in `seconds` (`resources.training_flops_per_sample`)."""
        return model_flops_per_second(self.flops_per_sample, samples, seconds)

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


def results_of(run: Run, state: TrainState, metrics: dict, timings: dict) -> dict:
    """results.json: the run's final test metrics, its history and what it ran on (a collective: each
    process's peak memory). Every test_* number is the final model's; the history's per-epoch numbers are
    the validation split's (val_*) where there is one, else the test set's (test_*)."""
    cfg, accelerator, splits, flops_per_sample = run.cfg, run.accelerator, run.data, run.flops_per_sample
    world, train_len, stats = accelerator.num_processes, len(splits.train), splits.stats
    reason = "early_stopping" if state.stopped_early else "max_steps" if cfg.max_steps == run.total_steps else "epochs"
    samples_seen = state.samples_seen + state.epoch_samples  # epoch_samples: a cut-short epoch's
    peak_memory = per_process(accelerator, peak_memory_mib(accelerator.device))  # MiB, by rank
    return {
        "dataset": cfg.dataset, **{f"test_{name}": metrics[name] for name in SCORES},
        "test_samples": metrics["samples"], "stopped": {"reason": reason, "step": state.global_step},
        "train_samples": train_len, "epochs": len(state.history), "steps": state.global_step,
        "samples_seen": samples_seen, "world_size": world, "per_process_batch_size": cfg.batch_size,
        "global_batch_size": cfg.global_batch(world), "mixed_precision": accelerator.mixed_precision,
        "torch_compile": compiled_with(accelerator),  # Accelerate's dynamo_backend, lower case; "no" when off
        "data_path": run.data_path,  # resolved: --data-path auto picks one
        "device_type": accelerator.device.type, "train_seconds": state.train_seconds,
        "cpu_threads": torch.get_num_threads() if accelerator.device.type == "cpu" else None,
        "cpu_threads_from": threads_from(cfg) if accelerator.device.type == "cpu" else None,
        # MKL in strict reproducibility mode: the same weights at any thread count (distributed.threads_reproducible)
        "cpu_threads_reproducible": threads_reproducible() if accelerator.device.type == "cpu" else None,
        "samples_per_second": samples_seen / state.train_seconds,
        "flops_per_sample": flops_per_sample, "flops_counted_by": FLOPS_COUNTED_BY,  # training: forward and backward
        "model_flops_per_second": model_flops_per_second(flops_per_sample, samples_seen, state.train_seconds),
        "peak_memory_mib": peak_memory, "peak_memory_measured": MEMORY_MEASURED.get(accelerator.device.type,
                                                                                   MEMORY_MEASURED["cpu"]),
        "deterministic": torch.are_deterministic_algorithms_enabled(),  # --deterministic
        "seconds_to_first_step": state.seconds_to_first_step,
        "timings": timings,  # this process's wall time by phase, seconds (train and eval: across resumes)
        "normalization": {"mean": stats[0], "std": stats[1]},
        "per_class_accuracy": dict(zip(splits.train.class_names, metrics["per_class_accuracy"])),
        "confusion_matrix": metrics["confusion_matrix"],  # [true class][predicted class], counts
        "history": state.history, "config": cfg.to_dict(),
    }


def write_outputs(run: Run, results: dict, report: Reporter) -> None:
    """The model, config.json, the pictures (also to the trackers) and, last, results.json, whose
    presence marks a finished run. All processes call this; the main process writes."""
    output_dir, bad = run.cfg.output_dir, non_finite(results)
    if bad:  # before anything is written: results.json is strict JSON
        raise TrainingError(f"the final evaluation gave a non-finite {bad} (the model's outputs overflow); nothing was "
                            f"written to {output_dir}. Lower --lr, or resume an earlier checkpoint with fewer steps")
    failure = None
    try:
        write_model_and_pictures(run, Path(output_dir), results, report)
    # torch and safetensors report a full disk as RuntimeError too; ValueError: a non-finite number for JSON
    except (OSError, RuntimeError, SafetensorError, ValueError) as err:
        failure = checkpoint.write_failure(Path(output_dir), err)
    if any_process(run.accelerator, failure is not None):  # the main process writes; every process stops alike
        raise DiskError(failure or f"the main process could not write the outputs to {output_dir}")


def draw_pictures(run: Run, model, output_dir: Path, results: dict) -> dict:
    """The run's pictures of the plain `model` in `output_dir`, and to the trackers (main process): name -> path."""
    from . import plots  # matplotlib and torchvision: about 1 s of start-up that only the main process needs, at the end

    epochs = results["epochs"]
    title = f"{results['dataset']}, {epochs} epoch{'s' if epochs != 1 else ''}, recipe {results['config']['recipe']}"
    pictures = {"training_curves": plots.training_curves(results["history"], output_dir / "training_curves.png",
                                                         title, results["config"]["label_smoothing"]),
                **plots.test_pictures(output_dir, results["confusion_matrix"], model, run.data.test, run.data.stats,
                                      title)}
    tracking.log_images(run.accelerator, pictures, results["steps"])
    return pictures


def non_finite(value, name: str = "") -> str | None:
    """The name of the first NaN or infinite number in `value` (nested dicts and lists), or None."""
    if isinstance(value, float):
        return None if math.isfinite(value) else name or "number"
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    return next((bad for key, item in items if (bad := non_finite(item, f"{name}.{key}" if name else str(key)))), None)


def write_model_and_pictures(run: Run, output_dir: Path, results: dict, report: Reporter) -> None:
    """`write_outputs` without the translation of a full disk into an error."""
    accelerator, began = run.accelerator, time.perf_counter()
    accelerator.wait_for_everyone()
    # the plain module, never its torch.compile wrapper: that one's weights are saved as "_orig_mod.fc1.weight"
    # (pytorch/pytorch#101107), and unwrapping it while keeping the wrapper puts the bare module inside it
    plain_model = accelerator.unwrap_model(run.model, keep_torch_compile=False)
    accelerator.save_model(plain_model, output_dir)  # model.safetensors, written by the main process
    if not accelerator.is_main_process:
        return
    atomic.write_json(output_dir / CONFIG_NAME, run.model_cfg)
    pictures = (draw_pictures(run, plain_model, output_dir, results)
                if results["config"]["pictures"] else {})
    results["timings"]["outputs"] = time.perf_counter() - began  # model file, pictures, W&B images
    # last, naming the model files it describes: a kill before it leaves the earlier results.json, which
    # `check_results` then finds out of step with them
    results["model_sha256"] = weights_sha256(output_dir / WEIGHTS_NAME)
    if results.get("best", {}).get("model_dir"):
        results["best"]["model_sha256"] = weights_sha256(output_dir / checkpoint.BEST_DIR / WEIGHTS_NAME)
    atomic.write_json(output_dir / RESULTS_NAME, results)
    checkpoint.rotate_after_outputs(output_dir, results["config"]["keep_checkpoints"])  # a spared one may go now
    report.say(f"mnist_dist: test_accuracy {results['test_accuracy']:.4f}; wrote {output_dir}/results.json"
               + (f" and {', '.join(p.name for p in pictures.values())}" if pictures else ""))


def run_summary(results: dict) -> dict:
    """The W&B run summary: the final test accuracy and, with a validation split, the best model's."""
    best = results.get("best") or {}
    return {"final_test_accuracy": results["test_accuracy"], "stopped": results["stopped"]["reason"],
            **({"best_val_accuracy": best["val_accuracy"], "best_step": best["step"]} if best else {}),
            **({"best_model_test_accuracy": best["test_accuracy"]} if "test_accuracy" in best else {})}


def as_flags(values: dict) -> str:
    """{"dataset": "mnist-5k", "cpu": True} -> "--dataset mnist-5k --cpu", as on a command line."""
    flags = [f"--{'' if value else 'no-'}{name}" if isinstance(value, bool) else f"--{name} {value}"
             for name, value in ((name.replace("_", "-"), value) for name, value in values.items())]
    return " ".join(flags)


def banner(run: Run, resumed: Resume | None, state: TrainState) -> str:
    """What this run is, said just before it trains; a resumed run on another world size says so too."""
    cfg, accelerator, splits, model_cfg, flops_per_sample = run.cfg, run.accelerator, run.data, run.model_cfg, run.flops_per_sample
    world, n = accelerator.num_processes, cfg.gradient_accumulation_steps
    saved = resumed and resumed.state
    val = f" / {len(splits.validation)} validation ({splits.validation_source})" if splits.validation else ""
    text = (f"mnist_dist: {len(splits.train)} train{val} / {len(splits.test)} test samples, {world} process(es) on "
            f"{accelerator.device.type}, global batch {cfg.global_batch(world)}"
            + (f" ({world} x {cfg.batch_size} x {n} accumulated)" if n > 1 else "")
            + f", precision {accelerator.mixed_precision}, "
            + (f"torch.compile {run.config['torch_compile']}, " if run.config["torch_compile"] != "no" else "")
            + f"data path {run.data_path}; {cfg.output_dir}"
            + (f", resuming from {resumed.path} (step {state.global_step})" if resumed else "")
            + f"\nmnist_dist: model {describe(model_cfg)}: {model_cfg['parameters']:,} parameters, "
            + (f"{flops_per_sample / 1e6:,.2f} MFLOP to train on a sample" if flops_per_sample is not None else
               "FLOPs not counted"))
    was_n = saved["config"]["gradient_accumulation_steps"] if saved else n
    if saved and saved["world_size"] != world:
        was = f"{saved['global_batch_size'] // saved['world_size'] // was_n}" + (f" x {was_n}" if was_n > 1 else "")
        text += (f"\nmnist_dist: the world size changed from {saved['world_size']} to {world}: each process now takes "
                 + (f"{cfg.batch_size} samples per " + ("step" if n == 1 else f"batch, {n} batches per step"))
                 + f" (was {was}), so the global batch ({cfg.global_batch(world)}), the data order and the "
                 "trajectory stay the same, up to the order in which floating-point sums are added")
    return text


def say_finished(accelerator, plan: Plan) -> dict:
    """--resume auto on a finished run: say so (main process), change nothing, return its results."""
    results = plan.finished
    early = stopped_early(results)
    if accelerator.is_main_process:
        further = ("it stopped early (--early-stopping-patience)" if early else "to train further, raise --epochs or "
                   "--max-steps with --resume auto (--schedule constant only: a schedule is laid over all the steps)")
        print(f"mnist_dist: {plan.output_dir} holds a finished run ({results['steps']} steps, test accuracy "
              f"{results['test_accuracy']:.4f}); nothing to resume. {further[0].upper()}{further[1:]}; to start "
              "over, use --overwrite.")
    return results


def non_finite_message(step: int, epoch: int, output_dir: str) -> str:
    """What a non-finite loss at `step` means, and where the last good checkpoint is."""
    try:
        saved = checkpoint.complete_checkpoints(output_dir)[-1:]
        where = (f"the checkpoints in {checkpoint.checkpoints_root(output_dir)} hold the last good state (step "
                 f"{checkpoint.read_state(saved[0])['global_step']})" if saved else "no checkpoint was saved before it")
    except CheckpointError:
        where = f"see {checkpoint.checkpoints_root(output_dir)} for the last good state"
    return (f"non-finite training loss or gradients at step {step} (epoch {epoch + 1}); the weights are those "
            f"of step {step - 1}, nothing after it was applied or saved. Lower --lr or try --mixed-precision no; "
            f"{where}.")


def read_results(output_dir: Path) -> tuple[dict | None, int | None]:
    """results.json in `output_dir`, checked (`check_results`), or None where there is none; and the step it
    reports, also where it no longer matches the model files (a resume that went on was stopped): the
    checkpoint of that step is spared until new outputs exist. One that fails the check is skipped with a
    warning: the run is not finished, and a resume writes its outputs again."""
    path, reported = output_dir / RESULTS_NAME, None
    try:
        results = read_json(path)
        steps = results.get("steps") if isinstance(results, dict) else None
        reported = steps if type(steps) is int else None
        check_results(results, path)
        return results, reported
    except FileNotFoundError:
        return None, None
    except UnreadableFile as err:
        print(f"mnist_dist: warning: skipping {err}; the run counts as unfinished")
        return None, reported


def check_results(results, path: Path) -> None:
    """The fields of results.json that decide what a resume does, and that it describes the model files
    beside it (their sha256): a write killed between the model and results.json leaves them out of step."""
    def need(ok: bool, key: str, what: str) -> None:
        if not ok:
            value = shown(results.get(key)) if isinstance(results, dict) else ""
            raise UnreadableFile(str(path), f"field {key!r} ({value}) {what}")

    need(isinstance(results, dict), "steps", "the file must hold a JSON object")
    for key, least in (("steps", 0), ("train_samples", 1), ("global_batch_size", 1)):
        need(type(results.get(key)) is int and results[key] >= least, key, f"must be an integer >= {least}")
    accuracy = results.get("test_accuracy")
    need(type(accuracy) in (int, float) and 0 <= accuracy <= 1, "test_accuracy", "must be a number from 0 to 1")
    need(isinstance(results.get("stopped", {}), dict), "stopped", "must be an object")
    best = results.get("best") or {}
    need(isinstance(best, dict), "best", "must be an object")
    # older results.json files carry no sha256: nothing to compare
    for recorded, weights in ((results.get("model_sha256"), path.parent / WEIGHTS_NAME),
                              (best.get("model_sha256"), path.parent / checkpoint.BEST_DIR / WEIGHTS_NAME)):
        if recorded is not None and recorded != weights_sha256(weights):
            raise UnreadableFile(str(path), f"describes another model than {weights} (writing the outputs was "
                                 "interrupted)")


def stopped_early(results: dict) -> bool:
    """Whether results.json says --early-stopping-patience ended the run."""
    stopped = results.get("stopped")
    return isinstance(stopped, dict) and stopped.get("reason") == "early_stopping"

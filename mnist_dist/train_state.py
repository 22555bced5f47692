"""The training state: where a run is and what it has added up (`TrainState`, what the loop updates), its
JSON in each checkpoint (training_state.json), and every check of that JSON before any of it is used:
`read` refuses a file that is damaged, of another format or at odds with itself, naming file and field.
"""

from __future__ import annotations

import copy
import functools
import itertools
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from .config import MAX_BATCH, NOT_INHERITED, SCORES, ConfigError, TrainConfig, flags
from .readback import UnreadableFile, is_count, is_number, read_json, shown

STATE_NAME = "training_state.json"
# bumped when a field is added or changes meaning: an older training state is refused by its format, never
# read with guesses for what it lacks (its model.safetensors and config.json still load for evaluate and predict)
STATE_FORMAT = 4
# what every training_state.json holds besides TrainState's fields
STATE_KEYS = ("format", "global_step", "world_size", "global_batch_size", "batch_size_flag", "accumulation_flag",
              "config", "run_id", "data")
PER_PROCESS = ("epoch_loss_sum", "window_loss_sum")  # saved as lists, one per process: epoch_loss_sums, ...


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message names the directory."""


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

    def evaluated(self) -> bool:
        """Whether the position reached has been evaluated: an epoch's start, or where --max-steps or early
        stopping ended one.
        A checkpoint saved on a stop signal at an epoch's or the run's end has not."""
        last = self.history[-1] if self.history else None
        return self.batch_in_epoch == 0 or (last is not None and last["epoch"] == self.epoch + 1
                                            and last["samples"] == self.epoch_samples)

    def gather_for_checkpoint(self, accelerator) -> dict:
        """This state as training_state.json holds it, with every process's loss sums gathered (a collective:
        every process calls it)."""
        mine = torch.tensor([[self.epoch_loss_sum, self.window_loss_sum]], device=accelerator.device)
        sums = accelerator.gather(mine).cpu().tolist()
        state = {k: v for k, v in asdict(self).items() if k not in PER_PROCESS}
        return {**state, "epoch_loss_sums": [s[0] for s in sums], "window_loss_sums": [s[1] for s in sums]}

    @classmethod
    def from_checkpoint(cls, saved: dict, rank: int, world: int) -> "TrainState":
        """The state in a checkpoint's training_state.json (`saved`), as process `rank` of `world` continues
        it. On another world size than the checkpoint's, process 0 carries the loss sums' totals."""
        names = [k for k in cls.__dataclass_fields__ if k not in PER_PROCESS]
        sums = [saved["epoch_loss_sums"], saved["window_loss_sums"]]
        if len(sums[0]) == world:
            mine = [s[rank] for s in sums]
        else:  # added in float32, as the processes' sums are when an epoch ends
            mine = [float(np.sum(s, dtype=np.float32)) if rank == 0 else 0.0 for s in sums]
        return cls(**{k: saved[k] for k in names}, epoch_loss_sum=mine[0], window_loss_sum=mine[1])


def read(file: Path) -> dict:
    """The training state in `file` (a checkpoint's training_state.json), checked field by field: parsed and
    checked once per version of the file (its inode, time and size), however often a start asks for it."""
    try:
        found = file.stat()
        version = (found.st_ino, found.st_mtime_ns, found.st_size)
        return copy.deepcopy(_read_version(Path(os.path.abspath(file)), version))  # callers may change their copy
    except FileNotFoundError:
        raise CheckpointError(f"{file.parent}: incomplete checkpoint (no {STATE_NAME})") from None
    except OSError as err:
        raise CheckpointError(f"damaged checkpoint: {file}: unreadable ({err.strerror or err})") from None
    except UnreadableFile as err:
        raise CheckpointError(f"damaged checkpoint: {err}") from None


@functools.lru_cache(maxsize=64)  # a start reads a run's few checkpoints: its scan, then the newest again
def _read_version(file: Path, version: tuple) -> dict:
    state = read_json(file)
    if not isinstance(state, dict) or "format" not in state:
        raise CheckpointError(f"{file}: not a mnist_dist training state")
    if state["format"] != STATE_FORMAT:
        older = type(state["format"]) is int and state["format"] < STATE_FORMAT
        raise CheckpointError(
            f"{file}: written by {'an earlier' if older else 'another'} mnist_dist (training state format "
            f"{shown(state['format'])}; this one reads format {STATE_FORMAT}): finish the run with the version that "
            "wrote it, or start it again; its model.safetensors and config.json still load for evaluate and predict")
    missing = [key for key in STATE_KEYS if key not in state]
    if missing:
        raise CheckpointError(f"{file}: damaged, it lacks {', '.join(missing)}")
    check_state(state, file)
    return state


def check_state(state: dict, file: Path) -> None:
    """Refuse a training state with a field of the wrong type, out of range or at odds with the others,
    naming the file and the field: nothing in it is used before it has passed."""
    missing = [key for key in (f"{f.name}s" if f.name in PER_PROCESS else f.name for f in fields(TrainState))
               if key not in state]
    if missing:
        raise CheckpointError(f"{file.parent}: {STATE_NAME} of this checkpoint lacks {', '.join(missing)}")

    def need(ok: bool, key: str, what: str) -> None:
        if not ok:
            raise CheckpointError(f"{file}: damaged, field {key!r} ({shown(state.get(key))}) {what}")

    for key in ("global_step", "world_size", "global_batch_size", "batch_size_flag", "accumulation_flag"):
        need(is_count(state[key], 1), key, "must be an integer >= 1")
    for key in ("epoch", "batch_in_epoch", "samples_seen", "epoch_samples", "window_samples", "window_norm_steps"):
        need(is_count(state[key], 0), key, "must be an integer >= 0")
    for key in ("window_norm_sum", "train_seconds", "seconds_to_first_step", "validation_seconds"):
        need(is_number(state[key], 0) or (state[key] is None and key == "seconds_to_first_step"), key,
             "must be a finite number >= 0")
    for key in ("epoch_loss_sums", "window_loss_sums"):  # one per process that saved the checkpoint
        sums = state[key]
        need(isinstance(sums, list) and len(sums) == state["world_size"] and all(is_number(x) for x in sums), key,
             f"must be {state['world_size']} finite numbers, one per process")
    need(isinstance(state["run_id"], str) and bool(state["run_id"]), "run_id", "must be a non-empty string")
    need(isinstance(state["data"], dict) and all(isinstance(state["data"].get(s), dict) and is_count(
        state["data"][s].get("samples"), 1) for s in ("train", "test")), "data", "must give each split's samples")
    need(isinstance(state["config"], dict), "config", "must be an object")
    lacks = [f.name for f in flags() if f.name not in state["config"]]
    need(not lacks, "config", f"must hold every flag, and lacks {', '.join(lacks)}")
    try:
        # where the run was and what to do with it are never taken from a checkpoint (a --profile
        # directory may since have become a file): not checked either
        config = TrainConfig(**{f.name: state["config"][f.name] for f in flags() if f.name not in NOT_INHERITED})
        config.validate()
    except ConfigError as err:
        raise CheckpointError(f"{file}: damaged, field 'config': {err}") from None
    _check_position(state, config, need)
    _check_history(state, need)
    _check_selection(state, need)
    began = state["batch_size_flag"] * state["accumulation_flag"]  # of one process, when the run began
    need(state["batch_size_flag"] <= MAX_BATCH and state["global_batch_size"] % began == 0, "batch_size_flag",
         f"must be at most {MAX_BATCH:,}, and with accumulation_flag divide global_batch_size")


def _check_position(state: dict, config: TrainConfig, need) -> None:
    """The step, the position in the epoch and the sample counts agree with each other and with the config."""
    per_epoch, train_samples = steps_per_epoch(state), state["data"]["train"]["samples"]
    step, epoch, position = state["global_step"], state["epoch"], state["batch_in_epoch"]
    steps = config.gradient_accumulation_steps
    need(state["global_batch_size"] == state["world_size"] * config.batch_size * steps, "global_batch_size",
         f"must be world_size x config.batch_size x config.gradient_accumulation_steps ({state['world_size']} x "
         f"{config.batch_size} x {steps})")
    # == per_epoch: stopped at an epoch's end before its evaluation
    need(position <= per_epoch, "batch_in_epoch", f"must be at most the {per_epoch} steps of an epoch")
    need(step == epoch * per_epoch + position, "global_step",
         f"must be epoch x steps per epoch + batch_in_epoch ({epoch} x {per_epoch} + {position})")
    need(step <= min(config.epochs * per_epoch, config.max_steps or math.inf), "global_step",
         f"must be at most the steps its config asks for (--epochs {config.epochs}, --max-steps {config.max_steps})")
    need(state["samples_seen"] == epoch * train_samples, "samples_seen", f"must be epoch x {train_samples} samples")
    need(state["epoch_samples"] == min(position * state["global_batch_size"], train_samples), "epoch_samples",
         "must be the samples of the epoch's steps taken")
    need(state["window_samples"] <= step * state["global_batch_size"], "window_samples", "must be at most the samples seen")


def _check_history(state: dict, need) -> None:
    """One entry per evaluated epoch, numbered from 1, finite, scored on the validation split if the run has
    one, else on the test set."""
    history, epoch = state["history"], state["epoch"]
    need(isinstance(history, list) and len(history) in (epoch, epoch + 1), "history",
         f"must hold one entry per evaluated epoch ({epoch}, or {epoch + 1} after --max-steps)")
    split = "val" if "validation" in state["data"] else "test"  # the split each epoch was scored on
    for number, entry in enumerate(history, 1):
        need(isinstance(entry, dict) and entry.get("epoch") == number and is_count(entry.get("samples"), 0)
             and all(is_number(entry.get(k), 0) for k in ("train_loss", "seconds", "eval_seconds",
                                                          *(f"{split}_{name}" for name in SCORES)))
             and entry[f"{split}_accuracy"] <= 1,
             "history", f"entry {number} must be epoch {number} with finite losses, {split} accuracy and times")


def _check_selection(state: dict, need) -> None:
    """The best validation accuracy, its step, the evaluations since and the newest one."""
    best, step, last = state["best_val_accuracy"], state["best_step"], state["last_validation"]
    need(best is None or is_number(best, 0) and best <= 1, "best_val_accuracy", "must be an accuracy from 0 to 1")
    need((step is None) == (best is None) and (step is None or is_count(step, 1) and step <= state["global_step"]),
         "best_step", "must be the step of best_val_accuracy, at most global_step")
    since = state["evals_since_best"]
    need(is_count(since, 0), "evals_since_best", "must be an integer >= 0")
    stopped = state["stopped_early"]
    need(type(stopped) is bool and (not stopped or since >= 1), "stopped_early",
         "must be true or false, and true only after an evaluation without a better accuracy")
    # with --early-stopping-min-delta a rise smaller than it is not a new best: the best may trail by that much
    delta = state["config"]["early_stopping_min_delta"]
    scored = [h.get("val_accuracy") for h in state["history"] if isinstance(h, dict)]
    need(best is None or all(is_number(a) and a <= best + delta for a in scored), "best_val_accuracy",
         "must be at least the history's validation accuracies (less --early-stopping-min-delta)")
    need(last is None or isinstance(last, dict) and is_count(last.get("step"), 1) and last["step"] <= state["global_step"]
         and all(is_number(last.get(k), 0) for k in SCORES) and last["accuracy"] <= 1
         and is_count(last.get("samples"), 1) and last["step"] >= (step or 0), "last_validation",
         "must be the step (at least best_step), accuracy, loss and samples of the newest validation")
    need((last is None) == (best is None), "last_validation", "must be given with best_val_accuracy, and only then")


def steps_per_epoch(state: dict) -> int:
    """Optimizer steps in an epoch of the checkpoint's run: its training samples over its global batch."""
    return math.ceil(state["data"]["train"]["samples"] / state["global_batch_size"])

"""Checkpoints: Accelerate's `save_state` plus an explicit JSON of the training state.

A checkpoint is `OUTPUT_DIR/checkpoints/step_XXXXXXXX/`, built under a `.tmp` name and
renamed only once every process has written its part and `training_state.json` is on
disk, so a directory with that name is always complete. Re-saving a step first renames the
old copy to `.old`, which still counts as complete until the new one is in place. Resume
reads the step, epoch, position in the epoch, running loss sums and history from the JSON,
never from a name, and loads every file before it trusts a checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .config import MAX_BATCH, NOT_INHERITED, ConfigError, TrainConfig, flags
from .distributed import any_process
from .model import CONFIG_NAME, WEIGHTS_NAME
from .readback import UnreadableFile, parse_json, read_json, shown

STATE_NAME = "training_state.json"
STATE_FORMAT = 3
# what every training_state.json holds besides TrainState's fields
STATE_KEYS = ("format", "global_step", "world_size", "global_batch_size", "batch_size_flag", "config", "run_id", "data")
# TrainState's fields, checked before any is used (`check_state`)
STATE_FIELDS = ("epoch", "batch_in_epoch", "samples_seen", "epoch_samples", "window_samples", "train_seconds",
                "seconds_to_first_step", "history", "epoch_loss_sums", "window_loss_sums")
HISTORY_NUMBERS = ("train_loss", "seconds", "eval_seconds")
BEST_DIR = "best"  # OUTPUT_DIR/best: the model of the best validation accuracy (--keep-best)
BEST_IN_CHECKPOINT = "best.safetensors"  # a checkpoint's copy of best/model.safetensors as it was then
BEST_KEY = "mnist_dist_best"  # best/model.safetensors' metadata: {"step", "val_accuracy"} as JSON
# config fields that shape the trajectory: a resumed run must use the same values
# (the batch: the global batch must match, see `batch_for_world`)
MUST_MATCH = ("dataset", "hidden_size", "lr", "seed", "mixed_precision", "schedule", "warmup_fraction",
              "label_smoothing", "normalization", "optimizer", "weight_decay", "max_grad_norm", "val_fraction",
              "early_stopping_min_delta")
# a schedule is laid out over all steps: the run's length must not change under it
MUST_MATCH_SCHEDULED = ("epochs", "max_steps")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message names the directory."""


class DiskError(OSError):
    """Writing a checkpoint or an output failed (a full disk, a broken mount); the message names the path."""


def checkpoints_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def save(accelerator: Accelerator, output_dir: str | Path, state: dict, keep: int | None,
         model_config: dict | None = None, best: Path | None = None, spare: int | None = None) -> Path:
    """Save a complete checkpoint for `state['global_step']` (all processes call this); with
    `model_config` it also holds config.json and loads as a model directory (`load_model`); with `best`
    (best/model.safetensors) a copy of it. Only the newest `keep` stay, and the one of step `spare` (the
    outputs' there, until new ones are written). Raises DiskError on every process when any could not
    write its part; earlier checkpoints stay."""
    final = checkpoints_root(output_dir) / f"step_{state['global_step']:08d}"
    tmp = final.with_name(final.name + ".tmp")
    failure = None
    if accelerator.is_main_process:
        failure = _written(tmp, _make_empty, tmp)
    if not any_process(accelerator, failure is not None):  # every process waits here, whoever failed
        failure = _written(tmp, accelerator.save_state, str(tmp))  # model, optimizer, RNG states, ...
    if not any_process(accelerator, failure is not None) and accelerator.is_main_process:
        failure = _written(tmp, _complete, tmp, final, state, model_config, best)
    if not failure and accelerator.is_main_process:
        failure = _written(final.parent, rotate, output_dir, state["run_id"], keep, spare)
    if any_process(accelerator, failure is not None):
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise DiskError(failure or f"another process could not write its part of {final}")
    return final


def _written(path: Path, write, *args) -> str | None:
    """`write(*args)`, which writes under `path`; None when it worked, else what to tell the user."""
    try:
        write(*args)
        return None
    except (OSError, RuntimeError, SafetensorError) as err:  # torch and safetensors report a full disk so too
        return write_failure(path, err)


def _make_empty(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)  # left by a run killed mid-save
    path.mkdir(parents=True)


def _complete(tmp: Path, final: Path, state: dict, model_config: dict | None, best: Path | None) -> None:
    """The main process's part of a save: the JSON files, the best model's copy, the rename."""
    if model_config is not None:
        write_json(tmp / "config.json", model_config)
    if best is not None:  # a hard link: no bytes copied, and best/'s next version replaces the name, not this file
        try:
            os.link(best, tmp / BEST_IN_CHECKPOINT)
        except OSError:  # a file system without hard links
            shutil.copyfile(best, tmp / BEST_IN_CHECKPOINT)
    write_json(tmp / STATE_NAME, {"format": STATE_FORMAT, **state})
    old = final.with_name(final.name + ".old")
    if final.exists():  # a re-save: keep the old copy complete under another name until the new one is in
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)  # the directory appears complete, or not at all
    shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(final.parent)


def rotate(output_dir: str | Path, run_id: str, keep: int | None, spare: int | None = None) -> None:
    """Remove the run's checkpoints but the newest `keep` (None: keep all) and the one of step `spare`."""
    if keep:
        for stale in complete_checkpoints(output_dir, run_id)[:-keep]:
            if spare is None or read_state(stale)["global_step"] != spare:
                remove_checkpoint(stale)


def rotate_after_outputs(output_dir: str | Path, keep: int | None) -> None:
    """`rotate` the newest checkpoint's run once its outputs are complete (main process), the checkpoint
    spared for the earlier outputs included; a failure is a warning, the run is done."""
    try:
        newest = complete_checkpoints(output_dir)[-1:]
        if newest:
            rotate(output_dir, read_state(newest[0])["run_id"], keep)
    except (OSError, CheckpointError) as err:
        print(f"mnist_dist: warning: could not remove the older checkpoints in {checkpoints_root(output_dir)} ({err})")


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint; renamed first, so that a kill half-way never leaves a part that looks complete."""
    doomed = path.with_name(path.name + ".deleting.tmp")
    os.replace(path, doomed)
    shutil.rmtree(doomed)


def write_failure(path: Path, err: Exception) -> str:
    """What to tell the user when writing under `path` failed: a full disk is named as such."""
    free = shutil.disk_usage(next(p for p in [path, *path.parents] if p.exists())).free
    why = f"the disk is full ({free / 2**20:.1f} MiB free)" if free < 2**26 or "No space" in str(err) else str(err)
    return f"could not write {path}: {why}; the earlier checkpoints are intact"


def complete_checkpoints(output_dir: str | Path, run_id: str | None = None,
                         damaged: list | None = None) -> list[Path]:
    """Complete checkpoints under OUTPUT_DIR/checkpoints, oldest first (by the step they record);
    with `run_id`, only that run's. The incomplete or damaged ones are added to `damaged` as (path, error)."""
    found = []
    root = checkpoints_root(output_dir)
    if root.is_dir():
        for path in root.iterdir():
            if path.is_dir() and not path.name.endswith(".tmp"):
                try:
                    state = read_state(path)
                except CheckpointError as err:  # never resumed from automatically
                    if damaged is not None:
                        damaged.append((path, err))
                    continue
                if run_id is None or state["run_id"] == run_id:
                    # of a step's two copies (a re-save killed half-way) the one without .old is newer
                    found.append((state["global_step"], not path.name.endswith(".old"), path))
    return [path for *_, path in sorted(found)]


def read_state(path: str | Path) -> dict:
    """The training state of the checkpoint at `path`, after checking that its files are all there."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"--resume {path}: no such checkpoint directory")
    state_file = path / STATE_NAME
    try:
        state = read_json(state_file)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: incomplete checkpoint (no {STATE_NAME})") from None
    except UnreadableFile as err:
        raise CheckpointError(f"damaged checkpoint: {err}") from None
    if not isinstance(state, dict) or "format" not in state:
        raise CheckpointError(f"{state_file}: not a mnist_dist training state")
    if state["format"] != STATE_FORMAT:
        raise CheckpointError(f"{state_file}: written by another version of mnist_dist (format {shown(state['format'])}; "
                              f"this one reads format {STATE_FORMAT}); resume it with that version")
    missing = [key for key in STATE_KEYS if key not in state]
    if missing:
        raise CheckpointError(f"{state_file}: damaged, it lacks {', '.join(missing)}")
    check_state(state, state_file)
    needed = ["model.safetensors", "optimizer.bin"] + [f"random_states_{r}.pkl" for r in range(state["world_size"])]
    if state.get("best_step") is not None and state["config"].get("keep_best") is not False:  # --keep-best's copy
        needed.append(BEST_IN_CHECKPOINT)
    missing = [name for name in needed if not (path / name).is_file()]
    if missing:
        raise CheckpointError(f"{path}: incomplete checkpoint, missing {', '.join(missing)}")
    return state


def check_state(state: dict, file: Path) -> None:
    """Refuse a training state with a field of the wrong type, out of range or at odds with the others,
    naming the file and the field: nothing in it is used before it has passed."""
    missing = [key for key in STATE_FIELDS if key not in state]
    if missing:
        raise CheckpointError(f"{file.parent}: {STATE_NAME} of this checkpoint lacks {', '.join(missing)}")

    def need(ok: bool, key: str, what: str) -> None:
        if not ok:
            raise CheckpointError(f"{file}: damaged, field {key!r} ({shown(state.get(key))}) {what}")

    for key in ("global_step", "world_size", "global_batch_size", "batch_size_flag"):
        need(_count(state[key], 1), key, "must be an integer >= 1")
    need(_count(state.get("accumulation_flag", 1), 1), "accumulation_flag", "must be an integer >= 1")
    need(_count(state.get("window_norm_steps", 0), 0), "window_norm_steps", "must be an integer >= 0")
    need(_number(state.get("window_norm_sum", 0.0), 0), "window_norm_sum", "must be a finite number >= 0")
    for key in ("epoch", "batch_in_epoch", "samples_seen", "epoch_samples", "window_samples"):
        need(_count(state[key], 0), key, "must be an integer >= 0")
    for key in ("train_seconds", "seconds_to_first_step"):
        need(_number(state[key], 0) or (state[key] is None and key != "train_seconds"), key, "must be a finite number >= 0")
    for key in ("epoch_loss_sums", "window_loss_sums"):  # one per process that saved the checkpoint
        sums = state[key]
        need(isinstance(sums, list) and len(sums) == state["world_size"] and all(_number(x) for x in sums), key,
             f"must be {state['world_size']} finite numbers, one per process")
    need(isinstance(state["run_id"], str) and bool(state["run_id"]), "run_id", "must be a non-empty string")
    need(isinstance(state["data"], dict) and all(isinstance(state["data"].get(s), dict) and _count(
        state["data"][s].get("samples"), 1) for s in ("train", "test")), "data", "must give each split's samples")
    need(isinstance(state["config"], dict), "config", "must be an object")
    try:
        # where the run was and what to do with it are never taken from a checkpoint (a --profile
        # directory may since have become a file): not checked either
        config = TrainConfig(**{f.name: state["config"][f.name] for f in flags()
                                if f.name in state["config"] and f.name not in NOT_INHERITED})
        config.validate()
    except ConfigError as err:
        raise CheckpointError(f"{file}: damaged, field 'config': {err}") from None
    _check_position(state, config, need)
    _check_history(state, need)
    _check_selection(state, need)
    began = state["batch_size_flag"] * state.get("accumulation_flag", 1)  # of one process, when the run began
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
        need(isinstance(entry, dict) and entry.get("epoch") == number and _count(entry.get("samples"), 0)
             and all(_number(entry.get(k), 0) for k in (*HISTORY_NUMBERS, f"{split}_loss", f"{split}_accuracy"))
             and entry[f"{split}_accuracy"] <= 1,
             "history", f"entry {number} must be epoch {number} with finite losses, {split} accuracy and times")


def _check_selection(state: dict, need) -> None:
    """The best validation accuracy, its step, the evaluations since and the newest one (newer than format 3's
    first checkpoints: absent means none)."""
    best, step, last = state.get("best_val_accuracy"), state.get("best_step"), state.get("last_validation")
    need(best is None or _number(best, 0) and best <= 1, "best_val_accuracy", "must be an accuracy from 0 to 1")
    need((step is None) == (best is None) and (step is None or _count(step, 1) and step <= state["global_step"]),
         "best_step", "must be the step of best_val_accuracy, at most global_step")
    since = state.get("evals_since_best", 0)
    need(_count(since, 0), "evals_since_best", "must be an integer >= 0")
    stopped = state.get("stopped_early", False)
    need(type(stopped) is bool and (not stopped or since >= 1), "stopped_early",
         "must be true or false, and true only after an evaluation without a better accuracy")
    # with --early-stopping-min-delta a rise smaller than it is not a new best: the best may trail by that much
    delta = state["config"].get("early_stopping_min_delta", 0.0)
    scored = [h.get("val_accuracy") for h in state["history"] if isinstance(h, dict)]
    need(best is None or all(_number(a) and a <= best + delta for a in scored), "best_val_accuracy",
         "must be at least the history's validation accuracies (less --early-stopping-min-delta)")
    need(_number(state.get("validation_seconds", 0.0), 0), "validation_seconds", "must be a finite number >= 0")
    need(last is None or isinstance(last, dict) and _count(last.get("step"), 1) and last["step"] <= state["global_step"]
         and all(_number(last.get(k), 0) for k in ("accuracy", "loss")) and last["accuracy"] <= 1
         and _count(last.get("samples"), 1) and last["step"] >= (step or 0), "last_validation",
         "must be the step (at least best_step), accuracy, loss and samples of the newest validation")
    need((last is None) == (best is None), "last_validation", "must be given with best_val_accuracy, and only then")


def _count(value, least: int) -> bool:
    return type(value) is int and value >= least


def _number(value, least: float = -math.inf) -> bool:
    return type(value) in (int, float) and math.isfinite(value) and value >= least


def steps_per_epoch(state: dict) -> int:
    """Optimizer steps in an epoch of the checkpoint's run: its training samples over its global batch."""
    return math.ceil(state["data"]["train"]["samples"] / state["global_batch_size"])


def check_loads(path: Path) -> None:
    """Load every file of the checkpoint at `path` (they are small), so that a damaged one is found
    now: Accelerate's `load_state` skips random states it cannot read without a word."""
    tensors = {}
    for file in sorted(path.iterdir()):
        try:
            if file.suffix == ".safetensors":
                tensors[file.name] = load_file(file)
            elif file.suffix in (".bin", ".pkl"):
                torch.load(file, map_location="cpu", weights_only=False)  # Accelerate's own files
        except Exception as err:  # unpickling a damaged file can raise almost anything
            raise CheckpointError(f"{file}: damaged checkpoint file ({type(err).__name__}: {err})") from None
    if BEST_IN_CHECKPOINT in tensors and WEIGHTS_NAME in tensors:  # the best model is the same network
        check_same_shapes(path / BEST_IN_CHECKPOINT, tensors[BEST_IN_CHECKPOINT], tensors[WEIGHTS_NAME])


def check_same_shapes(file: Path, tensors: dict, like: dict) -> None:
    """Refuse weights in `file` whose names, shapes or dtypes differ from `like`'s (a model's state dict;
    DDP's and torch.compile's prefixes aside), naming the first difference."""
    def layout(weights: dict) -> dict:
        plain = {k.removeprefix("module.").removeprefix("_orig_mod."): t for k, t in weights.items()}
        return {k: (tuple(t.shape), t.dtype) for k, t in plain.items()}

    got, want = layout(tensors), layout(like)
    if got != want:
        name = next((k for k in sorted(want.keys() | got.keys()) if got.get(k) != want.get(k)))
        raise CheckpointError(f"{file}: not this model's weights: {name} is {_shape_of(got.get(name))}, the model's "
                              f"is {_shape_of(want.get(name))}")


def _shape_of(entry) -> str:
    return "missing" if entry is None else f"{list(entry[0])} {str(entry[1]).removeprefix('torch.')}"


def resolve(resume: str | None, output_dir: str | Path) -> Path | None:
    """The checkpoint `--resume` names, checked to load: 'auto' is the newest complete one in output_dir
    that loads (a damaged newer one is skipped with a warning), or None where there is none."""
    if resume is None:
        return None
    if resume != "auto":
        read_state(resume)  # refuse a partial or damaged checkpoint before anything else happens
        path = Path(resume).resolve()  # symlinks and '..' resolved: whose run it is decides what may be removed
        check_loads(path)
        return path
    root, damaged = checkpoints_root(output_dir), []
    complete = complete_checkpoints(output_dir, damaged=damaged)
    for path, err in damaged:  # a step_N directory that is not complete was damaged after it was written
        print(f"mnist_dist: warning: skipping {path}: {err}")
    for path in reversed(complete):
        try:
            check_loads(path)
        except CheckpointError as err:
            print(f"mnist_dist: warning: skipping {path}: {err}")
            damaged.append((path, err))
            continue
        return path
    if damaged:
        damaged = [path for path, _ in damaged]
        raise CheckpointError(f"--resume auto: no checkpoint in {root} loads ({', '.join(p.name for p in damaged)} are "
                              "incomplete or damaged); resume one with --resume PATH, or start over with --overwrite")
    return None


def check_compatible(state: dict, config: dict, path: Path) -> None:
    """Refuse to resume where the continuation could not be the same run (the batch: `batch_for_world`)."""
    scheduled = config.get("schedule", "constant") != "constant"
    for name in MUST_MATCH + (MUST_MATCH_SCHEDULED if scheduled else ()):
        # a flag newer than the checkpoint: the run was trained with its default
        was = state["config"].get(name, getattr(TrainConfig, name, None))
        if was != config.get(name):
            flag = "--" + name.replace("_", "-")
            raise CheckpointError(
                f"{flag}={config.get(name)!r}, but {path} was trained with {was!r}; "
                f"resume with the same value"
            )


def began_with(state: dict | None, cfg: TrainConfig) -> dict:
    """The per-process batch and accumulation steps the run began with, which each of its checkpoints
    keeps: a requeued job's unchanged command line gives them again, whatever the world size is now.
    (accumulation_flag is newer than batch_size_flag: an older checkpoint's run accumulated nothing.)"""
    if state is None:
        return {"batch_size_flag": cfg.batch_size, "accumulation_flag": cfg.gradient_accumulation_steps}
    return {"batch_size_flag": state["batch_size_flag"], "accumulation_flag": state.get("accumulation_flag", 1)}


def batch_for_world(state: dict, cfg: TrainConfig, world: int, path: Path) -> tuple[int, int]:
    """(per-process batch, accumulation steps) that keep the checkpoint's global batch on `world` processes:
    the same samples in each optimizer step, in the same order, whatever the world size. A --batch-size or
    --gradient-accumulation-steps other than the run began with must make the global batch exactly; else
    each process takes the largest batch up to the one the run began with (its memory) that the global
    batch allows, and accumulates the rest."""
    global_batch, began = state["global_batch_size"], began_with(state, cfg)
    b, n, given = cfg.batch_size, cfg.gradient_accumulation_steps, cfg.given_fields()
    b_new = "batch_size" in given and b != began["batch_size_flag"]
    n_new = "gradient_accumulation_steps" in given and n != began["accumulation_flag"]
    if global_batch % world:
        was_steps = state["config"].get("gradient_accumulation_steps", 1)
        fits = [k for k in range(1, global_batch + 1) if global_batch % k == 0]
        raise CheckpointError(
            f"{path} was trained with a global batch of {global_batch} ({state['world_size']} processes x "
            f"{state['config']['batch_size']}{f' x {was_steps}' if was_steps > 1 else ''}); {world} processes "
            f"cannot split it evenly. Resume on a number of processes that divides it: "
            f"{', '.join(map(str, fits[:12]))}{', ...' if len(fits) > 12 else ''}")
    per_process = global_batch // world
    cuts = [(k, per_process // k) for k in range(per_process, 0, -1) if per_process % k == 0]  # largest batch first
    if not (b_new or n_new):
        return next((k, m) for k, m in cuts if k <= began["batch_size_flag"])
    fit = [(k, m) for k, m in cuts if (k == b or not b_new) and (m == n or not n_new)]
    if fit:
        return fit[0]
    named = " ".join(f"--{name.replace('_', '-')}={value}" for name, value, new in
                     (("batch_size", b, b_new), ("gradient_accumulation_steps", n, n_new)) if new)
    options = "; ".join(f"--batch-size {k} --gradient-accumulation-steps {m}" for k, m in cuts[:6])
    raise CheckpointError(
        f"{named} on {world} process(es) cannot make the global batch of {global_batch} that {path} was trained "
        f"with; resume with one of: {options}"
        f"{'; ...' if len(cuts) > 6 else ''}")


def check_data(state: dict, data: dict, config: dict, path: Path) -> None:
    """Refuse to resume on other data than the checkpoint's (`data.fingerprint` of both)."""
    if state["data"] != data:
        was = state["config"]
        raise CheckpointError(
            f"{path} was trained on other data: --dataset {was.get('dataset')} --data-dir {was.get('data_dir')} gave "
            f"{_describe(state['data'])}, this run's --dataset {config['dataset']} --data-dir {config['data_dir']} "
            f"gives {_describe(data)}; resume with the data it was trained on")


def _describe(data: dict) -> str:
    return " and ".join(f"{s['samples']} {name} images (sha256 {s['sha256'][:12]})" for name, s in data.items())


def write_json(path: Path, obj: dict) -> None:
    """Write `obj` to `path` on disk for good: readers see the old file or the new one, never half of one.
    Strict JSON: a NaN or infinity raises ValueError before anything is written."""
    text = json.dumps(obj, indent=2, allow_nan=False) + "\n"
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_best(accelerator: Accelerator, output_dir: str | Path, tensors: dict, model_config: dict, meta: dict) -> None:
    """The weights of the best validation accuracy (`tensors`, on the CPU), with config.json, into
    OUTPUT_DIR/best, which is never half-written: the first time it appears whole (a directory renamed into
    place), later only its model.safetensors is replaced. `meta` ({"step", "val_accuracy"}) goes into the
    file's metadata. All processes call this; the main process writes. Raises DiskError on every process
    if it could not."""
    best, failure = Path(output_dir) / BEST_DIR, None
    if accelerator.is_main_process:
        failure = _written(best, _write_best, best, tensors, model_config, {"format": "pt", BEST_KEY: json.dumps(meta)})
    if any_process(accelerator, failure is not None):
        raise DiskError(failure or f"the main process could not write {best}")


def _write_best(best: Path, tensors: dict, model_config: dict, metadata: dict) -> None:
    directory = best if best.is_dir() else best.with_name(best.name + ".tmp")
    if directory != best:
        _make_empty(directory)
        write_json(directory / CONFIG_NAME, model_config)
    tmp = directory / (WEIGHTS_NAME + ".tmp")
    save_file(tensors, tmp, metadata=metadata)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, directory / WEIGHTS_NAME)
    _fsync_dir(directory)
    if directory != best:
        os.replace(directory, best)
        _fsync_dir(best.parent)


def best_meta(path: Path) -> dict:
    """The {"step", "val_accuracy"} that a best model's file (best/model.safetensors, or a checkpoint's
    copy) records; an unreadable file is an error naming it."""
    try:
        with safe_open(path, "pt") as f:
            meta = parse_json((f.metadata() or {})[BEST_KEY], f"{path}'s metadata")
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file; the checkpoint holds no best model (its run had "
                              "--no-keep-best): resume with --no-keep-best") from None
    except UnreadableFile as err:
        raise CheckpointError(str(err)) from None
    except (SafetensorError, OSError, KeyError, ValueError) as err:
        raise CheckpointError(f"{path}: not a best model mnist_dist wrote ({type(err).__name__}: {err})") from err
    if not (isinstance(meta, dict) and _count(meta.get("step"), 1) and _number(meta.get("val_accuracy"), 0)):
        raise CheckpointError(f"{path}: damaged metadata {shown(meta)}")
    return meta


def load_best(path: Path, step: int, like: dict) -> dict:
    """The weights in `path` (a checkpoint's copy of best/), which must be the best model of `step`, with
    the names and shapes of `like` (the model's state dict): checked before they are written anywhere."""
    held = best_meta(path)["step"]
    if held != step:
        raise CheckpointError(f"{path}: holds the best model of step {held}, but its training state says step {step}")
    try:
        weights = load_file(path)
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path}: unreadable ({type(err).__name__}: {err})") from err
    check_same_shapes(path, weights, like)
    return weights


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

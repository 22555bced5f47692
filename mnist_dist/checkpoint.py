"""Checkpoints: Accelerate's `save_state` plus the training state's JSON, in
`OUTPUT_DIR/checkpoints/step_XXXXXXXX/`, a directory that appears complete or not at all. A resume reads
where the run was from the JSON, never from a name, and loads every file before it trusts a checkpoint.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from . import train_state
from .atomic import fsync_dir, write_json
from .distributed import any_process
from .model import WEIGHTS_NAME
from .readback import UnreadableFile, is_count, is_number, parse_json, shown
from .train_state import STATE_FORMAT, STATE_NAME, CheckpointError

BEST_DIR = "best"  # OUTPUT_DIR/best: the model of the best validation accuracy (--keep-best)
BEST_IN_CHECKPOINT = "best.safetensors"  # a checkpoint's copy of best/model.safetensors as it was then
BEST_KEY = "mnist_dist_best"  # best/model.safetensors' metadata: {"step", "val_accuracy"} as JSON


class DiskError(OSError):
    """Writing a checkpoint or an output failed (a full disk, a broken mount); the message names the path."""


def checkpoints_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def save(accelerator: Accelerator, output_dir: str | Path, state: dict, keep: int | None,
         model_config: dict | None = None, best: Path | None = None, spare: int | None = None) -> Path:
    """Save a complete checkpoint for `state['global_step']` (all processes call this), with config.json
    (`model_config`: it loads as a model directory) and a copy of `best` (best/model.safetensors). Only the
    newest `keep` stay, and the one of step `spare` (the outputs' there, until new ones are written). Raises
    DiskError on every process when any could not write its part; earlier checkpoints stay."""
    final = checkpoints_root(output_dir) / f"step_{state['global_step']:08d}"
    tmp = final.with_name(final.name + ".tmp")
    failure = None
    if accelerator.is_main_process:
        failure = failure_writing(tmp, make_empty, tmp)
    if not any_process(accelerator, failure is not None):  # every process waits here, whoever failed
        failure = failure_writing(tmp, accelerator.save_state, str(tmp))  # model, optimizer, RNG states, ...
    if not any_process(accelerator, failure is not None) and accelerator.is_main_process:
        failure = failure_writing(tmp, _complete, tmp, final, state, model_config, best)
    if not failure and accelerator.is_main_process:
        failure = failure_writing(final.parent, rotate, output_dir, state["run_id"], keep, spare)
    if any_process(accelerator, failure is not None):
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise DiskError(failure or f"another process could not write its part of {final}")
    return final


def failure_writing(path: Path, write, *args) -> str | None:
    """`write(*args)`, which writes under `path`; None when it worked, else what to tell the user."""
    try:
        write(*args)
        return None
    except (OSError, RuntimeError, SafetensorError) as err:  # torch and safetensors report a full disk so too
        return write_failure(path, err)


def make_empty(path: Path) -> None:
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
    fsync_dir(final.parent)


def rotate(output_dir: str | Path, run_id: str, keep: int | None, spare: int | None = None) -> None:
    """Remove the run's checkpoints but the newest `keep` (None: keep all) and the one of step `spare`."""
    if keep:
        for stale in complete_checkpoints(output_dir, run_id)[:-keep]:
            if spare is None or read_state(stale)["global_step"] != spare:
                doomed = stale.with_name(stale.name + ".deleting.tmp")  # a kill half-way leaves nothing complete
                os.replace(stale, doomed)
                shutil.rmtree(doomed)


def rotate_after_outputs(output_dir: str | Path, keep: int | None) -> None:
    """`rotate` the newest checkpoint's run once its outputs are complete (main process), the checkpoint
    spared for the earlier outputs included; a failure is a warning, the run is done."""
    try:
        newest = complete_checkpoints(output_dir)[-1:]
        if newest:
            rotate(output_dir, read_state(newest[0])["run_id"], keep)
    except (OSError, CheckpointError) as err:
        print(f"mnist_dist: warning: could not remove the older checkpoints in {checkpoints_root(output_dir)} ({err})")


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
    state = train_state.read(path / STATE_NAME)
    needed = ["model.safetensors", "optimizer.bin"] + [f"random_states_{r}.pkl" for r in range(state["world_size"])]
    if state["best_step"] is not None and state["config"]["keep_best"] is not False:  # --keep-best's copy
        needed.append(BEST_IN_CHECKPOINT)
    missing = [name for name in needed if not (path / name).is_file()]
    if missing:
        raise CheckpointError(f"{path}: incomplete checkpoint, missing {', '.join(missing)}")
    return state


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
    if BEST_IN_CHECKPOINT in tensors:
        if WEIGHTS_NAME in tensors:  # the best model is the same network
            check_same_shapes(path / BEST_IN_CHECKPOINT, tensors[BEST_IN_CHECKPOINT], tensors[WEIGHTS_NAME])
        best_meta(path / BEST_IN_CHECKPOINT)  # its step and score, read back when the run resumes


def check_same_shapes(file: Path, tensors: dict, like: dict) -> None:
    """Refuse weights in `file` whose names, shapes or dtypes differ from `like`'s (a model's state dict;
    DDP's and torch.compile's prefixes aside), naming the first difference."""
    def layout(weights: dict) -> dict:  # name -> "[shape] dtype"
        return {k.removeprefix("module.").removeprefix("_orig_mod."): f"{list(t.shape)} {str(t.dtype).removeprefix('torch.')}"
                for k, t in weights.items()}

    got, want = layout(tensors), layout(like)
    if got != want:
        name = next((k for k in sorted(want.keys() | got.keys()) if got.get(k) != want.get(k)))
        raise CheckpointError(f"{file}: not this model's weights: {name} is {got.get(name, 'missing')}, the model's "
                              f"is {want.get(name, 'missing')}")


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
    damaged = []
    complete = complete_checkpoints(output_dir, damaged=damaged)
    for path, err in damaged:  # a step_N directory that is not complete was damaged after it was written
        print(f"mnist_dist: warning: skipping {path}: {err}")
    for path in reversed(complete):
        try:
            check_loads(path)
            return path
        except CheckpointError as err:
            print(f"mnist_dist: warning: skipping {path}: {err}")
            damaged.append((path, err))
    if damaged:
        raise CheckpointError(f"--resume auto: no checkpoint in {checkpoints_root(output_dir)} loads "
                              f"({', '.join(p.name for p, _ in damaged)} are incomplete or damaged); resume one with "
                              "--resume PATH, or start over with --overwrite")
    return None


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
    if not (isinstance(meta, dict) and is_count(meta.get("step"), 1) and is_number(meta.get("val_accuracy"), 0)):
        raise CheckpointError(f"{path}: damaged metadata {shown(meta)}")
    return meta

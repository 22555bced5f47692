"""Checkpoints: Accelerate's `save_state` plus an explicit JSON of the training state.

A checkpoint is `OUTPUT_DIR/checkpoints/step_XXXXXXXX/`, built under a `.tmp` name and
renamed only once every process has written its part and `training_state.json` is on
disk, so a directory with that name is always complete. Resume reads the step, epoch,
position in the epoch, running loss sums and history from the JSON, never from a name.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from accelerate import Accelerator

STATE_NAME = "training_state.json"
STATE_FORMAT = 1
# config fields that shape the trajectory: a resumed run must use the same values
MUST_MATCH = ("dataset", "hidden_size", "batch_size", "lr", "seed", "mixed_precision", "schedule", "warmup_fraction",
              "label_smoothing", "normalization")
# a schedule is laid out over all steps: the run's length must not change under it
MUST_MATCH_SCHEDULED = ("epochs", "max_steps")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message names the directory."""


def checkpoints_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def save(accelerator: Accelerator, output_dir: str | Path, state: dict, keep: int | None,
         model_config: dict | None = None) -> Path:
    """Save a complete checkpoint for `state['global_step']` (all processes call this); with
    `model_config` it also holds config.json and loads as a model directory (`load_model`)."""
    root = checkpoints_root(output_dir)
    final = root / f"step_{state['global_step']:08d}"
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed mid-save
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # model, optimizer, sampler, every process's RNG state
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if model_config is not None:
            write_json(tmp / "config.json", model_config)
        write_json(tmp / STATE_NAME, {"format": STATE_FORMAT, **state})
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)  # the directory appears complete, or not at all
        _fsync_dir(root)
        if keep:
            for old in complete_checkpoints(output_dir)[:-keep]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints under OUTPUT_DIR/checkpoints, oldest first (by the step they record)."""
    found = []
    root = checkpoints_root(output_dir)
    if root.is_dir():
        for path in root.iterdir():
            if path.is_dir() and not path.name.endswith(".tmp"):
                try:
                    found.append((read_state(path)["global_step"], path))
                except CheckpointError:
                    continue  # incomplete or damaged: never resumed from automatically
    return [path for _, path in sorted(found)]


def read_state(path: str | Path) -> dict:
    """The training state of the checkpoint at `path`, after checking that its files are all there."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"--resume {path}: no such checkpoint directory")
    state_file = path / STATE_NAME
    try:
        state = json.loads(state_file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: incomplete checkpoint (no {STATE_NAME})") from None
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{state_file}: unreadable ({err})") from err
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{state_file}: not a mnist_dist training state (format {STATE_FORMAT})")
    needed = ["model.safetensors", "optimizer.bin"] + [f"random_states_{r}.pkl" for r in range(state["world_size"])]
    missing = [name for name in needed if not (path / name).is_file()]
    if missing:
        raise CheckpointError(f"{path}: incomplete checkpoint, missing {', '.join(missing)}")
    return state


def resolve(resume: str | None, output_dir: str | Path) -> Path | None:
    """The checkpoint `--resume` names: 'auto' is the newest complete one in output_dir, or None."""
    if resume is None:
        return None
    if resume == "auto":
        found = complete_checkpoints(output_dir)
        return found[-1] if found else None
    read_state(resume)  # refuse a partial or damaged checkpoint before anything else happens
    return Path(resume)


def check_compatible(state: dict, config: dict, world_size: int, path: Path) -> None:
    """Refuse to resume where the continuation could not be the same run."""
    if state["world_size"] != world_size:
        raise CheckpointError(
            f"{path} was written by {state['world_size']} processes, this run has {world_size}. The global "
            f"batch and each process's shard depend on the world size, so resume with "
            f"{state['world_size']} processes (--num_processes {state['world_size']})."
        )
    scheduled = config.get("schedule", "constant") != "constant"
    for name in MUST_MATCH + (MUST_MATCH_SCHEDULED if scheduled else ()):
        if state["config"].get(name) != config.get(name):
            flag = "--" + name.replace("_", "-")
            raise CheckpointError(
                f"{flag}={config.get(name)!r}, but {path} was trained with {state['config'].get(name)!r}; "
                f"resume with the same value"
            )


def write_json(path: Path, obj: dict) -> None:
    """Write `obj` to `path` on disk for good: readers see the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

"""An output directory belongs to one run: where a new run goes, what an earlier one left, the lock.

Without `--output-dir` each run gets a fresh `outputs/run-YYYYMMDD-HHMMSS`, and `outputs/latest`
points at the newest. A run holds its directory's lock (`filelock`: an flock the OS drops when the
process dies, so a killed run never blocks its own `--resume auto`) for its whole life. Plain Python:
the training loop has the main process call `claim` and tells the others what it found.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout

from . import checkpoint
from .config import TrainConfig

RUNS_ROOT = Path("outputs")
LATEST = RUNS_ROOT / "latest"
LOCK_NAME, HOLDER_NAME = ".lock", ".lock.json"
# what a run writes into its directory: what --overwrite removes, and nothing else
RUN_FILES = ("results.json", "model.safetensors", "config.json", "metrics.jsonl", "training_curves.png",
             "confusion_matrix.png", "misclassified.png", "checkpoints", "evaluation", "wandb", "tensorboard")


class RunDirError(ValueError):
    """An output directory that this run cannot use; the message names it and the ways out."""


@dataclass
class Plan:
    """What the main process found for this run, told to every process."""

    output_dir: str
    lock: "RunLock"  # held by the main process only
    resume_from: str | None = None  # a checkpoint that loads, or None: a fresh start
    finished: dict | None = None  # results.json of a run that has nothing left to do
    new: bool = False  # a new outputs/run-* directory, for outputs/latest to point at


def claim(cfg: TrainConfig) -> Plan:
    """Choose the run's directory, lock it, and decide what happens to what is there (main process).
    Refuses, before anything is loaded or written, a directory that holds another run unless told
    what to do with it (--resume auto, --overwrite)."""
    resume_path = checkpoint.resolve(cfg.resume, ".") if cfg.resume not in (None, "auto") else None
    output_dir = chosen_dir(cfg, resume_path)
    if output_dir is None:
        output_dir = new_run_dir()
        return Plan(str(output_dir), RunLock(output_dir, created=True).acquire(), new=True)
    check_writable(output_dir)
    created = not output_dir.exists()
    output_dir.mkdir(parents=True, exist_ok=True)
    lock = RunLock(output_dir, created).acquire()
    try:
        return Plan(str(output_dir), lock, *what_to_do(cfg, output_dir, resume_path))
    except BaseException:
        lock.release()
        raise


def chosen_dir(cfg: TrainConfig, resume_path: Path | None) -> Path | None:
    """--output-dir; else the run a --resume names (outputs/latest for 'auto'); None: a new run directory."""
    if cfg.output_dir:
        return Path(cfg.output_dir)
    if resume_path is not None and resume_path.parent.name == "checkpoints":
        return resume_path.parent.parent
    if cfg.resume == "auto" and LATEST.exists():
        return RUNS_ROOT / os.readlink(LATEST) if LATEST.is_symlink() else LATEST
    return None


def what_to_do(cfg: TrainConfig, output_dir: Path, resume_path: Path | None) -> tuple[str | None, dict | None]:
    """(the checkpoint to resume from, results.json of a finished run) for a locked `output_dir`."""
    there = left_behind(output_dir)
    if cfg.resume == "auto":
        found = checkpoint.resolve("auto", output_dir)
        if found is not None:
            return str(found), finished_results(output_dir, cfg)
        if there:  # an earlier start of this run stopped before its first checkpoint: start it again
            print(f"mnist_dist: no checkpoint in {output_dir}; starting from step 0 (removing {', '.join(there)})")
            remove_run_files(output_dir)
        return None, None
    own = resume_path is not None and resume_path.parent.parent.resolve() == output_dir.resolve()
    if there and cfg.overwrite:
        print(f"mnist_dist: --overwrite: removing {', '.join(there)} from {output_dir}")
        remove_run_files(output_dir)
    elif there and not own:
        raise RunDirError(
            f"--output-dir {output_dir} holds another run ({', '.join(there)}). Continue it with --resume auto, "
            "start over with --overwrite (removes those files), or choose another --output-dir")
    return (str(resume_path) if resume_path else None), None


def finished_results(output_dir: Path, cfg: TrainConfig) -> dict | None:
    """results.json of the run in `output_dir` if it already took every step `cfg` asks for, else None."""
    try:
        results = json.loads((output_dir / "results.json").read_text())
        per_epoch = math.ceil(results["train_samples"] / results["global_batch_size"])
        wanted = min(cfg.epochs * per_epoch, cfg.max_steps or math.inf)
        return results if results["steps"] >= wanted else None
    except (OSError, ValueError, KeyError, TypeError):
        return None  # none, or unreadable: the run resumes from its checkpoint and writes it again


def new_run_dir() -> Path:
    """outputs/run-YYYYMMDD-HHMMSS (with -2, -3, ... when that second is taken), created."""
    base = RUNS_ROOT / time.strftime("run-%Y%m%d-%H%M%S")
    for n in range(1, 1000):
        path = base if n == 1 else base.with_name(f"{base.name}-{n}")
        try:
            path.mkdir(parents=True)  # atomic: two runs started in the same second get two directories
            return path
        except FileExistsError:
            continue
    raise RunDirError(f"{base}: 999 runs started in this second")


def point_latest_at(run_dir: Path) -> None:
    """outputs/latest -> run_dir, replaced in one step (a symlink where the file system has them)."""
    tmp = LATEST.with_name(f".latest.{os.getpid()}")
    try:
        os.symlink(run_dir.name, tmp)
        os.replace(tmp, LATEST)
    except OSError as err:
        print(f"mnist_dist: warning: could not point {LATEST} at {run_dir} ({err})")


def left_behind(output_dir: Path) -> list[str]:
    """The names of what a run wrote that are in `output_dir` (an empty checkpoints/ does not count)."""
    found = []
    for name in RUN_FILES:
        path = output_dir / name
        if path.is_dir() and not any(path.iterdir()):
            continue
        if path.exists() or path.is_symlink():
            found.append(name + ("/" if path.is_dir() else ""))
    return found


def remove_run_files(output_dir: Path) -> None:
    """Delete what an earlier run wrote into `output_dir` (RUN_FILES only: a user's own files stay)."""
    for name in RUN_FILES:
        path = output_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def check_writable(output_dir: Path) -> None:
    """Refuse, before anything is read or written, a directory that cannot be made or written."""
    flag = f"--output-dir {output_dir}"
    if output_dir.exists() and not output_dir.is_dir():
        raise RunDirError(f"{flag}: is a file, not a directory; choose another --output-dir")
    existing = next(p for p in [output_dir, *output_dir.absolute().parents] if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise RunDirError(f"{flag}: cannot write to {existing} (permission denied); choose another --output-dir")


class RunLock:
    """The run's hold on its directory: an OS file lock plus a note of who holds it (host, pid)."""

    def __init__(self, output_dir: Path, created: bool = False):
        self.output_dir, self.created = output_dir, created  # created: by this run, removed if it stays empty
        self.lock = FileLock(output_dir / LOCK_NAME, timeout=0)
        self.holder = output_dir / HOLDER_NAME

    def __getstate__(self) -> dict:  # another process gets the directory, never the held lock
        return {"output_dir": self.output_dir, "created": self.created}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def acquire(self) -> "RunLock":
        try:
            self.lock.acquire()
        except Timeout:
            raise RunDirError(f"--output-dir {self.output_dir}: another run is using it ({self._holder()}); wait for "
                              "it to end, or choose another --output-dir") from None
        self.holder.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                           "since": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
        return self

    def release(self) -> None:
        """Let go of the directory; one this run made and left empty (it failed early) is removed."""
        if not self.lock.is_locked:
            return
        self.holder.unlink(missing_ok=True)
        if self.created and not any(p.name != LOCK_NAME for p in self.output_dir.iterdir()):
            (self.output_dir / LOCK_NAME).unlink(missing_ok=True)
            self.lock.release()
            self.output_dir.rmdir()
            return
        self.lock.release()

    def _holder(self) -> str:
        try:
            who = json.loads(self.holder.read_text())
            return f"process {who['pid']} on {who['host']}, since {who['since']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "holder unknown"

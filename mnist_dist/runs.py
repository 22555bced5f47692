"""An output directory belongs to one run: where a new run goes (without `--output-dir`, a fresh
`outputs/run-YYYYMMDD-HHMMSS`, `outputs/latest` pointing at the newest), what an earlier one left, and the
lock a run holds for its whole life (an flock the OS drops when the process dies: a killed run never blocks
its own `--resume auto`). The loop has the main process call `claim` and tells the others.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from filelock import FileLock, Timeout

from . import checkpoint
from .config import TrainConfig
from .reporting import read_results, stopped_early
from .readback import read_json, shown
from .train_state import CheckpointError, steps_per_epoch

RUNS_ROOT = Path("outputs")
LATEST = RUNS_ROOT / "latest"
LOCK_NAME, HOLDER_NAME = ".lock", ".lock.json"
# what a run writes into its directory: what --overwrite removes, and nothing else
RUN_FILES = ("results.json", "model.safetensors", "config.json", "metrics.jsonl", "training_curves.png",
             "confusion_matrix.png", "misclassified.png", "checkpoints", "best", "best.tmp", "evaluation", "wandb",
             "tensorboard", "stacks")
# what a start that never reached its first checkpoint leaves: `--resume auto` removes it and starts again
# (a best model is kept from the first validation on, which may come before the first checkpoint)
RESTARTABLE = ("metrics.jsonl", "checkpoints/", "best/", "best.tmp/", "wandb/", "tensorboard/", "stacks/")


class RunDirError(ValueError):
    """An output directory that this run cannot use; the message names it and the ways out."""


@dataclass
class Plan:
    """What the main process found for this run, told to every process."""

    output_dir: str
    lock: "RunLock"  # held by the main process only
    resume_from: str | None = None  # a checkpoint that loads, or None: a fresh start
    continues: bool = False  # resume_from is this directory's own run: keep its run id (and W&B run)
    finished: dict | None = None  # results.json of a run that has nothing left to do
    remove: list[str] = field(default_factory=list)  # what an earlier run left that must go, once training starts
    why: str = ""  # why it must go
    new: bool = False  # a new outputs/run-* directory, for outputs/latest to point at
    # the step of the results.json there: its checkpoint outlives rotation until new outputs are complete
    reported_step: int | None = None


def claim(cfg: TrainConfig) -> Plan:
    """Choose the run's directory, lock it, and decide what happens to what is there (main process).
    Refuses, before anything is loaded or written, a directory that holds another run unless told
    what to do with it (--resume auto, --overwrite). Deletes nothing: `clear` does, later."""
    resume_path = checkpoint.resolve(cfg.resume, ".") if cfg.resume not in (None, "auto") else None
    output_dir = chosen_dir(cfg, resume_path)
    if output_dir is None:
        check_writable(RUNS_ROOT)
        output_dir = new_run_dir()
        return Plan(str(output_dir), RunLock(output_dir, [output_dir]).acquire(), new=True)
    check_writable(output_dir)
    made = [p for p in [output_dir, *output_dir.absolute().parents] if not p.exists()]
    output_dir.mkdir(parents=True, exist_ok=True)
    lock = RunLock(output_dir, made).acquire()
    try:
        results, reported = read_results(output_dir)  # once: a damaged one is skipped with one warning
        decided = what_to_do(cfg, output_dir, resume_path, results)
        check_keeps_resumed(output_dir, decided)
        metrics = output_dir / "metrics.jsonl"  # a resume reads and extends it
        if decided.get("resume_from") and metrics.exists() and not metrics.is_file():
            raise RunDirError(f"{metrics}: not a file, so the run's log cannot go on in it; move it away, or start "
                              "over with --overwrite")
        kept = "results.json" not in decided.get("remove", [])
        return Plan(str(output_dir), lock, **decided, reported_step=reported if kept else None)
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


def what_to_do(cfg: TrainConfig, output_dir: Path, resume_path: Path | None, results: dict | None) -> dict:
    """The rest of the Plan for a locked `output_dir`, from what is there (`results`: its results.json, checked)
    and what the flags ask."""
    there = left_behind(output_dir)
    if cfg.resume == "auto":
        finished = finished_results(results, cfg)
        if finished:  # said finished, whether or not its checkpoints load here (another format's, say)
            try:
                found = checkpoint.resolve("auto", output_dir)
            except CheckpointError:
                found = None
            return {"resume_from": found and str(found), "continues": True, "finished": finished}
        found = checkpoint.resolve("auto", output_dir)  # an error where checkpoints are there but none loads
        if found:
            check_steps_left(cfg, found)
            return {"resume_from": str(found), "continues": True}
        kept = [name for name in there if name not in RESTARTABLE]
        if kept:
            raise RunDirError(f"--resume auto: {output_dir} holds no checkpoint to resume, but a run's {', '.join(kept)}; "
                              "start over with --overwrite, or choose another --output-dir")
        return {"remove": there, "why": "no checkpoint to resume, starting from step 0"}
    if resume_path is not None and resume_path.parent.parent.resolve() == output_dir.resolve():
        return resume_in_place(cfg, output_dir, resume_path, there, results)
    if there and not cfg.overwrite:
        raise RunDirError(
            f"--output-dir {output_dir} holds another run ({', '.join(there)}). Continue it with --resume auto, "
            "start over with --overwrite (removes those files), or choose another --output-dir")
    if resume_path is not None:
        check_steps_left(cfg, resume_path)
    return {"resume_from": resume_path and str(resume_path), "remove": there, "why": "--overwrite"}


def check_keeps_resumed(output_dir: Path, decided: dict) -> None:
    """Refuse a plan that would remove the checkpoint it resumes (or a directory holding it), whatever
    path, link or '..' named it: --overwrite removes only what came after that checkpoint."""
    if not decided.get("resume_from"):
        return
    resumed = Path(decided["resume_from"]).resolve()
    for name in decided.get("remove", []):
        doomed = (output_dir / name.rstrip("/")).resolve()
        if resumed == doomed or doomed in resumed.parents:
            raise RunDirError(f"--resume {decided['resume_from']}: removing {output_dir / name} ({decided['why']}) would "
                              "remove the checkpoint this run resumes; resume it into another --output-dir")


def resume_in_place(cfg: TrainConfig, output_dir: Path, resume_path: Path, there: list[str],
                    results: dict | None) -> dict:
    """--resume CHECKPOINT of the run in `output_dir` itself. What the run saved after that checkpoint
    (later checkpoints, a finished run's results.json) is never replaced without --overwrite."""
    step = checkpoint.read_state(resume_path)["global_step"]
    steps = {p: checkpoint.read_state(p)["global_step"] for p in checkpoint.complete_checkpoints(output_dir)}
    later = [p for p, at in steps.items() if at > step]
    finished = finished_results(results, cfg)
    if not later and finished and finished["steps"] == step:  # the newest checkpoint of a finished run
        return {"resume_from": str(resume_path), "continues": True, "finished": finished}
    check_steps_left(cfg, resume_path)
    done = max([steps[p] for p in later] + [results["steps"] if results else 0])
    if done > step and not cfg.overwrite:
        raise RunDirError(
            f"--resume {resume_path}: that checkpoint is at step {step}, but the run in {output_dir} went on to step "
            f"{done}; resuming it would replace what came after. Continue from step {done} with --resume auto, "
            f"resume step {step} into a new --output-dir, or drop what came after with --overwrite")
    names = [f"checkpoints/{p.name}" for p in later] + [n for n in ("results.json",) if n in there and done > step]
    return {"resume_from": str(resume_path), "continues": True, "remove": names, "why": f"resuming from step {step}"}


def check_steps_left(cfg: TrainConfig, path: Path) -> None:
    """Refuse a resume that asks for fewer steps in all than the checkpoint at `path` has taken."""
    state = checkpoint.read_state(path)
    step, per_epoch = state["global_step"], steps_per_epoch(state)
    wanted = min(cfg.epochs * per_epoch, cfg.max_steps or math.inf)
    if wanted < step:
        asks = f"--epochs {cfg.epochs}" + (f" --max-steps {cfg.max_steps}" if cfg.max_steps else "")
        raise RunDirError(
            f"{asks} asks for {wanted} steps in all, but {path} has already taken {step} ({per_epoch} steps an "
            f"epoch); ask for at least as many (--epochs {math.ceil(step / per_epoch)}"
            + (f", --max-steps {step}" if cfg.max_steps else "") + "), or start a new run without --resume (--overwrite, or a "
            "new --output-dir)")


def clear(plan: Plan) -> None:
    """Remove what `plan` says must go and point outputs/latest at a new run (main process, once the
    data, flags and checkpoint have all been checked)."""
    output_dir = Path(plan.output_dir)
    if plan.remove:
        print(f"mnist_dist: {plan.why}: removing {', '.join(plan.remove)} from {output_dir}")
    for name in plan.remove:
        path = output_dir / name.rstrip("/")
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    if plan.new:
        point_latest_at(output_dir)
    # said where a user may expect otherwise: a new run of theirs inside outputs/, once (not on its resumes)
    elif (not plan.continues and output_dir.absolute().parent == RUNS_ROOT.absolute() and LATEST.is_symlink()
          and os.readlink(LATEST) != output_dir.name):
        print(f"mnist_dist: {LATEST} still points at {os.readlink(LATEST)}: it follows the runs without --output-dir")


def finished_results(results: dict | None, cfg: TrainConfig) -> dict | None:
    """`results` (results.json, checked) if its run already took every step `cfg` asks for, or stopped early,
    else None."""
    if results is None:
        return None
    per_epoch = math.ceil(results["train_samples"] / results["global_batch_size"])
    wanted = min(cfg.epochs * per_epoch, cfg.max_steps or math.inf)
    return results if results["steps"] >= wanted or stopped_early(results) else None  # more steps: no change


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
        tmp.unlink(missing_ok=True)
        print(f"mnist_dist: warning: could not point {LATEST} at {run_dir} ({err})")


def left_behind(output_dir: Path) -> list[str]:
    """The names of what a run wrote that are in `output_dir` (an empty directory or file does not count:
    a run stopped during start-up leaves an empty metrics.jsonl)."""
    found = []
    for name in RUN_FILES:
        path = output_dir / name
        if path.is_dir() and not any(path.iterdir()) or path.is_file() and path.stat().st_size == 0:
            continue
        if path.exists() or path.is_symlink():
            found.append(name + ("/" if path.is_dir() else ""))
    return found


def check_writable(output_dir: Path) -> None:
    """Refuse, before anything is read or written, a directory that cannot be made or written."""
    flag = f"--output-dir {output_dir}"
    if output_dir.absolute() == Path(output_dir.absolute().anchor):  # --overwrite would clear the whole disk's files
        raise RunDirError(f"{flag}: the root of the file system; choose a directory of its own")
    if output_dir.is_symlink() and not output_dir.exists():
        raise RunDirError(f"{flag}: a symbolic link to {os.readlink(output_dir)}, which does not exist; "
                          "create its target or choose another --output-dir")
    if output_dir.exists() and not output_dir.is_dir():
        raise RunDirError(f"{flag}: is a file, not a directory; choose another --output-dir")
    existing = next(p for p in [output_dir, *output_dir.absolute().parents] if p.exists())
    if not existing.is_dir():
        raise RunDirError(f"{flag}: {existing} is a file, so no directory can be made inside it; choose another "
                          "--output-dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RunDirError(f"{flag}: cannot write to {existing} (permission denied); choose another --output-dir")


class RunLock:
    """The run's hold on its directory: an OS file lock plus a note of who holds it (host, pid)."""

    def __init__(self, output_dir: Path, made: list[Path] | None = None):
        self.output_dir, self.made = output_dir, made or []  # made: by this run, removed if it stays empty
        # no soft-lock fallback where flock is missing: a killed run's marker file would block its resume
        self.lock = FileLock(output_dir / LOCK_NAME, timeout=0, fallback_to_soft=False)
        self.holder = output_dir / HOLDER_NAME

    def __getstate__(self) -> dict:  # another process gets the directory, never the held lock
        return {"output_dir": self.output_dir, "made": self.made}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def acquire(self) -> "RunLock":
        try:
            self.lock.acquire()
            self.holder.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                               "since": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
        except Timeout:
            raise RunDirError(f"--output-dir {self.output_dir}: another run is using it ({self._holder()}); wait for "
                              "it to end, or choose another --output-dir") from None
        except OSError as err:  # the file system refuses the lock or the note
            self.release()
            raise RunDirError(f"--output-dir {self.output_dir}: cannot lock it ({err})") from None
        return self

    def release(self) -> None:
        """Let go of the directory; those this run made and left empty (it failed early) are removed."""
        if not self.lock.is_locked:
            return
        try:  # a directory made unwritable mid-run keeps its note: the error that ended the run is the one to tell
            self.holder.unlink(missing_ok=True)
            empty = self.made and all(p.name == LOCK_NAME for p in self.output_dir.iterdir())
            if empty:
                (self.output_dir / LOCK_NAME).unlink(missing_ok=True)
        except OSError:
            empty = False
        self.lock.release()
        for path in self.made if empty else []:  # innermost first
            try:
                path.rmdir()
            except OSError:
                break

    def _holder(self) -> str:
        try:
            who = read_json(self.holder, limit=4096)
            return f"process {shown(who['pid'])} on {shown(who['host'])}, since {shown(who['since'])}"
        except (OSError, ValueError, KeyError, TypeError):
            return "holder unknown"

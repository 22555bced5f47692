"""Experiment tracking through Accelerate's trackers (W&B, TensorBoard), on the main process only (one
W&B run per launch), plus OUTPUT_DIR/metrics.jsonl whatever the tracker: one JSON object per logged step.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import uuid
from pathlib import Path

from accelerate import Accelerator

from . import atomic
from .config import ConfigError, TrainConfig
from .readback import MAX_LINE_BYTES, UnreadableFile, parse_json, read_json

METRICS_NAME = "metrics.jsonl"


def log_with(cfg: TrainConfig) -> list[str]:
    """The Accelerate tracker names for --report-to."""
    names = {"wandb": ["wandb"], "tensorboard": ["tensorboard"], "all": ["wandb", "tensorboard"], "none": []}
    chosen = names[cfg.report_to]
    if "tensorboard" in chosen:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise ConfigError(
                f"--report-to={cfg.report_to!r} needs TensorBoard: pip install 'mnist_dist[tensorboard]'"
            ) from None
    return chosen


def wandb_mode(cfg: TrainConfig) -> tuple[str, str | None]:
    """(mode, a line to tell the user or None): --wandb-mode, else $WANDB_MODE, else online if logged in."""
    mode = cfg.wandb_mode or os.environ.get("WANDB_MODE")
    if mode in ("dryrun",):
        mode = "offline"
    if mode:
        return mode, None
    import wandb

    if wandb.login(prompt=False, verify=False):  # a key in WANDB_API_KEY, W&B's settings or .netrc
        return "online", None
    return "offline", "W&B: no API key (wandb login / WANDB_API_KEY), logging offline"


def project(cfg: TrainConfig) -> str:
    """--wandb-project, else $WANDB_PROJECT, else mnist_dist: a flag beats the environment, as in W&B."""
    return cfg.wandb_project or os.environ.get("WANDB_PROJECT") or "mnist_dist"


def git_commit() -> str | None:
    """The git commit of mnist_dist's checkout, or None (an installed copy, no git)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                                text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return commit.stdout.strip() if commit.returncode == 0 else None


def run_metadata() -> dict:
    """What the tracker's config gets besides the training config: git commit and SLURM job, when present."""
    meta = {"git_commit": commit} if (commit := git_commit()) else {}
    for var in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_RESTART_COUNT"):
        if os.environ.get(var):
            meta[var.lower()] = os.environ[var]
    return meta


def start_run(cfg: TrainConfig, accelerator: Accelerator, config: dict, kept_id: str | None, train_len: int) -> str:
    """Start the trackers for this run; return its id: `kept_id` (a checkpoint resumed in place keeps its
    run's), else a new one (a checkpoint resumed into another directory starts a run of its own)."""
    run_id = kept_id or uuid.uuid4().hex[:16]
    world = accelerator.num_processes
    start(accelerator, cfg, {**config, "world_size": world, "global_batch_size": cfg.global_batch(world),
                             "train_samples": train_len, "device_type": accelerator.device.type, **run_metadata()},
          run_id)
    return run_id


def start(accelerator: Accelerator, cfg: TrainConfig, config: dict, run_id: str) -> None:
    """Start the trackers (main process); W&B's run takes the id of the run (`run_id`), so that a resumed
    run continues the same W&B run."""
    if not accelerator.log_with:
        return
    init_kwargs = {}
    if "wandb" in [str(t) for t in accelerator.log_with]:
        import wandb

        mode, note = wandb_mode(cfg)
        if note and accelerator.is_main_process:
            print(f"mnist_dist: {note}")
        # None leaves W&B to read $WANDB_ENTITY, $WANDB_NAME, $WANDB_RUN_GROUP and $WANDB_TAGS itself
        init_kwargs["wandb"] = {
            "entity": cfg.wandb_entity, "name": cfg.run_name, "mode": mode,
            "dir": os.environ.get("WANDB_DIR") or str(cfg.output_dir),
            "id": os.environ.get("WANDB_RUN_ID") or run_id, "resume": "allow",
            # no network: give up on the server after 30 s ($WANDB_INIT_TIMEOUT) instead of the default 90
            "settings": wandb.Settings(init_timeout=float(os.environ.get("WANDB_INIT_TIMEOUT", 30)), quiet=True),
        }
        try:
            accelerator.init_trackers(project(cfg), config=config, init_kwargs=init_kwargs)
        except Exception as err:  # the server is unreachable: keep the run, log it offline
            if mode != "online":
                raise
            if accelerator.is_main_process:
                print(f"mnist_dist: W&B server unreachable ({type(err).__name__}: {err}); logging offline")
            accelerator.trackers = []
            wandb.teardown()  # forget the half-started online run, so its id can be used offline
            init_kwargs["wandb"]["mode"] = "offline"
            accelerator.init_trackers(project(cfg), config=config, init_kwargs=init_kwargs)
        return
    accelerator.init_trackers(project(cfg), config=config, init_kwargs=init_kwargs)


def finish(accelerator: Accelerator, cfg: TrainConfig, summary: dict) -> None:
    """Write the run summary (final test accuracy; the best validation model's), log the model with --log-model, and say how to
    sync an offline W&B run. Trackers only exist on the main process."""
    for tracker in accelerator.trackers:
        if tracker.name == "wandb":
            run = tracker.tracker
            run.summary.update(summary)
            if cfg.log_model:
                log_model(run, Path(cfg.output_dir))
            if run.settings.mode == "offline":
                print(f"mnist_dist: W&B run logged offline; upload it with: wandb sync {run.dir.rsplit('/files', 1)[0]}")


def log_model(run, output_dir: Path) -> None:
    """--log-model: the final model.safetensors and config.json as a W&B artifact of type "model"."""
    import wandb

    artifact = wandb.Artifact(f"model-{run.id}", type="model",
                              metadata=read_json(output_dir / "config.json"))
    for name in ("model.safetensors", "config.json"):
        artifact.add_file(str(output_dir / name))
    run.log_artifact(artifact)


def log_images(accelerator: Accelerator, pictures: dict[str, Path], step: int) -> None:
    """Send the run's PNG pictures to W&B and TensorBoard as images (main process)."""
    if not accelerator.is_main_process:
        return
    for tracker in accelerator.trackers:
        if tracker.name == "wandb":
            import wandb

            tracker.tracker.log({f"pictures/{name}": wandb.Image(str(path)) for name, path in pictures.items()},
                                step=step)
        elif tracker.name == "tensorboard":
            import numpy as np
            from PIL import Image

            for name, path in pictures.items():
                with Image.open(path) as image:
                    pixels = np.asarray(image.convert("RGB"))
                tracker.writer.add_image(f"pictures/{name}", pixels, step, dataformats="HWC")
            tracker.writer.flush()


def replay(accelerator: Accelerator, records: list[dict]) -> None:
    """Log again what a resumed run had logged up to its checkpoint, from the first step its W&B run
    lacks: a killed run may not have flushed its last records (offline, nothing reaches disk after a
    kill -9), and the run's history then has every step once."""
    if not accelerator.is_main_process or not accelerator.trackers:
        return
    first = 0
    for tracker in accelerator.trackers:
        if tracker.name == "wandb":
            first = tracker.tracker.step  # the next step W&B expects: 0 offline, past the last logged online
    for record in records:
        if record["step"] >= first:
            accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])


class MetricsLog:
    """OUTPUT_DIR/metrics.jsonl on the main process: one {"step": ..., metrics...} object per line."""

    def __init__(self, output_dir: str | Path, enabled: bool, resume_step: int | None):
        self.path = Path(output_dir) / METRICS_NAME
        self.enabled, self.kept = enabled, []
        if enabled and resume_step is not None and self.path.exists():
            # drop what the interrupted run logged after its checkpoint: it is about to be logged again
            self.kept = [r for r in read_records(self.path) if r["step"] <= resume_step]
            atomic.write_text(self.path, "".join(json.dumps(record) + "\n" for record in self.kept))
        elif enabled:
            self.path.write_text("")

    def records(self) -> list[dict]:
        """What was logged up to the step resumed from (read once, checked)."""
        return self.kept

    def write(self, step: int, values: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, **values}) + "\n")


def read_records(path: Path) -> list[dict]:
    """The records of metrics.jsonl at `path`, each a JSON object with an integer step and finite numbers
    (`readback`). A line that is not (cut short by a kill, edited) is skipped with one warning; a file
    that cannot be read at all is an error naming it."""
    if not path.is_file():
        raise ConfigError(f"{path}: not a file; move it away, or start over with --overwrite")
    records, skipped, number = [], [], 0
    with open(path, "rb") as f:
        while line := f.readline(MAX_LINE_BYTES + 1):  # a line of a gigabyte is never held whole
            number += 1
            if len(line) > MAX_LINE_BYTES:
                while line and not line.endswith(b"\n"):  # the rest of the overlong line
                    line = f.readline(MAX_LINE_BYTES)
                skipped.append(number)
                continue
            try:
                record = parse_json(line, f"{path}, line {number}")
            except UnreadableFile:
                skipped.append(number)
                continue
            if is_record(record):
                records.append(record)
            else:
                skipped.append(number)
    if skipped:
        print(f"mnist_dist: warning: {path}: skipping {len(skipped)} damaged line(s) ({', '.join(map(str, skipped[:5]))}"
              f"{', ...' if len(skipped) > 5 else ''})")
    return records


def is_record(record) -> bool:
    """A metrics.jsonl record as `MetricsLog.write` writes it: a step >= 0 and finite numbers."""
    numbers = all(type(v) in (int, float) and math.isfinite(v) for v in record.values()) if isinstance(record, dict) else False
    return numbers and type(record.get("step")) is int and record["step"] >= 0

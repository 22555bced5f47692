"""Stopping a sweep's losing points early, with Optuna's own pruners and one decision for all of a trial's
processes. The worker that supervises a trial's first run (its first seed) reads the validation scores the
run logs to its metrics.jsonl as they appear and reports each to the trial by optimizer step (with or
without a pruner: optuna-dashboard draws them), and, when the pruner says so, stops the run the way SIGTERM does: every process saves a checkpoint and exits 75. The trial
ends PRUNED, with `pruned.txt` beside its runs saying at which step; its other seeds are never trained, and
no later start of the sweep takes it up again. A worker killed while it decided leaves the scores on disk:
the next one reports them again and decides before it trains on. The test set never enters the decision.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import optuna

from .sweep_report import PRUNED_NAME
from .sweep_spec import PRUNERS, Spec

__all__ = ["PRUNED_NAME", "Curve", "Decider", "make_pruner", "pruned_text", "trial_of"]
METRICS_FILE = "metrics.jsonl"  # what a run logs (mnist_dist.tracking.METRICS_NAME; not imported: no torch here)
MAX_READ_BYTES = 2**24  # of new metrics.jsonl lines per look: a run logs a few hundred bytes a step


def make_pruner(spec: Spec) -> optuna.pruners.BasePruner:
    """The SPEC's pruner, with its settings (PRUNERS: defaults where the SPEC gives none)."""
    name = spec.pruner["name"]
    args = {arg: spec.pruner.get(key, default) for key, (_, arg, default) in PRUNERS[name].items()}
    if name == "median":
        return optuna.pruners.MedianPruner(**args)
    if name == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(**args)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(**{**args, "max_resource": args["max_resource"] or "auto"})
    return optuna.pruners.NopPruner()


class Curve:
    """The validation scores a run logs to its metrics.jsonl (`val/accuracy` or `val/loss` at each evaluation),
    read as they appear: only whole lines, and from the start again where the run rewrote the file (a resume
    drops what came after its checkpoint)."""

    def __init__(self, run_dir: Path, metric: str):
        self.path, self.key = Path(run_dir) / METRICS_FILE, "val/" + metric.removeprefix("val_")
        self.offset, self.inode = 0, None

    def new_points(self) -> list[tuple[int, float]]:
        """(step, score) of the evaluations logged since the last look."""
        try:
            with open(self.path, "rb") as f:
                stat = os.fstat(f.fileno())  # the file read, not whatever the path names a moment later
                if stat.st_ino != self.inode or stat.st_size < self.offset:
                    self.offset, self.inode = 0, stat.st_ino
                f.seek(self.offset)
                chunk = f.read(MAX_READ_BYTES)
        except FileNotFoundError:
            return []
        whole = chunk[: chunk.rfind(b"\n") + 1]
        self.offset += len(whole)
        return [point for line in whole.splitlines() if (point := self.score_in(line))]

    def score_in(self, line: bytes) -> tuple[int, float] | None:
        try:
            record = json.loads(line)
        except ValueError:
            return None
        step, value = (record.get("step"), record.get(self.key)) if isinstance(record, dict) else (None, None)
        if type(step) is int and isinstance(value, (int, float)) and math.isfinite(value):
            return step, float(value)
        return None


def trial_of(study, number: int) -> optuna.trial.Trial:
    """Trial `number` of `study`, to report to and set attributes on (a study's trials are numbered from 0)."""
    frozen = study.get_trials(deepcopy=False)[number]
    return optuna.trial.Trial(study, frozen._trial_id)  # Optuna has no public handle to a trial by its number


class Decider:
    """Trial `number`'s pruning: its first run's scores reported by step, and the pruner asked."""

    def __init__(self, study, number: int, run_dir: Path, metric: str):
        self.trial = trial_of(study, number)
        self.reported = set(study.get_trials(deepcopy=False)[number].intermediate_values)  # a killed worker's stand
        self.curve, self.last = Curve(run_dir, metric), None

    def report_new(self) -> bool:
        """Report what the run logged since the last look; whether there was a step not reported before."""
        new = False
        for step, value in self.curve.new_points():
            if step not in self.reported:
                self.trial.report(value, step)
                self.reported.add(step)
                new = True
            self.last = (step, value)
        return new

    def prune_at(self, first_look: bool = False) -> tuple[int, float] | None:
        """(step, score) where the pruner says stop after the newly logged scores, else None; the pruner is asked
        only about a new step (each ask reads the study), and at the first look (the scores a killed worker left)."""
        new = self.report_new()
        return self.last if self.last and (new or first_look) and self.trial.should_prune() else None


def pruned_text(spec: Spec, step: int, value: float, run_dir: Path) -> str:
    """What pruned.txt says: the step decided at, its score, and the step the run reached (its newest checkpoint)."""
    saved = [int(p.name.removeprefix("step_")) for p in (run_dir / "checkpoints").glob("step_*")
             if p.name.removeprefix("step_").isdigit()]
    reached = f"; its run stopped with a checkpoint at step {max(saved)}" if saved else ""
    return f"pruned at step {step}: {spec.choose_on} {value:.4f} (the {spec.pruner['name']} pruner){reached}"

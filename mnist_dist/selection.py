"""Choosing the model on held-out data: scoring a model on the validation or test split with every
process taking a share, the best model of the validation split in OUTPUT_DIR/best, and early stopping.

The test set chooses nothing: with a validation split it is scored once, at the end, on the final model
and on the best one. Each decision here follows from numbers every process holds alike (the sums over
all processes), so every process decides the same at the same step without another collective.
"""

from __future__ import annotations

import time
from pathlib import Path

from . import checkpoint, data
from .checkpoint import CheckpointError
from .data import VALIDATION, Split
from .evaluation import evaluate, evaluate_shard
from .model import load_model


class Scorer:
    """Evaluates a model on named splits over every process, each image counted once: on the DataLoader
    path through prepared loaders and `gather_for_metrics` (which drops the padding of the last batches),
    on the others through each process's unpadded share on the device (`data.eval_shard`)."""

    def __init__(self, accelerator, splits: dict[str, Split], data_path: str, batch_size: int, num_workers: int,
                 stats: tuple[float, float]):
        self.accelerator, self.stats = accelerator, stats
        rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
        self.batches = {
            name: accelerator.prepare(data.eval_loader(split, batch_size, num_workers)) if data_path == "dataloader"
            else data.eval_shard(split, batch_size, rank, world, device)
            for name, split in splits.items()
        }

    def score(self, model, split: str) -> dict:
        """Accuracy, loss, per-class accuracy and confusion matrix of `model` on `split`, all processes."""
        batches = self.batches[split]
        if isinstance(batches, list):
            return evaluate_shard(model, batches, self.stats, self.sum_over_processes)
        return evaluate(model, batches, gather=self.accelerator.gather_for_metrics, normalization=self.stats)

    def sum_over_processes(self, tensor):
        return self.accelerator.reduce(tensor, reduction="sum")


class ModelSelection:
    """The validation evaluations (each epoch's end, every --eval-every steps), the best model they find
    (--keep-best) and --early-stopping-patience. Inactive without a validation split: the run then scores
    each epoch on the test set for its curve, and chooses nothing."""

    def __init__(self, cfg, accelerator, scorer: Scorer, report, model_cfg: dict, has_validation: bool):
        self.cfg, self.accelerator, self.scorer, self.report, self.model_cfg = cfg, accelerator, scorer, report, model_cfg
        self.active = has_validation
        self.keep_best = has_validation and cfg.keep_best is not False  # on by default with a validation split
        self.output_dir = Path(cfg.output_dir)
        self.saved_step: int | None = None  # the step whose model best/ holds

    def due(self, state, steps_per_epoch: int, total_steps: int) -> bool:
        """An --eval-every point inside an epoch (epoch ends are always evaluated)."""
        inside = state.batch_in_epoch < steps_per_epoch and state.global_step < total_steps
        return self.active and bool(self.cfg.eval_every) and state.global_step % self.cfg.eval_every == 0 and inside

    def validate(self, model, state) -> float:
        """Score the model on the validation split at this step (once a step), log it, note the best and
        whether patience ran out. Returns the seconds it took."""
        began = time.perf_counter()
        if state.last_validation and state.last_validation["step"] == state.global_step:
            return 0.0
        metrics = self.scorer.score(model, VALIDATION)
        state.validated(metrics, self.cfg.early_stopping_min_delta, self.cfg.early_stopping_patience)
        self.report.log({"val/accuracy": metrics["accuracy"], "val/loss": metrics["loss"],
                         "val/best_accuracy": state.best_val_accuracy}, state.global_step)
        if state.stopped_early:
            self.report.say(f"mnist_dist: stopping early at step {state.global_step}: no validation accuracy above "
                            f"{state.best_val_accuracy:.4f} (step {state.best_step}) + {self.cfg.early_stopping_min_delta:g} "
                            f"in {state.evals_since_best} evaluations (--early-stopping-patience)")
        return time.perf_counter() - began

    def new_best(self, state) -> bool:
        """Whether this step's validation found a best model that best/ does not hold yet."""
        return self.keep_best and state.best_step == state.global_step and self.saved_step != state.global_step

    def keep_if_best(self, model, state) -> None:
        """Write the model into best/ if it is a new best; called after the step's checkpoint is saved, so
        that a kill between the two leaves a checkpoint from which `check_resumed` rewrites it."""
        if self.new_best(state):
            meta = {"step": state.global_step, "val_accuracy": state.best_val_accuracy}
            checkpoint.save_best(self.accelerator, self.output_dir, model, self.model_cfg, meta)
            self.saved_step = state.global_step

    def check_resumed(self, model, state, resume_from: Path) -> None:
        """On a resume: best/ must hold the checkpoint's best model. A kill between a checkpoint and best/
        left the previous best there: the checkpoint's own weights are the best then, and are written."""
        if not self.keep_best or state.best_step is None:
            return
        meta = checkpoint.read_best(self.output_dir)
        if meta is not None and meta["step"] == state.best_step:
            self.saved_step = state.best_step
        elif state.best_step == state.global_step:
            self.keep_if_best(model, state)
        else:
            held = f"the model of step {meta['step']}" if meta else "no model"
            raise CheckpointError(
                f"{self.output_dir / checkpoint.BEST_DIR} holds {held}, but the best model of {resume_from} is that of "
                f"step {state.best_step}: resume in the run's own --output-dir from its newest checkpoint, or pass "
                "--no-keep-best")

    def results(self, state, final_validation: dict) -> dict:
        """results.json's "validation" and "best" entries; the best model is scored on the test set here."""
        if not self.active:
            return {}
        best = {"selected_on": "validation accuracy", "step": state.best_step, "val_accuracy": state.best_val_accuracy,
                "model_dir": None}
        if self.keep_best:
            meta = checkpoint.read_best(self.output_dir)
            if meta is None or meta["step"] != state.best_step:
                raise CheckpointError(f"{self.output_dir / checkpoint.BEST_DIR}: holds {meta}, not the model of step "
                                      f"{state.best_step} (the best validation accuracy)")
            model, _ = load_model(self.output_dir / checkpoint.BEST_DIR)
            test = self.scorer.score(model.to(self.accelerator.device), "test")
            best |= {"model_dir": str(self.output_dir / checkpoint.BEST_DIR), "test_accuracy": test["accuracy"],
                     "test_loss": test["loss"], "test_samples": test["samples"]}
        return {"validation": final_validation, "best": best}

"""Choosing the model on held-out data: scoring a model on the validation or test split with every
process taking a share, the best model of the validation split in OUTPUT_DIR/best, and early stopping.

The test set chooses nothing: with a validation split it is scored once, at the end, on the final model
and on the best one. Each decision here follows from numbers every process holds alike (the sums over
all processes), so every process decides the same at the same step without another collective.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import checkpoint, data, sources
from .atomic import fsync_dir, replacing, write_json
from .checkpoint import CheckpointError, DiskError
from .config import SCORES, ConfigError, TrainConfig
from .data import VALIDATION, Split
from .distributed import any_process, threads_for_rows
from .metrics import evaluate, evaluate_shard
from .model import CONFIG_NAME, WEIGHTS_NAME, build_model


@dataclass
class RunData:
    """The splits a run trains, validates and tests on, their fingerprint and the input scaling."""

    train: Split
    test: Split
    validation: Split | None
    validation_source: str | None  # where the validation split came from, in words
    fingerprint: dict  # data.fingerprint: what checkpoints record and resumes check
    stats: tuple[float, float]  # (mean, std) on the 0..1 pixel scale, saved with the model


def load_run_data(cfg: TrainConfig, accelerator) -> RunData:
    """The run's splits: the dataset's validation split if it has one, else --val-fraction of the training
    split held out, else none. Refuses the model-selection flags without a validation split."""
    with accelerator.local_main_process_first():  # one process per node decodes and caches, the others read
        splits = sources.load_splits(cfg.dataset, cfg.data_dir, cfg.cache_dir, cfg.image_column, cfg.label_column)
    train_set, val_set, held_out, source = splits["train"], splits.get(VALIDATION), None, None
    if val_set is not None:
        source = f"the dataset's {VALIDATION} split" + (f"; --val-fraction {cfg.val_fraction} is not used" if cfg.val_fraction else "")
    elif cfg.val_fraction:
        train_set, val_set, indices = data.hold_out(train_set, cfg.val_fraction, cfg.seed)
        held_out = {"fraction": cfg.val_fraction, "seed": cfg.seed, "indices_sha256": data.indices_digest(indices)}
        source = f"{100 * cfg.val_fraction:g}% of the training split, each class alike, chosen by --seed {cfg.seed}"
    check_selection_flags(cfg, val_set is not None)
    used = {"train": train_set, "test": splits["test"], **({VALIDATION: val_set} if val_set is not None else {})}
    stats = data.pixel_stats(train_set.images) if cfg.normalization == "dataset" else data.SCALINGS[cfg.normalization]
    return RunData(train_set, splits["test"], val_set, source, data.fingerprint(used, held_out), stats)


def check_selection_flags(cfg: TrainConfig, has_validation: bool) -> None:
    """The model-selection flags choose on a validation split: refused without one."""
    if has_validation:
        return
    for name, given in (("eval_every", cfg.eval_every is not None), ("keep_best", cfg.keep_best is True),
                        ("early_stopping_patience", cfg.early_stopping_patience is not None),
                        ("early_stopping_min_delta", cfg.early_stopping_min_delta != 0)):
        if given:
            raise ConfigError(f"--{name.replace('_', '-')}={getattr(cfg, name)!r}: needs a validation split, and "
                              f"{cfg.dataset} has none; hold one out with --val-fraction (0.1, say)")


class EvaluationError(RuntimeError):
    """An evaluation whose loss is not finite: the model's outputs overflow. Every process raises it alike
    (the sums are all processes')."""


class Scorer:
    """Evaluates a model on named splits over every process, each image counted once: on the DataLoader
    path through prepared loaders and `gather_for_metrics` (which drops the padding of the last batches),
    on the others through each process's unpadded share on the device (`data.eval_shard`)."""

    def __init__(self, accelerator, splits: dict[str, Split], data_path: str, batch_size: int, num_workers: int,
                 stats: tuple[float, float]):
        self.accelerator, self.stats = accelerator, stats
        rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
        # the fewest rows a process's batch of each split has (a short last one), for `threads_for_rows`
        self.fewest_rows = {name: (len(split) % (batch_size * world)) // world or batch_size
                            for name, split in splits.items()}
        self.batches = {
            name: accelerator.prepare(data.eval_loader(split, batch_size, num_workers)) if data_path == "dataloader"
            else data.eval_shard(split, batch_size, rank, world, device)
            for name, split in splits.items()
        }

    @classmethod
    def for_run(cls, accelerator, splits: RunData, data_path: str, cfg: TrainConfig) -> "Scorer":
        """A scorer of the run's test set and, if it has one, its validation split."""
        named = {"test": splits.test, **({VALIDATION: splits.validation} if splits.validation else {})}
        return cls(accelerator, named, data_path, cfg.eval_batch_size, cfg.num_workers, splits.stats)

    def score(self, model, split: str) -> dict:
        """Accuracy, loss, per-class accuracy and confusion matrix of `model` on `split`, all processes."""
        batches = self.batches[split]
        with threads_for_rows(self.fewest_rows[split], self.accelerator.device):  # the same bits at any thread count
            if isinstance(batches, list):
                metrics = evaluate_shard(model, batches, self.stats, self.sum_over_processes)
            else:
                metrics = evaluate(model, batches, gather=self.accelerator.gather_for_metrics, normalization=self.stats)
        if not math.isfinite(metrics["loss"]):  # before it reaches a history, a checkpoint or results.json
            raise EvaluationError(f"evaluating on the {split} split gave a non-finite loss ({metrics['loss']}): the "
                                  "model's outputs overflow. Lower --lr, or resume an earlier checkpoint")
        return metrics

    def sum_over_processes(self, tensor):
        return self.accelerator.reduce(tensor, reduction="sum")


class ModelSelection:
    """The validation evaluations (each epoch's end, every --eval-every steps), the best model they find
    (--keep-best) and --early-stopping-patience. Inactive without a validation split: the run then scores
    each epoch on the test set for its curve, and chooses nothing.

    Every process keeps the best model's weights in memory (on the CPU); the main process writes them into
    OUTPUT_DIR/best, and each checkpoint holds a copy (a hard link) of best/'s file, so that a resume from
    any checkpoint, into any directory, puts back the best model of that point in the run."""

    def __init__(self, cfg, accelerator, scorer: Scorer, model_cfg: dict, has_validation: bool):
        self.cfg, self.accelerator, self.scorer, self.model_cfg = cfg, accelerator, scorer, model_cfg
        self.active = has_validation
        self.keep_best = has_validation and cfg.keep_best is not False  # on by default with a validation split
        self.output_dir = Path(cfg.output_dir)
        self.best_weights: dict | None = None  # the weights of state.best_step, CPU tensors

    def due(self, state, steps_per_epoch: int, total_steps: int) -> bool:
        """An --eval-every point inside an epoch (epoch ends are always evaluated)."""
        inside = state.batch_in_epoch < steps_per_epoch and state.global_step < total_steps
        return self.active and bool(self.cfg.eval_every) and state.global_step % self.cfg.eval_every == 0 and inside

    def validate(self, model, state, report) -> dict | None:
        """Score the model on the validation split at this step, keep it if it is the best, and note whether
        patience ran out; return the scores. None: this step was validated already (`state.last_validation`)."""
        if state.last_validation and state.last_validation["step"] == state.global_step:
            return None
        metrics, patience = self.scorer.score(model, VALIDATION), self.cfg.early_stopping_patience
        state.last_validation = {"step": state.global_step, **{name: metrics[name] for name in SCORES},
                                 "samples": metrics["samples"]}
        # a new best where it beats the best by more than --early-stopping-min-delta
        if state.best_val_accuracy is None or metrics["accuracy"] > state.best_val_accuracy + self.cfg.early_stopping_min_delta:
            state.best_val_accuracy, state.best_step, state.evals_since_best = metrics["accuracy"], state.global_step, 0
        else:
            state.evals_since_best += 1
        state.stopped_early = patience is not None and state.evals_since_best >= patience
        if self.keep_best and state.best_step == state.global_step:
            self.best_weights = self.weights_of(model)
            self.write_best(state)
        if state.stopped_early:
            report.say(f"mnist_dist: stopping early at step {state.global_step}: no validation accuracy above "
                       f"{state.best_val_accuracy:.4f} (step {state.best_step}) + {self.cfg.early_stopping_min_delta:g} "
                       f"in {state.evals_since_best} evaluations (--early-stopping-patience)")
        return metrics

    def write_best(self, state) -> None:
        """best/ from the weights kept, if any, with config.json and {"step", "val_accuracy"} in the file's
        metadata. All processes call this; the main process writes. Raises DiskError on every process if it
        could not."""
        if self.best_weights is None:
            return
        best, failure = self.output_dir / checkpoint.BEST_DIR, None
        meta = {"step": state.best_step, "val_accuracy": state.best_val_accuracy}
        if self.accelerator.is_main_process:
            failure = checkpoint.failure_writing(best, write_best_dir, best, self.best_weights, self.model_cfg,
                                         {"format": "pt", checkpoint.BEST_KEY: json.dumps(meta)})
        if any_process(self.accelerator, failure is not None):
            raise DiskError(failure or f"the main process could not write {best}")

    def checkpoint_copy(self) -> Path | None:
        """The file a checkpoint keeps a copy of: best/'s model, once there is one."""
        return self.output_dir / checkpoint.BEST_DIR / WEIGHTS_NAME if self.best_weights is not None else None

    def weights_of(self, model) -> dict:
        """A CPU copy of the plain model's weights, as write_outputs saves them (no DDP or compile wrapper;
        contiguous, as safetensors keeps them, whatever the model's memory format)."""
        plain = self.accelerator.unwrap_model(model, keep_torch_compile=False)
        return {name: t.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)
                for name, t in plain.state_dict().items()}

    def resumed(self, model, state, resumed) -> None:
        """Take the best model from the checkpoint resumed (`resume.Resume`), checked before anything is
        written; `model` holds the checkpoint's weights. A run that stopped early stays stopped, as its
        results.json says (`runs.finished_results`)."""
        if not self.keep_best or state.best_step is None:
            return
        self.best_weights, copy = self.weights_of(model), resumed.path / checkpoint.BEST_IN_CHECKPOINT
        # a checkpoint of a run without --keep-best, taken at its best step, has no copy: its own weights are the best
        if copy.is_file() or state.best_step != state.global_step:
            self.best_weights = load_best(copy, state.best_step, self.best_weights)

    def results(self, model, state, splits) -> dict:
        """results.json's "validation" (the final model's) and "best" entries; the best model is scored on
        the test set here."""
        if not self.active:
            return {}
        last = state.last_validation
        if last is None or last["step"] != state.global_step:
            last = self.scorer.score(model, VALIDATION)
        # samples: as counted over every process, each validation image once
        validation = {"source": splits.validation_source, "samples": last["samples"],
                      **{name: last[name] for name in SCORES}}
        best = {"selected_on": "validation accuracy", "step": state.best_step, "val_accuracy": state.best_val_accuracy,
                "model_dir": None}
        if self.best_weights is not None:
            best_model = build_model(self.model_cfg)
            best_model.load_state_dict(self.best_weights)
            test = self.scorer.score(best_model.to(self.accelerator.device), "test")
            best |= {"model_dir": str(self.output_dir / checkpoint.BEST_DIR), "test_samples": test["samples"],
                     **{f"test_{name}": test[name] for name in SCORES}}
        return {"validation": validation, "best": best}


def write_best_dir(best: Path, tensors: dict, model_config: dict, metadata: dict) -> None:
    """OUTPUT_DIR/best, never half-written: the first time it appears whole (a directory renamed into
    place), later only its model.safetensors is replaced."""
    directory = best if best.is_dir() else best.with_name(best.name + ".tmp")
    if directory != best:
        checkpoint.make_empty(directory)
        write_json(directory / CONFIG_NAME, model_config)
    with replacing(directory / WEIGHTS_NAME, durable=True) as tmp:
        save_file(tensors, tmp, metadata=metadata)
    fsync_dir(directory)
    if directory != best:
        os.replace(directory, best)
        fsync_dir(best.parent)


def load_best(path: Path, step: int, like: dict) -> dict:
    """The weights in `path` (a checkpoint's copy of best/), which must be the best model of `step`, with
    the names and shapes of `like` (the model's state dict): checked before they are written anywhere."""
    held = checkpoint.best_meta(path)["step"]
    if held != step:
        raise CheckpointError(f"{path}: holds the best model of step {held}, but its training state says step {step}")
    try:
        weights = load_file(path)
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path}: unreadable ({type(err).__name__}: {err})") from err
    checkpoint.check_same_shapes(path, weights, like)
    return weights

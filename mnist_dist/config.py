"""One source of configuration: the `TrainConfig` dataclass.

Every field is a command-line flag (`hidden_sizes` -> `--hidden-sizes`) whose help text
is the field's `help` metadata, with its unit. The resolved config goes into
results.json, so a run can always be read back and repeated.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field

from .readback import MAX_DEPTH, nesting, shown

# MKL's strict conditional numerical reproducibility: its matrix products give the same bits at any
# thread count (measured: 1 and 2 threads differ without it, and run no slower with it; benchmarks/
# README.md), so that a CPU run's weights do not follow the machine's load. Set here, in the module that
# everything which computes imports first (not in __init__.py, which a directory named mnist_dist in the
# working directory, a clone, turns into a namespace package that never runs); MKL reads it when it first
# computes, which is after this. A value the user set wins.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

MIXED_PRECISION_CHOICES = ("no", "fp16", "bf16")
SCHEDULE_CHOICES = ("constant", "onecycle", "cosine")
# named presets for the flags below; explicit flags still win (`--recipe tuned --lr 1e-3`)
RECIPES = {
    "record": {},  # the recipe of record: the field defaults
    # more accuracy in the same 10 epochs and batch 128 (README: Results): a one-cycle schedule peaking
    # at 3x the learning rate, label smoothing, inputs standardized with the training set's statistics
    "tuned": {"schedule": "onecycle", "lr": 3e-3, "warmup_fraction": 0.15, "label_smoothing": 0.1,
              "normalization": "dataset"},
}
DATA_PATH_CHOICES = ("auto", "dataloader", "device", "graph")
# None: no limit, no step checkpoints, no evaluations inside epochs, no early stopping
OPTIONAL_COUNTS = ("max_steps", "checkpoint_every", "eval_every", "early_stopping_patience")
MAX_VAL_FRACTION = 0.5  # of the training split: past it, more is held out than trained on
MAX_HIDDEN = 65_536  # units: 51M weights, 0.8 GB with Adam's moments and the gradients in fp32
MAX_LAYERS = 8  # hidden layers of an MLP: the tutorial's question is one to three
MAX_MLP_WEIGHTS = 2**26  # 67M: with gradients and Adam's two moments, 1 GiB in fp32
ACTIVATION_CHOICES = ("relu", "tanh", "sigmoid", "gelu")
NORMALIZATION_CHOICES = ("half", "dataset", "none")  # data.SCALINGS, and 'dataset': measured on the training split
# what an evaluation reports (`metrics.summarize`; numbers >= 0) and which way is better: results.json, the
# histories, the trackers ({split}/{name}) and sweeps (choose_on val_{name}) all take the names from here; a
# new one changes what a checkpoint holds: raise train_state.STATE_FORMAT with it
SCORES = {"loss": "minimize", "accuracy": "maximize"}
CALLABLE = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")  # --model package.module:function
MAX_BATCH = 1_048_576  # samples: past any dataset this package reads
# classes of a dataset: the confusion matrix in results.json is classes^2 counts (4M at this bound, ~10 MB of
# JSON, 32 MiB as int64), and 2,048 is past any 28x28 dataset we know (EMNIST 62, Omniglot 1,623)
MAX_CLASSES = 2_048


class ConfigError(ValueError):
    """A flag or config value that cannot work; the message names the flag."""


# what a resume does with a flag, declared by each field (`_field(resume=...)`)
RESUME_ROLES = {
    "match": "it shapes the trajectory: a resume must give the checkpoint's value",
    "match_scheduled": "a schedule is laid out over all steps: under one, a resume must give the checkpoint's value",
    "not_inherited": "where the run is and what to do with it: never taken from the checkpoint",
    "free": "taken from the checkpoint unless given; a resume may change it",
}
SHAPES = ("mlp", "augment")  # what some flags shape, and so go only with it: --model mlp, --augment


def _field(default, help: str, *, resume: str, shapes: str | None = None, **metadata):
    """A flag: its default, its help (with its unit), what a resume does with it and what it shapes."""
    assert resume in RESUME_ROLES and shapes in (None, *SHAPES), (resume, shapes)
    return field(default=default, metadata={"help": help, "resume": resume, "shapes": shapes, **metadata})


@dataclass
class TrainConfig:
    # data
    dataset: str = _field("mnist", "'mnist' (Hub ylecun/mnist), 'fashion_mnist' (Hub zalando-datasets/fashion_mnist), "
                          "'mnist-5k' (5,000 real MNIST training digits + the real 10k test set, bundled, offline), "
                          "or any dataset of 28x28 grayscale images with train and test splits: a Hub id (owner/name) "
                          "or a directory `datasets` reads (an `hf download` copy, save_to_disk)", resume="match")
    image_column: str | None = _field(None, "--dataset's image column (default: its only Image column)", resume="free")
    label_column: str | None = _field(None, "--dataset's label column (default: its only ClassLabel column)",
                                      resume="free")
    data_dir: str | None = _field(None, "read the four MNIST-format IDX files (gzip or not) from this directory "
                                  "instead of the Hub; also accepts the torchvision layout DIR/MNIST/raw",
                                  resume="free")
    cache_dir: str | None = _field(None, "where decoded datasets are cached as uint8 tensors (default: "
                                   "$MNIST_DIST_CACHE, else $XDG_CACHE_HOME/mnist_dist, else ~/.cache/mnist_dist)",
                                   resume="free")
    data_path: str = _field(
        "auto", "'dataloader': Accelerate-prepared PyTorch DataLoaders (the reference); 'device': the dataset kept "
        "on the device as uint8 and each process's batches cut from it by index (same batches); 'graph': the "
        "device path with each whole epoch replayed from one CUDA graph (one CUDA process, constant schedule, "
        "precision no or bf16; same batches); 'auto': graph where it can run, else device (docs/training.md)",
        choices=DATA_PATH_CHOICES, resume="free")
    val_fraction: float = _field(0.0, "fraction of the training split held out as the validation split (0..0.5; 0: "
                                 "none, train on all of it): the same samples of each class, chosen by --seed, on "
                                 "every process and resume. A dataset with a validation split uses that instead",
                                 resume="match")
    num_workers: int = _field(0, "DataLoader worker processes per training process, on --data-path dataloader (0: "
                                  "load in the main process)", resume="free")
    normalization: str = _field("half", "input scaling: 'half' maps pixels 0..255 to [-1, 1] (mean 0.5, std 0.5, "
                                "as the tutorials do); 'dataset' standardizes with the training set's pixel mean "
                                "and std (saved with the model); 'none' keeps them in [0, 1]",
                                choices=NORMALIZATION_CHOICES, resume="match")
    # model
    model: str = _field("mlp", "'mlp' (the record's; --hidden-sizes, --activation, --dropout, --batch-norm shape it), "
                        "'cnn' (two convolutions), or 'package.module:function' of yours: it gets the input shape "
                        "(1, 28, 28), the number of classes and --model-args, and returns a torch.nn.Module (this "
                        "imports and runs that code, at training and wherever the model is loaded; docs/models.md)",
                        resume="match")
    hidden_sizes: str = _field("256", f"mlp: units of each hidden layer, comma-separated ('512,256': two layers; "
                               f"1 to {MAX_LAYERS} layers of 1 to {MAX_HIDDEN:,} units)", parse="sizes",
                               resume="match", shapes="mlp")
    activation: str = _field("relu", "mlp: the hidden layers' activation", choices=ACTIVATION_CHOICES,
                             resume="match", shapes="mlp")
    dropout: float = _field(0.0, "mlp: dropout after each hidden layer's activation (probability, [0, 1))",
                            resume="match", shapes="mlp")
    batch_norm: bool = _field(False, "mlp: BatchNorm after each hidden layer, before its activation",
                              resume="match", shapes="mlp")
    sync_batch_norm: bool = _field(False, "BatchNorm statistics over every process's batch (torch.nn.SyncBatchNorm, "
                                   "GPUs only); without it each process normalizes with its own batch, and DDP "
                                   "broadcasts the first process's running statistics", resume="match")
    augment: bool = _field(False, "a random affine transform of each training image, drawn from --seed, the epoch "
                           "and the sample, on the device (the test and validation images never)", resume="match")
    augment_rotation: float = _field(10.0, "--augment: the most each image is turned, either way (degrees, 0 to 180)",
                                     resume="match", shapes="augment")
    augment_translation: float = _field(2.0, "--augment: the most each image is shifted in x and in y (pixels, 0 "
                                        "to 14)", resume="match", shapes="augment")
    augment_scale: float = _field(0.1, "--augment: the most each image is scaled up or down (fraction of its "
                                  "size, [0, 0.5))", resume="match", shapes="augment")
    model_args: str | None = _field(None, "the keyword arguments of --model package.module:function, as a JSON "
                                    "object ('{\"width\": 64}'); default: none", resume="match")
    # optimisation
    epochs: int = _field(10, "passes over the training set (epochs)", resume="match_scheduled")
    batch_size: int = _field(128, "training samples per process per batch; the global batch of an optimizer "
                             "step is this times the world size times --gradient-accumulation-steps", resume="free")
    gradient_accumulation_steps: int = _field(
        1, "batches each process adds the gradients of before one optimizer step (Accelerate's accumulate: one "
        "all-reduce per step); the global batch is processes x --batch-size x this", resume="free")
    eval_batch_size: int = _field(1024, "samples per process per evaluation batch (test and validation)", resume="free")
    recipe: str = _field("record", "preset for the optimisation flags: 'record' (the defaults: constant lr 1e-3) "
                         "or 'tuned' (--schedule onecycle --lr 3e-3 --warmup-fraction 0.15 --label-smoothing 0.1 "
                         "--normalization dataset); flags given explicitly override it", choices=tuple(RECIPES),
                         resume="free")
    lr: float = _field(1e-3, "learning rate per optimizer step (the peak, with a schedule)", resume="match")
    schedule: str = _field("constant", "learning-rate schedule over all steps: 'constant', 'onecycle' (warm up to "
                           "--lr, then cosine down to --lr/1e4; torch OneCycleLR) or 'cosine' (from --lr down to 0)",
                           choices=SCHEDULE_CHOICES, resume="match")
    warmup_fraction: float = _field(0.15, "onecycle: fraction of all steps spent rising to the peak --lr (0..1)",
                                    resume="match")
    label_smoothing: float = _field(0.0, "cross-entropy label smoothing for training (0: none; test loss never uses it)",
                                    resume="match")
    optimizer: str = _field("adam", "'adam' (--weight-decay: an L2 term added to the gradient) or 'adamw' (decoupled "
                            "weight decay, torch's AdamW); fused where torch has a fused kernel", choices=("adam", "adamw"),
                            resume="match")
    weight_decay: float = _field(0.0, "weight decay per optimizer step (AdamW: weights shrink by lr x this each step), "
                                 "on every parameter, biases included (0: none)", resume="match")
    max_grad_norm: float | None = _field(None, "clip the gradients' total L2 norm to this before each optimizer "
                                         "step (accelerator.clip_grad_norm_); default: no clipping. Either way "
                                         "the norm before clipping, averaged over each --log-every window, is "
                                         "logged as train/grad_norm (not on the graph path)", resume="match")
    seed: int = _field(0, "seed for weight init and the per-epoch shuffle (same on every process; 0 to 2**32 - 1)",
                       resume="match")
    max_steps: int | None = _field(None, "stop after this many optimizer steps in total, then evaluate "
                                   "(debugging); default: all epochs ('none' says so on a resume)",
                                   resume="match_scheduled")
    # model selection (they need a validation split: --val-fraction, or the dataset's own)
    eval_every: int | None = _field(None, "optimizer steps between validation evaluations, besides the one at each "
                                    "epoch end (steps); default: epoch ends only", resume="free")
    keep_best: bool | None = _field(None, "keep the model of the best validation accuracy in OUTPUT_DIR/best "
                                    "(default: on when there is a validation split)", resume="free")
    early_stopping_patience: int | None = _field(None, "stop after this many validation evaluations in a row "
                                                 "without a better validation accuracy (evaluations); default: never",
                                                 resume="free")
    early_stopping_min_delta: float = _field(0.0, "the least rise in validation accuracy (fraction 0..1) that counts "
                                             "as better, for --early-stopping-patience and --keep-best", resume="match")
    # hardware
    mixed_precision: str | None = _field(None, "autocast precision; default: what `accelerate launch` was "
                                         "configured with, else 'no'", choices=MIXED_PRECISION_CHOICES, resume="match")
    deterministic: bool = _field(False, "deterministic algorithms only (torch.use_deterministic_algorithms, cuDNN and "
                                 "cuBLAS set so): two runs on one GPU end bit-identical, at some speed; a CPU "
                                 "run is deterministic without it", resume="free")
    cpu: bool = _field(False, "train on the CPU even if a GPU is present (also makes `accelerate launch` use gloo)",
                       resume="free")
    cpu_threads: int | None = _field(None, "torch threads of each CPU process; default: $OMP_NUM_THREADS, else "
                                     "its share of the allowed cores idle at start; capped at the allowed cores. With MKL's "
                                     "strict mode (x86) the weights do not depend on it (docs/training.md)",
                                     resume="free")
    # output
    output_dir: str | None = _field(None, "the run's directory (results.json, the model, checkpoints); one run per "
                                    "directory. Default: a new outputs/run-YYYYMMDD-HHMMSS, with outputs/latest "
                                    "pointing at it (it follows only these, not a run given --output-dir); "
                                    "with --resume auto, outputs/latest", resume="not_inherited")
    profile: str | None = _field(None, "profile the third stretch of steps (from one check to the next: "
                                 "--log-every steps; an epoch on the graph path) with torch's profiler and write "
                                 "PROFILE/trace.json (Chrome trace) and PROFILE/top_ops.txt (a directory); default: off",
                                 resume="not_inherited")
    pictures: bool = _field(True, "draw the run's pictures at its end (training_curves.png, confusion_matrix.png, "
                            "misclassified.png; the trackers get them too); --no-pictures for runs nobody looks at, "
                            "such as sweep trials: about 1 s less a run (mnist_dist.evaluate draws the test set's "
                            "later)",
                            resume="free")
    overwrite: bool = _field(False, "start over in an --output-dir that holds another run: its files are removed first",
                             resume="not_inherited")
    log_every: int = _field(50, "optimizer steps between loss reads (log, progress bar) and the processes' check "
                            "for a stop signal or a non-finite step: the only host syncs in training (steps)",
                            resume="free")
    timeout: int = _field(300, "seconds a process waits for the others at any collective (a stalled or lost "
                          "peer) before the run stops with an error", resume="free")
    # tracking
    report_to: str = _field("wandb", "experiment tracker: W&B, TensorBoard, both, or none (metrics.jsonl is "
                            "written regardless)", choices=("wandb", "tensorboard", "all", "none"), resume="free")
    wandb_project: str | None = _field(None, "W&B project (also the TensorBoard run name); default: "
                                       "$WANDB_PROJECT, else mnist_dist", resume="free")
    wandb_entity: str | None = _field(None, "W&B entity (user or team); default: $WANDB_ENTITY, else the one "
                                      "your W&B account sets", resume="free")
    run_name: str | None = _field(None, "W&B run name; default: $WANDB_NAME, else W&B picks one", resume="free")
    wandb_mode: str | None = _field(None, "W&B mode; default: $WANDB_MODE, else online when logged in, else "
                                    "offline", choices=("online", "offline", "disabled"), resume="free")
    log_model: bool = _field(False, "log the final model.safetensors and config.json to W&B as a model artifact",
                             resume="free")
    # checkpoints
    checkpoint_every: int | None = _field(None, "optimizer steps between checkpoints, besides the one at each "
                                          "epoch end (steps); default: epoch ends only ('none' says so on a resume)",
                                          resume="free")
    keep_checkpoints: int = _field(2, "how many of the newest complete checkpoints OUTPUT_DIR/checkpoints keeps (the "
                                      "one behind a finished run's results.json too, until new outputs are written)",
                                   resume="free")
    resume: str | None = _field(None, "'auto': the newest checkpoint of the run in --output-dir (default "
                                "outputs/latest) that loads; a finished run is left alone, a run without "
                                "checkpoints starts again. Or a checkpoint directory. Every flag not given is "
                                "taken from the checkpoint: the run continues as it was launched",
                                resume="not_inherited")
    # not a flag: the fields given on the command line (`parse_args`), which a resume keeps while it takes
    # the others from the checkpoint; None (a config built in Python): the fields that differ from the defaults
    given: frozenset | None = field(default=None, repr=False, compare=False, metadata={"flag": False})

    def validate(self) -> "TrainConfig":
        """Raise ConfigError naming the flag for any value that cannot work."""
        hints = typing.get_type_hints(TrainConfig)
        for f in flags():
            value, choices = getattr(self, f.name), f.metadata.get("choices")
            if not _has_type(value, _flag_type(hints[f.name]), f.default is None):  # a config read back from JSON
                kind = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}[_flag_type(hints[f.name])]
                self._refuse(f.name, f"must be {kind}{' or null' if f.default is None else ''}")
            if choices and value not in choices and not (value is None and f.default is None):
                self._refuse(f.name, f"unknown {f.name.replace('_', ' ')}; choose one of {', '.join(choices)}")
        for name in ("epochs", "batch_size", "gradient_accumulation_steps", "eval_batch_size",
                     "log_every", "keep_checkpoints", "max_steps", "checkpoint_every", "eval_every",
                     "early_stopping_patience"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1) and not (value is None and name in OPTIONAL_COUNTS):
                self._refuse(name, "must be an integer >= 1")
        for name, ok, why in [
            ("num_workers", self.num_workers >= 0, "must be an integer >= 0"),
            ("lr", math.isfinite(self.lr) and self.lr > 0, "must be a finite number > 0"),
            ("warmup_fraction", 0 < self.warmup_fraction < 1, "must be between 0 and 1 (exclusive)"),
            ("label_smoothing", 0 <= self.label_smoothing < 1, "must be in [0, 1)"),
            ("val_fraction", 0 <= self.val_fraction <= MAX_VAL_FRACTION, f"must be in [0, {MAX_VAL_FRACTION}]"),
            ("early_stopping_min_delta", 0 <= self.early_stopping_min_delta < 1, "must be in [0, 1) (accuracy)"),
            ("max_grad_norm", self.max_grad_norm is None or 0 < self.max_grad_norm < math.inf,
             "must be a finite number > 0"),
            ("weight_decay", math.isfinite(self.weight_decay) and self.weight_decay >= 0, "must be a finite number >= 0"),
            ("dataset", bool(self.dataset), "must not be empty"),
            ("resume", self.resume is None or bool(self.resume), "give 'auto' or a checkpoint directory"),
            ("output_dir", self.output_dir is None or bool(self.output_dir), "must not be empty"),
            ("profile", self.profile is None or bool(self.profile) and not os.path.isfile(self.profile),
             "must be a directory (it is a file, or empty)"),
            ("profile", self.profile is None or self.resume or self.overwrite
             or not os.path.exists(os.path.join(self.profile, "trace.json")),
             "holds an earlier profile (trace.json); choose another directory, or replace it with --overwrite"),
            ("seed", isinstance(self.seed, int) and 0 <= self.seed < 2**32, "must be an integer from 0 to 2**32 - 1"),
            ("dropout", math.isfinite(self.dropout) and 0 <= self.dropout < 1, "must be in [0, 1) (a probability)"),
            ("augment_rotation", 0 <= self.augment_rotation <= 180, "must be from 0 to 180 (degrees)"),
            ("augment_translation", 0 <= self.augment_translation <= 14, "must be from 0 to 14 (pixels)"),
            ("augment_scale", 0 <= self.augment_scale < 0.5, "must be in [0, 0.5) (a fraction)"),
            ("batch_size", self.batch_size <= MAX_BATCH, f"must be at most {MAX_BATCH:,}"),
            ("eval_batch_size", self.eval_batch_size <= MAX_BATCH, f"must be at most {MAX_BATCH:,}"),
            ("timeout", isinstance(self.timeout, int) and self.timeout >= 1, "must be an integer >= 1 (seconds)"),
            ("cpu_threads", self.cpu_threads is None or self.cpu_threads >= 1, "must be an integer >= 1"),
            ("overwrite", not (self.overwrite and self.resume == "auto"), "cannot be combined with --resume auto "
             "(with --resume CHECKPOINT it drops what the run saved after that checkpoint)"),
        ]:
            if not ok:
                self._refuse(name, why)
        self._check_model()
        return self

    def _check_model(self) -> None:
        """--model names a built-in or a callable; the MLP's flags go with the MLP, --model-args with yours."""
        yours = CALLABLE.fullmatch(self.model) is not None
        if not yours:
            from .model import built_in_names  # the registry's names: this loads torch (1-4 s), as a run would next

            if self.model not in built_in_names():
                self._refuse("model", f"unknown model; choose {', '.join(built_in_names())} or package.module:function")
        sizes = self.hidden_sizes.split(",")
        if not (len(sizes) <= MAX_LAYERS and all(s.isascii() and s.isdigit() and 1 <= int(s) <= MAX_HIDDEN
                                                 for s in sizes)):
            self._refuse("hidden_sizes", f"must be 1 to {MAX_LAYERS} comma-separated integers from 1 to {MAX_HIDDEN:,}")
        widths = [784, *map(int, sizes), 10]
        if sum(a * b for a, b in zip(widths, widths[1:])) > MAX_MLP_WEIGHTS:
            self._refuse("hidden_sizes", f"makes more than {MAX_MLP_WEIGHTS:,} weights (about 1 GiB to train in fp32)")
        given = self.given_fields()  # given on the command line, or (from Python) unlike the defaults
        for name in AUGMENT_AMOUNTS:
            if not self.augment and name in given:
                self._refuse(name, "is an amount of --augment, which this run does not have")
        for name in MLP_FLAGS:
            if self.model != "mlp" and name in given:
                self._refuse(name, f"shapes --model mlp, and this run has --model {self.model}")
        if self.model_args is not None and not yours:
            self._refuse("model_args", "are the arguments of --model package.module:function")
        if self.model_args is not None:
            # config.json holds the arguments 2 levels down, and mnist_dist reads back MAX_DEPTH levels at most
            if nesting(self.model_args) > MAX_DEPTH - 2:
                self._refuse("model_args", f"nests {nesting(self.model_args)} levels deep; the run's config.json "
                             f"can hold {MAX_DEPTH - 2}")
            try:
                args = json.loads(self.model_args, parse_constant=_not_a_number)
            except ValueError as err:
                self._refuse("model_args", f"not JSON ({err})")
            if not isinstance(args, dict):
                self._refuse("model_args", "must be a JSON object of keyword arguments")

    def _refuse(self, name: str, why: str):
        raise ConfigError(f"--{name.replace('_', '-')}={shown(getattr(self, name))}: {why}")

    def to_dict(self) -> dict:
        """The flags' values (what config.json, results.json, checkpoints and W&B record)."""
        return {f.name: getattr(self, f.name) for f in flags()}

    def global_batch(self, world: int) -> int:
        """Training samples of one optimizer step on `world` processes, all of them."""
        return world * self.batch_size * self.gradient_accumulation_steps

    def given_fields(self) -> frozenset:
        """The fields this config was given: on the command line, else those that differ from the defaults."""
        if self.given is not None:
            return self.given
        return frozenset(f.name for f in flags() if getattr(self, f.name) != f.default)

    def continued(self, saved: dict) -> tuple["TrainConfig", dict]:
        """This config resuming a run whose checkpoint holds the config `saved`: every field not given is
        taken from `saved`, so that the run continues as it was launched. Returns it and what was taken."""
        given = self.given_fields()
        taken = {f.name: saved[f.name] for f in flags()
                 if f.name not in given and f.name not in NOT_INHERITED and f.name in saved
                 and saved[f.name] != getattr(self, f.name)}
        # what was given stays what was given, also for a config built in Python (`given_fields`)
        return dataclasses.replace(self, **taken, given=given), taken


def flags() -> list[dataclasses.Field]:
    """TrainConfig's fields that are command-line flags."""
    return [f for f in dataclasses.fields(TrainConfig) if f.metadata.get("flag", True)]


def flags_where(**metadata) -> tuple[str, ...]:
    """The names of the flags whose fields declare `metadata`, e.g. flags_where(resume="match")."""
    return tuple(f.name for f in flags() if all(f.metadata.get(k) == v for k, v in metadata.items()))


NOT_INHERITED = flags_where(resume="not_inherited")
MLP_FLAGS, AUGMENT_AMOUNTS = flags_where(shapes="mlp"), flags_where(shapes="augment")


def flag_kinds() -> dict[str, type]:
    """Each flag's scalar type by its field name: what its command-line value is (bool: a switch)."""
    hints = typing.get_type_hints(TrainConfig)
    return {f.name: _flag_type(hints[f.name]) for f in flags()}


def _has_type(value, kind: type, optional: bool) -> bool:
    """Whether `value` is of the flag type `kind` (an int passes as a float, a bool never as an int)."""
    if value is None:
        return optional
    if kind is float:
        return type(value) in (int, float)
    return type(value) is kind


def _count_or_none(text: str) -> int | None:
    """An optional count's flag value: an integer, or 'none'."""
    if text.lower() == "none":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: must be an integer or 'none'") from None


def _sizes(text: str) -> str:
    """--hidden-sizes as written down: '512, 256' -> '512,256'."""
    return ",".join(part.strip() for part in text.split(","))


def _flag_type(hint):
    """The scalar type of a field's type hint such as `int | None`."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
    return hint


class LaunchedParser(argparse.ArgumentParser):
    """An argument parser whose errors are said once in a launch of N processes: by the first."""

    def error(self, message: str):
        if os.environ.get("RANK", "0") != "0":  # every process got the same bad command
            self.exit(2)
        super().error(message)


TRAIN_DESCRIPTION = ("Train an MNIST classifier (the record: an MLP 784-256-10) with Hugging Face Accelerate on CPU, "
                     "one GPU or many.")


def build_parser(prog: str = "python -m mnist_dist.train", defaults: bool = True,
                 description: str = TRAIN_DESCRIPTION) -> argparse.ArgumentParser:
    """The flags of TrainConfig; with `defaults=False` a parse returns only the flags given."""
    parser = LaunchedParser(prog=prog, description=description)
    hints = typing.get_type_hints(TrainConfig)
    for f in flags():
        flag, kind, help = "--" + f.name.replace("_", "-"), _flag_type(hints[f.name]), f.metadata["help"]
        if kind is bool:
            # --no-cpu turns off, on a resume, a flag that the checkpoint's run was launched with
            action = "store_true" if f.name in NOT_INHERITED else argparse.BooleanOptionalAction
            parser.add_argument(flag, action=action, default=None if defaults else argparse.SUPPRESS,
                                help=f"{help} (default: {'on' if f.default else 'off'})" if type(f.default) is bool
                            else help)
            continue
        if "default" not in help.lower():  # one default per flag: some help texts say where theirs comes from
            help += f" (default: {f.default})"
        if f.name in OPTIONAL_COUNTS:  # "none" lifts, on a resume, a limit the checkpoint's run was launched with
            kind = _count_or_none
        if f.metadata.get("parse") == "sizes":
            kind = _sizes
        parser.add_argument(flag, type=kind, default=f.default if defaults else argparse.SUPPRESS,
                            choices=f.metadata.get("choices"), help=help.replace("%", "%%"))
    return parser


def _not_a_number(name: str):
    raise ValueError(f"{name} is not a number JSON files hold; the run's config.json could not")


def parse_args(argv: list[str] | None = None, prog: str = "python -m mnist_dist.train",
               description: str = TRAIN_DESCRIPTION) -> TrainConfig:
    """Flags -> a validated TrainConfig that knows which flags were given; a bad value exits with status 2
    and a message naming the flag. `prog`: the command that reads them (mnist_dist.doctor reads the run's)."""
    parser = build_parser(prog, description=description)
    # a recipe sets the defaults of the flags it names; anything given explicitly still wins
    known, _ = parser.parse_known_args(argv)
    recipe = RECIPES.get(known.recipe, {})
    parser.set_defaults(**recipe)
    values = vars(parser.parse_args(argv))
    defaults = TrainConfig.__dataclass_fields__  # a switch not given is its default (argparse leaves it None)
    values |= {name: defaults[name].default for name, value in values.items()
               if value is None and type(defaults[name].default) is bool}
    given = set(vars(build_parser(defaults=False).parse_args(argv)))
    if "recipe" in given:  # the flags a recipe named count as given: a resume keeps them too
        given |= set(recipe)
    try:
        return TrainConfig(**values, given=frozenset(given)).validate()
    except ConfigError as err:
        parser.error(str(err))

"""The models, in one registry: the MLP of record (784-256-10, ReLU) with its tutorial variants, a small CNN,
and any `nn.Module` a callable of yours builds. Plain PyTorch, no distributed code.

A trained model is `model.safetensors` (the weights) and `config.json` in one directory: the architecture's
name, its options, the input size, the number of classes and the input normalization, which is all
`build_model` needs; `load_model(dir)` reads both. Adding a model is one class and one `ARCHITECTURES` entry
(docs/models.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from .config import CALLABLE, MAX_CLASSES, MAX_HIDDEN, MAX_LAYERS, ConfigError
from .data import IMAGE_SIDE
from .readback import UnreadableFile, read_json, shown

WEIGHTS_NAME = "model.safetensors"
IMAGE_SHAPE = (1, 28, 28)  # channels, height, width: every dataset here is 28x28 grayscale
INPUT_SIZE = IMAGE_SIDE * IMAGE_SIDE  # the pixels a model takes, flattened: [batch, 784] normalized
CONFIG_NAME = "config.json"
ACTIVATIONS = {"relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid, "gelu": F.gelu}
IMPORTED = "import"  # the architecture name config.json gives a model built by a callable of yours
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


class MLP(nn.Module):
    """Fully connected layers fc1 ... fcN (the record: one hidden layer of 256, ReLU), each hidden one
    optionally followed by BatchNorm (bn1 ...) and dropout."""

    def __init__(self, input_size: int = INPUT_SIZE, hidden_sizes: tuple[int, ...] = (256,), num_classes: int = 10,
                 activation: str = "relu", dropout: float = 0.0, batch_norm: bool = False):
        super().__init__()
        widths = [input_size, *hidden_sizes, num_classes]
        for i, (inputs, outputs) in enumerate(zip(widths, widths[1:]), 1):  # fc1, fc2: the record's names
            setattr(self, f"fc{i}", nn.Linear(inputs, outputs))
            if batch_norm and i < len(widths) - 1:
                setattr(self, f"bn{i}", nn.BatchNorm1d(outputs))
        self.layers, self.activation, self.dropout = len(widths) - 1, ACTIVATIONS[activation], dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [batch, 784] normalized pixels -> [batch, classes] logits
        for i in range(1, self.layers):
            x = getattr(self, f"fc{i}")(x)
            if hasattr(self, f"bn{i}"):
                x = getattr(self, f"bn{i}")(x)
            x = self.activation(x)
            if self.dropout:
                x = F.dropout(x, self.dropout, self.training)
        return getattr(self, f"fc{self.layers}")(x)


class CNN(nn.Module):
    """A small convolutional net in the spirit of pytorch/examples' MNIST one, cheaper: two 3x3 convolutions
    (16, 32 channels, padded), each followed by BatchNorm, 2x2 max pooling and ReLU (28 -> 14 -> 7), a
    128-unit layer, dropout and the logits."""

    def __init__(self, num_classes: int = 10, dropout: float = 0.25):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.fc1, self.fc2 = nn.Linear(32 * 7 * 7, 128), nn.Linear(128, num_classes)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(-1, *IMAGE_SHAPE)  # [batch, 784] -> [batch, 1, 28, 28]
        # ReLU after the pooling: the same numbers (ReLU is monotonic, so it commutes with max pooling, and the
        # same gradients), on a quarter of the elements: 20-40% of a step on a 2-core CPU (docs/speed.md)
        x = F.relu(F.max_pool2d(self.bn1(self.conv1(x)), 2))
        x = F.relu(F.max_pool2d(self.bn2(self.conv2(x)), 2))
        x = F.dropout(F.relu(self.fc1(x.flatten(1))), self.dropout, self.training)
        return self.fc2(x)


@dataclass(frozen=True)
class Architecture:
    """A registry entry: how to build the model from (input shape, classes, options), which flags make its
    options (for config.json), and how to check options read back from a file."""

    build: Callable[[tuple[int, ...], int, dict], nn.Module]
    options: Callable[[object], dict]  # a TrainConfig -> the options config.json records
    check: Callable[[dict], str | None]  # options -> what is wrong with them, or None


def _mlp_options(cfg) -> dict:
    return {"hidden_sizes": [int(h) for h in cfg.hidden_sizes.split(",")], "activation": cfg.activation,
            "dropout": cfg.dropout, "batch_norm": cfg.batch_norm}


def _check_mlp(options: dict) -> str | None:
    sizes = options.get("hidden_sizes")
    if not (isinstance(sizes, list) and 1 <= len(sizes) <= MAX_LAYERS
            and all(type(h) is int and 1 <= h <= MAX_HIDDEN for h in sizes)):
        return f"hidden_sizes must be 1 to {MAX_LAYERS} integers from 1 to {MAX_HIDDEN:,}"
    if options.get("activation") not in ACTIVATIONS:
        return f"activation must be one of {', '.join(ACTIVATIONS)}"
    if not (type(options.get("dropout")) in (int, float) and 0 <= options["dropout"] < 1):
        return "dropout must be a number in [0, 1)"
    if type(options.get("batch_norm")) is not bool:
        return "batch_norm must be true or false"
    return None


def no_options(options: dict) -> str | None:
    return None if not options else f"takes no options, got {', '.join(options)}"


def _imported_options(cfg) -> dict:
    return {"callable": cfg.model, "args": model_args(cfg.model_args)}


def _check_imported(options: dict) -> str | None:
    if not (isinstance(options.get("callable"), str) and CALLABLE.fullmatch(options["callable"])):
        return "callable must be 'package.module:function'"
    return None if isinstance(options.get("args"), dict) else "args must be a JSON object"


def build_imported(input_shape: tuple[int, ...], num_classes: int, options: dict) -> nn.Module:
    """The module that `options["callable"]` ('package.module:function') returns for (input shape, classes,
    **args): this imports and runs that code, as HF's trust_remote_code does."""
    name = options["callable"]
    module_name, _, attribute = name.partition(":")
    with left_as_found(name):
        try:
            found = importlib.import_module(module_name)
            for part in attribute.split("."):
                found = getattr(found, part)
        except YOUR_CODE_ENDS as err:  # ImportError, AttributeError, or whatever importing your module raised
            raise ConfigError(f"--model {name}: cannot import it ({type(err).__name__}: {err}); run from the "
                              "directory that holds its package, or install it") from None
        try:
            built = found(input_shape, num_classes, **options["args"])
        except YOUR_CODE_ENDS as err:  # your code, with --model-args it may not take
            raise ConfigError(f"--model {name}: failed to build with --model-args {options['args']} "
                              f"({type(err).__name__}: {err})") from None
    if not isinstance(built, nn.Module):
        raise ConfigError(f"--model {name}: returned a {type(built).__name__}, not a torch.nn.Module")
    return built


# how code of yours may end: an exception, sys.exit, or a KeyboardInterrupt it raises itself (a real Ctrl-C
# during a run is the trainer's stop signal, not this)
YOUR_CODE_ENDS = (Exception, SystemExit, KeyboardInterrupt)


@contextlib.contextmanager
def left_as_found(name: str):
    """Code of yours must leave the process as it found it: torch's default dtype and the working directory
    are put back and the model refused (the run's data, files and weights depend on them); the thread count
    is put back with a warning (the run uses, and records, the count it chose)."""
    dtype, cwd, threads = torch.get_default_dtype(), os.getcwd(), torch.get_num_threads()
    try:
        yield
    finally:
        changed = []
        if torch.get_default_dtype() != dtype:
            changed.append(f"torch's default dtype ({dtype} -> {torch.get_default_dtype()})")
            torch.set_default_dtype(dtype)
        if os.getcwd() != cwd:
            changed.append(f"the working directory ({cwd} -> {os.getcwd()})")
            os.chdir(cwd)
        if torch.get_num_threads() != threads:
            print(f"mnist_dist: warning: --model {name} set torch's threads to {torch.get_num_threads()}; the run "
                  f"keeps its {threads}", file=sys.stderr)
            torch.set_num_threads(threads)
    if changed:
        raise ConfigError(f"--model {name}: changed {' and '.join(changed)}; leave them as you found them")


ARCHITECTURES = {
    "mlp": Architecture(lambda shape, classes, o: MLP(math.prod(shape), tuple(o["hidden_sizes"]), classes,
                                                      o["activation"], o["dropout"], o["batch_norm"]),
                        _mlp_options, _check_mlp),
    # channels_last: the weights' memory order, not their values; torch's kernels for it took 1.4-1.6x less time
    # a step of the CNN on the 2-core CPU VM (docs/speed.md), and cuDNN prefers it for convolutions
    "cnn": Architecture(lambda shape, classes, o: CNN(classes).to(memory_format=torch.channels_last), lambda cfg: {},
                        no_options),
    IMPORTED: Architecture(build_imported, _imported_options, _check_imported),
}


def built_in_names() -> list[str]:
    """What --model accepts by name: the registry's entries (one added below it included)."""
    return [name for name in ARCHITECTURES if name != IMPORTED]


def architecture_of(model_flag: str) -> str:
    """The registry name `--model` gives: a built-in name, or IMPORTED for 'package.module:function'."""
    return IMPORTED if CALLABLE.fullmatch(model_flag) else model_flag


def model_args(text: str | None) -> dict:
    """--model-args: a JSON object (the keyword arguments of your callable); None is {}."""
    import json

    return {} if text is None else json.loads(text)


def new_model(cfg, class_names, stats: tuple[float, float], device: torch.device) -> tuple[nn.Module, dict]:
    """(the model `cfg` asks for, the config.json saved beside it) for images of IMAGE_SHAPE, the classes
    `class_names` and inputs scaled with `stats` (mean, std on the 0..1 scale), to train on `device`. The
    output of one batch is checked (a model of yours may return the wrong shape); with --sync-batch-norm
    its BatchNorm layers become torch's SyncBatchNorm, which runs on GPUs only."""
    name, num_classes = architecture_of(cfg.model), len(class_names)
    entry = {"architecture": name, "input_size": INPUT_SIZE, "num_classes": num_classes,
             "options": ARCHITECTURES[name].options(cfg)}
    model = build_model(entry)
    check_output(model, num_classes, cfg.model)
    entry |= {"parameters": parameter_count(model),  # said, not read back
              "normalization": {"mean": stats[0], "std": stats[1], "pixel_scale": 255}, "dataset": cfg.dataset,
              "data_dir": str(Path(cfg.data_dir).resolve()) if cfg.data_dir else None,
              "image_column": cfg.image_column, "label_column": cfg.label_column, "class_names": list(class_names)}
    if cfg.sync_batch_norm and device.type != "cuda":
        raise ConfigError(f"--sync-batch-norm: torch's SyncBatchNorm runs on GPUs only, and this run is on the "
                          f"{device.type}; without it each process normalizes with its own batch")
    if cfg.sync_batch_norm and not any(isinstance(m, BATCH_NORMS) for m in model.modules()):
        raise ConfigError(f"--sync-batch-norm: --model {cfg.model} has no BatchNorm layer (--batch-norm adds them to "
                          "the MLP)")
    return (nn.SyncBatchNorm.convert_sync_batchnorm(model) if cfg.sync_batch_norm else model), entry


def check_output(model: nn.Module, num_classes: int, named: str) -> None:
    """Refuse a model that could not train: one without parameters to train, or whose output for 2 and for 3
    images, in eval and in training mode, is not [batch, num_classes] floating-point logits (with a gradient,
    in training mode). The model is left as it was: its buffers (BatchNorm's running statistics) are put
    back and the random numbers its dropout draws come from a fork of the generator."""
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError(f"--model {named}: has no parameters to train")
    was = model.training
    saved = {name: b.clone() for name, b in model.named_buffers() if not nn.parameter.is_lazy(b)}
    try:
        with torch.random.fork_rng(devices=[]):
            for training, images in ((False, 2), (False, 3), (True, 3)):
                with torch.set_grad_enabled(training):
                    out = model.train(training)(torch.zeros(images, INPUT_SIZE))
                check_logits(out, images, num_classes, training, named)
    except ModelRefused:
        raise
    except YOUR_CODE_ENDS as err:  # a model of yours can fail in any way
        raise ConfigError(f"--model {named}: fails on a batch of images of [batch, {INPUT_SIZE}] "
                          f"({type(err).__name__}: {err})") from None
    finally:
        model.train(was)
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                if name in saved and saved[name].shape == buffer.shape:
                    buffer.copy_(saved[name])


def check_logits(out, images: int, num_classes: int, training: bool, named: str) -> None:
    mode = "in training mode" if training else "in eval mode"
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (images, num_classes):
        got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelRefused(f"--model {named}: returns {got} for {images} images, not [{images}, {num_classes}] "
                           f"(one logit per class; {mode})")
    if not out.is_floating_point():
        raise ModelRefused(f"--model {named}: returns {out.dtype} logits; they must be floating point")
    if training and not out.requires_grad:
        raise ModelRefused(f"--model {named}: returns logits without a gradient in training mode (detached, or "
                           "not computed from its parameters)")


class ModelRefused(ConfigError):
    """What `check_logits` found wrong, passed through `check_output` as it is."""


def model_options(config: dict) -> dict:
    """The options of `config`; a config.json written before the registry (an MLP's `hidden_size`) too."""
    if "options" in config:
        return config["options"]
    return {"hidden_sizes": [config.get("hidden_size")], "activation": "relu", "dropout": 0.0, "batch_norm": False}


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def describe(config: dict) -> str:
    """The model of a config.json in a few words: 'mlp 512-256 tanh, batch norm, dropout 0.2', 'cnn', ..."""
    name, options = config["architecture"], model_options(config)
    if name == "mlp":
        extras = (["batch norm"] if options["batch_norm"] else []) + ([f"dropout {options['dropout']:g}"]
                                                                      if options["dropout"] else [])
        return f"mlp {'-'.join(map(str, options['hidden_sizes']))} {options['activation']}" + "".join(
            f", {e}" for e in extras)
    if name == IMPORTED:
        return f"{options['callable']}({', '.join(f'{k}={v!r}' for k, v in options['args'].items())})"
    return name


def build_model(config: dict) -> nn.Module:
    """The untrained model `config` (a checked config.json) describes."""
    return ARCHITECTURES[config["architecture"]].build(IMAGE_SHAPE, config["num_classes"], model_options(config))


def check_config(config, path: Path) -> None:
    """Refuse a config.json whose fields could not rebuild the model or scale its inputs, naming the field."""
    def need(ok: bool, key: str, what: str) -> None:
        if not ok:
            value = shown(config.get(key)) if isinstance(config, dict) else ""
            raise ValueError(f"{path}: not a mnist_dist model config: {key!r} ({value}) {what}")

    need(isinstance(config, dict), "architecture", "the file must hold a JSON object")
    need(config.get("architecture") in ARCHITECTURES, "architecture", f"must be one of {', '.join(ARCHITECTURES)}")
    need(config.get("input_size") == INPUT_SIZE, "input_size", f"must be {INPUT_SIZE} (28x28 pixels)")
    need(type(config.get("num_classes")) is int and 1 <= config["num_classes"] <= MAX_CLASSES, "num_classes",
         f"must be an integer from 1 to {MAX_CLASSES:,}")
    if "options" not in config:  # written before the registry: an MLP of one hidden layer
        need(type(config.get("hidden_size")) is int and 1 <= config["hidden_size"] <= MAX_HIDDEN, "hidden_size",
             f"must be an integer from 1 to {MAX_HIDDEN:,}")
    options = model_options(config)
    wrong = ARCHITECTURES[config["architecture"]].check(options) if isinstance(options, dict) else "not an object"
    need(wrong is None, "options", f"do not fit {config['architecture']}: {wrong}")
    names = config.get("class_names")
    need(names is None or isinstance(names, list) and len(names) == config["num_classes"]
         and all(isinstance(n, str) for n in names) and len(set(names)) == len(names), "class_names",
         f"must be {config['num_classes']} strings, no two alike")
    norm = config.get("normalization", {"mean": 0.5, "std": 0.5})
    numbers = isinstance(norm, dict) and all(type(norm.get(k)) in (int, float) and math.isfinite(norm[k])
                                             for k in ("mean", "std"))
    need(numbers and norm["std"] > 0, "normalization", "must give a finite mean and a std > 0")
    for key in ("dataset", "data_dir", "image_column", "label_column"):  # where evaluate finds its test set
        need(config.get(key) is None or isinstance(config[key], str), key, "must be a string or null")


def load_model(path: str | Path) -> tuple[nn.Module, dict]:
    """(model in eval mode, config) from a model directory (a run's output dir or a checkpoint), or from
    its model.safetensors with config.json beside it. Raises FileNotFoundError or ValueError naming the file.
    A config.json naming a callable of yours ('import') imports and runs it."""
    path = Path(path)
    if path.is_file() or path.suffix == ".safetensors":
        directory, weights_path = path.parent, path
    else:
        directory, weights_path = path, path / WEIGHTS_NAME
    config_path = directory / CONFIG_NAME
    for file in (weights_path, config_path):
        if not file.is_file():
            raise FileNotFoundError(
                f"{file}: no such file (a saved model is {WEIGHTS_NAME} with {CONFIG_NAME} in the same directory)"
            )
    try:
        config = read_json(config_path)
    except UnreadableFile as err:
        raise ValueError(f"{config_path}: not a mnist_dist model config ({err.why})") from None
    check_config(config, config_path)
    if config["architecture"] == IMPORTED:  # as HF's trust_remote_code: the user sees what runs
        print(f"mnist_dist: importing and running {config['options']['callable']}, as {config_path} names it",
              file=sys.stderr)
    try:
        model = build_model(config)
        check_output(model, config["num_classes"], model_options(config).get("callable", config["architecture"]))
    except ConfigError as err:
        raise ValueError(f"{config_path}: {err}") from None
    try:
        weights = load_file(weights_path)
    except Exception as err:  # safetensors raises its own error types for damaged files
        raise ValueError(f"{weights_path}: unreadable weights ({err})") from err
    consume_prefix_in_state_dict_if_present(weights, "_orig_mod.")  # saved through torch.compile's wrapper
    consume_prefix_in_state_dict_if_present(weights, "module.")  # saved from a DDP-wrapped model
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        raise ValueError(f"{weights_path}: weights do not match {config_path}: {err}") from err
    bad = [name for name, t in weights.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:  # its every prediction would be NaN
        raise ValueError(f"{weights_path}: {bad[0]} holds NaN or infinite weights (a run that diverged)")
    return model.eval(), config


def weights_sha256(path: Path) -> str | None:
    """The sha256 of the weights in the safetensors file at `path` (names, dtypes, shapes and values; not
    the file's other metadata), or None where there is no readable one."""
    try:
        weights = load_file(path)
    except (OSError, SafetensorError):
        return None
    digest = hashlib.sha256()
    for name in sorted(weights):
        tensor = weights[name].contiguous()
        digest.update(f"{name} {tensor.dtype} {list(tensor.shape)}\n".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()

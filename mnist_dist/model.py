"""The model of record: a 784-256-10 MLP with a ReLU. Plain PyTorch, no distributed code.

A trained model is `model.safetensors` (the weights) and `config.json` (what `build_model` needs,
plus the input normalization) in one directory, which `load_model(dir)` reads.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from .config import MAX_CLASSES, MAX_HIDDEN
from .readback import UnreadableFile, read_json, shown

WEIGHTS_NAME = "model.safetensors"
INPUT_SIZE = 28 * 28  # pixels: every dataset here is 28x28 grayscale
CONFIG_NAME = "config.json"


class MLP(nn.Module):
    def __init__(self, input_size: int = 784, hidden_size: int = 256, num_classes: int = 10):
        super().__init__()
        self.fc1 = nn.Linear(input_size, hidden_size)
        self.fc2 = nn.Linear(hidden_size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [batch, 784] normalized pixels -> [batch, 10] logits
        return self.fc2(torch.relu(self.fc1(x)))


def model_config(model: MLP, **extra) -> dict:
    """What config.json holds: the architecture, plus whatever the caller adds (normalization, classes)."""
    return {"architecture": "mlp", "input_size": model.fc1.in_features, "hidden_size": model.fc1.out_features,
            "num_classes": model.fc2.out_features, **extra}


def parameter_count(config: dict) -> int:
    """Weights and biases of the MLP that `config` (`model_config`) describes."""
    inputs, hidden, classes = config["input_size"], config["hidden_size"], config["num_classes"]
    return inputs * hidden + hidden + hidden * classes + classes


def build_model(config: dict) -> MLP:
    return MLP(config["input_size"], config["hidden_size"], config["num_classes"])


def check_config(config, path: Path) -> None:
    """Refuse a config.json whose fields could not rebuild the model or scale its inputs, naming the field."""
    def need(ok: bool, key: str, what: str) -> None:
        if not ok:
            value = shown(config.get(key)) if isinstance(config, dict) else ""
            raise ValueError(f"{path}: not a mnist_dist model config: {key!r} ({value}) {what}")

    need(isinstance(config, dict), "architecture", "the file must hold a JSON object")
    need(config.get("architecture") == "mlp", "architecture", "must be 'mlp'")
    need(config.get("input_size") == INPUT_SIZE, "input_size", f"must be {INPUT_SIZE} (28x28 pixels)")
    for key, most in (("hidden_size", MAX_HIDDEN), ("num_classes", MAX_CLASSES)):
        need(type(config.get(key)) is int and 1 <= config[key] <= most, key, f"must be an integer from 1 to {most:,}")
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


def load_model(path: str | Path) -> tuple[MLP, dict]:
    """(model in eval mode, config) from a model directory (a run's output dir or a checkpoint), or from
    its model.safetensors with config.json beside it. Raises FileNotFoundError or ValueError naming the file."""
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
    model = build_model(config)
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
    bad = [name for name, t in weights.items() if not torch.isfinite(t).all()]
    if bad:  # its every prediction would be NaN
        raise ValueError(f"{weights_path}: {bad[0]} holds NaN or infinite weights (a run that diverged)")
    return model.eval(), config

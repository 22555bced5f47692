"""The model of record: a 784-256-10 MLP with a ReLU. Plain PyTorch, no distributed code.

A trained model is two files in one directory: `model.safetensors` (the weights) and
`config.json` (what `build_model` needs to rebuild it, plus the input normalization),
so `load_model(dir)` works without the training code's state.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

WEIGHTS_NAME = "model.safetensors"
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
    return {
        "architecture": "mlp",
        "input_size": model.fc1.in_features,
        "hidden_size": model.fc1.out_features,
        "num_classes": model.fc2.out_features,
        **extra,
    }


def build_model(config: dict) -> MLP:
    return MLP(config["input_size"], config["hidden_size"], config["num_classes"])


def load_model(directory: str | Path) -> tuple[MLP, dict]:
    """Rebuild a saved model from `directory` (config.json + model.safetensors); returns (model, config)."""
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file (a saved model is {CONFIG_NAME} + {WEIGHTS_NAME})")
    config = json.loads(config_path.read_text())
    model = build_model(config)
    try:
        model.load_state_dict(load_file(weights_path))
    except RuntimeError as err:
        raise ValueError(f"{weights_path}: weights do not match {config_path}: {err}") from err
    return model, config

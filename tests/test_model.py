import json

import pytest
import torch
from safetensors.torch import save_file

from mnist_dist.model import MLP, build_model, load_model

from .helpers import legacy_model_config


def test_default_model_maps_784_pixels_to_10_logits():
    model = MLP()
    assert model(torch.zeros(5, 784)).shape == (5, 10)


def test_default_model_has_203530_parameters():
    assert sum(p.numel() for p in MLP().parameters()) == 784 * 256 + 256 + 256 * 10 + 10 == 203_530


def test_hidden_size_is_configurable():
    assert MLP(hidden_sizes=(32,)).fc1.out_features == 32


def test_saved_model_reloads_from_its_directory(tmp_path):
    model = MLP(hidden_sizes=(16,))
    (tmp_path / "config.json").write_text(json.dumps(legacy_model_config(16)))  # written before the registry
    save_file(model.state_dict(), tmp_path / "model.safetensors")
    loaded, config = load_model(tmp_path)
    x = torch.randn(3, 784)
    torch.testing.assert_close(loaded(x), model(x))
    assert config["hidden_size"] == 16
    assert isinstance(build_model(config), MLP)


class _DDPLayout(torch.nn.Module):
    """Holds the model as `.module`, as DistributedDataParallel does (whose weights are "module.fc1.weight")."""

    def __init__(self, module):
        super().__init__()
        self.module = module


@pytest.mark.parametrize("wrap", ["compiled", "compiled DDP"])
def test_weights_saved_through_torch_compiles_wrapper_reload(tmp_path, wrap):
    model = MLP(hidden_sizes=(16,))
    # what Accelerate's dynamo_backend makes of a prepared model; nothing is compiled until it is called
    wrapped = torch.compile(model if wrap == "compiled" else _DDPLayout(model))
    state = wrapped.state_dict()
    assert all(key.startswith("_orig_mod.") for key in state)
    (tmp_path / "config.json").write_text(json.dumps(legacy_model_config(16)))
    save_file(state, tmp_path / "model.safetensors")
    loaded, _ = load_model(tmp_path)
    x = torch.randn(3, 784)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_config_that_does_not_match_the_weights_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(legacy_model_config(8)))
    save_file(MLP(hidden_sizes=(16,)).state_dict(), tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="model.safetensors.*do not match"):
        load_model(tmp_path)


def test_missing_weights_file_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(legacy_model_config()))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_model(tmp_path)


def test_the_parameter_count_is_the_models():
    from mnist_dist.config import TrainConfig
    from mnist_dist.model import new_model

    for hidden in (256, 7):
        model, config = new_model(TrainConfig(hidden_sizes=str(hidden)), list("0123456789"), (0.5, 0.5),
                                  torch.device("cpu"))
        assert config["parameters"] == sum(p.numel() for p in model.parameters()) == 784 * hidden + hidden + hidden * 10 + 10

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from mnist_dist.model import MLP, build_model, load_model

from .helpers import REPO, check, legacy_model_config, mnist5k, results, train_here


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


# ---------------------------------------------------------------- the registry


def test_the_mlp_options_shape_its_layers():
    model = MLP(hidden_sizes=(512, 256), activation="tanh", dropout=0.2, batch_norm=True)
    assert [(m.in_features, m.out_features) for m in (model.fc1, model.fc2, model.fc3)] == [(784, 512), (512, 256),
                                                                                              (256, 10)]
    assert model.bn1.num_features == 512 and model.bn2.num_features == 256 and not hasattr(model, "bn3")
    assert model(torch.zeros(4, 784)).shape == (4, 10)
    model.eval()  # dropout off, BatchNorm on its running statistics: the same logits twice
    x = torch.randn(4, 784)
    torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)


def test_the_record_mlp_keeps_the_names_of_its_weights():  # checkpoints written before the registry load
    assert list(MLP().state_dict()) == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]


def test_training_flops_are_counted_for_a_convolution_at_every_position():
    from mnist_dist.model import CNN
    from mnist_dist.resources import training_flops_per_sample

    # forward, 2 FLOPs a multiply-add: conv1 16 x 28 x 28 positions x 9, conv2 32 x 14 x 14 x 16 x 9, fc1 1568 x 128,
    # fc2 128 x 10; backward: the same again for the weights' gradients, and for the inputs' but the pixels'
    forward = [2 * 16 * 784 * 9, 2 * 32 * 196 * 144, 2 * 1568 * 128, 2 * 128 * 10]
    model = CNN()
    assert training_flops_per_sample(model, 784) == 2 * sum(forward) + sum(forward[1:]) == 7_082_496
    assert 6 * sum(p.numel() for p in model.parameters()) < 7_082_496 / 5  # what 6 x parameters would have said
    assert all(p.grad is None for p in model.parameters())  # counted on a copy


def new(**flags):
    from mnist_dist.config import TrainConfig
    from mnist_dist.model import new_model

    return new_model(TrainConfig(**flags).validate(), list("0123456789"), (0.5, 0.5), torch.device("cpu"))


def test_a_model_of_yours_is_built_with_its_arguments_and_recorded_for_loading_again(tmp_path):
    from mnist_dist.model import build_model

    model, config = new(model="examples.custom_model:build", model_args='{"width": 64}')
    assert config["architecture"] == "import" and config["options"] == {"callable": "examples.custom_model:build",
                                                                         "args": {"width": 64}}
    assert model.hidden.out_features == 64 and type(build_model(config)) is type(model)


@pytest.mark.parametrize("flags, message", [
    ({"model": "examples.no_such_module:build"}, "--model examples.no_such_module:build: cannot import it "
                                                 "(ModuleNotFoundError"),
    ({"model": "tests.broken_model:build"}, "--model tests.broken_model:build: cannot import it (RuntimeError: this "
                                            "module needs a library"),
    ({"model": "examples.custom_model:nothing"}, "--model examples.custom_model:nothing: cannot import it (AttributeError"),
    ({"model": "examples.custom_model:build", "model_args": '{"depth": 2}'}, "failed to build with --model-args "
                                                                             "{'depth': 2} (TypeError"),
    ({"model": "tests.models:not_a_module"}, "--model tests.models:not_a_module: returned a dict, not a torch.nn.Module"),
    ({"model": "tests.models:wrong_output"}, "--model tests.models:wrong_output: returns [2, 11] for 2 images, not [2, 10]"),
    ({"model": "tests.models:FixedBatch"}, "--model tests.models:FixedBatch: returns [2, 10] for 3 images, not [3, 10]"),
    ({"model": "tests.models:OtherShapeInTraining"}, "returns [3, 9] for 3 images, not [3, 10] (one logit per "
                                                         "class; in training mode)"),
    ({"model": "tests.models:Detached"}, "--model tests.models:Detached: returns logits without a gradient"),
    ({"model": "tests.models:IntegerLogits"}, "--model tests.models:IntegerLogits: returns torch.int64 logits"),
    ({"model": "tests.models:NoParameters"}, "--model tests.models:NoParameters: has no parameters to train"),
    ({"model": "tests.models:float64_default"}, "--model tests.models:float64_default: changed torch's default dtype "
                                                "(torch.float32 -> torch.float64)"),
    ({"model": "tests.models:changes_directory"}, "--model tests.models:changes_directory: changed the working "
                                                  "directory"),
    ({"model": "tests.models:exits"}, "--model tests.models:exits: failed to build with --model-args {} (SystemExit: 3)"),
    ({"model": "tests.models:interrupts"}, "--model tests.models:interrupts: failed to build with --model-args {} "
                                           "(KeyboardInterrupt"),
])
def test_a_model_of_yours_that_cannot_train_is_refused_naming_it(flags, message):
    from mnist_dist.config import ConfigError

    cwd, dtype = os.getcwd(), torch.get_default_dtype()
    with pytest.raises(ConfigError) as err:
        new(**flags)
    assert message in str(err.value)
    assert (os.getcwd(), torch.get_default_dtype()) == (cwd, dtype)  # the process as it was


def test_a_model_with_lazy_layers_is_checked_and_built():
    model, _ = new(model="tests.models:lazy")
    assert model[0].weight.shape == (32, 784) and model[1].num_batches_tracked == 0  # the check left no trace


def test_a_model_that_changes_the_thread_count_is_warned_and_the_run_keeps_its_own(capsys):
    threads = torch.get_num_threads()
    new(model="tests.models:sets_threads")
    assert torch.get_num_threads() == threads
    assert f"--model tests.models:sets_threads set torch's threads to {threads + 1}; the run keeps its {threads}" in \
        capsys.readouterr().err


def test_a_model_whose_flops_cannot_be_counted_trains_without_the_figure(tmp_path):
    out = tmp_path / "out"
    check(train_here("--dataset", "mnist-5k", "--cpu", "--model", "tests.models:NoCopy", "--max-steps", "2",
                     "--report-to", "none", "--output-dir", str(out)))
    assert results(out)["flops_per_sample"] is None and results(out)["model_flops_per_second"] is None


@pytest.mark.parametrize("model, says, sig", [
    ("tests.models:sleeps_forever", "building, forever", signal.SIGTERM),
    ("tests.sleepy_import:build", "importing, forever", signal.SIGINT),
])
def test_a_model_that_never_finishes_building_is_stopped_by_a_signal(tmp_path, model, says, sig):
    proc = subprocess.Popen([sys.executable, "-m", "mnist_dist.train", "--dataset", "mnist-5k", "--cpu", "--model", model,
                             "--report-to", "none", "--output-dir", str(tmp_path / "out")], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for line in proc.stderr:  # until the model's code has begun
        if says in line:
            break
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 75, err
    assert (f"stopped by signal {signal.Signals(sig).name} during start-up; nothing new to save (it came while "
            f"building --model {model})") in err
    assert "Traceback" not in err


def test_the_evaluation_takes_the_number_of_classes_from_the_logits():
    from mnist_dist.metrics import evaluate

    from .models import HeadFirst

    test = mnist5k()["test"]
    metrics = evaluate(HeadFirst((1, 28, 28), 10), [(test.images[:100], test.labels[:100])])
    assert len(metrics["confusion_matrix"]) == 10 and metrics["samples"] == 100


def test_sync_batch_norm_is_refused_on_a_cpu_naming_why():
    from mnist_dist.config import ConfigError

    with pytest.raises(ConfigError, match="--sync-batch-norm: torch's SyncBatchNorm runs on GPUs only, and this run is "
                                          "on the cpu"):
        new(batch_norm=True, sync_batch_norm=True)


def test_a_config_json_naming_an_unknown_architecture_is_refused_naming_the_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**legacy_model_config(), "architecture": "resnet"}))
    save_file(MLP().state_dict(), tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=f"{tmp_path / 'config.json'}: not a mnist_dist model config: 'architecture' "
                                         "\\('resnet'\\) must be one of mlp, cnn, import"):
        load_model(tmp_path)


@pytest.mark.slow
def test_the_cnn_trains_in_channels_last_resumes_bit_identically_and_saves_its_models_whole(tmp_path):
    from mnist_dist.config import TrainConfig
    from mnist_dist.data import DIGITS
    from mnist_dist.model import new_model

    from .helpers import same_weights

    model, _ = new_model(TrainConfig(model="cnn"), DIGITS, (0.5, 0.5), torch.device("cpu"))
    assert model.conv2.weight.is_contiguous(memory_format=torch.channels_last) and not model.conv2.weight.is_contiguous()
    flags = ["--dataset", "mnist-5k", "--cpu", "--model", "cnn", "--epochs", "2", "--val-fraction", "0.1",
             "--report-to", "none"]
    check(train_here(*flags, "--max-steps", "45", "--output-dir", str(tmp_path / "whole")))
    out = tmp_path / "out"
    check(train_here(*flags, "--max-steps", "40", "--output-dir", str(out)))  # 36 steps an epoch
    check(train_here("--resume", "auto", "--max-steps", "45", "--output-dir", str(out)))
    assert same_weights(out, tmp_path / "whole") and same_weights(out / "best", tmp_path / "whole" / "best")
    best, _ = load_model(out / "best")
    assert results(out)["best"]["test_accuracy"] > 0.8 and isinstance(best.conv2, torch.nn.Conv2d)


def test_the_graph_path_names_why_it_cannot_replay_a_model():
    from mnist_dist.config import TrainConfig
    from mnist_dist.graphs import graph_unsupported

    cuda = torch.device("cuda")
    assert graph_unsupported(TrainConfig(), cuda, 1, "no") is None
    for flags in ({"model": "cnn"}, {"dropout": 0.1}, {"batch_norm": True}, {"model": "examples.custom_model:build"}):
        assert "replays the MLP without dropout or BatchNorm" in graph_unsupported(TrainConfig(**flags), cuda, 1, "no")


@pytest.mark.slow
def test_a_model_of_yours_trains_stops_resumes_bit_identically_and_is_evaluated_and_predicted(tmp_path):
    import sys

    from PIL import Image

    from mnist_dist.stopping import EXIT_PREEMPTED

    from .helpers import REPO, check, mnist5k, results, run, same_weights, train_cli

    flags = ["--dataset", "mnist-5k", "--cpu", "--model", "examples.custom_model:build", "--model-args", '{"width": 32}',
             "--epochs", "2", "--log-every", "10", "--report-to", "none"]
    check(train_cli(*flags, "--output-dir", str(tmp_path / "whole")))
    out = tmp_path / "out"
    # SIGTERM as the third stretch of steps begins; a script's own directory is on sys.path, not the repository
    stop = {"STOP_IN": "stretch:3", "STOP_SIGNAL": "SIGTERM", "PYTHONPATH": str(REPO)}
    check(run([sys.executable, str(REPO / "tests" / "workers" / "stop_in.py"), *flags, "--output-dir", str(out)],
              env=stop), rc=EXIT_PREEMPTED)
    check(train_cli("--resume", "auto", "--output-dir", str(out)))
    assert same_weights(out, tmp_path / "whole")
    assert results(out)["test_accuracy"] > 0.8  # a linear skip and 32 GELU units, 80 steps

    evaluated = check(run([sys.executable, "-m", "mnist_dist.evaluate", "--model", str(out), "--cpu"]))
    assert f"test_accuracy {results(out)['test_accuracy']:.4f}" in evaluated.stdout
    digit = mnist5k()["test"]
    Image.fromarray(digit.images[0].reshape(28, 28).numpy()).save(tmp_path / "digit.png")
    predicted = check(run([sys.executable, "-m", "mnist_dist.predict", str(tmp_path / "digit.png"), "--model", str(out)]))
    assert predicted.stdout.startswith(f"{tmp_path / 'digit.png'}: {digit.labels[0].item()}")


@pytest.mark.slow
def test_batch_norm_and_dropout_resume_bit_identically_on_the_same_number_of_processes(tmp_path):
    from mnist_dist.stopping import EXIT_PREEMPTED

    from .helpers import check, results, same_weights, stopped_in, train_cli

    flags = ["--dataset", "mnist-5k", "--hidden-sizes", "64,32", "--batch-norm", "--dropout", "0.2", "--epochs", "2",
             "--log-every", "10", "--report-to", "none"]
    check(train_cli(*flags, "--cpu", "--output-dir", str(tmp_path / "whole")))
    out = tmp_path / "out"
    check(stopped_in("stretch:4", *flags, "--output-dir", str(out)), rc=EXIT_PREEMPTED)  # mid-epoch: step 30
    check(train_cli("--resume", "auto", "--output-dir", str(out)))
    # dropout's masks come from the checkpoint's RNG state, BatchNorm's running statistics from its weights
    assert same_weights(out, tmp_path / "whole")
    assert results(out)["config"]["batch_norm"] is True


@pytest.mark.slow
def test_an_augmented_batch_norm_run_on_two_processes_goes_on_on_one(tmp_path):
    from .helpers import check, launch, results, train_cli

    out = tmp_path / "out"
    flags = ["--dataset", "mnist-5k", "--hidden-sizes", "64", "--batch-norm", "--augment", "--batch-size", "64",
             "--report-to", "none", "--output-dir", str(out)]
    # 79 batches of 64 an epoch: in its last step the second process has no sample, BatchNorm and --augment none
    proc = check(launch(2, *flags, "--epochs", "1"))
    assert results(out)["world_size"] == 2 and results(out)["steps"] == 40, proc.stdout
    proc = check(train_cli("--resume", "auto", "--output-dir", str(out), "--epochs", "2"))
    r = results(out)
    # the global batch of 2 x 64 as 1 x 64 x 2 accumulated: each BatchNorm still normalizes 64 samples at a time
    assert (r["world_size"], r["global_batch_size"], r["per_process_batch_size"], r["steps"]) == (1, 128, 64, 80)
    assert r["config"]["gradient_accumulation_steps"] == 2 and "the world size changed from 2 to 1" in proc.stdout
    assert r["test_accuracy"] > 0.8

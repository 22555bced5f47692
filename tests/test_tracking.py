"""W&B (offline, read back from its own transaction log), TensorBoard and metrics.jsonl."""

import json
import os
import signal

import pytest

from mnist_dist import checkpoint

from .helpers import (check, launch, read_wandb_run, results, run, start, train_cli, train_cmd, unmeasured,
    wait_for_checkpoint)

pytestmark = pytest.mark.slow  # the quick loop (-m "not slow") leaves these out
RUN = ["--dataset", "mnist-5k", "--epochs", "2", "--log-every", "10"]
OFFLINE = {"WANDB_MODE": "offline"}
TRAIN_KEYS = {"train/loss", "train/lr", "train/samples_per_second", "train/epoch"}
EPOCH_KEYS = {"test/accuracy", "test/loss", "train/epoch_loss", "epoch", "epoch_seconds"}


def offline_runs(out):
    return sorted((out / "wandb").glob("offline-run-*"))


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def without_timing(record):
    return unmeasured(record)


@pytest.mark.parametrize("world", [1, 2])
def test_offline_wandb_makes_exactly_one_run_holding_the_logged_history(world, tmp_path):
    flags = [*RUN, "--output-dir", str(tmp_path)]
    flags += ["--pictures"]  # sent to W&B as images
    check(launch(2, *flags, env=OFFLINE) if world == 2 else train_cli(*flags, "--cpu", env=OFFLINE))
    (run_dir,) = offline_runs(tmp_path)
    wandb_run = read_wandb_run(run_dir)
    steps_per_epoch = 40 // world
    train_steps = [h["_step"] for h in wandb_run["history"] if TRAIN_KEYS <= h.keys()]
    epoch_steps = [h["_step"] for h in wandb_run["history"] if EPOCH_KEYS <= h.keys()]
    assert train_steps == list(range(10, 2 * steps_per_epoch + 1, 10))
    assert epoch_steps == [steps_per_epoch, 2 * steps_per_epoch]
    r = results(tmp_path)
    assert wandb_run["config"]["world_size"] == world and wandb_run["config"]["global_batch_size"] == 128 * world
    assert wandb_run["config"]["lr"] == 1e-3 and "git_commit" in wandb_run["config"]
    assert wandb_run["summary"]["final_test_accuracy"] == r["test_accuracy"]
    assert wandb_run["summary"]["stopped"] == "epochs" and "best_val_accuracy" not in wandb_run["summary"]
    # the epoch metrics W&B holds are the ones in results.json
    assert [h["test/accuracy"] for h in wandb_run["history"] if "test/accuracy" in h] == [
        h["test_accuracy"] for h in r["history"]
    ]
    # the run's pictures, as W&B images whose files are in the run
    (pictures,) = [h for h in wandb_run["history"] if "pictures/confusion_matrix/_type" in h]
    for name in ("training_curves", "confusion_matrix", "misclassified"):
        assert pictures[f"pictures/{name}/_type"] == "image-file"
        assert (run_dir / "files" / pictures[f"pictures/{name}/path"]).is_file()


def test_without_an_api_key_it_logs_offline_and_says_how_to_sync(tmp_path):
    no_key = {"WANDB_MODE": None, "WANDB_API_KEY": None, "NETRC": str(tmp_path / "no-netrc"),
              "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config")}
    proc = check(train_cli(*RUN, "--cpu", "--max-steps", "5", "--output-dir", str(tmp_path / "o"),
                           env={**no_key, "WANDB_SILENT": None}))
    assert "no API key" in proc.stdout
    assert "deprecated" not in proc.stdout + proc.stderr  # nothing of the package's own calls
    (run_dir,) = offline_runs(tmp_path / "o")
    assert f"wandb sync {run_dir}" in proc.stdout


def test_wandb_settings_come_from_its_environment_variables_and_flags_beat_them(tmp_path):
    env = {**OFFLINE, "WANDB_PROJECT": "from-env", "WANDB_RUN_GROUP": "sweep-3", "WANDB_NAME": "env-name",
           "WANDB_TAGS": "fast,cpu", "WANDB_DIR": str(tmp_path / "wandb-here"), "WANDB_RUN_ID": "envrunid123"}
    check(train_cli(*RUN, "--cpu", "--max-steps", "5", "--log-model", "--output-dir", str(tmp_path / "a"), env=env))
    (run_dir,) = (tmp_path / "wandb-here" / "wandb").glob("offline-run-*")
    by_env = read_wandb_run(run_dir)
    assert (by_env["id"], by_env["project"], by_env["group"], by_env["name"], by_env["tags"]) == (
        "envrunid123", "from-env", "sweep-3", "env-name", ["fast", "cpu"])
    assert by_env["artifacts"] == [("model-envrunid123", "model")]  # --log-model: model.safetensors + config.json
    check(train_cli(*RUN, "--cpu", "--max-steps", "5", "--wandb-project", "from-flag", "--run-name", "flag-name",
                    "--output-dir", str(tmp_path / "b"), env={**env, "WANDB_DIR": None, "WANDB_RUN_ID": None}))
    (run_dir,) = offline_runs(tmp_path / "b")
    by_flag = read_wandb_run(run_dir)
    assert (by_flag["project"], by_flag["name"], by_flag["group"]) == ("from-flag", "flag-name", "sweep-3")
    assert by_flag["id"] == checkpoint.read_state(checkpoint.complete_checkpoints(tmp_path / "b")[-1])["run_id"]
    assert by_flag["artifacts"] == []  # no --log-model


def test_unreachable_wandb_server_falls_back_to_offline_without_hanging(tmp_path):
    unreachable = {"WANDB_MODE": "online", "WANDB_API_KEY": "x" * 40, "WANDB_BASE_URL": "http://127.0.0.1:9",
                   "WANDB_INIT_TIMEOUT": "5", "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config")}
    proc = check(train_cli(*RUN, "--cpu", "--max-steps", "5", "--output-dir", str(tmp_path), env=unreachable, timeout=120))
    assert "W&B server unreachable" in proc.stdout and "logging offline" in proc.stdout
    (run_dir,) = offline_runs(tmp_path)
    assert read_wandb_run(run_dir)["history"]


def test_metrics_jsonl_is_written_without_any_tracker(tmp_path):
    check(train_cli(*RUN, "--cpu", "--report-to", "none", "--output-dir", str(tmp_path)))
    records = metrics(tmp_path)
    assert [r["step"] for r in records if TRAIN_KEYS <= r.keys()] == list(range(10, 81, 10))
    assert [r["test/accuracy"] for r in records if "test/accuracy" in r] == [
        h["test_accuracy"] for h in results(tmp_path)["history"]
    ]
    assert not (tmp_path / "wandb").exists()


def test_tensorboard_gets_the_same_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    check(train_cli(*RUN, "--cpu", "--pictures", "--report-to", "tensorboard", "--output-dir", str(tmp_path)))
    # Accelerate writes the scalars to tensorboard/<project>/ and the hyperparameters to a subfolder
    acc = EventAccumulator(str(tmp_path / "tensorboard" / "mnist_dist"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("test/accuracy")] == [40, 80]
    assert [round(e.value, 4) for e in acc.Scalars("test/accuracy")] == [
        round(h["test_accuracy"], 4) for h in results(tmp_path)["history"]
    ]
    # and the run's pictures, at the last step
    for name in ("training_curves", "confusion_matrix", "misclassified"):
        (image,) = acc.Images(f"pictures/{name}")
        assert image.step == 80 and image.width >= 300 and image.encoded_image_string[:4] == b"\x89PNG"


def test_resumed_run_continues_the_same_wandb_run_and_metrics_have_no_gaps_or_duplicates(tmp_path):
    flags = [*RUN, "--epochs", "2", "--checkpoint-every", "7", "--seed", "5"]
    reference = tmp_path / "reference"
    check(train_cli(*flags, "--cpu", "--output-dir", str(reference), env=OFFLINE))
    out = tmp_path / "out"
    proc = start(1, *flags, "--output-dir", str(out), env=OFFLINE)
    wait_for_checkpoint(out, 45, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    resumed_from = checkpoint.read_state(checkpoint.complete_checkpoints(out)[-1])
    check(run(train_cmd(1, *flags, "--output-dir", str(out), "--resume", "auto"), env=OFFLINE))

    assert [without_timing(r) for r in metrics(out)] == [without_timing(r) for r in metrics(reference)]
    # two offline logs of one W&B run: the killed one (whatever reached the disk) and the resumed one
    killed, resumed = offline_runs(out)
    run_id = resumed_from["run_id"]
    assert killed.name.endswith(run_id) and read_wandb_run(resumed)["id"] == run_id
    # the resumed log holds every step once, with the values of the uninterrupted run
    strip = lambda h: {k: v for k, v in without_timing(h).items() if k not in ("_timestamp", "_runtime")}
    assert [strip(h) for h in read_wandb_run(resumed)["history"]] == [
        strip(h) for h in read_wandb_run(offline_runs(reference)[0])["history"]
    ]


def test_report_to_tensorboard_without_tensorboard_names_the_extra(tmp_path, monkeypatch):
    import builtins

    from mnist_dist import tracking
    from mnist_dist.config import ConfigError, TrainConfig

    real_import = builtins.__import__
    monkeypatch.setattr(
        builtins, "__import__",
        lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name)) if name == "tensorboard" else real_import(name, *a, **k),
    )
    with pytest.raises(ConfigError, match=r"pip install 'mnist_dist\[tensorboard\]'"):
        tracking.log_with(TrainConfig(report_to="tensorboard"))

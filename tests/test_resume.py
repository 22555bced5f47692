"""A resume continues the run as it was launched: the checkpoint's settings for every flag not given,
nothing the run saved replaced without --overwrite, every field of training_state.json checked first.
Real runs on mnist-5k (40 steps an epoch), in this process where one process does."""

import json
import math
import shutil
import sys
from pathlib import Path

import pytest

from mnist_dist import atomic, checkpoint
from mnist_dist.config import TrainConfig, parse_args

from .helpers import REPO, check, results, run, same_results, same_weights, train_here, snapshot as every_file


def snapshot(directory) -> dict:
    """Every file a run wrote under `directory`, with size and time (the lock a resume takes aside)."""
    return {name: stamp for name, stamp in every_file(directory).items() if not name.startswith(".lock")}

# flags that differ from the defaults everywhere they can: a resume given none of them must find them all
FLAGS = ["--dataset", "mnist-5k", "--cpu", "--seed", "3", "--hidden-sizes", "32", "--epochs", "2", "--lr", "2e-3",
         "--report-to", "none", "--checkpoint-every", "10", "--keep-checkpoints", "10"]


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """An uninterrupted run of FLAGS with a checkpoint every 10 steps, all kept (80 steps)."""
    out = tmp_path_factory.mktemp("whole")
    check(train_here(*FLAGS, "--output-dir", str(out)))
    return out


def interrupted(whole, tmp_path, step: int):
    """A run directory as a run of FLAGS killed after step `step` leaves it: its checkpoints up to there."""
    out = tmp_path / "cut"
    for path in checkpoint.complete_checkpoints(whole):
        if checkpoint.read_state(path)["global_step"] <= step:
            shutil.copytree(path, out / "checkpoints" / path.name)
    return out


def test_resume_auto_alone_continues_the_run_as_it_was_launched(whole, tmp_path):
    out = interrupted(whole, tmp_path, 30)
    proc = check(train_here("--resume", "auto", "--output-dir", str(out)))
    assert ("continuing with the checkpoint's settings for the flags not given: --dataset mnist-5k --hidden-sizes 32 "
            "--epochs 2 --lr 0.002 --seed 3") in proc.stdout
    assert "--cpu" in proc.stdout and "resuming from" in proc.stdout and "(step 30)" in proc.stdout
    assert same_weights(out, whole)
    same_results(out, whole)
    # the precision the checkpoint ran with, resolved ("no"), where the first launch left it to Accelerate (None)
    assert results(out)["config"] == {**results(whole)["config"], "output_dir": str(out), "resume": "auto",
                                      "mixed_precision": "no"}


def test_a_training_state_of_an_older_format_is_refused_by_name_saying_what_to_do(whole, tmp_path):
    out = interrupted(whole, tmp_path, 30)
    newest = checkpoint.complete_checkpoints(out)[-1]
    edited(newest, "format", 3)  # as mnist_dist wrote them until 2026-12-08
    proc = check(train_here("--resume", str(newest), "--output-dir", str(out)), rc=2)
    assert (f"{newest / checkpoint.STATE_NAME}: written by an earlier mnist_dist (training state format 3; this one "
            "reads format 4)") in proc.stderr
    assert "its model.safetensors and config.json still load for evaluate and predict" in proc.stderr


def test_a_flag_given_on_resume_wins_and_one_that_shapes_the_run_is_refused(whole, tmp_path):
    out = interrupted(whole, tmp_path, 30)
    before = snapshot(out)
    proc = check(train_here("--resume", "auto", "--output-dir", str(out), "--seed", "4"), rc=2)
    assert "--seed=4, but" in proc.stderr and "was trained with 3" in proc.stderr
    assert snapshot(out) == before


def test_fewer_steps_than_the_checkpoint_took_are_refused_naming_both(whole, tmp_path):
    out = interrupted(whole, tmp_path, 30)
    before = snapshot(out)
    proc = check(train_here("--resume", "auto", "--output-dir", str(out), "--max-steps", "20"), rc=2)
    assert "--max-steps 20 asks for 20 steps in all, but" in proc.stderr and "has already taken 30" in proc.stderr
    proc = check(train_here("--resume", "auto", "--output-dir", str(out), "--epochs", "1", "--max-steps", "5"), rc=2)
    assert "asks for 5 steps in all" in proc.stderr and "--epochs 1, --max-steps 30" in proc.stderr
    assert snapshot(out) == before


def test_resuming_an_earlier_checkpoint_never_replaces_what_came_after(whole, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(whole, out)
    before = snapshot(out)
    step_30 = out / "checkpoints" / "step_00000030"
    for flags in ([], ["--epochs", "1"]):  # the case: an earlier checkpoint, and fewer epochs
        proc = check(train_here("--resume", str(step_30), *flags), rc=2)
        assert "step 30" in proc.stderr or "taken 30" in proc.stderr
        assert snapshot(out) == before
    assert "went on to step 80" in check(train_here("--resume", str(step_30)), rc=2).stderr
    # the newest checkpoint of the finished run: nothing to do, nothing rewritten
    proc = check(train_here("--resume", str(out / "checkpoints" / "step_00000080")))
    assert f"{out} holds a finished run (80 steps" in proc.stdout
    assert snapshot(out) == before


def test_a_finished_run_given_more_epochs_keeps_its_outputs_until_it_writes_new_ones(whole, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(whole, out)
    proc = check(train_here("--resume", "auto", "--output-dir", str(out), "--epochs", "3"))
    assert "removing" not in proc.stdout
    assert results(out)["steps"] == 120 and len(results(out)["history"]) == 3


# hand edits of a real checkpoint's training_state.json: (field, value, what the error says)
EDITS = [
    ("batch_in_epoch", 1000, "must be at most the 40 steps of an epoch"),  # looped forever before
    ("global_step", "x", "must be an integer >= 1"),
    ("global_step", math.nan, "must be an integer >= 1"),
    ("global_step", -1, "must be an integer >= 1"),
    ("global_step", 10**6, "must be epoch x steps per epoch + batch_in_epoch"),
    ("epoch", -1, "must be an integer >= 0"),
    ("world_size", 0, "must be an integer >= 1"),
    ("accumulation_flag", 0, "must be an integer >= 1"),
    ("batch_size_flag", 10**7, "must be at most 1,048,576"),  # not reported as a --batch-size never given
    ("config", None, "must be an object"),
    ("train_seconds", math.nan, "must be a finite number >= 0"),
    ("epoch_loss_sums", [], "must be 1 finite numbers, one per process"),
    ("global_batch_size", 64, "must be world_size x config.batch_size"),
    ("samples_seen", 7, "must be epoch x 5000 samples"),
    ("best_val_accuracy", 2.0, "must be an accuracy from 0 to 1"),
    ("best_step", 3, "must be the step of best_val_accuracy, at most global_step"),
    ("evals_since_best", -1, "must be an integer >= 0"),
    ("stopped_early", 1, "must be true or false"),
    ("last_validation", {"step": 10**6, "accuracy": 0.5, "loss": 1.0, "samples": 9}, "must be the step (at least best_step)"),
    ("history", [], "must hold one entry per evaluated epoch"),
    ("history", [{"epoch": 1, "train_loss": math.inf}], "entry 1 must be epoch 1 with finite losses"),
]


def edited(path, key, value):
    state_file = path / checkpoint.STATE_NAME
    state = json.loads(state_file.read_text())
    state[key] = value
    state_file.write_text(json.dumps(state))
    return state_file


@pytest.mark.parametrize("key, value, message", EDITS, ids=[f"{k}={v}" for k, v, _ in EDITS])
def test_every_field_of_a_training_state_is_checked_before_it_is_used(whole, tmp_path, key, value, message):
    damaged = tmp_path / "step"
    shutil.copytree(whole / "checkpoints" / "step_00000050", damaged)
    state_file = edited(damaged, key, value)
    with pytest.raises(checkpoint.CheckpointError) as err:
        checkpoint.read_state(damaged)
    assert f"{state_file}: damaged, field '{key}'" in str(err.value) and message in str(err.value)


def test_a_bad_config_in_the_training_state_is_refused_naming_the_flag(whole, tmp_path):
    damaged = tmp_path / "step"
    shutil.copytree(whole / "checkpoints" / "step_00000050", damaged)
    config = json.loads((damaged / checkpoint.STATE_NAME).read_text())["config"]
    edited(damaged, "config", {**config, "epochs": -1})
    proc = check(train_here("--resume", str(damaged), "--output-dir", str(tmp_path / "o")), rc=2)
    assert "damaged, field 'config': --epochs=-1: must be an integer >= 1" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_resume_auto_falls_back_past_a_hand_edited_checkpoint_with_a_warning(whole, tmp_path):
    out = interrupted(whole, tmp_path, 40)
    edited(out / "checkpoints" / "step_00000040", "batch_in_epoch", 1000)
    proc = check(train_here("--resume", "auto", "--output-dir", str(out)))
    assert f"warning: skipping {out / 'checkpoints' / 'step_00000040'}" in proc.stdout
    assert "batch_in_epoch" in proc.stdout and "(step 30)" in proc.stdout
    assert same_weights(out, whole)


def test_a_state_that_looped_forever_before_now_ends_and_evaluates_no_epoch_twice(whole, tmp_path):
    # the check of the state switched off: the loop itself must end, each epoch evaluated at most once
    damaged = tmp_path / "step"
    shutil.copytree(whole / "checkpoints" / "step_00000030", damaged)
    edited(damaged, "batch_in_epoch", 1000)
    proc = run([sys.executable, str(REPO / "tests" / "workers" / "unchecked_state.py"), "--resume", str(damaged),
                "--output-dir", str(tmp_path / "o")], timeout=120)
    assert proc.stdout.count("epoch 1/2:") == 1, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_results_json_is_strict_json(whole, tmp_path):
    def no_constants(name):
        raise AssertionError(f"results.json holds {name}")

    json.loads((whole / "results.json").read_text(), parse_constant=no_constants)
    with pytest.raises(ValueError):
        atomic.write_json(tmp_path / "x.json", {"train_seconds": math.nan})
    assert not (tmp_path / "x.json").exists() and not (tmp_path / "x.json.tmp").exists()


def test_the_flags_given_are_known_and_a_recipe_counts_as_giving_its_flags():
    assert parse_args(["--epochs", "3", "--cpu"]).given == {"epochs", "cpu"}
    assert {"recipe", "lr", "schedule"} <= parse_args(["--recipe", "tuned"]).given
    cfg, taken = parse_args(["--epochs", "3", "--resume", "auto"]).continued(
        {"epochs": 5, "seed": 7, "output_dir": "elsewhere", "cpu": True, "resume": None})
    assert (cfg.epochs, cfg.seed, cfg.output_dir, cfg.cpu, cfg.resume) == (3, 7, None, True, "auto")
    assert taken == {"seed": 7, "cpu": True}
    # a config built in Python: the fields that differ from the defaults count as given
    assert TrainConfig(epochs=3).continued({"epochs": 5, "seed": 7})[0].epochs == 3
    assert parse_args(["--no-cpu"]).cpu is False and parse_args([]).cpu is False


def test_a_limit_the_run_was_launched_with_is_kept_unless_lifted_with_none(whole, tmp_path):
    out = tmp_path / "cut"
    check(train_here(*FLAGS, "--max-steps", "30", "--output-dir", str(out)))
    assert "holds a finished run (30 steps" in check(train_here("--resume", "auto", "--output-dir", str(out))).stdout
    check(train_here("--resume", "auto", "--output-dir", str(out), "--max-steps", "none"))
    assert results(out)["steps"] == 80 and results(out)["config"]["max_steps"] is None
    assert same_weights(out, whole)


def test_a_checkpoint_whose_profile_directory_became_a_file_still_reads(whole, tmp_path):
    step = tmp_path / "step"
    shutil.copytree(whole / "checkpoints" / "step_00000050", step)
    state_file = step / checkpoint.STATE_NAME
    state = json.loads(state_file.read_text())
    state["config"]["profile"] = str(state_file)  # --profile is never taken from a checkpoint: not checked
    state_file.write_text(json.dumps(state))
    assert checkpoint.read_state(step)["config"]["profile"] == str(state_file)


def test_resume_auto_reads_each_training_state_once_and_the_newest_at_most_twice(tmp_path, monkeypatch):
    from mnist_dist import train_state

    out = tmp_path / "out"
    flags = ["--dataset", "mnist-5k", "--cpu", "--report-to", "none", "--checkpoint-every", "2", "--output-dir", str(out)]
    check(train_here(*flags, "--max-steps", "4"))
    parsed = []
    read_json = train_state.read_json
    monkeypatch.setattr(train_state, "read_json", lambda path: parsed.append(Path(path)) or read_json(path))
    train_state._read_version.cache_clear()  # as a new process starts
    check(train_here(*flags, "--max-steps", "6", "--resume", "auto"))
    newest = out / "checkpoints" / "step_00000004" / train_state.STATE_NAME
    assert 1 <= parsed.count(newest) <= 2
    assert all(parsed.count(p) == 1 for p in set(parsed) if p != newest)

"""One run per output directory: refusals, --overwrite, fresh default directories, the lock, a finished
run left alone, and stop signals at any moment. Real training runs (mnist-5k, a few steps)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mnist_dist import atomic, checkpoint, config, evaluate, model, runs

from .helpers import REPO, check, in_process, results, snapshot, train_cli, train_here

SHORT = ["--dataset", "mnist-5k", "--cpu", "--max-steps", "3", "--report-to", "none"]


def test_a_new_run_into_the_directory_of_another_is_refused_and_changes_nothing(tmp_path):
    out = tmp_path / "out"
    check(train_here(*SHORT, "--output-dir", str(out)))
    before = snapshot(out)
    proc = check(train_here(*SHORT, "--seed", "1", "--output-dir", str(out)), rc=2)
    message = proc.stderr
    assert f"--output-dir {out} holds another run (results.json" in message and "checkpoints/" in message
    assert "--resume auto" in message and "--overwrite" in message and "another --output-dir" in message
    assert snapshot(out) == before


@pytest.mark.slow
def test_overwrite_removes_the_earlier_runs_files_and_only_those(tmp_path):
    out = tmp_path / "out"
    check(train_here(*SHORT, "--checkpoint-every", "1", "--output-dir", str(out)))
    (out / "notes.txt").write_text("mine")
    proc = check(train_here("--dataset", "mnist-5k", "--cpu", "--max-steps", "2", "--report-to", "none", "--seed", "1",
                            "--checkpoint-every", "1", "--output-dir", str(out), "--overwrite"))
    assert "--overwrite: removing results.json" in proc.stdout
    assert results(out)["steps"] == 2 and results(out)["config"]["seed"] == 1
    assert [checkpoint.read_state(p)["global_step"] for p in checkpoint.complete_checkpoints(out)] == [1, 2]
    assert (out / "notes.txt").read_text() == "mine"
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [2]


def test_nothing_is_removed_until_the_new_run_has_passed_its_checks(tmp_path):
    out = tmp_path / "out"
    check(train_here(*SHORT, "--output-dir", str(out)))
    before = snapshot(out)
    proc = check(train_here(*SHORT, "--data-dir", str(tmp_path / "missing"), "--output-dir", str(out), "--overwrite"), rc=2)
    assert "no such directory" in proc.stderr and snapshot(out) == before


def test_resume_auto_never_removes_a_run_it_cannot_resume(tmp_path):
    out = tmp_path / "out"
    check(train_here(*SHORT, "--output-dir", str(out)))
    shutil.rmtree(out / "checkpoints")
    before = snapshot(out)
    proc = check(train_here(*SHORT[:-4], "--max-steps", "5", "--report-to", "none", "--cpu", "--output-dir", str(out),
                            "--resume", "auto"), rc=2)
    assert f"--resume auto: {out} holds no checkpoint to resume, but a run's results.json" in proc.stderr
    assert snapshot(out) == before


@pytest.mark.slow
def test_resuming_an_earlier_checkpoint_of_a_run_drops_its_later_ones_only_with_overwrite(tmp_path):
    out = tmp_path / "out"
    flags = [*SHORT, "--checkpoint-every", "1", "--keep-checkpoints", "3", "--output-dir", str(out)]
    check(train_here(*flags))
    first = checkpoint.complete_checkpoints(out)[0]
    before = snapshot(out)
    proc = check(train_here(*flags, "--resume", str(first)), rc=2)
    assert "that checkpoint is at step 1, but the run in" in proc.stderr and "went on to step 3" in proc.stderr
    assert snapshot(out) == before
    proc = check(train_here(*flags, "--resume", str(first), "--overwrite"))
    assert ("resuming from step 1: removing checkpoints/step_00000002, checkpoints/step_00000003, results.json"
            in proc.stdout)
    assert [checkpoint.read_state(p)["global_step"] for p in checkpoint.complete_checkpoints(out)] == [1, 2, 3]
    assert results(out)["steps"] == 3


def test_runs_without_an_output_dir_get_fresh_directories_and_latest_points_at_the_newest(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    check(train_here(*SHORT))
    check(train_here(*SHORT, "--seed", "1"))
    first, second = sorted((tmp_path / "outputs").glob("run-*"))
    assert results(first)["config"]["seed"] == 0 and results(second)["config"]["seed"] == 1
    assert results(second)["config"]["output_dir"] == str(runs.RUNS_ROOT / second.name)
    assert os.readlink(tmp_path / "outputs" / "latest") == second.name
    # the README's evaluate example points at something real
    proc = in_process(evaluate.main, "--model", "outputs/latest", "--cpu")
    assert proc.returncode == 0 and f"test_accuracy {results(second)['test_accuracy']:.4f}" in proc.stdout
    # --resume auto without --output-dir continues outputs/latest: finished, so nothing to do
    proc = check(train_here(*SHORT, "--seed", "1", "--resume", "auto"))
    assert f"{runs.RUNS_ROOT / second.name} holds a finished run (3 steps" in proc.stdout
    # outputs/latest does not follow --output-dir: said for a new run of yours in outputs/, once, and not elsewhere
    note = f"outputs/latest still points at {second.name}"
    proc = check(train_here(*SHORT, "--max-steps", "2", "--output-dir", "outputs/mine"))
    assert note in proc.stdout
    assert note not in check(train_here(*SHORT, "--output-dir", "outputs/mine", "--resume", "auto")).stdout
    assert note not in check(train_here(*SHORT, "--output-dir", "elsewhere")).stdout


@pytest.mark.slow
def test_resume_auto_on_a_finished_run_says_so_and_rewrites_nothing(tmp_path):
    out = tmp_path / "out"
    env = {"WANDB_MODE": "offline"}
    flags = [*SHORT[:-2], "--report-to", "wandb", "--output-dir", str(out)]
    check(train_cli(*flags, env=env))
    before = snapshot(out)
    proc = check(train_cli(*flags, "--resume", "auto", env=env))
    assert f"{out} holds a finished run (3 steps, test accuracy {results(out)['test_accuracy']:.4f})" in proc.stdout
    assert snapshot(out) == before  # no file rewritten, no second W&B run started
    assert len(list((out / "wandb").glob("offline-run-*"))) == 1


@pytest.mark.slow
def test_a_second_launch_into_a_directory_in_use_is_refused_naming_the_holder(tmp_path):
    out = tmp_path / "out"
    first = subprocess.Popen([sys.executable, "-m", "mnist_dist.train", "--dataset", "mnist-5k", "--cpu", "--epochs", "3",
                              "--report-to", "none", "--output-dir", str(out)], cwd=REPO, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    holder = out / runs.HOLDER_NAME
    deadline = time.monotonic() + 120
    while not holder.exists():
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()[0][-3000:]
        time.sleep(0.01)
    second = train_here(*SHORT, "--output-dir", str(out))
    running = first.poll() is None
    output, _ = first.communicate(timeout=120)
    assert second.returncode == 2
    assert f"--output-dir {out}: another run is using it (process {first.pid} on " in second.stderr
    assert running, "the refusal came only after the first run had finished"
    assert first.returncode == 0, output[-3000:]
    assert results(out)["steps"] == 120 and not holder.exists()


def test_a_run_that_fails_before_training_leaves_no_directory_behind(tmp_path):
    out = tmp_path / "new" / "out"
    proc = check(train_here(*SHORT, "--data-dir", str(tmp_path / "missing"), "--output-dir", str(out)), rc=2)
    assert "--data-dir" in proc.stderr and "no such directory" in proc.stderr
    assert not (tmp_path / "new").exists()


def test_output_dir_that_is_a_file_or_unwritable_is_refused_before_the_data_is_read(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("")
    missing_data = ["--data-dir", str(tmp_path / "missing")]  # would be an error too, later
    proc = check(train_here(*SHORT, *missing_data, "--output-dir", str(afile)), rc=2)
    assert f"--output-dir {afile}: is a file, not a directory" in proc.stderr
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.access(locked, os.W_OK):
        pytest.skip("running as a user whom permissions do not stop (root)")
    proc = check(train_here(*SHORT, *missing_data, "--output-dir", str(locked / "out")), rc=2)
    assert "permission denied" in proc.stderr


@pytest.mark.parametrize("flag, value, message", [
    ("--seed", "-1", "--seed=-1: must be an integer from 0 to 2**32 - 1"),
    ("--seed", str(2**32), f"--seed={2**32}: must be an integer from 0 to 2**32 - 1"),
    ("--hidden-sizes", "1000000000", "--hidden-sizes='1000000000': must be 1 to 8 comma-separated integers from 1 to 65,536"),
    ("--batch-size", "100000000", "--batch-size=100000000: must be at most 1,048,576"),
    ("--timeout", "0", "--timeout=0: must be an integer >= 1"),
])
def test_out_of_range_flags_are_refused_naming_the_flag(flag, value, message, capsys):
    with pytest.raises(SystemExit) as stopped:
        config.parse_args([flag, value])
    assert stopped.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.slow
def test_a_stop_signal_during_start_up_exits_75(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "mnist_dist.train", *SHORT, "--output-dir", str(out)], cwd=REPO,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    while not (out / runs.HOLDER_NAME).exists():  # it has claimed its directory: data and model are next
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, output[-3000:]
    assert "stopped by signal SIGTERM during start-up; nothing new to save" in output
    assert not (out / "results.json").exists() and not (out / runs.HOLDER_NAME).exists()


def test_a_stop_signal_while_the_outputs_are_written_exits_75_with_the_outputs_complete(tmp_path, monkeypatch):
    write_json = atomic.write_json

    def signalled_write(path, obj):
        if path.name == "results.json":
            signal.raise_signal(signal.SIGTERM)
        write_json(path, obj)

    monkeypatch.setattr(atomic, "write_json", signalled_write)
    out = tmp_path / "out"
    proc = train_here(*SHORT, "--output-dir", str(out))
    assert proc.returncode == 75, proc.stderr
    assert "stopped by signal SIGTERM after writing the outputs; the run is complete" in proc.stdout
    assert results(out)["steps"] == 3


def test_the_root_directory_and_a_dangling_link_are_refused_as_output_dirs(tmp_path):
    proc = check(train_here(*SHORT, "--output-dir", "/"), rc=2)
    assert "--output-dir /: the root of the file system" in proc.stderr
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "gone")
    proc = check(train_here(*SHORT, "--output-dir", str(link)), rc=2)
    assert f"--output-dir {link}: a symbolic link to {tmp_path / 'gone'}, which does not exist" in proc.stderr


def steps_of_checkpoints(out) -> list[int]:
    return [checkpoint.read_state(p)["global_step"] for p in checkpoint.complete_checkpoints(out)]


def test_a_resume_named_through_a_link_or_dots_with_overwrite_never_removes_the_checkpoint_it_resumes(tmp_path):
    out = tmp_path / "out"
    flags = [*SHORT, "--checkpoint-every", "1", "--keep-checkpoints", "3", "--output-dir", str(out)]
    check(train_here(*flags))
    uninterrupted = load_file(out / "model.safetensors")
    link = tmp_path / "link"
    link.symlink_to(out / "checkpoints" / "step_00000001")
    proc = check(train_here(*flags, "--resume", str(link), "--overwrite"))
    # taken for this run's own checkpoint: only what came after it goes (before: checkpoints/ and all)
    assert ("resuming from step 1: removing checkpoints/step_00000002, checkpoints/step_00000003, results.json"
            in proc.stdout)
    assert steps_of_checkpoints(out) == [1, 2, 3]
    resumed = load_file(out / "model.safetensors")
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)
    dotted = out / "checkpoints" / "step_00000002" / ".." / "step_00000002"  # parent.parent is not the run
    proc = check(train_here(*flags, "--resume", str(dotted), "--overwrite"))
    assert "resuming from step 2: removing checkpoints/step_00000003, results.json" in proc.stdout
    assert steps_of_checkpoints(out) == [1, 2, 3]


def run_with_best_copies(tmp_path):
    """A run validated every step and checkpointed every 2, stopped at step 4: (its directory, its flags,
    the copy of best/ in its step-4 checkpoint)."""
    out = tmp_path / "out"
    flags = [*SHORT[:-4], "--report-to", "none", "--val-fraction", "0.1", "--eval-every", "1",
             "--checkpoint-every", "2", "--output-dir", str(out)]
    check(train_here(*flags, "--max-steps", "4"))
    return out, flags, out / "checkpoints" / "step_00000004" / checkpoint.BEST_IN_CHECKPOINT


def test_a_best_model_of_the_wrong_shape_in_a_checkpoint_is_refused_before_best_is_written(tmp_path):
    out, flags, copy = run_with_best_copies(tmp_path)
    with safe_open(copy, "pt") as f:  # valid metadata, other shapes
        metadata = f.metadata()
    save_file({"fc1.weight": torch.zeros(3, 784), "fc1.bias": torch.zeros(3), "fc2.weight": torch.zeros(10, 3),
               "fc2.bias": torch.zeros(10)}, copy, metadata=metadata)
    before = snapshot(out)
    proc = check(train_here(*flags, "--max-steps", "6", "--resume", str(copy.parent)), rc=2)
    assert f"{copy}: not this model's weights: fc1.bias is [3] float32, the model's is [256] float32" in proc.stderr
    assert snapshot(out) == before  # best/ above all
    # found by --resume auto, the damaged checkpoint is skipped as any other
    proc = check(train_here(*flags, "--max-steps", "6", "--resume", "auto"))
    assert f"warning: skipping {copy.parent}: {copy}: not this model's weights" in proc.stdout
    assert "resuming from" in proc.stdout and "step_00000002" in proc.stdout
    assert results(out)["steps"] == 6
    check(in_process(evaluate.main, "--model", str(out / "best"), "--cpu"))


def test_resume_auto_goes_back_past_a_checkpoint_whose_best_model_metadata_is_damaged(tmp_path):
    out, flags, copy = run_with_best_copies(tmp_path)
    save_file(load_file(copy), copy, metadata={"format": "pt", checkpoint.BEST_KEY: '{"step": "four"}'})
    proc = check(train_here(*flags, "--max-steps", "6", "--resume", "auto"))
    assert f"warning: skipping {copy.parent}: {copy}: damaged metadata" in proc.stdout
    assert "resuming from" in proc.stdout and "step_00000002" in proc.stdout
    assert results(out)["steps"] == 6


def test_a_finished_run_whose_checkpoints_have_an_older_format_is_still_said_finished(tmp_path):
    out = tmp_path / "out"
    flags = [*SHORT, "--checkpoint-every", "2", "--output-dir", str(out)]
    check(train_here(*flags))
    for kept in checkpoint.complete_checkpoints(out):  # as an earlier mnist_dist wrote them
        state = json.loads((kept / checkpoint.STATE_NAME).read_text())
        (kept / checkpoint.STATE_NAME).write_text(json.dumps({**state, "format": 3}))
    proc = check(train_here(*flags, "--resume", "auto"))
    assert "holds a finished run (3 steps" in proc.stdout and "training state format 3" in proc.stdout


def test_a_model_whose_code_changed_since_its_checkpoint_is_refused_saying_so(tmp_path, monkeypatch):
    out = tmp_path / "out"
    flags = [*SHORT[:-4], "--report-to", "none", "--model", "examples.custom_model:build", "--checkpoint-every", "2",
             "--output-dir", str(out)]
    check(train_here(*flags, "--max-steps", "2"))
    import examples.custom_model

    build = examples.custom_model.build  # the module edited: the same flags build a wider network
    monkeypatch.setattr(examples.custom_model, "build", lambda shape, classes: build(shape, classes, width=17))
    proc = check(train_here(*flags, "--max-steps", "4", "--resume", "auto"), rc=2)
    assert ("the model changed since this checkpoint was saved: --model examples.custom_model:build builds another "
            f"network now ({out / 'checkpoints' / 'step_00000002' / 'model.safetensors'}: not this model's weights: "
            "hidden.bias is [128] float32, the model's is [17] float32)") in proc.stderr
    assert "damaged" not in proc.stderr


def test_results_json_out_of_step_with_its_model_is_never_reported_and_its_checkpoint_is_kept(tmp_path):
    out = tmp_path / "out"
    flags = [*SHORT[:3], "--report-to", "none", "--checkpoint-every", "1", "--keep-checkpoints", "1",
             "--output-dir", str(out)]
    check(train_here(*flags, "--max-steps", "3"))
    (out / "results.json.tmp").mkdir()  # writing results.json fails after the 5-step model is written
    proc = check(train_here(*flags, "--max-steps", "5", "--resume", "auto"), rc=74)
    assert "could not write" in proc.stderr
    assert results(out)["steps"] == 3 and steps_of_checkpoints(out) == [3, 5]  # the reported run's checkpoint stays
    proc = check(train_here(*flags, "--max-steps", "3", "--resume", "auto"), rc=2)
    assert f"{out / 'results.json'}: describes another model than {out / 'model.safetensors'}" in proc.stdout
    assert "holds a finished run" not in proc.stdout and "has already taken 5" in proc.stderr
    (out / "results.json.tmp").rmdir()
    check(train_here(*flags, "--max-steps", "5", "--resume", "auto"))
    assert results(out)["steps"] == 5 and steps_of_checkpoints(out) == [5]
    assert results(out)["model_sha256"] == model.weights_sha256(out / "model.safetensors")
    proc = check(train_here(*flags, "--max-steps", "5", "--resume", "auto"))
    assert "holds a finished run (5 steps" in proc.stdout


def test_an_output_dir_inside_a_file_names_the_file(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("")
    proc = check(train_here(*SHORT, "--output-dir", str(afile / "sub")), rc=2)
    assert f"--output-dir {afile / 'sub'}: {afile} is a file, so no directory can be made inside it" in proc.stderr


def test_an_empty_metrics_log_left_by_a_start_up_stop_does_not_make_the_same_command_a_refusal(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.jsonl").write_text("")
    check(train_here(*SHORT, "--output-dir", str(out)))
    assert results(out)["steps"] == 3


def test_a_non_finite_final_evaluation_is_an_error_naming_it_before_anything_is_written(tmp_path, monkeypatch):
    from mnist_dist import selection

    evaluate_shard = selection.evaluate_shard  # the device path's evaluation: its outputs overflow
    monkeypatch.setattr(selection, "evaluate_shard", lambda *args: {**evaluate_shard(*args), "loss": float("inf")})
    out = tmp_path / "out"
    proc = check(train_here(*SHORT, "--output-dir", str(out)), rc=1)
    assert "evaluating on the test split gave a non-finite loss (inf)" in proc.stderr and "JSON" not in proc.stderr
    assert not any((out / name).exists() for name in ("model.safetensors", "results.json", "confusion_matrix.png"))


def test_a_directory_made_unwritable_mid_run_keeps_the_error_that_ended_it(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    lock = runs.RunLock(out).acquire()

    def refused(self, missing_ok=False):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(type(out), "unlink", refused)
    lock.release()  # no PermissionError chained onto the error that ended the run
    assert not lock.lock.is_locked

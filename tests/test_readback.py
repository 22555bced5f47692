"""Every file read back goes through one bounded reader: huge numbers, deep nesting, wrong types,
damaged lines and directories are errors or warnings naming the file and field, never tracebacks.
Real runs on mnist-5k (a few steps); the files are edited as a user or a crash would leave them."""

import json
import re
import shutil

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mnist_dist import checkpoint, evaluate, predict, readback, reporting

from .helpers import check, in_process, results, train_here

RUN = ["--dataset", "mnist-5k", "--cpu", "--report-to", "none", "--checkpoint-every", "2"]
HUGE = "1" + "0" * 400  # 10**400: parses as a Python int, then overflows any float it meets


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 4-step run with a validation split and its best model, to copy and damage."""
    out = tmp_path_factory.mktemp("readback") / "run"
    check(train_here(*RUN, "--max-steps", "4", "--val-fraction", "0.1", "--output-dir", str(out)))
    return out


@pytest.fixture
def run_copy(finished, tmp_path):
    shutil.copytree(finished, tmp_path / "run")
    return tmp_path / "run"


@pytest.mark.parametrize("text, why", [
    (f'{{"global_step": {HUGE}}}', "an integer of 401 digits"),
    ("[" * 200_000 + "]" * 200_000, "nested 200000 levels deep"),
    (b'{"a": "\xff"}', "not UTF-8 text (byte 7)"),
    ("{not json", "not valid JSON"),
])
def test_the_reader_refuses_huge_integers_deep_nesting_bad_bytes_and_bad_json_naming_the_file(tmp_path, text, why):
    path = tmp_path / "file.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(readback.UnreadableFile, match=f"^{re.escape(f'{path}: {why}')}"):
        readback.read_json(path)


def test_the_reader_refuses_a_directory_and_a_file_over_its_bound(tmp_path):
    with pytest.raises(readback.UnreadableFile, match="a directory, not a file"):
        readback.read_json(tmp_path)
    (tmp_path / "big.json").write_text(json.dumps("x" * 2000))
    with pytest.raises(readback.UnreadableFile, match="larger than"):
        readback.read_json(tmp_path / "big.json", limit=1000)


def test_a_training_state_with_a_huge_integer_is_refused_naming_the_file(run_copy):
    step = checkpoint.complete_checkpoints(run_copy)[-1]
    state_file = step / checkpoint.STATE_NAME
    state_file.write_text(state_file.read_text().replace('"global_step": 4', f'"global_step": {HUGE}'))
    proc = check(train_here(*RUN, "--max-steps", "6", "--output-dir", str(run_copy), "--resume", str(step)), rc=2)
    assert f"{state_file}: an integer of 401 digits" in proc.stderr and "Traceback" not in proc.stderr


def test_a_long_field_is_shown_cut_short(run_copy):
    step = checkpoint.complete_checkpoints(run_copy)[-1]
    state = json.loads((step / checkpoint.STATE_NAME).read_text())
    state["run_id"] = ["x" * 1_000_000]
    (step / checkpoint.STATE_NAME).write_text(json.dumps(state))
    with pytest.raises(checkpoint.CheckpointError) as err:
        checkpoint.read_state(step)
    assert "field 'run_id'" in str(err.value) and len(str(err.value)) < 500


def test_a_best_models_metadata_with_a_huge_integer_is_refused_naming_the_file(run_copy):
    best = run_copy / "best" / "model.safetensors"
    with safe_open(best, "pt") as f:
        metadata = f.metadata()
    metadata[checkpoint.BEST_KEY] = f'{{"step": {HUGE}, "val_accuracy": 0.5}}'
    save_file(load_file(best), best, metadata=metadata)
    with pytest.raises(checkpoint.CheckpointError, match=re.escape(f"{best}'s metadata: an integer of 401 digits")):
        checkpoint.best_meta(best)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c | {"dataset": 5}, "'dataset' (5) must be a string or null"),
    (lambda c: c | {"data_dir": ["a"]}, "'data_dir' (['a']) must be a string or null"),
    (lambda c: c | {"hidden_size": int(HUGE)}, "an integer of 401 digits"),
    (lambda c: {"deep": json.loads("[" * 30 + "]" * 30)} | c | {"x": "[" * 40}, None),  # brackets in a string count not
])
def test_config_json_fields_are_checked_before_evaluate_uses_them(run_copy, edit, message):
    config_path = run_copy / "config.json"
    config_path.write_text(json.dumps(edit(json.loads(config_path.read_text()))))
    proc = in_process(evaluate.main, "--model", str(run_copy), "--cpu")
    if message is None:
        assert proc.returncode == 0, proc.stderr
        return
    assert proc.returncode == 2 and f"{config_path}: not a mnist_dist model config" in proc.stderr
    assert message in proc.stderr


@pytest.mark.parametrize("field, value", [("global_batch_size", 0), ("test_accuracy", "high"), ("steps", None)])
def test_a_hand_edited_results_json_is_skipped_with_a_warning_and_the_run_writes_it_again(run_copy, field, value):
    path = run_copy / "results.json"
    edited = results(run_copy) | {field: value}
    path.write_text(json.dumps(edited))
    proc = check(train_here(*RUN, "--max-steps", "4", "--val-fraction", "0.1", "--output-dir", str(run_copy),
                            "--resume", "auto"))
    assert f"warning: skipping {path}: field {field!r}" in proc.stdout and "counts as unfinished" in proc.stdout
    assert results(run_copy)["steps"] == 4 and results(run_copy)["global_batch_size"] == 128


def test_damaged_lines_of_metrics_jsonl_are_skipped_with_one_warning_on_resume(run_copy):
    log = run_copy / "metrics.jsonl"
    kept = log.read_bytes()
    log.write_bytes(kept + b'{"step": "3", "train/loss": 1}\n' + b'{"step": 3, "x": "\xff"}\n' + b"[1, 2]\n")
    proc = check(train_here(*RUN, "--max-steps", "6", "--val-fraction", "0.1", "--output-dir", str(run_copy),
                            "--resume", "auto"))
    assert f"warning: {log}: skipping 3 damaged line(s) (" in proc.stdout
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 6


def test_a_metrics_log_that_is_a_directory_is_refused_naming_it(run_copy):
    log = run_copy / "metrics.jsonl"
    log.unlink()
    log.mkdir()
    proc = check(train_here(*RUN, "--max-steps", "6", "--val-fraction", "0.1", "--output-dir", str(run_copy),
                            "--resume", "auto"), rc=2)
    assert f"{log}: not a file, so the run's log cannot go on in it" in proc.stderr


def test_predict_refuses_nan_weights_duplicate_class_names_and_a_directory_for_an_image(run_copy, tmp_path):
    from PIL import Image

    image = tmp_path / "digit.png"
    Image.new("L", (28, 28), 0).save(image)
    weights = load_file(run_copy / "model.safetensors")
    good = dict(weights)
    weights["fc2.bias"][3] = float("nan")
    save_file(weights, run_copy / "model.safetensors")
    proc = in_process(predict.main, str(image), "--model", str(run_copy))
    assert proc.returncode == 2 and "fc2.bias holds NaN or infinite weights" in proc.stderr
    save_file(good, run_copy / "model.safetensors")
    config = json.loads((run_copy / "config.json").read_text())
    (run_copy / "config.json").write_text(json.dumps(config | {"class_names": ["a"] * 10}))
    proc = in_process(predict.main, str(image), "--model", str(run_copy))
    assert proc.returncode == 2 and "'class_names'" in proc.stderr and "no two alike" in proc.stderr
    proc = in_process(predict.main, str(tmp_path), "--model", str(run_copy / "best"))
    assert proc.returncode == 2 and f"{tmp_path}: a directory; give the image files in it" in proc.stderr


def test_a_best_model_out_of_step_with_results_json_makes_the_run_unfinished(run_copy, capsys):
    assert reporting.read_results(run_copy)[0]["best"]["model_sha256"]  # in step as written
    best = run_copy / "best" / "model.safetensors"
    with safe_open(best, "pt") as f:
        metadata = f.metadata()
    weights = load_file(best)
    weights["fc2.bias"] += 1  # a later best, written by a resume that was stopped before its results.json
    save_file(weights, best, metadata=metadata)
    results, reported = reporting.read_results(run_copy)
    assert results is None
    assert f"describes another model than {best}" in capsys.readouterr().out
    assert reported == 4  # its checkpoint is still spared

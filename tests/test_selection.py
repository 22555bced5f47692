"""Model selection on a validation split: the split itself, the best model in OUTPUT_DIR/best, early
stopping, on 1 and 2 real processes and across a kill and resume; mnist-5k throughout."""

import json
import signal
import sys

import pytest
import torch
from safetensors.torch import load_file

from mnist_dist import checkpoint, data
from mnist_dist.config import TrainConfig, parse_args
from mnist_dist.resume import Resume
from mnist_dist.metrics import evaluate
from mnist_dist.graphs import graph_unsupported
from mnist_dist.model import load_model

from .helpers import (REPO, as_datasets, check, launch, launch_script, mnist5k, results, run, same_weights, subset,
    train_cli, train_here)

RUN = ["--dataset", "mnist-5k", "--report-to", "none", "--val-fraction", "0.1"]
# 4,500 training samples: 36 steps an epoch; validation every 12 steps, stopped after 2 without a rise of 1%
EARLY = [*RUN, "--epochs", "8", "--eval-every", "12", "--early-stopping-patience", "2",
         "--early-stopping-min-delta", "0.01"]


def validation_split(fraction: float = 0.1, seed: int = 0):
    return data.hold_out(mnist5k()["train"], fraction, seed)


def logged(output_dir, key: str) -> dict[int, float]:
    """{step: value} of `key` in the run's metrics.jsonl."""
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in records if key in r}


def accuracy_on(model_dir, split: data.Split) -> float:
    model, config = load_model(model_dir)
    stats = (config["normalization"]["mean"], config["normalization"]["std"])
    return evaluate(model, [(split.images, split.labels)], normalization=stats)["accuracy"]


def test_the_held_out_split_takes_the_same_share_of_each_class_chosen_by_the_seed():
    train = mnist5k()["train"]  # 500 of each digit
    rest, val, indices = data.hold_out(train, 0.1, seed=0)
    assert torch.bincount(val.labels).tolist() == [50] * 10 and torch.bincount(rest.labels).tolist() == [450] * 10
    kept = torch.ones(len(train), dtype=torch.bool)
    kept[indices] = False
    assert len(set(indices.tolist())) == 500 and not kept[indices].any()  # disjoint, and together all of it
    assert torch.equal(rest.images, train.images[kept]) and torch.equal(val.images, train.images[indices])
    assert torch.equal(indices, indices.sort().values)  # the training split's order, in both
    assert torch.equal(data.hold_out(train, 0.1, seed=0)[2], indices)  # the same on every call, process, machine
    other = data.hold_out(train, 0.1, seed=1)
    assert not torch.equal(other[2], indices)
    # another seed or fraction: another fingerprint, so a resume with it is refused
    prints = [data.fingerprint({"train": r, "validation": v}, {"indices_sha256": data.indices_digest(i)})
              for r, v, i in (other, data.hold_out(train, 0.1, seed=0), data.hold_out(train, 0.2, seed=0))]
    assert prints[0] != prints[1] != prints[2] != prints[0]
    with pytest.raises(data.DataError, match="--val-fraction 0.0001: holds out 0 of the 5000"):
        data.hold_out(train, 0.0001, seed=0)


def test_bad_model_selection_flags_are_refused_naming_the_flag(tmp_path, capsys):
    for flags, message in [
        (["--val-fraction", "0.6"], "--val-fraction=0.6: must be in [0, 0.5]"),
        (["--val-fraction", "-0.1"], "--val-fraction=-0.1: must be in [0, 0.5]"),
        (["--early-stopping-min-delta", "1.5"], "--early-stopping-min-delta=1.5: must be in [0, 1)"),
        (["--early-stopping-patience", "0"], "--early-stopping-patience=0: must be an integer >= 1"),
        (["--eval-every", "0"], "--eval-every=0: must be an integer >= 1"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            parse_args(["--dataset", "mnist-5k", *flags])
        assert exit_.value.code == 2 and message in capsys.readouterr().err, flags
    for flag, value in [("--early-stopping-patience", "2"), ("--eval-every", "10"), ("--keep-best", None),
                        ("--early-stopping-min-delta", "0.5")]:
        proc = train_here("--dataset", "mnist-5k", "--cpu", "--report-to", "none", "--output-dir", str(tmp_path / "x"),
                          flag, *([value] if value else []))
        assert proc.returncode == 2, proc.stderr
        shown = repr(True if value is None else float(value) if "." in value else int(value))
        assert f"{flag}={shown}: needs a validation split, and mnist-5k has none; hold one " \
               "out with --val-fraction" in proc.stderr
        assert not (tmp_path / "x").exists()  # refused before anything was written


def test_a_resume_with_another_validation_fraction_is_refused(tmp_path):
    config = parse_args(["--dataset", "mnist-5k"]).to_dict()
    older = {"config": {**config, "val_fraction": 0.0}}  # trained without a validation split
    Resume(tmp_path, older).check_compatible({**config, "val_fraction": 0.0})
    with pytest.raises(checkpoint.CheckpointError, match="--val-fraction=0.1, but .* was trained with 0.0"):
        Resume(tmp_path, older).check_compatible({**config, "val_fraction": 0.1})


def test_a_score_named_in_scores_and_computed_in_summarize_reaches_every_report_and_checkpoint(tmp_path, monkeypatch):
    from mnist_dist import config, metrics

    summarize = metrics.summarize  # a new score is these two changes, nothing else
    monkeypatch.setitem(config.SCORES, "error", "minimize")
    monkeypatch.setattr(metrics, "summarize", lambda sums: (m := summarize(sums)) | {"error": 1 - m["accuracy"]})
    out = tmp_path / "out"
    check(train_here(*RUN, "--cpu", "--max-steps", "24", "--eval-every", "12", "--output-dir", str(out)))
    check(train_here(*RUN, "--cpu", "--max-steps", "36", "--output-dir", str(out), "--resume", "auto"))  # read back
    r = results(out)
    assert r["test_error"] == 1 - r["test_accuracy"] and r["validation"]["error"] == 1 - r["validation"]["accuracy"]
    assert r["history"][0]["val_error"] == 1 - r["history"][0]["val_accuracy"]
    assert r["best"]["test_error"] == 1 - r["best"]["test_accuracy"]
    assert sorted(logged(out, "val/error")) == [12, 24, 36]


@pytest.fixture(scope="module")
def selected(tmp_path_factory):
    """One process, 6 epochs, validation every 12 steps and at each epoch end (the best: step 180 of 216)."""
    out = tmp_path_factory.mktemp("selected") / "run"
    check(train_cli(*RUN, "--cpu", "--epochs", "6", "--eval-every", "12", "--output-dir", str(out)))
    return out


def test_each_epoch_is_scored_on_the_validation_split_and_the_test_set_only_at_the_end(selected):
    r = results(selected)
    assert all("val_accuracy" in h and "test_accuracy" not in h for h in r["history"])
    assert r["validation"]["samples"] == 500 and "10% of the training split" in r["validation"]["source"]
    assert r["train_samples"] == 4500 and r["test_samples"] == 10_000
    assert r["validation"]["accuracy"] == r["history"][-1]["val_accuracy"]  # the final model's
    assert r["stopped"] == {"reason": "epochs", "step": 216}
    assert "best_test_accuracy" not in r  # nothing is chosen on the test set
    val = logged(selected, "val/accuracy")
    assert sorted(val) == list(range(12, 217, 12))  # every 12 steps, epoch ends included, each once
    assert "test/accuracy" not in json.dumps([json.loads(x) for x in (selected / "metrics.jsonl").read_text().splitlines()])
    # the fingerprint names the held-out samples: a resume with another split is refused
    state = checkpoint.read_state(checkpoint.complete_checkpoints(selected)[-1])
    assert state["data"]["validation"]["held_out"]["indices_sha256"] == data.indices_digest(validation_split()[2])
    assert state["data"]["train"]["samples"] == 4500


def test_best_holds_the_model_of_the_best_validation_accuracy(selected):
    r, val = results(selected), logged(selected, "val/accuracy")
    best_step = min(step for step, acc in val.items() if acc == max(val.values()))  # the first of the best
    assert r["best"]["step"] == best_step and r["best"]["val_accuracy"] == max(val.values())
    _, val_set, _ = validation_split()
    assert accuracy_on(selected / "best", val_set) == r["best"]["val_accuracy"]  # re-evaluated from the files
    assert accuracy_on(selected / "best", mnist5k()["test"]) == r["best"]["test_accuracy"]
    assert accuracy_on(selected, mnist5k()["test"]) == r["test_accuracy"]  # the final model's
    proc = check(run([sys.executable, "-m", "mnist_dist.evaluate", "--model", str(selected / "best"), "--cpu"]))
    assert f"test_accuracy {r['best']['test_accuracy']:.4f}" in proc.stdout
    assert best_step < r["steps"] and not same_weights(selected / "best", selected)  # the best was not the last


@pytest.fixture(scope="module")
def stopped_early(tmp_path_factory):
    out = tmp_path_factory.mktemp("early") / "run"
    check(train_cli(*EARLY, "--cpu", "--output-dir", str(out)))
    return out


def test_early_stopping_ends_the_run_as_finished_after_the_patience_runs_out(stopped_early):
    r, val = results(stopped_early), logged(stopped_early, "val/accuracy")
    steps = sorted(val)
    assert r["stopped"]["reason"] == "early_stopping" and r["stopped"]["step"] == steps[-1] == r["steps"] < 8 * 36
    best = r["best"]["step"]
    assert steps[-3] == best  # the best, then two evaluations that did not beat it by more than 1%
    assert all(val[s] <= val[best] + 0.01 for s in steps[-2:])
    assert val[best] > max(val[t] for t in steps if t < best) + 0.01
    records = [json.loads(line) for line in (stopped_early / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in records if "val/accuracy" in r]) == len(val)  # each validation logged once
    proc = check(train_cli(*EARLY, "--cpu", "--output-dir", str(stopped_early), "--resume", "auto"))
    assert "holds a finished run" in proc.stdout and "It stopped early (--early-stopping-patience)" in proc.stdout


def test_two_processes_hold_out_the_same_split_and_stop_at_the_same_step(stopped_early, tmp_path):
    out, steps = tmp_path / "two", tmp_path / "steps"
    # the DataLoader path: validation through a prepared loader and gather_for_metrics
    proc = check(launch_script(2, REPO / "tests" / "workers" / "final_step.py", str(steps), *EARLY, "--cpu",
                               "--data-path", "dataloader", "--output-dir", str(out)))
    ended = [json.loads((steps / f"rank-{r}.json").read_text()) for r in range(2)]
    assert [e["world_size"] for e in ended] == [2, 2], proc.stdout
    assert ended[0]["step"] == ended[1]["step"] == results(out)["steps"] and all(e["stopped_early"] for e in ended)
    one, two = results(stopped_early), results(out)
    assert two["validation"]["samples"] == 500  # each validation image counted once on 2 processes
    state = [checkpoint.read_state(checkpoint.complete_checkpoints(d)[-1]) for d in (stopped_early, out)]
    assert state[0]["data"] == state[1]["data"]  # the same held-out indices, training and test data
    # (the same batches as one process trains on, summed in another order: an accuracy within a sample of the
    # threshold may decide otherwise, so the steps are not compared across world sizes)
    assert two["stopped"]["reason"] == "early_stopping" and two["validation"]["source"] == one["validation"]["source"]


def killed_in(where: str, *flags: str):
    """A one-process run SIGKILLed at `where` (see tests/workers/stop_in.py)."""
    proc = run([sys.executable, str(REPO / "tests" / "workers" / "stop_in.py"), "--cpu", *flags],
               env={"STOP_IN": where, "STOP_SIGNAL": "SIGKILL"})
    assert proc.returncode == -signal.SIGKILL, proc.stdout[-2000:]
    return proc


def same_selection(out, ref) -> None:
    """`out` ended as `ref` did: the same stop, the same best model (weights and scores), the same final model."""
    r, expected = results(out), results(ref)
    assert r["stopped"] == expected["stopped"] and r["best"] == {**expected["best"], "model_dir": str(out / "best")}
    assert same_weights(out / "best", ref / "best") and same_weights(out, ref)


def test_a_run_killed_after_a_new_best_resumes_from_an_older_checkpoint_with_that_checkpoints_best(
        stopped_early, tmp_path):
    out = tmp_path / "killed"
    # checkpoints at steps 12, 24, then the kill as the one of step 36 (an epoch end) begins: best/ already
    # holds step 36's model, newer than the checkpoint the resume starts from
    killed_in("checkpoint:3", *EARLY, "--checkpoint-every", "12", "--output-dir", str(out))
    newest = checkpoint.complete_checkpoints(out)[-1]
    state = checkpoint.read_state(newest)
    assert state["global_step"] == 24 and checkpoint.best_meta(newest / checkpoint.BEST_IN_CHECKPOINT)["step"] == \
        state["best_step"] == 24
    assert checkpoint.best_meta(out / "best" / "model.safetensors")["step"] == 36
    # up to the checkpoint's step only: best/ is that checkpoint's best again, step 24's weights
    check(train_cli(*EARLY, "--cpu", "--output-dir", str(out), "--resume", "auto", "--max-steps", "24"))
    assert checkpoint.best_meta(out / "best" / "model.safetensors")["step"] == 24
    copy = load_file(newest / checkpoint.BEST_IN_CHECKPOINT)
    assert all(copy[k].equal(v) for k, v in load_file(out / "best" / "model.safetensors").items())
    check(train_cli(*EARLY, "--cpu", "--output-dir", str(out), "--resume", "auto", "--max-steps", "none"))
    same_selection(out, stopped_early)


def test_a_checkpoint_resumed_into_another_directory_brings_its_best_model(stopped_early, tmp_path):
    last = checkpoint.complete_checkpoints(stopped_early)[-1]  # where it stopped: step 60, its best step 36's
    assert (checkpoint.read_state(last)["global_step"], checkpoint.read_state(last)["best_step"]) == (60, 36)
    out = tmp_path / "elsewhere"
    check(train_cli(*EARLY, "--cpu", "--output-dir", str(out), "--resume", str(last)))
    same_selection(out, stopped_early)


def test_keep_best_turned_on_at_a_resume_takes_the_checkpoints_weights_when_they_are_the_best(tmp_path):
    out = tmp_path / "run"
    # 2 processes: the checkpoint's weights were saved through DDP; step 36 (an epoch end) is the best so far
    check(launch(2, *EARLY, "--no-keep-best", "--max-steps", "36", "--output-dir", str(out)))
    assert not (out / "best").exists() and results(out)["best"]["step"] == 36
    check(launch(2, *EARLY, "--keep-best", "--max-steps", "none", "--output-dir", str(out), "--resume", "auto"))
    r = results(out)
    assert r["world_size"] == 2 and r["stopped"]["reason"] == "early_stopping" and r["best"]["step"] >= 36
    assert checkpoint.best_meta(out / "best" / "model.safetensors")["step"] == r["best"]["step"]
    assert accuracy_on(out / "best", mnist5k()["test"]) == r["best"]["test_accuracy"]


def test_a_run_killed_after_stopping_early_writes_its_outputs_on_resume(stopped_early, tmp_path):
    out = tmp_path / "killed"
    killed_in("outputs:1", *EARLY, "--output-dir", str(out))
    assert not (out / "results.json").exists()
    proc = check(train_cli(*EARLY, "--cpu", "--output-dir", str(out), "--resume", "auto"))
    assert "resuming from" in proc.stdout and "epoch " not in proc.stdout  # nothing trained again
    same_selection(out, stopped_early)


def test_a_dataset_with_a_validation_split_is_validated_on_it(tmp_path):
    import datasets

    source = mnist5k()["train"]  # the validation split: 100 digits that are not among the 600 trained on
    splits = {**subset(600, 200), "validation": data.Split(source.images[4000:4100], source.labels[4000:4100])}
    columns = {"image": datasets.Image(), "label": datasets.ClassLabel(names=list(data.DIGITS))}
    as_datasets(splits, columns).save_to_disk(tmp_path / "disk")
    out = tmp_path / "run"
    proc = check(train_cli("--dataset", str(tmp_path / "disk"), "--cache-dir", str(tmp_path / "cache"), "--cpu",
                           "--report-to", "none", "--epochs", "1", "--val-fraction", "0.2", "--output-dir", str(out)))
    assert "600 train / 100 validation (the dataset's validation split; --val-fraction 0.2 is not used)" in proc.stdout
    r = results(out)
    assert r["train_samples"] == 600 and r["validation"]["samples"] == 100 and r["best"]["step"] == 5


def test_the_graph_path_leaves_validation_inside_epochs_to_the_device_path():
    why = graph_unsupported(TrainConfig(eval_every=10), torch.device("cuda"), 1, "no")
    assert "--eval-every 10 validates inside them: --data-path device runs it" in why
    assert graph_unsupported(TrainConfig(val_fraction=0.1), torch.device("cuda"), 1, "no") is None  # epoch ends only

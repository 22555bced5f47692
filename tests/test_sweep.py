"""`python -m mnist_dist.sweep SPEC`: real Optuna studies of real training runs on a 1,000-digit subset."""

import csv
import json
import os
import signal
import statistics
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import psutil
import pytest

from mnist_dist import sweep, sweep_journal
from mnist_dist.sweep_pruning import PRUNED_NAME
from mnist_dist.sweep_spec import SpecError, read_spec

from .helpers import REPO, check, in_process, read_wandb_run, results, train_here

TRIAL_FLAGS = {"cpu": True, "epochs": 1, "val-fraction": 0.1, "report-to": "none"}


def write_spec(tmp_path: Path, data_dir, space: dict, name="spec.yaml", **top) -> Path:
    """A SPEC file as a user writes one (YAML), sweeping `space` on the subset."""
    flags = {"data-dir": str(data_dir), **TRIAL_FLAGS, **top.pop("flags", {})}
    lines = [f"dir: {top.pop('dir', tmp_path / 'sweep')}", "flags:"]
    lines += [f"  {k}: {str(v).lower() if isinstance(v, bool) else v}" for k, v in flags.items()]
    lines += ["space:"] + [f"  {k}: {v}" for k, v in space.items()]
    lines += [f"{k}: {v}" for k, v in top.items()]
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


def sweep_cli(spec: Path, *args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mnist_dist.sweep", str(spec), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=REPO, **kw)


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out
    return out


def study_of(directory: Path) -> optuna.Study:
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(directory / sweep.JOURNAL)))
    return optuna.load_study(study_name=sweep.STUDY_NAME, storage=storage)


def csv_rows(directory: Path) -> list[dict]:
    with open(directory / "trials.csv") as f:
        return list(csv.DictReader(f))


# --- a SPEC is checked whole before any trial starts ---------------------------------------------------------

@pytest.mark.parametrize("space, top, line, says", [
    ({"hidden-sizez": "[32, 64]"}, {}, 9, "unknown mnist_dist.train flag"),
    ({"normalization": "[half, halff]"}, {}, 9, "invalid choice: 'halff'"),
    ({"lr": "[0.001, -1]"}, {}, 9, "--lr=-1.0: must be a finite number > 0"),
    ({"lr": "[]"}, {}, 9, "an empty list"),
    ({"lr": "{low: 0.01, high: 0.001}"}, {"sampler": "tpe", "trials": 2}, 9, "low < high"),
    ({"lr": "{low: 0.001, high: 0.01}"}, {}, 9, "sampler (ranges draw points) needs `trials`"),
    ({"lr": "{low: 0.001, high: 0.01}"}, {"sampler": "grid"}, 9, "a range needs sampler: random or tpe"),
    ({"lr": "[0.001]"}, {"choose_on": "test_accuracy"}, 10, "the test set never chooses"),
    ({"lr": "[0.001]"}, {"choose_ob": "val_loss"}, 10, "unknown key"),
    ({"seed": "[1, 2]"}, {}, 9, "set by the sweep: use `seeds`"),
    ({"lr": "[0.001]"}, {"seeds": 0}, 10, "seeds: a count"),
    ({"lr": "&rates [0.001]", "dropout": "*rates"}, {}, 10, "YAML aliases (*name)"),
    ({"lr": "[[[[[[[[[0.001]]]]]]]]]"}, {}, 9, "nesting deeper than 8"),
    ({"lr": "[1e-3, 0.001]"}, {}, 9, "lists a value twice"),
    ({"batch-size": "{low: 16, high: 64, step: 0.5}"}, {"sampler": "random", "trials": 2}, 9, "an integer step"),
    ({"batch-size": "{low: 16, high: 1" + "0" * 400 + "}"}, {"sampler": "random", "trials": 2}, 9, "low < high"),
    ({"lr": "[0.001]"}, {"seeds": "[[1], [2]]"}, 10, "seeds: a count"),
    ({"lr": "[0.001]"}, {"choose_on": "[val_loss]"}, 10, "choose_on: choose val_loss or val_accuracy"),
    ({"lr": "[0.001, 0.002]"}, {"pruner": "medain"}, 10, "pruner: 'medain': choose none, median"),
    ({"lr": "[0.001, 0.002]"}, {"pruner": "{name: median, warmup: 2}"}, 10, "not a setting of the median pruner"),
    ({"lr": "[0.001, 0.002]"}, {"pruner": "{name: [median]}"}, 10, "choose none, median"),
    ({"lr": "[0.001, 0.002]"}, {"pruner": "{name: hyperband, min_resource: 0}"}, 10, "0: a whole number from 1"),
    ({"lr": "[0.001, 0.002]"}, {"pruner": "median"}, 5, "flags.epochs: the point {'lr': 0.001} reports one validation"),
    ({"lr": "[0.001]"}, {"pruner": "median"}, 10, "sweep has 1 point(s): it could never prune"),
    ({"lr": "[0.001]"}, {"within": 1.5}, 10, "within: 1.5: a number from 0 to below 1"),
    ({"lr": "[0.001]"}, {"within": "-0.1"}, 10, "within: -0.1: a number from 0"),
    ({"lr": "[0.001]"}, {"accelerate_config": "accelerate_configs/cpu.yaml"}, 10, "give `processes` too"),
    ({"lr": "[0.001]"}, {"seeds": "1" * 5000}, 10, "a value over 4,096 characters"),
    ({"run-name": "[a, b]"}, {}, 9, "each run is named"),
])
def test_a_bad_spec_is_refused_naming_its_line_before_any_trial(tmp_path, space, top, line, says):
    spec = write_spec(tmp_path, tmp_path, space, **top)
    run = in_process(sweep.main, str(spec))
    assert run.returncode == 2
    assert f"{spec}:{line}: " in run.stderr and says in run.stderr, run.stderr
    assert not (tmp_path / "sweep").exists()  # no study, no trial


def test_choosing_on_validation_needs_a_validation_split(tmp_path):
    spec = write_spec(tmp_path, tmp_path, {"lr": "[0.001]"}, flags={"val-fraction": 0})
    with pytest.raises(SpecError, match=r"spec.yaml:6: flags.val-fraction: choosing on validation needs a validation split"):
        read_spec(spec)


def test_a_refused_flag_is_found_at_its_own_line(tmp_path):
    spec = write_spec(tmp_path, tmp_path, {"lr": "[0.001]"}, flags={"augment": True, "augment-rotation": -5})
    with pytest.raises(SpecError, match=r"spec.yaml:9: flags.augment-rotation: --augment-rotation=-5.0: must be"):
        read_spec(spec)


def test_a_combination_the_trainer_refuses_is_an_error_too(tmp_path):
    spec = write_spec(tmp_path, tmp_path, {"model": "[mlp, cnn]", "dropout": "[0.0, 0.2]"})
    with pytest.raises(SpecError, match=r"spec.yaml:8: space: the point .*'model': 'cnn'.* refused: --dropout"):
        read_spec(spec)


def test_a_directory_holding_another_sweep_is_refused(tmp_path, small_subset):
    first = write_spec(tmp_path, small_subset, {"lr": "[0.001]"})
    sweep.claim_dir(read_spec(first))
    other = write_spec(tmp_path, small_subset, {"lr": "[0.002]"}, name="other.yaml")
    run = in_process(sweep.main, str(other))
    assert run.returncode == 2 and "holds a sweep of another SPEC (it differs in space)" in run.stderr


# --- sweeps of real runs ----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_2x2_grid_on_two_workers_trains_each_point_once_and_chooses_the_best_median(tmp_path, small_subset):
    spec = write_spec(tmp_path, small_subset, {"hidden-sizes": "[16, 64]", "lr": "[0.0003, 0.003]"}, seeds=2)
    out = finish(sweep_cli(spec, "--workers", "2"))
    directory = tmp_path / "sweep"
    trials = study_of(directory).get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4
    assert sorted((t.params["hidden-sizes"], t.params["lr"]) for t in trials) == [
        (16, 0.0003), (16, 0.003), (64, 0.0003), (64, 0.003)]
    assert "#0: trial" in out and "#1: trial" in out  # both workers trained
    rows = csv_rows(directory)
    assert len(rows) == 8 and {r["status"] for r in rows} == {"finished"}
    for row in rows:  # each run trained with its trial's flags and seed, without pictures
        config = results(Path(row["run_dir"]))["config"]
        assert not config["pictures"] and not list(Path(row["run_dir"]).glob("*.png"))
        assert (config["hidden_sizes"], config["lr"], config["seed"]) == (row["hidden-sizes"], float(row["lr"]), int(row["seed"]))
    medians = {t: statistics.median(float(r["val_accuracy"]) for r in rows if r["trial"] == t) for t in {r["trial"] for r in rows}}
    best = min(medians, key=lambda t: (-medians[t], int(t)))  # a tie goes to the first trial, as in summary.md
    chosen = [r for r in rows if r["trial"] == best]
    summary = (directory / "summary.md").read_text()
    assert f"**Chosen on validation:** hidden-sizes {chosen[0]['hidden-sizes']}, lr {chosen[0]['lr']} (trial {best})" in summary
    test = statistics.median(float(r["test_accuracy"]) for r in chosen)
    assert f"**Its test accuracy** (the test set chose nothing): median {test:.2%}" in summary
    assert (directory / "metric.png").stat().st_size > 0
    again = finish(sweep_cli(spec, "--workers", "2"))  # a finished sweep started again trains nothing
    assert "trial" not in again.split("mnist_dist.sweep: chose")[0]
    assert len(study_of(directory).get_trials()) == 4


def wait_for_checkpoint_after(checkpoints: Path, step: int, proc: subprocess.Popen) -> int:
    """The step of the first checkpoint past `step` in `checkpoints` (the run goes on)."""
    deadline = time.monotonic() + 120
    while True:
        steps = [int(p.name.split("_")[1]) for p in checkpoints.glob("step_*") if p.name.split("_")[1].isdigit()]
        if steps and max(steps) > step:
            return max(steps)
        assert proc.poll() is None and time.monotonic() < deadline, f"no checkpoint past step {step}"
        time.sleep(0.05)


@pytest.mark.slow
def test_a_stopped_or_killed_worker_started_again_continues_its_trial_and_runs_each_once(tmp_path, small_subset):
    flags = {"epochs": 4, "checkpoint-every": 10, "batch-size": 16, "hidden-sizes": "1024,1024"}
    spec = write_spec(tmp_path, small_subset, {"lr": "[0.001, 0.002]"}, flags=flags)
    checkpoints = tmp_path / "sweep" / "trials" / "0000" / "seed-0" / "checkpoints"
    first = sweep_cli(spec, start_new_session=True)
    wait_for_checkpoint_after(checkpoints, 0, first)
    first.send_signal(signal.SIGTERM)  # as slurm/sweep.sh passes on USR1: the sweep stops its runs with a checkpoint
    out, _ = first.communicate(timeout=120)
    assert first.returncode == 75, out
    saved = wait_for_checkpoint_after(checkpoints, 0, first)  # the one it stopped with
    second = sweep_cli(spec, start_new_session=True)
    wait_for_checkpoint_after(checkpoints, saved, second)
    os.killpg(second.pid, signal.SIGKILL)  # the worker and its run, as a lost node
    second.communicate()
    assert not (checkpoints.parent / "results.json").exists()
    out = finish(sweep_cli(spec))
    assert "trial 0 was left unfinished: continuing it" in out
    trials = study_of(tmp_path / "sweep").get_trials()
    assert [(t.number, t.state.name) for t in trials] == [(0, "COMPLETE"), (1, "COMPLETE")]
    log = (checkpoints.parent.parent / "seed-0.log").read_text()
    assert log.count("--resume auto") == 3 and log.count("resuming from") == 2  # started 3 times, continued twice
    assert results(checkpoints.parent)["epochs"] == 4


@pytest.mark.slow
def test_a_failed_trial_is_recorded_with_its_error_and_the_sweep_goes_on(tmp_path, small_subset):
    spec = write_spec(tmp_path, small_subset, {"model": "[tests.broken_model:build, mlp]"})
    proc = sweep_cli(spec)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out  # one point trained
    trials = study_of(tmp_path / "sweep").get_trials()
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]
    rows = csv_rows(tmp_path / "sweep")
    assert rows[0]["status"] == "failed" and "exited with 2" in rows[0]["error"]
    assert "cannot import it" in (tmp_path / "sweep" / "trials" / "0000" / "error.txt").read_text()
    assert "Trial 0 (model tests.broken_model:build) failed" in (tmp_path / "sweep" / "summary.md").read_text()


@pytest.mark.slow
def test_a_two_process_trial_builds_its_model_on_both_processes_and_logs_to_the_sweeps_wandb_group(tmp_path, small_subset):
    spec = write_spec(tmp_path, small_subset, {"hidden-sizes": "[24]", "lr": "[0.002]"}, processes=2,
                      flags={"report-to": "wandb", "wandb-mode": "offline"})
    finish(sweep_cli(spec))
    run_dir = tmp_path / "sweep" / "trials" / "0000" / "seed-0"
    got = results(run_dir)
    assert got["world_size"] == 2  # DDP checks that both processes built the same 784-24-10 model
    assert (got["config"]["hidden_sizes"], got["config"]["lr"]) == ("24", 0.002)
    (wandb_dir,) = (run_dir / "wandb").glob("offline-run-*")
    logged = read_wandb_run(wandb_dir)
    assert logged["group"] == "sweep-sweep" and logged["name"] == "sweep-trial-0-seed-0"
    assert (logged["config"]["hidden_sizes"], logged["config"]["lr"]) == ("24", 0.002)


def finished_trial(spec, scores: dict[int, float]) -> None:
    """The study's next trial, finished with validation `scores` by step (the median pruner's startup trial),
    recorded as a worker records one: its runs' results.json and its scores reported to the trial."""
    study = sweep.open_study(spec)
    number, params, lock = sweep.Worker(spec, study, "test worker", threading.Event(), {}).next_trial()
    for seed in spec.seeds:
        fake_results(spec.trial_dir(number) / f"seed-{seed}", max(scores.values()))
    trial = optuna.trial.Trial(study, study.get_trials()[number]._trial_id)
    for step, value in scores.items():
        trial.report(value, step)
    study.tell(number, max(scores.values()))
    lock.release()


@pytest.mark.slow
def test_a_clearly_worse_point_is_pruned_on_both_processes_with_a_checkpoint_and_never_trained_again(tmp_path, small_subset):
    """lr 1e-6 after a point that finished with 60-90% at each epoch end (the median pruner's one startup
    trial): its first run, of 2 processes, is stopped at an early epoch end, both processes saving a checkpoint
    (exit 75, no traceback); its second seed is never trained."""
    spec = write_spec(tmp_path, small_subset, {"lr": "[0.003, 0.000001]"}, seeds=2, processes=2, pruner="median",
                      flags={"epochs": 40})
    finished_trial(read_spec(spec), {4 * epoch: min(0.6 + 0.01 * epoch, 0.9) for epoch in range(1, 41)})
    out = finish(sweep_cli(spec))
    directory = tmp_path / "sweep"
    trials = study_of(directory).get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "PRUNED"], out
    pruned = spec_dir = directory / "trials" / "0001"
    said = (pruned / PRUNED_NAME).read_text()
    step = int(said.split("pruned at step ")[1].split(":")[0])
    assert 0 < step < 40 * 4 and step in trials[1].intermediate_values  # 900 samples, global batch 256: 4 steps
    assert trials[1].intermediate_values[step] < trials[0].intermediate_values[step]
    log = (pruned / "seed-0.log").read_text()
    assert "stopped by signal SIGTERM" in log and "Traceback" not in log
    saved = sorted(p.name for p in (pruned / "seed-0" / "checkpoints").iterdir())
    reached = int(saved[-1].split("_")[1])  # the stop's checkpoint, at or after the step decided at
    assert reached >= step and said.strip().endswith(f"its run stopped with a checkpoint at step {reached}")
    assert max(trials[1].intermediate_values) <= reached  # the scores it logged until it stopped, all reported
    assert not (pruned / "seed-0" / "results.json").exists() and not (spec_dir / "seed-1").exists()
    summary = (directory / "summary.md").read_text()
    assert f"Trial 1 (lr 1e-06) {said.strip()}" in summary and "1 stopped early by the median pruner" in summary
    assert "chose among 1 of 2 points, 1 pruned: lr 0.003" in out
    assert {r["status"] for r in csv_rows(directory) if r["trial"] == "1"} == {"pruned"}
    again = finish(sweep_cli(spec))  # started again: nothing trained, the pruned trial left as it was
    assert "trial" not in again.split("mnist_dist.sweep: chose")[0]
    assert sorted(p.name for p in (pruned / "seed-0" / "checkpoints").iterdir()) == saved
    assert json.loads(json.dumps(trials[1].user_attrs)) == {  # what optuna-dashboard shows of the trial
        "run_dirs": [str(pruned / "seed-0"), str(pruned / "seed-1")],
        "flags": " ".join(read_spec(spec).train_flags({"lr": 0.000001}))}
    dashboard_lists_the_trials(directory / sweep.JOURNAL, trials)


def dashboard_lists_the_trials(journal: Path, trials: list) -> None:
    """`optuna-dashboard DIR/study.journal`, read by its API and in a headless browser (Debian's chromium)."""
    browser = [shutil.which("chromium"), shutil.which("chromedriver")]
    if not all(browser):
        needs = "the dashboard's browser test needs Debian's chromium and chromium-driver (as .ci/run installs)"
        pytest.fail(needs) if os.environ.get("CI") else pytest.skip(needs)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    port = sweep.free_port()
    command = Path(sys.executable).parent / "optuna-dashboard"  # the extra's command, in this environment
    server = subprocess.Popen([str(command), str(journal), "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    options = webdriver.ChromeOptions()
    options.binary_location = browser[0]
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    driver = None
    try:
        study = api_study(port)
        pruned = study["trials"][1]
        assert [t["state"] for t in study["trials"]] == ["Complete", "Pruned"]
        assert {v["step"]: v["value"] for v in pruned["intermediate_values"]} == trials[1].intermediate_values
        attrs = {a["key"]: a["value"] for a in pruned["user_attrs"]}
        assert json.loads(attrs["run_dirs"])[0].endswith("trials/0001/seed-0") and "--lr 1e-06" in attrs["flags"]
        driver = webdriver.Chrome(options=options, service=Service(browser[1]))
        driver.get(f"http://127.0.0.1:{port}/dashboard/studies/0/trials")
        page = lambda: driver.find_element(By.TAG_NAME, "body").text  # noqa: E731
        WebDriverWait(driver, 60).until(lambda _: "Trial 1" in page())
        assert "2 Trials" in page() and "Pruned" in page() and "Complete" in page()
    finally:
        if driver is not None:
            driver.quit()
        server.kill()
        server.wait()


def api_study(port: int, timeout: float = 60) -> dict:
    """Study 0 as optuna-dashboard's API gives it, once the server answers."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies/0", timeout=5) as answer:
                return json.loads(answer.read())
        except (urllib.error.URLError, ConnectionError):
            assert time.monotonic() < deadline, f"optuna-dashboard did not answer on port {port}"
            time.sleep(0.2)


def test_a_trial_left_mid_decision_is_decided_from_the_scores_on_disk_before_it_trains(tmp_path, capsys):
    spec = read_spec(write_spec(tmp_path, tmp_path, {"lr": "[0.001, 0.002]"}, pruner="median", flags={"epochs": 3}))
    study = sweep.open_study(spec)
    worker = sweep.Worker(spec, study, "test worker", threading.Event(), {})
    number, params, lock = worker.next_trial()  # trial 0: finished, with its scores by step
    fake_results(spec.trial_dir(number) / "seed-0", 0.9)
    trial = optuna.trial.Trial(study, study.get_trials()[number]._trial_id)
    for step, value in ((4, 0.6), (8, 0.8), (12, 0.9)):
        trial.report(value, step)
    study.tell(number, 0.9)
    lock.release()
    number, params, lock = worker.next_trial()  # trial 1: its worker killed after the run logged two poor scores
    run_dir = spec.trial_dir(number) / "seed-0"
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "val/accuracy": v, "val/loss": 2.0}) + "\n"
                                                   for s, v in ((4, 0.1), (8, 0.12))))
    lock.release()
    number, params, lock = worker.next_trial()  # the next worker continues it, and decides first
    assert number == 1
    worker.run_trial(number, params)  # no run is launched: it would fail here, without a dataset
    lock.release()
    assert study.get_trials()[1].state.name == "PRUNED" and study.get_trials()[1].intermediate_values == {4: 0.1, 8: 0.12}
    assert "trial 1 pruned at step 8: val_accuracy 0.1200 (the median pruner)" in capsys.readouterr().out
    assert not (spec.trial_dir(1) / "seed-0.log").exists()


# --- a sweep chooses only from what it trained, and says among how many ---------------------------------------

def fake_results(run_dir: Path, accuracy: float, seconds: float = 2.0) -> None:
    """A finished run's results.json as read_outcome reads it (the report's view of a run that finished)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "results.json").write_text(json.dumps({
        "validation": {"accuracy": accuracy, "loss": 1 - accuracy}, "test_accuracy": accuracy,
        "train_seconds": seconds, "epochs": 1, "flops_per_sample": 1.2e6}))


def test_a_report_with_a_point_whose_seeds_have_not_all_finished_draws_no_cost_for_it(tmp_path):
    spec = read_spec(write_spec(tmp_path, tmp_path, {"lr": "[0.001, 0.002]"}, seeds=2))
    study = sweep.open_study(spec)
    number, params, lock = sweep.Worker(spec, study, "test worker", threading.Event(), {}).next_trial()
    fake_results(spec.trial_dir(number) / "seed-0", 0.9)  # its seed 1 is still to train
    lock.release()
    report = in_process(sweep.main, str(spec.path), "--report")
    assert report.returncode == 1 and "Traceback" not in report.stderr, report.stderr
    assert "nothing to choose among 0 of 2 points" in report.stdout
    assert (tmp_path / "sweep" / "metric.png").exists() and not (tmp_path / "sweep" / "cost.png").exists()


def test_the_summary_marks_the_pareto_front_and_names_the_cheapest_point_within_the_margin(tmp_path):
    spec = read_spec(write_spec(tmp_path, tmp_path, {"lr": "[0.001, 0.002, 0.003, 0.004]"}, within=0.005))
    study = sweep.open_study(spec)
    worker = sweep.Worker(spec, study, "test worker", threading.Event(), {})
    # (accuracy, training seconds): the best; half a point less at a quarter of the time; cheap and poor;
    # and one that another point beats on both (0.897 in 5 s against 0.85 in 10 s)
    for accuracy, seconds in ((0.90, 20.0), (0.897, 5.0), (0.80, 2.0), (0.85, 10.0)):
        number, params, lock = worker.next_trial()
        fake_results(spec.trial_dir(number) / "seed-0", accuracy, seconds)
        study.tell(number, accuracy)
        lock.release()
    report = in_process(sweep.main, str(spec.path), "--report")
    assert report.returncode == 0, report.stderr
    table = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in
             (tmp_path / "sweep" / "summary.md").read_text().splitlines() if line.startswith("| 0.00")}
    assert {lr: row[5] == "yes" for lr, row in table.items()} == {"0.001": True, "0.002": True, "0.003": True,
                                                                    "0.004": False}
    assert table["0.002"][2:5] == ["5.00", "1.2", "5.00"]  # train seconds, MFLOP a sample, s/epoch
    summary = (tmp_path / "sweep" / "summary.md").read_text()
    assert ("**Cheapest within 0.50% of the best** (`within`): lr 0.002 (trial 1), median val_accuracy 89.70% in "
            "5.0 s of training, against 20.0 s for the chosen point (4.0x).") in summary
    assert (tmp_path / "sweep" / "cost.png").stat().st_size > 0
    rows = csv_rows(tmp_path / "sweep")
    assert [(r["train_seconds"], r["flops_per_sample"]) for r in rows][:2] == [("20.0", "1200000.0"), ("5.0", "1200000.0")]


def test_a_finished_trial_whose_results_were_deleted_is_not_chosen_and_its_point_is_trained_again(tmp_path):
    spec = read_spec(write_spec(tmp_path, tmp_path, {"lr": "[0.001, 0.002]"}))
    study = sweep.open_study(spec)
    worker = sweep.Worker(spec, study, "test worker", threading.Event(), {})
    for accuracy in (0.9, 0.8):  # trial 0 (lr 0.001) is the better one
        number, params, lock = worker.next_trial()
        fake_results(spec.trial_dir(number) / "seed-0", accuracy)
        study.tell(number, accuracy)
        lock.release()
    shutil.rmtree(spec.trial_dir(0) / "seed-0")  # the chosen point's run, deleted after it finished
    report = in_process(sweep.main, str(spec.path), "--report")
    assert report.returncode == 1 and "Traceback" not in report.stderr
    assert "chose among 1 of 2 points (not trained: lr 0.001 (gone: its runs' results.json are gone" in report.stdout
    assert "lr 0.002 (median val_accuracy 80.00%)" in report.stdout
    number, params, lock = worker.next_trial()  # the next start trains lr 0.001 again, as a new trial
    assert (number, params) == (2, {"lr": 0.001})
    assert worker.next_trial() is None  # while trial 2 trains, nothing else is left
    lock.release()


def test_a_point_whose_worker_died_inside_ask_is_asked_again_not_lost(tmp_path):
    spec = read_spec(write_spec(tmp_path, tmp_path, {"lr": "[0.001, 0.002]"}))
    study = sweep.open_study(spec)
    worker = sweep.Worker(spec, study, "test worker", threading.Event(), {})
    first, params, held = worker.next_trial()  # trial 0 is being trained: its lock stays held
    assert params == {"lr": 0.001}
    half = study.ask()  # the worker that took lr 0.002 died after Optuna made the trial, before its params
    assert half.number == 1 and half.params == {}
    number, params, lock = worker.next_trial()
    assert (number, params) == (2, {"lr": 0.002})  # the lost point, asked again
    assert study.get_trials()[1].state.name == "FAIL"
    lock.release()
    held.release()


def test_a_trial_stopped_from_outside_is_left_for_the_next_start_not_failed(tmp_path):
    spec = read_spec(write_spec(tmp_path, tmp_path, {"lr": "[0.001, 0.002]"}))
    study = sweep.open_study(spec)
    left = {}
    worker = sweep.Worker(spec, study, "test worker", threading.Event(), left)
    number, params, lock = worker.next_trial()
    worker.leave(number, "seed 0: mnist_dist.train was killed by SIGKILL")
    lock.release()
    taken = worker.next_trial()  # this start goes on with the other point ...
    assert taken[:2] == (1, {"lr": 0.002})
    taken[2].release()
    assert study.get_trials()[0].state.name == "RUNNING"
    report = in_process(sweep.main, str(spec.path), "--report")
    assert report.returncode == 1
    assert "not trained: lr 0.001 (interrupted: seed 0: mnist_dist.train was killed by SIGKILL)" in report.stdout
    again = sweep.Worker(spec, study, "next start", threading.Event(), {})  # ... and the next continues it
    number, params, lock = again.next_trial()
    assert (number, params) == (0, {"lr": 0.001})
    lock.release()


@pytest.mark.parametrize("status, outside", [(-signal.SIGKILL, True), (75, True), (74, True), (128 + 9, True),
                                             (1, False), (2, False), (-signal.SIGSEGV, False)])
def test_only_a_failure_of_the_point_itself_is_final(status, outside):
    assert sweep.from_outside(status) == outside


@pytest.mark.parametrize("codes, status", [([-signal.SIGKILL, 74], 74), ([-signal.SIGKILL, -signal.SIGTERM], 74),
                                           ([74, 74], 74), ([1, -signal.SIGTERM], 1), ([2, 2], 2)])
def test_a_launch_whose_processes_were_killed_or_lost_a_peer_says_74(codes, status):
    from mnist_dist import launch

    assert launch.exit_status(codes) == status


def test_a_random_sweep_that_drew_a_point_twice_has_all_it_promised(tmp_path):
    spec = read_spec(write_spec(tmp_path, tmp_path, {"lr": "[0.1, 0.01]"}, sampler="random", trials=3))
    study = sweep.open_study(spec)
    for number, (lr, accuracy) in enumerate([(0.1, 0.5), (0.1, 0.6), (0.01, 0.7)]):
        fake_results(spec.trial_dir(number) / "seed-0", accuracy)
        study.add_trial(optuna.trial.create_trial(params={"lr": lr}, distributions=sweep.distributions(spec),
                                                  value=accuracy))
    report = in_process(sweep.main, str(spec.path), "--report")
    assert report.returncode == 0 and "chose among 3 of 3 points: lr 0.01" in report.stdout


# --- the sweep's directory and its journal ----------------------------------------------------------------------

def test_dir_is_resolved_before_it_is_checked_and_a_users_files_are_never_touched(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "summary.md").write_text("my own notes")
    spec = write_spec(tmp_path, tmp_path, {"lr": "[0.001]"}, dir=mine / "nothere" / "..")
    run = in_process(sweep.main, str(spec))
    assert run.returncode == 2 and f"dir: {mine} holds files of something other than a sweep" in run.stderr
    assert sorted(p.name for p in mine.iterdir()) == ["summary.md"] and (mine / "summary.md").read_text() == "my own notes"


def test_dir_naming_another_sweep_through_dotdot_is_that_sweep(tmp_path):
    first = write_spec(tmp_path, tmp_path, {"lr": "[0.001]"}, dir=tmp_path / "a")
    sweep.claim_dir(read_spec(first))
    other = write_spec(tmp_path, tmp_path, {"lr": "[0.002]"}, name="other.yaml", dir=tmp_path / "a" / "x" / ".." / ".." / "a")
    run = in_process(sweep.main, str(other))
    assert run.returncode == 2 and f"dir: {tmp_path / 'a'} holds a sweep of another SPEC" in run.stderr


@pytest.mark.parametrize("where, says", [
    ("/", "holds files of something other than a sweep"),
    ("{file}", "is a file, not a directory"),
    ("{file}/sweep", "cannot make or write the sweep's directory there"),
    ("/proc/sweep", "cannot make or write the sweep's directory there"),
    ("/sys/sweep", "cannot make or write the sweep's directory there"),
])
def test_a_dir_that_cannot_be_a_sweeps_is_a_clear_error_before_anything_is_made(tmp_path, where, says):
    afile = tmp_path / "afile"
    afile.write_text("")
    spec = write_spec(tmp_path, tmp_path, {"lr": "[0.001]"}, dir=where.format(file=afile))
    run = in_process(sweep.main, str(spec))
    assert run.returncode == 2 and f"{spec}:1: dir: " in run.stderr and says in run.stderr, run.stderr
    assert not Path("/.ask.lock").exists() and afile.read_text() == ""


def journal_of(tmp_path) -> tuple[Path, Path]:
    """A sweep directory whose study holds two trials; its SPEC and its journal."""
    spec = write_spec(tmp_path, tmp_path, {"lr": "[0.001, 0.002]"})
    study = sweep.open_study(read_spec(spec))
    for lr in (0.001, 0.002):
        study.enqueue_trial({"lr": lr})
    return spec, tmp_path / "sweep" / sweep.JOURNAL


def test_a_journal_with_a_torn_last_record_is_repaired_before_anything_is_appended(tmp_path):
    spec, journal = journal_of(tmp_path)
    whole = journal.read_bytes()
    journal.write_bytes(whole + b'{"op_code": 5, "worker_id": "x", "trial_id": 0, "torn-tail')  # a crash mid-append
    run = in_process(sweep.main, str(spec), "--report")  # opens the study: the tail is set aside
    repaired = journal.read_bytes()
    assert "ended in a torn record" in run.stderr and repaired.startswith(whole) and b'torn-tail' not in repaired
    (aside,) = journal.parent.glob("study.journal.torn-*")
    assert aside.read_bytes().endswith(b'torn-tail')
    study = sweep.open_study(read_spec(spec))
    study.enqueue_trial({"lr": 0.003})  # appended on a line of its own
    assert len(sweep.open_study(read_spec(spec)).get_trials()) == 3


@pytest.mark.parametrize("damage, says", [
    (lambda lines: [lines[0], b'{"op_code": 5, "worker_id"\n', *lines[1:]], ":2: a damaged record"),
    (lambda lines: [lines[0], bytes(range(256)) + b"\n", *lines[1:]], ":2: a damaged record"),
    (lambda lines: [lines[0], b"[1, 2]\n", *lines[1:]], ":2: not a record of Optuna's journal"),
    (lambda lines: [lines[0], b"x" * (sweep_journal.MAX_RECORD_BYTES + 10) + b"\n", *lines[1:]], ":2: a line over 1 MiB"),
])
def test_a_damaged_journal_is_an_error_naming_its_line_and_is_left_as_it_was(tmp_path, damage, says):
    spec, journal = journal_of(tmp_path)
    journal.write_bytes(b"".join(damage(journal.read_bytes().splitlines(keepends=True))))
    before = journal.read_bytes()
    run = in_process(sweep.main, str(spec), "--report")
    assert run.returncode == 2 and f"{journal}{says}" in run.stderr, run.stderr
    assert "docs/experiments.md#a-damaged-journal" in run.stderr
    assert journal.read_bytes() == before


def test_a_spec_with_too_many_points_is_refused_before_each_value_is_parsed(tmp_path, monkeypatch):
    from mnist_dist import sweep_spec

    parsed = []
    monkeypatch.setattr(sweep_spec, "trainer_parse", lambda argv: parsed.append(argv) or (None, None))
    spec = write_spec(tmp_path, tmp_path, {"batch-size": "[" + ", ".join(map(str, range(1, 9001))) + "]"})
    with pytest.raises(SpecError, match="more than 1,000 points"):
        read_spec(spec)
    assert len(parsed) == 1  # the SPEC's flags alone; not 9,000 values


@pytest.mark.slow
def test_a_run_killed_from_outside_leaves_its_trial_to_the_next_start_which_continues_it(tmp_path, small_subset):
    flags = {"epochs": 2, "checkpoint-every": 10, "batch-size": 16, "hidden-sizes": "1024,1024"}
    spec = write_spec(tmp_path, small_subset, {"lr": "[0.001, 0.002]"}, flags=flags)
    checkpoints = tmp_path / "sweep" / "trials" / "0000" / "seed-0" / "checkpoints"
    first = sweep_cli(spec)
    wait_for_checkpoint_after(checkpoints, 0, first)
    (run,) = [p for p in psutil.Process(first.pid).children(recursive=True) if "mnist_dist.train" in p.cmdline()]
    run.kill()  # the training process alone, as the OOM killer does
    out, _ = first.communicate(timeout=300)
    assert first.returncode == 1, out
    assert "trial 0 was ended from outside (seed 0: mnist_dist.train was killed by SIGKILL" in out
    assert "chose among 1 of 2 points (not trained: lr 0.001 (interrupted: seed 0: mnist_dist.train was killed" in out
    assert [t.state.name for t in study_of(tmp_path / "sweep").get_trials()] == ["RUNNING", "COMPLETE"]
    out = finish(sweep_cli(spec))
    assert "trial 0 was left unfinished: continuing it" in out and "chose among 2 of 2 points: " in out
    assert (checkpoints.parent.parent / "seed-0.log").read_text().count("resuming from") == 1
    assert [t.state.name for t in study_of(tmp_path / "sweep").get_trials()] == ["COMPLETE", "COMPLETE"]
    assert "chose among 2 of 2 points." in (tmp_path / "sweep" / "summary.md").read_text()


def test_a_seed_whose_run_finished_is_read_and_not_launched_again(tmp_path, small_subset, capsys):
    spec = read_spec(write_spec(tmp_path, small_subset, {"lr": "[0.001]"}, seeds="[0, 1]"))
    study = sweep.open_study(spec)
    worker = sweep.Worker(spec, study, "test worker", threading.Event(), {})
    number, params, lock = worker.next_trial()
    for seed in (0, 1):  # what an earlier start trained before it was stopped
        run_dir = spec.trial_dir(number) / f"seed-{seed}"
        check(train_here(*spec.train_flags(params), "--seed", str(seed), "--output-dir", str(run_dir)))
    (spec.trial_dir(number) / "seed-1" / "results.json").unlink()  # seed 1's outputs were not complete
    worker.run_trial(number, params)
    lock.release()
    out = capsys.readouterr().out
    assert not (spec.trial_dir(number) / "seed-0.log").exists()  # read, not launched
    assert "seed 0 (lr 0.001): val_accuracy" in out and "(trained by an earlier start)" in out.split("seed 1")[0]
    assert "holds no checkpoint" not in (spec.trial_dir(number) / "seed-1.log").read_text()  # launched, resumed
    assert "resuming from" in (spec.trial_dir(number) / "seed-1.log").read_text()
    scores = [results(spec.trial_dir(number) / f"seed-{s}")["validation"]["accuracy"] for s in (0, 1)]
    assert study.trials[number].state.name == "COMPLETE" and study.trials[number].value == statistics.median(scores)


def test_a_study_is_rebuilt_from_its_trial_directories_keeping_each_trials_number(tmp_path):
    spec = read_spec(write_spec(tmp_path, tmp_path, {"lr": "[0.001, 0.002, 0.003]"}))
    study = sweep.open_study(spec)
    worker = sweep.Worker(spec, study, "test worker", threading.Event(), {})
    taken = [worker.next_trial() for _ in range(3)]
    fake_results(spec.trial_dir(0) / "seed-0", 0.9)  # trial 0 finished, trial 1 failed, trial 2 was training
    study.tell(0, 0.9)
    worker.fail(1, "seed 0: mnist_dist.train exited with 2")
    for _, _, lock in taken:
        lock.release()
    (spec.dir / sweep.JOURNAL).write_bytes(b"\x00" * 100 + b"\n")  # the journal is lost
    assert in_process(sweep.main, str(spec.path), "--report").returncode == 2
    rebuilt = sweep.rebuild(spec)
    assert [(t.number, t.state.name, t.params) for t in rebuilt.get_trials()][:2] == [
        (0, "COMPLETE", {"lr": 0.001}), (1, "FAIL", {"lr": 0.002})]
    assert rebuilt.get_trials()[0].value == 0.9
    number, params, lock = sweep.Worker(spec, rebuilt, "next start", threading.Event(), {}).next_trial()
    assert (number, params) == (2, {"lr": 0.003})  # continued in its own directory
    lock.release()
    assert len(list(spec.dir.glob("study.journal.set-aside-*"))) == 1


def test_a_rebuild_waits_for_no_worker_and_places_every_run_or_refuses(tmp_path):
    spec = read_spec(write_spec(tmp_path, tmp_path, {"lr": "[0.001, 0.002]"}))
    worker = sweep.Worker(spec, sweep.open_study(spec), "test worker", threading.Event(), {})
    number, params, lock = worker.next_trial()
    journal = (spec.dir / sweep.JOURNAL).read_bytes()
    with pytest.raises(SpecError, match="a worker trains trial\\(s\\) 0000 now; stop every worker"):
        sweep.rebuild(spec)
    lock.release()
    (spec.trial_dir(number) / sweep.POINT_NAME).unlink()  # a trial of an older sweep, with runs
    fake_results(spec.trial_dir(number) / "seed-0", 0.9)
    with pytest.raises(SpecError, match="trials 0000 have no point.json of this SPEC's space"):
        sweep.rebuild(spec)
    assert (spec.dir / sweep.JOURNAL).read_bytes() == journal  # the study as it was
    other = read_spec(write_spec(tmp_path, tmp_path, {"lr": "[0.003]"}, name="other.yaml"))
    with pytest.raises(SpecError, match="holds a sweep of another SPEC"):
        sweep.rebuild(other)
    assert (spec.dir / sweep.JOURNAL).read_bytes() == journal

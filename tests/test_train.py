"""The training entry point as a user runs it: one process, flags, outputs, precision errors."""

import ctypes
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
from safetensors.torch import load_file
from accelerate.commands.config.config_args import load_config_from_file

from mnist_dist.config import ConfigError, TrainConfig, build_parser, parse_args
from mnist_dist.sources import find_idx_files, load_idx
from mnist_dist.distributed import RECHECK_S, CoreWatch, core_watch, cpu_threads, threads_for
from mnist_dist.metrics import evaluate
from mnist_dist.model import load_model

from .helpers import MNIST_5K, REPO, check, results, run, train_cli, train_here

RESULT_KEYS = {
    "test_accuracy", "test_loss", "test_samples", "train_samples", "epochs", "world_size",
    "per_process_batch_size", "global_batch_size", "mixed_precision", "device_type",
    "train_seconds", "samples_per_second", "history", "config", "timings", "normalization",
    "per_class_accuracy", "confusion_matrix", "data_path", "torch_compile",
}


def test_recipe_of_record_reaches_88_percent_on_the_10000_real_test_digits(recipe_run):
    out, r, _ = recipe_run
    assert r["test_samples"] == 10000 and r["train_samples"] == 5000
    assert r["test_accuracy"] >= 0.88, r["test_accuracy"]
    assert not (out / "stacks").exists()  # a run that never stalled, nor got SIGUSR2, leaves no stacks


def test_results_json_has_the_documented_fields(recipe_run):
    _, r, _ = recipe_run
    assert RESULT_KEYS <= r.keys()
    assert r["world_size"] == 1 and r["global_batch_size"] == r["per_process_batch_size"] == 128
    assert r["epochs"] == 10 and len(r["history"]) == 10
    assert r["mixed_precision"] == "no" and r["device_type"] == "cpu" and r["torch_compile"] == "no"
    assert r["data_path"] == "device"  # --data-path auto on a CPU
    assert r["config"] == {**TrainConfig().to_dict(), "dataset": "mnist-5k", "cpu": True, "output_dir": r["config"]["output_dir"]}
    for h in r["history"]:
        assert {"epoch", "train_loss", "test_accuracy", "test_loss", "seconds"} <= h.keys()
        assert h["samples"] == 5000
    assert r["history"][-1]["test_accuracy"] == r["test_accuracy"]
    assert r["history"][-1]["train_loss"] < r["history"][0]["train_loss"]
    assert 0 < r["train_seconds"] and r["samples_per_second"] == pytest.approx(50000 / r["train_seconds"])


def test_timings_split_the_run_into_phases_that_fit_in_its_wall_time(recipe_run):
    _, r, proc = recipe_run
    t = r["timings"]
    assert t.keys() == {"startup", "data_load", "setup", "train", "capture", "eval", "outputs"}
    assert all(v >= 0 for v in t.values()) and t["capture"] == 0  # no CUDA graph on a CPU
    assert t["train"] == r["train_seconds"] and t["eval"] == pytest.approx(sum(h["eval_seconds"] for h in r["history"]))
    phases = t["startup"] + t["data_load"] + t["setup"] + t["train"] + t["eval"] + t["outputs"]
    # startup counts from the OS starting the process (mnist_dist.clock), to within a 10 ms tick
    assert t["startup"] > 0.1 and phases <= proc.wall_seconds + 0.011, (t, proc.wall_seconds)


def test_saved_model_reproduces_the_reported_accuracy(recipe_run):
    out, r, _ = recipe_run
    model, config = load_model(out)
    assert config["options"]["hidden_sizes"] == [256] and config["normalization"] == {"mean": 0.5, "std": 0.5, "pixel_scale": 255}
    test = load_idx(find_idx_files(MNIST_5K))["test"]
    metrics = evaluate(model, [(test.images[i : i + 1000], test.labels[i : i + 1000]) for i in range(0, 10000, 1000)])
    assert metrics["accuracy"] == r["test_accuracy"]
    assert metrics["loss"] == pytest.approx(r["test_loss"], rel=1e-5)


def test_one_summary_line_per_epoch(recipe_run):
    _, _, proc = recipe_run
    text = proc.stdout + proc.stderr
    assert [text.count(f"epoch {e}/10:") for e in range(1, 11)] == [1] * 10


def test_max_steps_stops_early_and_still_evaluates(tmp_path):
    check(train_cli("--dataset", "mnist-5k", "--cpu", "--max-steps", "45", "--output-dir", str(tmp_path)))
    r = results(tmp_path)
    assert r["steps"] == 45 and r["epochs"] == 2  # 40 steps per epoch
    assert r["samples_seen"] == 5000 + 5 * 128 and r["test_samples"] == 10000


def test_bf16_on_cpu_is_used_when_asked(tmp_path):
    check(train_cli("--dataset", "mnist-5k", "--cpu", "--mixed-precision", "bf16", "--max-steps", "5", "--output-dir", str(tmp_path)))
    assert results(tmp_path)["mixed_precision"] == "bf16"


def test_fp16_on_cpu_is_an_error_not_a_silent_fp32_run(tmp_path):
    proc = check(train_cli("--dataset", "mnist-5k", "--cpu", "--mixed-precision", "fp16", "--output-dir", str(tmp_path / "o")), rc=2)
    assert "--mixed-precision=fp16 needs a GPU" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_fp16_from_the_accelerate_config_on_cpu_is_an_error_too(tmp_path):
    proc = check(
        train_cli("--dataset", "mnist-5k", "--cpu", "--output-dir", str(tmp_path / "o"), env={"ACCELERATE_MIXED_PRECISION": "fp16"}),
        rc=2,
    )
    assert "the accelerate config's mixed_precision=fp16 needs a GPU" in proc.stderr


# ---------------------------------------------------------------- flags


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--batch-size", "0"], "--batch-size=0: must be an integer >= 1"),
        (["--lr", "-0.1"], "--lr=-0.1: must be a finite number > 0"),
        (["--lr", "nan"], "--lr=nan: must be a finite number > 0"),
        (["--epochs", "0"], "--epochs=0: must be an integer >= 1"),
        (["--max-steps", "0"], "--max-steps=0: must be an integer >= 1"),
        (["--hidden-sizes", "-3"], "--hidden-sizes='-3': must be 1 to 8 comma-separated integers from 1 to 65,536"),
        (["--num-workers", "-1"], "--num-workers=-1: must be an integer >= 0"),
        (["--model", "resnet"], "--model='resnet': unknown model; choose mlp, cnn or package.module:function"),
        (["--hidden-sizes", "0"], "--hidden-sizes='0': must be 1 to 8 comma-separated integers from 1 to 65,536"),
        (["--hidden-sizes", "9,9,9,9,9,9,9,9,9"], "--hidden-sizes='9,9,9,9,9,9,9,9,9': must be 1 to 8 comma-separated"),
        (["--dropout", "1"], "--dropout=1.0: must be in [0, 1) (a probability)"),
        (["--dropout", "-0.1"], "--dropout=-0.1: must be in [0, 1) (a probability)"),
        (["--activation", "swish"], "argument --activation: invalid choice: 'swish'"),
        (["--model", "cnn", "--hidden-sizes", "64"], "--hidden-sizes='64': shapes --model mlp, and this run has --model cnn"),
        (["--model", "cnn", "--batch-norm"], "--batch-norm=True: shapes --model mlp, and this run has --model cnn"),
        (["--model-args", '{"width": 3}'], "--model-args='{\"width\": 3}': are the arguments of --model package.module:function"),
        (["--model", "examples.custom_model:build", "--model-args", "{width: 3}"], "--model-args='{width: 3}': not JSON"),
        (["--model", "examples.custom_model:build", "--model-args", "[3]"], "must be a JSON object of keyword arguments"),
        (["--model", "examples.custom_model:build", "--model-args", '{"width": NaN}'], "NaN is not a number JSON files hold"),
        (["--model", "examples.custom_model:build", "--model-args", '{"w": -Infinity}'], "-Infinity is not a number JSON"),
        (["--model", "examples.custom_model:build", "--model-args", '{"a":' * 31 + "1" + "}" * 31],
         "nests 31 levels deep; the run's config.json can hold 30"),
        (["--model", "examples.custom_model:build", "--model-args", "[" * 60000 + "]" * 60000], "nests 60000 levels deep"),
        (["--dataset", ""], "--dataset='': must not be empty"),
        (["--mixed-precision", "fp8"], "argument --mixed-precision: invalid choice: 'fp8'"),
        (["--data-path", "ring"], "argument --data-path: invalid choice: 'ring'"),
        (["--batch-size", "ten"], "argument --batch-size: invalid int value: 'ten'"),
    ],
)
def test_bad_flag_exits_2_naming_the_flag(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(flags)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_validate_refuses_bad_values_when_called_from_python():
    with pytest.raises(ConfigError, match="--dataset='': must not be empty"):
        TrainConfig(dataset="").validate()
    with pytest.raises(ConfigError, match="--data-path='ring': unknown data path; choose one of auto, dataloader, device, graph"):
        TrainConfig(data_path="ring").validate()


def test_help_lists_every_flag_with_its_default():
    text = build_parser().format_help()
    for flag in ["--epochs", "--batch-size", "--lr", "--hidden-sizes", "--seed", "--mixed-precision", "--dataset",
                 "--data-dir", "--output-dir", "--cpu", "--max-steps"]:
        assert flag in text
    options = [a for a in build_parser()._actions if a.dest != "help"]
    assert len(options) == len(TrainConfig.__dataclass_fields__) - 1  # every field but `given` is a flag
    for action in options:  # one default per flag, said once
        assert action.help.lower().count("default") == 1, f"{action.option_strings}: {action.help}"


@pytest.mark.parametrize("cli", ["train", "evaluate", "predict"])
def test_help_is_answered_before_torch_is_imported(cli):
    proc = check(run([sys.executable, "-X", "importtime", "-m", f"mnist_dist.{cli}", "--help"]))
    assert proc.stdout.startswith("usage: python -m mnist_dist.")
    imported = {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "argparse" in imported  # importtime's report was read: the modules the CLI loaded
    assert not imported & {"torch", "torchvision", "matplotlib", "accelerate"}, sorted(imported)


def test_defaults_are_the_recipe_of_record():
    cfg = parse_args([])
    assert (cfg.model, cfg.hidden_sizes, cfg.activation, cfg.lr, cfg.batch_size, cfg.epochs, cfg.dataset) == (
        "mlp", "256", "relu", 1e-3, 128, 10, "mnist")


# ---------------------------------------------------------------- accelerate_configs


@pytest.mark.parametrize("name", ["single_gpu", "multi_gpu", "multi_node", "cpu"])
def test_accelerate_config_loads_with_accelerates_own_loader(name):
    config = load_config_from_file(str(REPO / "accelerate_configs" / f"{name}.yaml"))
    assert config.num_processes >= 1 and config.mixed_precision in ("no", "fp16", "bf16")
    if name == "multi_node":
        assert config.num_machines > 1 and config.main_process_ip
    # the CPU config is run for real by the multi-process tests in test_distributed.py


FAULTS_PER_STEP = """
import resource, sys, torch, torch.nn.functional as F
from mnist_dist.model import CNN
from mnist_dist.resources import keep_freed_memory
torch.manual_seed(0)
model = CNN().to(memory_format=torch.channels_last)
optimizer = torch.optim.Adam(model.parameters(), fused=True)
images, labels = torch.randn(128, 784), torch.randint(0, 10, (128,))
def faults(steps=5):  # page faults a training step takes, once warm
    for _ in range(2 * steps):
        if _ == steps:
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / steps
default = faults()
applied = keep_freed_memory()
print(default, applied, faults())
"""


@pytest.mark.skipif(sys.platform != "linux" or not hasattr(ctypes.CDLL(None), "mallopt")
                    or any(name in os.environ for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_",
                                                           "GLIBC_TUNABLES")),
                    reason="glibc's malloc, its settings left to mnist_dist")
def test_a_training_step_keeps_the_memory_it_frees_instead_of_faulting_it_in_again():
    default, applied, kept = check(run([sys.executable, "-c", FAULTS_PER_STEP])).stdout.split()
    assert applied == "True" and float(kept) < float(default) / 10, (default, kept)
    # a malloc setting of the user's is theirs
    code = "from mnist_dist.resources import keep_freed_memory; print(keep_freed_memory())"
    assert check(run([sys.executable, "-c", code], env={"MALLOC_TRIM_THRESHOLD_": "268435456"})).stdout == "False\n"


@pytest.mark.parametrize("flags, env, threads", [
    ([], {"OMP_NUM_THREADS": "2"}, 2),
    pytest.param(["--cpu-threads", "2"], {"OMP_NUM_THREADS": "1"}, 2, marks=pytest.mark.slow),
], ids=["OMP_NUM_THREADS", "flag"])
def test_cpu_threads_and_omp_num_threads_override_the_idle_cores(flags, env, threads, tmp_path, monkeypatch):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    before = torch.get_num_threads()
    try:
        check(train_here("--dataset", "mnist-5k", "--cpu", "--max-steps", "2", "--report-to", "none", *flags,
                         "--output-dir", str(tmp_path)))
    finally:
        torch.set_num_threads(before)
    assert results(tmp_path)["cpu_threads"] == threads
    assert results(tmp_path)["cpu_threads_from"] == ("--cpu-threads" if flags else "OMP_NUM_THREADS")


@pytest.mark.parametrize("allowed, idle, local, threads", [
    (2, 2, 1, 2),  # an idle 2-core machine: both
    (2, 1, 1, 1),  # one core busy: one thread, not two waiting on it
    (1, 1, 1, 1),  # taskset -c 0, or SLURM's --cpus-per-task=1
    (8, 8, 2, 4),  # two processes on a node share its cores
    (2, 0, 2, 1),  # two processes on two cores, each seeing the other start: one each
    (8, 0, 1, 1),  # everything busy: still one
])
def test_a_process_takes_its_share_of_the_idle_cores(allowed, idle, local, threads):
    assert threads_for(allowed, idle, local) == threads


def probe(*prefix: str, env: dict | None = None) -> tuple[int, str]:
    """cpu_threads of a fresh process with no thread settings, as the real probe measures them."""
    code = ("from mnist_dist.config import TrainConfig; from mnist_dist.distributed import cpu_threads; "
            "print(*cpu_threads(TrainConfig()), sep='|')")
    out = check(run([*prefix, sys.executable, "-c", code], env={"OMP_NUM_THREADS": None, **(env or {})})).stdout.strip().splitlines()[-1]
    threads, why = out.split("|")
    return int(threads), why


def test_the_default_under_taskset_one_core_is_one_thread():
    threads, why = probe("taskset", "-c", "0")
    assert threads == 1 and " of 1 allowed cores idle, 1 process(es) on this node" in why


def test_the_default_on_two_idle_allowed_cores_is_two_threads(monkeypatch):
    # the probe's reading is given: whether this VM's cores are idle right now is not the test's to decide
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(psutil, "cpu_percent", lambda interval, percpu: [3.0, 12.0, 100.0])  # core 2: not ours
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert cpu_threads(TrainConfig()) == (2, "2 of 2 allowed cores idle, 1 process(es) on this node")


def test_the_default_with_a_core_kept_busy_is_at_most_the_idle_rest():
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        threads, why = probe()
    finally:
        spinner.kill()
    allowed = len(os.sched_getaffinity(0))
    assert threads <= max(1, allowed - 1), why


def test_processes_of_one_node_share_the_cores():
    threads, why = probe(env={"LOCAL_WORLD_SIZE": str(64 * len(os.sched_getaffinity(0)))})
    assert threads == 1 and why.endswith(f"{64 * len(os.sched_getaffinity(0))} process(es) on this node")


class Readings:
    """psutil's two readings as a CoreWatch takes them: all cores' and this process's (%)."""

    def __init__(self, monkeypatch, cores: list[float], ours: float):
        monkeypatch.setattr(psutil, "cpu_percent", lambda percpu: cores)
        monkeypatch.setattr(psutil.Process, "cpu_percent", lambda self: ours)


@pytest.mark.parametrize("cores, ours, threads", [
    ([100.0, 100.0], 120.0, 1),  # 2 threads of ours beside another program's: one core is not ours
    ([100.0, 3.0], 100.0, 2),  # 1 thread of ours, the other program gone: both again
    ([100.0, 100.0], 200.0, 2),  # all of it ours
    ([100.0, 30.0], 100.0, 2),  # a third of a core of other work does not count as a busy core
])
def test_a_watch_rechooses_the_threads_from_the_cores_free_of_other_work(cores, ours, threads, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    before = torch.get_num_threads()
    torch.set_num_threads(3 - threads)  # the other count: a change to make
    said = []
    try:
        watch = CoreWatch()
        Readings(monkeypatch, cores, ours)
        watch.recheck(said.append)
        assert torch.get_num_threads() == 3 - threads and said == []  # not yet: less than RECHECK_S since the start
        watch.since -= RECHECK_S
        watch.recheck(said.append)
        got = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    assert got == threads and said == [f"mnist_dist: {threads} torch thread(s) from now ({threads} of 2 allowed cores "
                                       "free of other programs' work)"]


def test_a_watch_beside_a_busy_program_leaves_its_core_to_it():
    torch_before = torch.get_num_threads()
    allowed = len(os.sched_getaffinity(0))
    torch.set_num_threads(allowed)
    watch = CoreWatch()
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(RECHECK_S + 0.2)
        watch.recheck(print)
        got = torch.get_num_threads()
    finally:
        spinner.kill()
        torch.set_num_threads(torch_before)
    assert got <= max(1, allowed - 1)


@pytest.mark.parametrize("flags, env, watched", [
    ([], {"OMP_NUM_THREADS": None}, True),
    ([], {"OMP_NUM_THREADS": "2"}, False),  # told: the threads stay
    (["--cpu-threads", "2"], {"OMP_NUM_THREADS": None}, False),
    ([], {"OMP_NUM_THREADS": None, "LOCAL_WORLD_SIZE": "2"}, False),  # each process's reading counts its peers'
])
def test_only_a_lone_process_with_threads_from_idle_cores_is_watched(flags, env, watched, monkeypatch):
    for name, value in env.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    cfg = parse_args(["--dataset", "mnist-5k", *flags])
    assert (core_watch(cfg, torch.device("cpu")) is not None) == watched
    assert core_watch(cfg, torch.device("cuda")) is None


def test_adamw_decays_the_weights(tmp_path):
    flags = ["--dataset", "mnist-5k", "--cpu", "--epochs", "2", "--report-to", "none"]
    for name, extra in [("adam", []), ("adamw", ["--optimizer", "adamw", "--weight-decay", "5"])]:
        check(train_here(*flags, *extra, "--output-dir", str(tmp_path / name)))
    adam, adamw = (load_file(tmp_path / name / "model.safetensors") for name in ("adam", "adamw"))
    assert results(tmp_path / "adamw")["config"] == {**results(tmp_path / "adam")["config"], "optimizer": "adamw",
                                                          "weight_decay": 5.0, "output_dir": str(tmp_path / "adamw")}
    # decoupled decay: each of the 80 steps shrinks every weight by lr x 5 = 0.5% of itself (0.67x in all)
    assert sum(float(t.square().sum()) for t in adamw.values()) < 0.9 * sum(float(t.square().sum()) for t in adam.values())


@pytest.mark.parametrize("data_path", ["device", "dataloader"])
def test_profile_writes_a_chrome_trace_of_the_third_stretch_that_names_the_matrix_products(data_path, tmp_path):
    profile = tmp_path / "profile"
    proc = train_here("--dataset", "mnist-5k", "--cpu", "--max-steps", "15", "--log-every", "5", "--report-to", "none",
                      "--data-path", data_path, "--profile", str(profile), "--output-dir", str(tmp_path / "run"))
    check(proc)
    trace = json.loads((profile / "trace.json").read_text())
    names = {event.get("name") for event in trace["traceEvents"]}
    assert {"aten::addmm", "aten::mm"} & names, sorted(n for n in names if n)[:50]
    assert "aten::" in (profile / "top_ops.txt").read_text()
    assert f"wrote the profile of one stretch of steps to {profile}/trace.json" in proc.stdout


def test_profile_into_a_file_is_refused_naming_the_flag(tmp_path, capsys):
    (tmp_path / "f").write_text("")
    with pytest.raises(SystemExit):
        parse_args(["--dataset", "mnist-5k", "--profile", str(tmp_path / "f")])
    assert "--profile=" in capsys.readouterr().err


def test_more_threads_than_allowed_cores_are_capped_with_a_message(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert cpu_threads(TrainConfig(cpu_threads=10_000)) == (2, "--cpu-threads 10000, capped at the 2 allowed cores")
    monkeypatch.setenv("OMP_NUM_THREADS", "64")
    assert cpu_threads(TrainConfig()) == (2, "OMP_NUM_THREADS 64, capped at the 2 allowed cores")


def test_without_a_reproducible_blas_the_default_does_not_follow_the_load(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(psutil, "cpu_percent", lambda interval, percpu: [100.0] * 4)  # all busy: not asked
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("MKL_CBWR", "AUTO")  # MKL's default rounding: the bits follow the thread count
    threads, why = cpu_threads(TrainConfig())
    assert threads == 2 and "not by load" in why
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert core_watch(TrainConfig(), torch.device("cpu")) is None  # no re-choice by load either
    monkeypatch.setenv("MKL_CBWR", "AUTO,STRICT")
    assert cpu_threads(TrainConfig())[0] == 1  # by load: every core busy


def test_a_profile_directory_holding_an_earlier_profile_is_refused_unless_replaced(tmp_path, capsys):
    (tmp_path / "trace.json").write_text("{}")
    with pytest.raises(SystemExit) as stopped:
        parse_args(["--profile", str(tmp_path)])
    assert stopped.value.code == 2 and "holds an earlier profile (trace.json)" in capsys.readouterr().err
    assert parse_args(["--profile", str(tmp_path), "--overwrite"]).profile == str(tmp_path)


def test_a_ctrl_c_after_sigterm_is_a_stop_request_and_only_a_second_ctrl_c_ends_at_once(monkeypatch):
    from mnist_dist.stopping import StopSignals

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    exits = []
    monkeypatch.setattr(os, "_exit", exits.append)
    with StopSignals() as signals:
        signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGINT)  # the first Ctrl-C: as SIGTERM
        assert signals.reason() == "signal SIGTERM" and exits == []
        signal.raise_signal(signal.SIGINT)  # the second: at once
        assert exits == [128 + signal.SIGINT]


def test_normalization_none_trains_on_pixels_in_0_to_1_and_saves_that_scaling(tmp_path):
    from mnist_dist.data import SCALINGS, normalize

    check(train_here("--dataset", "mnist-5k", "--cpu", "--normalization", "none", "--max-steps", "5", "--report-to",
                     "none", "--output-dir", str(tmp_path)))
    assert results(tmp_path)["normalization"] == {"mean": 0.0, "std": 1.0}
    assert json.loads((tmp_path / "config.json").read_text())["normalization"] == {"mean": 0.0, "std": 1.0,
                                                                                   "pixel_scale": 255}
    inputs = normalize(torch.tensor([[0, 51, 255]], dtype=torch.uint8), *SCALINGS["none"])
    assert inputs[0].tolist() == pytest.approx([0.0, 0.2, 1.0])  # float32


def test_a_directory_named_mnist_dist_in_the_working_directory_keeps_the_thread_count_out_of_the_weights(tmp_path):
    (tmp_path / "mnist_dist").mkdir()  # a clone of the repository, run from its parent: a namespace package
    probe = "import mnist_dist, mnist_dist.model, os; print(mnist_dist.__file__, os.environ.get('MKL_CBWR'))"
    env = {k: v for k, v in os.environ.items() if k not in ("MKL_CBWR", "PYTHONPATH")}  # as installed, no path above
    proc = check(subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True))
    assert proc.stdout.split() == ["None", "AUTO,STRICT"]  # __init__.py did not run; MKL's strict mode is set


def test_every_flag_declares_what_a_resume_does_with_it():
    from mnist_dist import config

    assert all(f.metadata["resume"] in config.RESUME_ROLES for f in config.flags())
    with pytest.raises(TypeError, match="resume"):  # a new flag without a role is refused where it is declared
        config._field(1, "a flag that says nothing of resumes")
    assert set(config.MLP_FLAGS) == {"hidden_sizes", "activation", "dropout", "batch_norm"}


def test_pictures_are_drawn_unless_no_pictures_and_a_resume_keeps_the_runs_choice():
    assert parse_args([]).pictures is True and parse_args(["--no-pictures"]).pictures is False
    cfg, taken = parse_args(["--resume", "auto"]).continued({**parse_args([]).to_dict(), "pictures": False})
    assert cfg.pictures is False and taken == {"pictures": False}

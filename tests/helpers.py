"""Test helpers: run the real entry points in subprocesses and build small IDX datasets."""

from __future__ import annotations

import contextlib
import glob
import gzip
import io
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import load_file

from mnist_dist import data, sources
from mnist_dist.sweep import free_port

REPO = Path(__file__).resolve().parents[1]
MNIST_5K = sources.BUNDLED_DIRS["mnist-5k"]


def write_idx(path: Path, tensor: torch.Tensor, compress: bool | None = None) -> Path:
    """Write a uint8 tensor as an IDX file (gzip when the name ends in .gz)."""
    payload = bytes([0, 0, 0x08, tensor.ndim]) + struct.pack(f">{tensor.ndim}I", *tensor.shape)
    payload += tensor.to(torch.uint8).contiguous().numpy().tobytes()
    compress = path.suffix == ".gz" if compress is None else compress
    path.write_bytes(gzip.compress(payload) if compress else payload)
    return path


def write_dataset(directory: Path, train: tuple, test: tuple, gz: bool = True) -> Path:
    """Write (images [N,28,28] or [N,784], labels [N]) train and test splits as the four IDX files."""
    directory.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if gz else ""
    for (images_name, labels_name), (images, labels) in zip(sources.IDX_FILES.values(), (train, test)):
        write_idx(directory / (images_name + ext), images.reshape(-1, 28, 28))
        write_idx(directory / (labels_name + ext), labels)
    return directory


def legacy_model_config(hidden_size: int = 256, **extra) -> dict:
    """config.json as mnist_dist wrote it for the MLP before the model registry (2026-12-06): it still loads."""
    return {"architecture": "mlp", "input_size": 784, "hidden_size": hidden_size, "num_classes": 10, **extra}


def mnist5k() -> dict[str, data.Split]:
    return sources.load_idx(sources.find_idx_files(MNIST_5K))


def run(args: list[str], timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a command with this process's environment plus `env` (None unsets); return it finished."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env = {k: v for k, v in full_env.items() if v is not None}
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=REPO)


def in_process(main, *flags: str) -> SimpleNamespace:
    """A CLI's `main(argv)` in this process, without an interpreter's start-up: its exit status and output.
    For runs that end in an error before training; the subprocess helpers run the CLIs as users do."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(flags))
    return SimpleNamespace(returncode=rc, stdout=out.getvalue(), stderr=err.getvalue())


# first on every training command of the helpers: pictures cost about 1 s a run, and the tests of the
# pictures (test_use, test_tracking) ask for them with --pictures, which comes later and wins
NO_PICTURES = "--no-pictures"


def train_here(*flags: str) -> SimpleNamespace:
    """`python -m mnist_dist.train FLAGS`, in this process (see `in_process`)."""
    from mnist_dist import config, train

    return in_process(lambda argv: train.main(config.parse_args(argv)), NO_PICTURES, *flags)


def train_cli(*flags: str, **kw) -> subprocess.CompletedProcess:
    """`python -m mnist_dist.train FLAGS` in a fresh process."""
    return run([sys.executable, "-m", "mnist_dist.train", NO_PICTURES, *flags], **kw)


def launch(num_processes: int, *flags: str, cpu_flag: bool = True, module: str = "mnist_dist.train",
           launcher: str = "accelerate.commands.launch", **kw) -> subprocess.CompletedProcess:
    """`accelerate launch` (or mnist_dist.launch, which takes its flags) with accelerate_configs/cpu.yaml:
    N real processes connected over gloo."""
    args = [
        sys.executable, "-m", launcher,
        "--config_file", str(REPO / "accelerate_configs" / "cpu.yaml"),
        "--num_processes", str(num_processes),
        "--main_process_port", str(free_port()),
        "-m", module, *([NO_PICTURES] if module == "mnist_dist.train" else []), *flags,
    ]
    if cpu_flag:
        args.append("--cpu")
    return run(args, **kw)


def launch_script(num_processes: int, script: Path, *args: str, **kw) -> subprocess.CompletedProcess:
    """Launch a test worker script on N CPU processes (ACCELERATE_USE_CPU=1 connects them over gloo)."""
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", str(num_processes), "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()),
        str(script), *args,
    ]
    return run(cmd, env={"ACCELERATE_USE_CPU": "1"}, **kw)


def launch_gpus(num_processes: int, *flags: str, **kw) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file accelerate_configs/multi_gpu.yaml` on N GPUs."""
    args = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(REPO / "accelerate_configs" / "multi_gpu.yaml"),
        "--num_processes", str(num_processes), "--main_process_port", str(free_port()),
        "-m", "mnist_dist.train", NO_PICTURES, *flags,
    ]
    return run(args, **kw)




# what a run measures of the machine rather than computes: times, rates, memory, FLOP/s
MEASURED = ("seconds", "samples_per_second", "peak_memory", "flops")


def unmeasured(record: dict) -> dict:
    """`record` (a history entry, a metrics.jsonl line) without the machine's measurements."""
    return {k: v for k, v in record.items() if not any(m in k for m in MEASURED)}


def results(output_dir: Path) -> dict:
    return json.loads((output_dir / "results.json").read_text())


def check(proc: subprocess.CompletedProcess, rc: int = 0) -> subprocess.CompletedProcess:
    assert proc.returncode == rc, f"exit {proc.returncode}, expected {rc}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def read_wandb_run(run_dir: Path) -> dict:
    """Read an offline W&B run's transaction log (run-ID.wandb) with wandb's own protobuf schema.

    The file is a LevelDB-style log: a 7-byte header (':W&B', magic, version), then 32 KiB
    blocks of chunks, each a 7-byte header (crc32, length, type) and a piece of a Record.
    Returns {"id", "project", "group", "name", "tags", "config", "history": [{key: value}],
    "summary": {key: value}, "artifacts": [(name, type)]}.
    """
    from wandb.proto import wandb_internal_pb2

    (log,) = run_dir.glob("run-*.wandb")
    raw = log.read_bytes()
    assert raw[:4] == b":W&B", f"{log}: not a W&B transaction log"
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # too little room left in the block for a chunk header
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(raw[pos + 4 : pos + 6], "little"), raw[pos + 6]
        if length == 0 and kind == 0:
            break
        pending += raw[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    run = {"id": None, "config": {}, "history": [], "summary": {}, "artifacts": []}
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run["id"] = record.run.run_id
            run |= {"project": record.run.project, "group": record.run.run_group, "name": record.run.display_name,
                    "tags": list(record.run.tags)}
            run["config"].update({i.key: json.loads(i.value_json) for i in record.run.config.update})
        elif kind == "config":
            run["config"].update({i.key: json.loads(i.value_json) for i in record.config.update})
        elif kind == "history":
            run["history"].append({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item})
        elif kind == "artifact":
            run["artifacts"].append((record.artifact.name, record.artifact.type))
        elif kind == "summary":
            run["summary"].update({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.summary.update})
    return run


# ---------------------------------------------------------------- runs compared, started, stopped

COMPARED = ("test_accuracy", "test_loss", "test_samples", "steps", "samples_seen", "stopped", "epochs")


def same_weights(a: Path, b: Path) -> bool:
    """Whether the model.safetensors in directories `a` and `b` hold bit-identical weights."""
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return wa.keys() == wb.keys() and all(wa[k].equal(wb[k]) for k in wa)


def same_results(a, b) -> None:
    ra, rb = results(a), results(b)
    for key in COMPARED:
        assert ra[key] == rb[key], key
    for ha, hb in zip(ra["history"], rb["history"], strict=True):
        assert (ha["train_loss"], ha["test_accuracy"], ha["test_loss"], ha["samples"]) == (
            hb["train_loss"], hb["test_accuracy"], hb["test_loss"], hb["samples"]
        )


def close_weights(a, b, atol: float) -> float:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    worst = max((wa[name] - wb[name]).abs().max().item() for name in wa)
    assert worst <= atol, f"weights differ by up to {worst}"
    return worst


def train_cmd(world: int, *flags: str, launcher: str = "accelerate.commands.launch") -> list[str]:
    if world == 1:
        return [sys.executable, "-m", "mnist_dist.train", "--cpu", NO_PICTURES, *flags]
    if launcher == "torch.distributed.run":
        launch_flags = ["--nproc_per_node", str(world), "--master_port", str(free_port())]
    else:  # accelerate launch, and mnist_dist.launch, which takes its flags
        launch_flags = ["--config_file", str(REPO / "accelerate_configs" / "cpu.yaml"),
                        "--num_processes", str(world), "--main_process_port", str(free_port())]
    return [sys.executable, "-m", launcher, *launch_flags, "-m", "mnist_dist.train", "--cpu", NO_PICTURES, *flags]


def start(world: int, *flags: str, env: dict | None = None, launcher: str = "accelerate.commands.launch"
          ) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "ACCELERATE_USE_CPU": "1", **(env or {})}
    return subprocess.Popen(
        train_cmd(world, *flags, launcher=launcher), cwd=REPO, env=env, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def wait_for_checkpoint(out, min_step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        steps = [int(p.rsplit("_", 1)[1]) for p in glob.glob(f"{out}/checkpoints/step_*") if not p.endswith(".tmp")]
        if steps and max(steps) >= min_step:
            return
        assert proc.poll() is None, f"training ended early:\n{proc.communicate()[0][-3000:]}"
        time.sleep(0.002)
    raise AssertionError(f"no checkpoint at step >= {min_step} within {timeout} s")


def stopped_in(where: str, *flags: str) -> subprocess.CompletedProcess:
    """A one-process run that gets SIGUSR1 as its nth stretch of steps (between two checks) or its nth
    evaluation begins: `where` is "stretch:n" or "evaluation:n"."""
    return run([sys.executable, str(REPO / "tests" / "workers" / "stop_in.py"), "--cpu", NO_PICTURES, *flags],
               env={"STOP_IN": where})


def snapshot(directory) -> dict:
    """Every file under `directory` with its size and modification time."""
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- Hugging Face datasets


def subset(n_train=300, n_test=200) -> dict:
    source = mnist5k()
    return {"train": data.Split(source["train"].images[:n_train], source["train"].labels[:n_train]),
            "test": data.Split(source["test"].images[:n_test], source["test"].labels[:n_test])}


def as_datasets(splits: dict, columns: dict, labels=None):
    """`splits` as a DatasetDict with `columns` {name: feature}: each Image column gets the digits, the
    other column the labels (`labels(split)` if given)."""
    import datasets
    from PIL import Image

    rows = {}
    for name, split in splits.items():
        images = [Image.fromarray(a) for a in split.images.reshape(-1, 28, 28).numpy()]
        values = (labels(split) if labels else split.labels).tolist()
        rows[name] = {c: images if isinstance(f, datasets.Image) else values for c, f in columns.items()}
    return datasets.DatasetDict({n: datasets.Dataset.from_dict(r, features=datasets.Features(columns))
                                 for n, r in rows.items()})


def hub_layout(directory: Path, splits: dict) -> Path:
    """What `hf download ylecun/mnist --repo-type dataset --local-dir DIR` leaves: parquet files named by
    split, with an Image and a ClassLabel column."""
    import datasets

    dataset = as_datasets(splits, {"image": datasets.Image(), "label": datasets.ClassLabel(names=list(data.DIGITS))})
    (directory / "mnist").mkdir(parents=True)
    for name, split in dataset.items():
        split.to_parquet(directory / "mnist" / f"{name}-00000-of-00001.parquet")
    return directory


def same_data(loaded: dict, expected: dict) -> bool:
    return all(torch.equal(loaded[s].images, expected[s].images) and torch.equal(loaded[s].labels, expected[s].labels)
               for s in ("train", "test"))

"""Test helpers: run the real entry points in subprocesses and build small IDX datasets."""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

from mnist_dist import data, sources

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


def train_here(*flags: str) -> SimpleNamespace:
    """`python -m mnist_dist.train FLAGS`, in this process (see `in_process`)."""
    from mnist_dist import config, train

    return in_process(lambda argv: train.main(config.parse_args(argv)), *flags)


def train_cli(*flags: str, **kw) -> subprocess.CompletedProcess:
    """`python -m mnist_dist.train FLAGS` in a fresh process."""
    return run([sys.executable, "-m", "mnist_dist.train", *flags], **kw)


def launch(num_processes: int, *flags: str, cpu_flag: bool = True, module: str = "mnist_dist.train",
           launcher: str = "accelerate.commands.launch", **kw) -> subprocess.CompletedProcess:
    """`accelerate launch` (or mnist_dist.launch, which takes its flags) with accelerate_configs/cpu.yaml:
    N real processes connected over gloo."""
    args = [
        sys.executable, "-m", launcher,
        "--config_file", str(REPO / "accelerate_configs" / "cpu.yaml"),
        "--num_processes", str(num_processes),
        "--main_process_port", str(_free_port()),
        "-m", module, *flags,
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
        "--main_process_port", str(_free_port()),
        str(script), *args,
    ]
    return run(cmd, env={"ACCELERATE_USE_CPU": "1"}, **kw)


def launch_gpus(num_processes: int, *flags: str, **kw) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file accelerate_configs/multi_gpu.yaml` on N GPUs."""
    args = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(REPO / "accelerate_configs" / "multi_gpu.yaml"),
        "--num_processes", str(num_processes), "--main_process_port", str(_free_port()),
        "-m", "mnist_dist.train", *flags,
    ]
    return run(args, **kw)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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

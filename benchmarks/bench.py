"""Epoch throughput side by side, in one invocation: the tutorial's pipeline, the Accelerate
DataLoader path (`--data-path dataloader`), the device-resident path (`--data-path device`), on a
GPU the captured-epoch path (`--data-path graph`), the device path on two processes (DDP: two GPUs
over NCCL, or two CPU processes over gloo on a machine without GPUs), the tuned recipe
(`--recipe tuned`) and the global batch of 128 as 4 accumulated batches of 32.

    python benchmarks/bench.py --data-dir /usr/share/datasets/fashion-mnist --fashion --epochs 4
    python benchmarks/bench.py --data-dir mnist_dist/datasets/mnist-5k --epochs 10 --json out.json
    python benchmarks/bench.py --data-dir /usr/share/datasets/fashion-mnist --fashion --model cnn --epochs 3

With `--model cnn` the baseline is pytorch/examples' MNIST loop (tutorial.py --pytorch-examples: its
DataLoader and transforms) training the same CNN, against mnist_dist's defaults and DataLoader path.

Each pipeline runs in its own process on the same IDX files with the recipe of record
(784-256-10 MLP, Adam 1e-3, batch 128 per process) on the GPU if there is one, else the CPU.
Steady-state s/epoch is the median of the epochs after the first; ms/step is that divided by
each process's steps per epoch (two processes take half as many steps each). The two-process
row runs over gloo on the CPU, or on two GPUs when there are two; a machine with one GPU skips it.
Then `--pairs` times in turn, one process (on a CPU with one thread, as each of two processes gets)
and two processes: the ratio of their steps per pair, as the table's rows run minutes
apart on a machine whose speed may change in between. Prints a table and writes JSON.
"""

import argparse
import gzip
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def torchvision_root(data_dir: Path, fashion: bool, tmp: Path) -> Path:
    """The IDX files, uncompressed, in the layout torchvision's (Fashion)MNIST expects."""
    raw = tmp / ("FashionMNIST" if fashion else "MNIST") / "raw"
    raw.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        gz, plain = data_dir / (name + ".gz"), data_dir / name
        if plain.exists():
            shutil.copy(plain, raw / name)
        else:
            (raw / name).write_bytes(gzip.decompress(gz.read_bytes()))
    return tmp


def timed(cmd: list[str], env: dict | None = None) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start, proc.stdout


def row(name: str, epoch_seconds: list[float], samples: int, accuracy: float, first_step: float, wall: float,
        steps_per_epoch: int, **extra) -> dict:
    steady = statistics.median(epoch_seconds[1:]) if len(epoch_seconds) > 1 else epoch_seconds[0]
    return {"pipeline": name, "s_per_epoch": steady, "samples_per_s": samples / steady, "test_accuracy": accuracy,
            "ms_per_step": 1000 * steady / steps_per_epoch, "seconds_to_first_step": first_step,
            "end_to_end_s": wall, "epoch_seconds": epoch_seconds, **extra}


def train_cmd(processes: int, flags: list[str]) -> list[str]:
    if processes == 1:
        return [sys.executable, "-m", "mnist_dist.train", *flags]
    gpus = torch.cuda.device_count() >= processes
    config = HERE.parent / "accelerate_configs" / ("multi_gpu.yaml" if gpus else "cpu.yaml")
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes",
            str(processes), "-m", "mnist_dist.train", *flags, *([] if gpus else ["--cpu"])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, required=True, help="the four IDX files (gzip or not)")
    parser.add_argument("--fashion", action="store_true", help="the files are Fashion-MNIST")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--skip-tutorial", action="store_true")
    parser.add_argument("--pairs", type=int, default=3, help="one process then two, this many times (0: none)")
    parser.add_argument("--model", choices=("mlp", "cnn"), default="mlp",
                        help="cnn: pytorch/examples' loop against mnist_dist's defaults and DataLoader path")
    args = parser.parse_args()
    cnn = args.model == "cnn"

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if not args.skip_tutorial:
            root = torchvision_root(args.data_dir, args.fashion, tmp / "tv")
            wall, out = timed([sys.executable, str(HERE / "tutorial.py"), str(root), str(args.epochs)]
                              + (["--fashion"] if args.fashion else []) + (["--pytorch-examples"] if cnn else []))
            r = json.loads(out.strip().splitlines()[-1])
            name = "pytorch/examples loop, CNN (1 worker)" if cnn else "tutorial (torchvision, 2 workers)"
            rows.append(row(name, r["epoch_seconds"], r["train_samples"],
                            r["test_accuracy"], r["seconds_to_first_step"], wall, r["steps_per_epoch"]))
        gpus = torch.cuda.device_count()
        runs = [("auto", 1, [], {}), ("dataloader", 1, [], {}), ("device", 1, [], {})]  # auto: the defaults
        if gpus:
            runs.append(("graph", 1, [], {}))
        if gpus != 1:
            runs.append(("device", 2, [], {}))
        runs.append(("device", 1, ["--recipe", "tuned"], {}))
        # the global batch of 128 from 4 accumulated batches of 32: what accumulation costs against one batch
        runs.append(("device", 1, ["--gradient-accumulation-steps", "4", "--batch-size", "32"], {}))
        if not gpus:  # `accelerate launch` gives each of N CPU processes cores/N threads: compare like with like
            threads = str(max(1, (os.cpu_count() or 2) // 2))
            runs.insert(3, ("device", 1, [], {"OMP_NUM_THREADS": threads}))
        if cnn:  # the same CNN as the baseline's, through mnist_dist's defaults and its DataLoader path
            runs = [("auto", 1, ["--model", "cnn"], {}), ("dataloader", 1, ["--model", "cnn"], {})]
        runs_done = 0

        def run(path: str, processes: int, extra: list[str], env: dict) -> dict:
            nonlocal runs_done
            out_dir = tmp / f"run{runs_done}"
            runs_done += 1
            flags = ["--data-dir", str(args.data_dir), "--dataset", "fashion_mnist" if args.fashion else "mnist",
                     "--epochs", str(args.epochs), "--data-path", path,
                     "--report-to", "none", "--output-dir", str(out_dir), "--cache-dir", str(tmp / "cache"), *extra]
            if not gpus and processes == 1 and path != "auto":  # one thread per core, unless the row says
                flags += ["--cpu-threads", env.get("OMP_NUM_THREADS", str(os.cpu_count() or 1))]
            if runs_done == 1:
                # warm the dataset cache, as any later run would find it (the last --output-dir, --epochs win)
                timed(train_cmd(1, [*flags, "--output-dir", str(tmp / "warm"), "--epochs", "1"]))
            wall, _ = timed(train_cmd(processes, flags), env)
            r = json.loads((out_dir / "results.json").read_text())
            name = ("mnist_dist defaults" if path == "auto" else f"mnist_dist {path}")
            name += ((f" x{processes}" if processes > 1 else "")
                     + (f" ({env['OMP_NUM_THREADS']} thread(s))" if env else "") + " ".join(["", *extra]))
            name += f" [{r['data_path']}, {r['cpu_threads']} thr]" if r["cpu_threads"] else ""
            return row(name, [h["seconds"] for h in r["history"]], r["train_samples"], r["test_accuracy"],
                       r["seconds_to_first_step"], wall, r["steps"] // r["epochs"], timings=r["timings"],
                       processes=processes, device=r["device_type"])

        for path, processes, extra, env in runs:
            rows.append(run(path, processes, extra, env))
        pairs = []
        if gpus != 1 and not cnn:
            alone = {} if gpus else {"OMP_NUM_THREADS": "1"}
            for _ in range(args.pairs):
                one, two = run("device", 1, [], alone), run("device", 2, [], {})
                pairs.append({"one_process_ms_per_step": one["ms_per_step"], "two_processes_ms_per_step": two["ms_per_step"],
                              "ratio": two["ms_per_step"] / one["ms_per_step"]})

    base = rows[0]["s_per_epoch"]
    print(f"{'pipeline':40} {'s/epoch':>8} {'samples/s':>11} {'speed-up':>8} {'ms/step':>8} {'test acc':>8} "
          f"{'1st step':>8} {'end-to-end':>10}")
    for r in rows:
        print(f"{r['pipeline']:40} {r['s_per_epoch']:8.3f} {r['samples_per_s']:11,.0f} {base / r['s_per_epoch']:7.1f}x "
              f"{r['ms_per_step']:8.3f} {r['test_accuracy']:8.4f} {r['seconds_to_first_step']:7.1f}s "
              f"{r['end_to_end_s']:9.1f}s")
    for r in rows:
        if "timings" in r:
            print(f"{r['pipeline']:40} " + "  ".join(f"{k} {v:.2f}s" for k, v in r["timings"].items()))
    if pairs:
        print("one process, then two, in turn (ms/step): " + ",  ".join(
            f"{p['one_process_ms_per_step']:.2f} / {p['two_processes_ms_per_step']:.2f} = {p['ratio']:.2f}x" for p in pairs)
            + f";  median {statistics.median(p['ratio'] for p in pairs):.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "pairs": pairs}, indent=2) + "\n")


if __name__ == "__main__":
    main()

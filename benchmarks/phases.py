"""Where a run's time goes, end to end: each command run `--repeat` times in turn, the median of each phase.

    python benchmarks/phases.py                      # the quickstart, the CNN, a 2-process run, on mnist-5k
    python benchmarks/phases.py --repeat 5 --json out.json

The phases are the run's own `timings` from results.json (startup: from the OS starting the process to the
process group; data_load; setup: model, optimizer, prepare, trackers; train; eval; outputs: model file and
pictures) and `rest`: the wall time outside them (the exit; with 2 processes the launcher's own start too).
`overhead` is what the run adds around its work: wall - `import torch` alone - train - eval. Measured on
this machine as it is: say what else was running.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PHASES = ("startup", "data_load", "setup", "train", "eval", "outputs")
RUNS = {  # name -> (processes, flags)
    "quickstart": (1, ["--dataset", "mnist-5k", "--cpu", "--report-to", "none"]),
    "cnn": (1, ["--dataset", "mnist-5k", "--cpu", "--report-to", "none", "--model", "cnn"]),
    "2 processes": (2, ["--dataset", "mnist-5k", "--cpu", "--report-to", "none"]),
}


def command(processes: int, flags: list[str], out: Path) -> list[str]:
    train = ["-m", "mnist_dist.train", *flags, "--output-dir", str(out), "--overwrite"]
    if processes == 1:
        return [sys.executable, *train]
    return [sys.executable, "-m", "mnist_dist.launch", "--multi_gpu", "--num_processes", str(processes),
            "--mixed_precision", "no", "--dynamo_backend", "no", *train]


def wall(cmd: list[str]) -> float:
    began = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "ACCELERATE_USE_CPU": "1"})
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - began


def measure(name: str, processes: int, flags: list[str], tmp: Path) -> dict:
    """One run of `name`: its wall time and phases (seconds)."""
    out = tmp / name.replace(" ", "-")
    seconds = wall(command(processes, flags, out))
    timings = json.loads((out / "results.json").read_text())["timings"]
    phases = {phase: timings[phase] for phase in PHASES}
    return {"wall": seconds, **phases, "rest": seconds - sum(phases.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3, help="runs of each command, in turn")
    parser.add_argument("--json", type=Path, help="also write the medians here")
    args = parser.parse_args()
    torch_import = statistics.median(wall([sys.executable, "-c", "import torch"]) for _ in range(args.repeat))
    found = {name: [] for name in RUNS}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeat):  # in turn: a machine whose speed changes slows every command alike
            for name, (processes, flags) in RUNS.items():
                found[name].append(measure(name, processes, flags, Path(tmp)))
    columns = ("wall", *PHASES, "rest")
    print(f"`import torch` alone: {torch_import:.2f} s; medians of {args.repeat} runs, seconds\n")
    print("| run | " + " | ".join(columns) + " | overhead |")
    print("| --- |" + " ---: |" * (len(columns) + 1))
    medians = {}
    for name, runs in found.items():
        medians[name] = {c: statistics.median(r[c] for r in runs) for c in columns}
        m = medians[name]
        overhead = m["wall"] - torch_import - m["train"] - m["eval"]
        print(f"| {name} | " + " | ".join(f"{m[c]:.2f}" for c in columns) + f" | {overhead:.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"import_torch": torch_import, "runs": medians}, indent=2) + "\n")


if __name__ == "__main__":
    main()

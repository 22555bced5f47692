"""CPU threads of one training process, on an idle machine and with one core kept busy.

    python benchmarks/threads.py [--epochs 4] [--dataset mnist-5k] [-- more mnist_dist.train flags]

Each setting trains `python -m mnist_dist.train --cpu` in a fresh process and reads its seconds per
epoch (the median of the epochs after the first) from results.json; the settings take turns, so
that a change in the machine's speed shows in all of them. "busy" runs a spinning Python process
beside the training (one core's worth of other work). Prints one line per setting and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CORES = os.cpu_count()
SETTINGS = {  # name -> (flags, environment) of the training process
    f"{CORES} threads (torch's own default: one per core)": ([f"--cpu-threads={CORES}"], {}),
    "1 thread": (["--cpu-threads=1"], {}),
    f"{CORES} threads, passive OpenMP wait": ([f"--cpu-threads={CORES}"], {"OMP_WAIT_POLICY": "PASSIVE"}),
    "the package's default": ([], {}),
}


def seconds_per_epoch(flags: list[str], env: dict, args, out: Path) -> float:
    full_env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    subprocess.run([sys.executable, "-m", "mnist_dist.train", "--cpu", "--dataset", args.dataset, "--epochs",
                    str(args.epochs), "--report-to", "none", "--output-dir", str(out), *args.train_flags, *flags],
                   check=True, capture_output=True, env={**full_env, "WANDB_MODE": "disabled", **env})
    history = json.loads((out / "results.json").read_text())["history"]
    return statistics.median(h["seconds"] for h in history[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--dataset", default="mnist-5k")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", default="threads.json")
    parser.add_argument("train_flags", nargs="*", help="more mnist_dist.train flags (after --)")
    args = parser.parse_args()
    figures, runs = {}, 0
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for load in ("idle", "busy"):
                spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if load == "busy" else None
                try:
                    for name, (flags, env) in SETTINGS.items():
                        runs += 1
                        out = Path(tmp) / f"run-{runs}"  # one run per directory
                        figures.setdefault(f"{load}: {name}", []).append(seconds_per_epoch(flags, env, args, out))
                finally:
                    if spinner:
                        spinner.kill()
    for key, values in figures.items():
        print(f"{key:50s} {min(values):.3f} s/epoch (best of {len(values)}: {', '.join(f'{v:.3f}' for v in values)})")
    Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()

"""CPU threads and data paths of one training process: on an idle machine, with one core kept busy
from before the start, and with that work starting after the run began.

    python benchmarks/threads.py [--epochs 4] [--dataset mnist-5k] [--only NAME ...] [-- more train flags]

Each setting trains `python -m mnist_dist.train --cpu` in a fresh process and reads its seconds per
epoch (the median of the epochs after the first) from results.json; the settings take turns, so
that a change in the machine's speed shows in all of them. "busy" runs a spinning Python process
beside the training (one core's worth of other work); "busy later" starts it --later-s seconds
after the training process. Prints one line per setting and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CORES = os.cpu_count()
SETTINGS = {  # name -> (flags, environment) of the training process
    **{f"{path}, {n} thread(s)": ([f"--cpu-threads={n}", f"--data-path={path}"], {})
       for path in ("dataloader", "device") for n in sorted({1, CORES})},
    f"device, {CORES} threads, passive OpenMP wait": ([f"--cpu-threads={CORES}", "--data-path=device"],
                                                      {"OMP_WAIT_POLICY": "PASSIVE"}),
    "the package's default": ([], {}),
}


def spin() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def seconds_per_epoch(flags: list[str], env: dict, args, out: Path, spin_after: float | None) -> tuple[float, int, int]:
    """The run's median epoch (s), its torch threads at the end and how often it re-chose them; `spin_after`:
    start a spinner that late (s)."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    proc = subprocess.Popen([sys.executable, "-m", "mnist_dist.train", "--cpu", "--dataset", args.dataset,
                             "--epochs", str(args.epochs), "--report-to", "none", "--output-dir", str(out),
                             *args.train_flags, *flags], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**full_env, "WANDB_MODE": "disabled", **env})
    spinner = None
    try:
        if spin_after is not None:
            time.sleep(spin_after)
            spinner = spin()
        output = proc.communicate()[0]
        assert proc.returncode == 0, f"{flags} failed"
    finally:
        if spinner:
            spinner.kill()
    results = json.loads((out / "results.json").read_text())
    changes = output.count("torch thread(s) from now")  # the run re-chose its threads (a CoreWatch)
    return statistics.median(h["seconds"] for h in results["history"][1:]), results["cpu_threads"], changes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--dataset", default="mnist-5k")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--later-s", type=float, default=4.0, help="'busy later': seconds before the spinner starts")
    parser.add_argument("--json", default="threads.json")
    parser.add_argument("--only", nargs="*", help="the settings whose names contain one of these")
    parser.add_argument("train_flags", nargs="*", help="more mnist_dist.train flags (after --)")
    args = parser.parse_args()
    settings = {k: v for k, v in SETTINGS.items() if not args.only or any(word in k for word in args.only)}
    figures, runs = {}, 0
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for load in ("idle", "busy", "busy later"):
                spinner = spin() if load == "busy" else None
                try:
                    for name, (flags, env) in settings.items():
                        runs += 1
                        out = Path(tmp) / f"run-{runs}"  # one run per directory
                        later = args.later_s if load == "busy later" else None
                        figure = seconds_per_epoch(flags, env, args, out, later)
                        figures.setdefault(f"{load}: {name}", []).append(figure)
                finally:
                    if spinner:
                        spinner.kill()
    for key, values in figures.items():
        seconds = [v[0] for v in values]
        print(f"{key:50s} {min(seconds):.3f} s/epoch (best of {len(values)}: {', '.join(f'{v:.3f}' for v in seconds)}; "
              f"threads at the end {sorted({v[1] for v in values})}, re-chosen {sum(v[2] for v in values)} times)")
    Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()

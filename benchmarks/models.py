"""Test accuracy and training speed of the built-in models, each a real `python -m mnist_dist.train` run
with its defaults otherwise (10 epochs, batch 128, Adam 1e-3), over several seeds; prints a Markdown table
of the median test accuracy and s/epoch (training time per epoch, from results.json) per model and dataset.

    python benchmarks/models.py --out /tmp/models [--seeds 0 1 2] [--fashion-dir /usr/share/datasets/fashion-mnist]
"""

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

MODELS = {
    "MLP of record (784-256-10)": [],
    "MLP 2x512, BatchNorm, dropout 0.2": ["--hidden-sizes", "512,512", "--batch-norm", "--dropout", "0.2"],
    "CNN": ["--model", "cnn"],
    "CNN, --augment": ["--model", "cnn", "--augment"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="a directory for the runs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--fashion-dir", default="/usr/share/datasets/fashion-mnist",
                        help="Fashion-MNIST's IDX files; '' leaves Fashion-MNIST out")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    args = parser.parse_args()
    datasets = {"mnist-5k": ["--dataset", "mnist-5k"]}
    if args.fashion_dir:
        datasets["Fashion-MNIST"] = ["--dataset", "fashion_mnist", "--data-dir", args.fashion_dir]
    print("| model | data | test accuracy (median) | seeds | s/epoch (median) |\n| --- | --- | --- | --- | --- |")
    for model in args.models:
        for name, data in datasets.items():
            accuracies, seconds = [], []
            for seed in args.seeds:
                out = Path(args.out) / f"{list(MODELS).index(model)}-{name}-{seed}"
                subprocess.run([sys.executable, "-m", "mnist_dist.train", *data, *MODELS[model], "--cpu", "--seed",
                                str(seed), "--report-to", "none", "--output-dir", str(out), "--overwrite"],
                               check=True, capture_output=True)
                results = json.loads((out / "results.json").read_text())
                accuracies.append(results["test_accuracy"])
                seconds.append(results["train_seconds"] / results["epochs"])
            runs = " / ".join(f"{100 * a:.2f}%" for a in accuracies)
            print(f"| {model} | {name} | {100 * statistics.median(accuracies):.2f}% | {runs} | "
                  f"{statistics.median(seconds):.2f} |", flush=True)


if __name__ == "__main__":
    main()

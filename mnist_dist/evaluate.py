"""Evaluate a trained model on a test set: accuracy, loss, per-class accuracy, confusion matrix.

    python -m mnist_dist.evaluate --model outputs/latest                     # the dataset it was trained on
    python -m mnist_dist.evaluate --model outputs/latest/checkpoints/step_00000400 --dataset mnist-5k
    python -m mnist_dist.evaluate --model outputs/latest/model.safetensors --data-dir /data/fashion-mnist
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml -m mnist_dist.evaluate --model outputs/latest

Under `accelerate launch` each process evaluates its own share of the test set and the totals
are added up, so every test image counts exactly once. Writes evaluation.json,
confusion_matrix.png and misclassified.png to --output-dir (default: MODEL_DIR/evaluation)
and prints the summary.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from dataclasses import replace
from pathlib import Path

from .stopping import QuickExit

def build_parser() -> argparse.ArgumentParser:
    from .config import LaunchedParser  # no torch: --help stays fast

    parser = LaunchedParser(prog="python -m mnist_dist.evaluate", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", required=True,
                        help="a trained model: its directory (config.json + model.safetensors), the "
                             "model.safetensors file, or a checkpoint directory")
    parser.add_argument("--dataset", help="test set to use, as in training (mnist, fashion_mnist, mnist-5k, a Hub id "
                                          "or a directory); default: the one the model was trained on")
    parser.add_argument("--image-column", help="--dataset's image column (as in training)")
    parser.add_argument("--label-column", help="--dataset's label column (as in training)")
    parser.add_argument("--data-dir", help="read the IDX files from this directory (as in training)")
    parser.add_argument("--cache-dir", help="decoded-dataset cache (as in training)")
    parser.add_argument("--batch-size", type=int, default=1024, help="test images per process per batch")
    parser.add_argument("--output-dir", help="where to write evaluation.json and the PNGs; default: MODEL_DIR/evaluation")
    parser.add_argument("--cpu", action="store_true", help="evaluate on the CPU even if a GPU is present")
    return parser


def evaluate_model(args: argparse.Namespace) -> dict:
    """Evaluate as `args` say; the main process writes the files; every process returns the report."""
    from accelerate import Accelerator

    from . import data, plots, sources
    from .atomic import write_json
    from .config import SCORES
    from .data import DataError
    from .distributed import check_coupled
    from .metrics import evaluate_shard
    from .model import load_model

    if args.batch_size < 1:
        raise ValueError(f"--batch-size={args.batch_size}: must be an integer >= 1")
    accelerator = Accelerator(cpu=args.cpu)
    try:
        check_coupled(accelerator, "mnist_dist.evaluate")
        model, config = load_model(args.model)
        model_path = Path(args.model)
        model_dir = model_path.parent if model_path.suffix == ".safetensors" else model_path
        dataset = args.dataset or config.get("dataset", "mnist")
        data_dir = args.data_dir
        if args.dataset is None and data_dir is None:  # nothing said: the files the model was trained on
            data_dir = config.get("data_dir")
        trained_on = args.dataset is None  # nothing said: the columns it was trained on
        columns = [args.image_column or (config.get("image_column") if trained_on else None),
                   args.label_column or (config.get("label_column") if trained_on else None)]
        with accelerator.local_main_process_first():
            test = sources.load_splits(dataset, data_dir, args.cache_dir, *columns)["test"]
        if test.images.shape[1] != config["input_size"]:
            raise DataError(f"the test images have {test.images.shape[1]} pixels, {args.model} expects {config['input_size']}")
        if len(test.class_names) > config["num_classes"]:
            raise DataError(f"{dataset}: {len(test.class_names)} classes, {args.model} knows {config['num_classes']}")
        norm = config.get("normalization", {"mean": data.MEAN, "std": data.STD})
        stats = (norm["mean"], norm["std"])
        model.to(accelerator.device)
        shard = data.eval_shard(test, args.batch_size, accelerator.process_index, accelerator.num_processes,
                                accelerator.device)
        metrics = evaluate_shard(model, shard, stats, lambda t: accelerator.reduce(t, reduction="sum"))
        names = config.get("class_names") or list(test.class_names)
        report = {
            "model": str(model_path), "dataset": dataset, "data_dir": data_dir, "world_size": accelerator.num_processes,
            **{f"test_{name}": metrics[name] for name in SCORES}, "test_samples": metrics["samples"],
            "per_class_accuracy": dict(zip(names, metrics["per_class_accuracy"])),
            "confusion_matrix": metrics["confusion_matrix"],  # [true class][predicted class], counts
        }
        if accelerator.is_main_process:
            out = Path(args.output_dir) if args.output_dir else model_dir / "evaluation"
            out.mkdir(parents=True, exist_ok=True)
            named = replace(test, class_names=tuple(names))  # the model's names: it may know more classes
            plots.test_pictures(out, report["confusion_matrix"], model, named, stats, f"{dataset}, {model_path}")
            write_json(out / "evaluation.json", report)
            report["output_dir"] = str(out)
        return report
    finally:
        accelerator.end_training()  # destroys the process group


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # --help and bad flags are answered before torch loads (seconds)
    from .distributed import LaunchError

    try:
        report = evaluate_model(args)
    except (FileNotFoundError, ValueError, LaunchError) as err:  # DataError is a ValueError
        if os.environ.get("RANK", "0") == "0":  # a bad command fails alike on every process: said once
            print(f"mnist_dist.evaluate: error: {err}", file=sys.stderr)
        return 2
    finally:
        gc.collect()  # free gloo's hold on the process group while Python is fully alive (see loop.main)
    if "output_dir" in report:  # the main process
        per_class = "  ".join(f"{name} {100 * acc:.1f}%" for name, acc in report["per_class_accuracy"].items()
                              if acc is not None)
        print(f"test_accuracy {report['test_accuracy']:.4f}  test_loss {report['test_loss']:.4f}  "
              f"({report['test_samples']} images, {report['world_size']} process(es))\nper class: {per_class}\n"
              f"wrote {report['output_dir']}/evaluation.json, confusion_matrix.png, misclassified.png")
    return 0


if __name__ == "__main__":
    QuickExit().end(main)  # made before torch loads: no teardown of it at the end (about 1 s)

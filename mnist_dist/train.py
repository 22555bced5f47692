"""Train the MNIST MLP with Hugging Face Accelerate on one CPU, one GPU, many GPUs or many nodes.

    python -m mnist_dist.train --dataset mnist-5k --cpu          # one process: laptop / debugging
    python -m mnist_dist.train                                   # one process, GPU if there is one
    accelerate launch --config_file accelerate_configs/single_gpu.yaml -m mnist_dist.train
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml -m mnist_dist.train
    accelerate launch --config_file accelerate_configs/cpu.yaml -m mnist_dist.train --cpu   # N CPU processes

`python -m mnist_dist.train --help` lists every flag with its default and unit.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from . import data
from .config import ConfigError, TrainConfig, parse_args
from .data import DataError, make_loaders, normalize
from .distributed import LaunchError, build_accelerator, shard_counts
from .evaluation import evaluate
from .model import CONFIG_NAME, MLP, model_config


def train(cfg: TrainConfig) -> dict:
    """Train as `cfg` says; write results.json and the model (main process); return the results."""
    cfg.validate()
    accelerator = build_accelerator(cfg)
    main = accelerator.is_main_process
    world = accelerator.num_processes

    # one process per node decodes the data and writes the cache; the others then read the cache
    with accelerator.local_main_process_first():
        splits = data.load_splits(cfg.dataset, cfg.data_dir, cfg.cache_dir)
    train_set, test_set = splits["train"], splits["test"]
    output_dir = Path(cfg.output_dir)
    if main:
        output_dir.mkdir(parents=True, exist_ok=True)

    set_seed(cfg.seed)  # same initial weights everywhere (DDP also broadcasts rank 0's)
    model = MLP(train_set.images.shape[1], cfg.hidden_size, data.NUM_CLASSES)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    train_loader, test_loader = make_loaders(
        train_set, test_set, cfg.batch_size, cfg.eval_batch_size, cfg.num_workers, cfg.seed
    )
    model, optimizer, train_loader, test_loader = accelerator.prepare(model, optimizer, train_loader, test_loader)

    steps_per_epoch = len(train_loader)  # per process; the same on every process
    total_steps = min(cfg.epochs * steps_per_epoch, cfg.max_steps or math.inf)
    epochs = math.ceil(total_steps / steps_per_epoch)
    # the bar is for people at a terminal; batch logs (SLURM) get the one line per epoch below
    bar = tqdm(total=total_steps, disable=not (main and sys.stderr.isatty()), unit="step", dynamic_ncols=True)
    say = bar.write if main else (lambda _: None)
    say(
        f"mnist_dist: {len(train_set)} train / {len(test_set)} test samples, {world} process(es) on "
        f"{accelerator.device.type}, global batch {cfg.batch_size * world}, precision {accelerator.mixed_precision}"
    )

    history, step, samples, train_seconds = [], 0, 0, 0.0
    for epoch in range(epochs):
        train_loader.set_epoch(epoch)  # reshuffle: permutation seeded by seed + epoch, same on every process
        model.train()
        epoch_start = time.perf_counter()
        # loss sums stay on the device; they are read once per log interval, not every step
        epoch_loss = torch.zeros((), device=accelerator.device)
        window_loss, window_samples = torch.zeros((), device=accelerator.device), 0
        epoch_samples = 0
        for batch_index, (images, labels) in enumerate(train_loader):
            local_real, global_real = shard_counts(
                batch_index, len(labels), len(train_set), cfg.batch_size, accelerator
            )
            logits = model(normalize(images))
            losses = F.cross_entropy(logits.float(), labels, reduction="none")[:local_real]
            # DDP averages gradients over processes; scaling each process's sum by world / global_real
            # makes the update the mean over the real samples of the global batch, as on one process
            accelerator.backward(losses.sum() * (world / global_real))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            step += 1
            epoch_samples += global_real
            window_samples += global_real
            epoch_loss += losses.detach().sum()
            window_loss += losses.detach().sum()
            bar.update(1)
            if step % cfg.log_every == 0:
                loss = accelerator.reduce(window_loss, reduction="sum").item() / window_samples
                rate = (samples + epoch_samples) / (train_seconds + time.perf_counter() - epoch_start)
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss:.4f}", samples_s=f"{rate:,.0f}")
                window_loss.zero_()
                window_samples = 0
            if step >= total_steps:
                break
        train_loss = accelerator.reduce(epoch_loss, reduction="sum").item() / epoch_samples
        seconds = time.perf_counter() - epoch_start
        train_seconds += seconds
        samples += epoch_samples

        eval_start = time.perf_counter()
        metrics = evaluate(model, test_loader, gather=accelerator.gather_for_metrics)
        history.append(
            {
                "epoch": epoch + 1,
                "train_loss": train_loss,
                "test_accuracy": metrics["accuracy"],
                "test_loss": metrics["loss"],
                "seconds": seconds,
                "eval_seconds": time.perf_counter() - eval_start,
                "samples": epoch_samples,
            }
        )
        say(
            f"epoch {epoch + 1}/{epochs}: train_loss {train_loss:.4f}  test_loss {metrics['loss']:.4f}  "
            f"test_accuracy {metrics['accuracy']:.4f}  ({seconds:.2f} s, {epoch_samples / seconds:,.0f} samples/s)"
        )
    bar.close()

    results = {
        "dataset": cfg.dataset,
        "test_accuracy": metrics["accuracy"],
        "test_loss": metrics["loss"],
        "test_samples": metrics["samples"],
        "train_samples": len(train_set),
        "epochs": epochs,
        "steps": step,
        "samples_seen": samples,
        "world_size": world,
        "per_process_batch_size": cfg.batch_size,
        "global_batch_size": cfg.batch_size * world,
        "mixed_precision": accelerator.mixed_precision,
        "device_type": accelerator.device.type,
        "train_seconds": train_seconds,
        "samples_per_second": samples / train_seconds,
        "history": history,
        "config": cfg.to_dict(),
    }
    accelerator.wait_for_everyone()
    accelerator.save_model(model, output_dir)  # model.safetensors, written by the main process
    if main:
        config = model_config(
            accelerator.unwrap_model(model),
            normalization={"mean": data.MEAN, "std": data.STD, "pixel_scale": 255},
            dataset=cfg.dataset,
            class_names=data.class_names(cfg.dataset),
        )
        _write_json(output_dir / CONFIG_NAME, config)
        _write_json(output_dir / "results.json", results)  # last: its presence marks a finished run
        say(f"mnist_dist: test_accuracy {results['test_accuracy']:.4f}; wrote {output_dir}/results.json")
    accelerator.end_training()  # destroys the process group
    # and free what holds on to it (the DDP model) now, while Python is fully alive: left to
    # interpreter shutdown, gloo's threads can abort a finished run with SIGABRT
    del model, optimizer, train_loader, test_loader
    accelerator.free_memory()
    return results


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)  # readers see the old file or the new one, never half of one


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    try:
        train(cfg)
    except (ConfigError, DataError, LaunchError) as err:
        print(f"mnist_dist.train: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

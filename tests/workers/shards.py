"""Launched on N CPU processes by test_distributed.py; writes what each process saw as JSON.

    shards.py N_TRAIN N_TEST BATCH OUT.json

Each sample's image carries its own index in its first two pixels, so the test can tell
exactly which samples every process trained and evaluated on.
"""

import json
import sys

import torch
from accelerate.utils import gather_object

from mnist_dist.config import TrainConfig
from mnist_dist.data import DeviceBatches, Split, eval_loader, eval_shard, train_loader
from mnist_dist.distributed import build_accelerator, local_real
from mnist_dist.metrics import evaluate, evaluate_shard
from mnist_dist.model import MLP

EPOCHS = 2


def indexed(n: int) -> Split:
    index = torch.arange(n)
    images = torch.zeros(n, 784, dtype=torch.uint8)
    images[:, 0], images[:, 1] = index % 256, index // 256
    images[:, 2:] = torch.randint(0, 256, (n, 782), generator=torch.Generator().manual_seed(n))
    return Split(images, index % 10)


def index_of(images: torch.Tensor) -> list[int]:
    return (images[:, 0].long() + 256 * images[:, 1].long()).tolist()


def main() -> None:
    n_train, n_test, batch, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    cfg = TrainConfig(cpu=True, batch_size=batch, eval_batch_size=batch, seed=7).validate()
    accelerator = build_accelerator(cfg)
    train_set, test_set = indexed(n_train), indexed(n_test)
    torch.manual_seed(0)
    model = MLP(hidden_sizes=(16,))
    model, loader, test_loader = accelerator.prepare(model, train_loader(train_set, batch, 0, cfg.seed),
                                                     eval_loader(test_set, batch))

    rank, world = accelerator.process_index, accelerator.num_processes
    device_batches = DeviceBatches(train_set, batch, cfg.seed, rank, world, accelerator.device)
    device_epochs = []
    for epoch in range(EPOCHS):
        batches = [index_of(images.cpu()) for images, _ in device_batches.epoch(epoch)]
        device_epochs.append(gather_object([batches]))

    epochs = []
    for epoch in range(EPOCHS):
        loader.set_epoch(epoch)
        batches = []  # this process's real samples, batch by batch
        for i, (images, labels) in enumerate(loader):
            batches.append(index_of(images[: local_real(i, len(labels), n_train, batch, accelerator)]))
        epochs.append(gather_object([batches]))  # [rank][batch] -> indices

    evaluated = []
    for images, _ in test_loader:
        evaluated += accelerator.gather_for_metrics(torch.tensor(index_of(images))).tolist()
    metrics = evaluate(model, test_loader, gather=accelerator.gather_for_metrics)
    shard = eval_shard(test_set, batch, rank, world, accelerator.device)
    device_metrics = evaluate_shard(model, shard, sum_over_processes=lambda t: accelerator.reduce(t, reduction="sum"))

    if accelerator.is_main_process:
        with open(out, "w") as f:
            json.dump({"world_size": accelerator.num_processes, "epochs": epochs, "device_epochs": device_epochs,
                       "evaluated": evaluated, "metrics": metrics, "device_metrics": device_metrics}, f)
    # destroy the process group, then free DDP's hold on it while Python is fully alive (as loop.main does)
    accelerator.end_training()
    del model, loader, test_loader
    accelerator.free_memory()


if __name__ == "__main__":
    main()

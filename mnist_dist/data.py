"""MNIST-like data as uint8 tensors (`Split`: images [N, 784], labels [N]) and what training does with
them: scaling the pixels, holding out a validation split, fingerprinting, and the batches of the
DataLoader and device paths. Where the tensors come from is `sources.py`.

Plain PyTorch: the training loop passes a process's rank and the world size where a shard is cut.
"""

from __future__ import annotations

import hashlib
import math
import signal
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, TensorDataset

IMAGE_SIDE = 28  # pixels: every image is IMAGE_SIDE x IMAGE_SIDE, grayscale
DIGITS = tuple(str(i) for i in range(10))
# pixels go uint8 [0, 255] -> [0, 1] -> (x - MEAN) / STD, i.e. [-1, 1]
MEAN, STD = 0.5, 0.5
# --normalization's fixed scalings, (mean, std) on the 0..1 scale: 'none' leaves the pixels in [0, 1]
SCALINGS = {"half": (MEAN, STD), "none": (0.0, 1.0)}
VALIDATION = "validation"  # the split name `datasets` uses; a dataset that has it is validated on it


class DataError(ValueError):
    """Data that cannot be used; the message names the file, directory or dataset."""


@dataclass(frozen=True)
class Split:
    images: torch.Tensor  # uint8 [N, 784]
    labels: torch.Tensor  # int64 [N], each in 0..len(class_names) - 1
    class_names: tuple[str, ...] = DIGITS  # the dataset's classes, label value i is class_names[i]

    def __len__(self) -> int:
        return len(self.labels)


def normalize(images: torch.Tensor, mean: float = MEAN, std: float = STD) -> torch.Tensor:
    """uint8 pixels [N, 784] -> float32 (pixel / 255 - mean) / std; the defaults give [-1, 1], as
    ToTensor() + Normalize(0.5, 0.5) would."""
    # in place on one fresh float copy: the same operations in the same order, without three temporaries
    return images.to(torch.float32, copy=True).div_(255).sub_(mean).div_(std)


def pixel_stats(images: torch.Tensor) -> tuple[float, float]:
    """(mean, std) of all pixels of uint8 `images` on the 0..1 scale: `--normalization dataset`'s statistics."""
    # from the histogram of the 256 pixel values: exact in float64, the same digits on every process
    counts = torch.bincount(images.flatten(), minlength=256).double()
    values = torch.arange(256, dtype=torch.float64) / 255
    n = counts.sum()
    mean = (counts * values).sum() / n
    std = ((counts * (values - mean) ** 2).sum() / (n - 1)).sqrt()
    return round(mean.item(), 6), round(std.item(), 6)



def fingerprint(splits: dict[str, Split], held_out: dict | None = None) -> dict:
    """What a checkpoint records of its data: each split's size and the sha256 of its decoded tensors;
    `held_out`, a validation split cut from the training split (`hold_out`), goes in too."""
    prints = {}
    for name, split in splits.items():
        digest = hashlib.sha256(memoryview(split.images.numpy()))
        digest.update(memoryview(split.labels.numpy()))
        prints[name] = {"samples": len(split), "classes": len(split.class_names), "sha256": digest.hexdigest()}
    if held_out is not None:
        prints[VALIDATION]["held_out"] = held_out
    return prints


def hold_out(train: Split, fraction: float, seed: int) -> tuple[Split, Split, torch.Tensor]:
    """(the rest of `train`, the validation split, its indices in `train`): round(fraction x n) samples of each
    class of n, drawn with `seed`, the same on every machine; both keep the training split's order."""
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for label in range(len(train.class_names)):
        members = (train.labels == label).nonzero().flatten()
        take = round(fraction * len(members))
        chosen.append(members[torch.randperm(len(members), generator=generator)[:take]])
    indices = torch.cat(chosen).sort().values
    keep = torch.ones(len(train), dtype=torch.bool)
    keep[indices] = False
    if not len(indices) or not keep.any():
        raise DataError(f"--val-fraction {fraction}: holds out {len(indices)} of the {len(train)} training samples; "
                        "both splits need samples")
    rest = Split(train.images[keep], train.labels[keep], train.class_names)
    return rest, Split(train.images[indices], train.labels[indices], train.class_names), indices


def indices_digest(indices: torch.Tensor) -> str:
    """sha256 of sample indices (int64): which samples a split holds."""
    return hashlib.sha256(memoryview(indices.to(torch.int64).numpy())).hexdigest()


# ---------------------------------------------------------------- loaders


def train_loader(train: Split, batch_size: int, num_workers: int = 0, seed: int = 0) -> DataLoader:
    """A shuffling DataLoader over uint8 tensors; pixels are normalized later, on the device (4x less to copy)."""
    return DataLoader(TensorDataset(train.images, train.labels), batch_size=batch_size, shuffle=True,
                      generator=torch.Generator().manual_seed(seed), num_workers=num_workers,
                      worker_init_fn=ignore_ctrl_c)


def eval_loader(split: Split, batch_size: int, num_workers: int = 0) -> DataLoader:
    """A DataLoader over an evaluation split (test, validation), in order."""
    return DataLoader(TensorDataset(split.images, split.labels), batch_size=batch_size, num_workers=num_workers,
                      worker_init_fn=ignore_ctrl_c)


def ignore_ctrl_c(worker_id: int) -> None:
    """A loader worker leaves Ctrl-C (sent to the terminal's whole process group) to the training process,
    which stops at its next check: a worker that died of it would end the run with an error instead."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffle of `epoch`: Accelerate's seedable sampler's permutation, torch.randperm from seed + epoch
    on the CPU, the same on every process and for every world size."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))


class DeviceBatches:
    """The DataLoader path's batches for process `rank` of `world`, cut from tensors on the device (no
    collation, no copy per step): at step s process r takes positions [(s * world + r) * batch, +batch) of
    `epoch_order`."""

    def __init__(self, split: Split, batch_size: int, seed: int, rank: int, world: int, device: torch.device):
        self.images, self.labels = split.images.to(device), split.labels.to(device)
        self.n, self.batch_size, self.seed, self.rank, self.world = len(split), batch_size, seed, rank, world

    def __len__(self) -> int:
        return math.ceil(self.n / (self.world * self.batch_size))

    def epoch(self, epoch: int, start: int = 0):
        """Yield (images, labels) of this process's steps `start`, `start + 1`, ... of `epoch`."""
        order = epoch_order(self.n, self.seed, epoch).to(self.images.device)
        for step in range(start, len(self)):
            lo = min((step * self.world + self.rank) * self.batch_size, self.n)
            index = order[lo : min(lo + self.batch_size, self.n)]
            # index_select copies whole rows, where images[index] gathers element by element
            yield torch.index_select(self.images, 0, index), torch.index_select(self.labels, 0, index)


def eval_shard(split: Split, batch_size: int, rank: int, world: int, device: torch.device) -> list[tuple]:
    """Process `rank`'s contiguous share of an evaluation split (test, validation) as (images, labels) batches
    on the device: together the `world` shares hold every image once, with no padding."""
    per_process = math.ceil(len(split) / world)
    lo = min(rank * per_process, len(split))
    hi = min(lo + per_process, len(split))
    images, labels = split.images[lo:hi].to(device), split.labels[lo:hi].to(device)
    return [(images[i : i + batch_size], labels[i : i + batch_size]) for i in range(0, hi - lo, batch_size)]

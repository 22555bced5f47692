"""Test-set evaluation. Plain PyTorch: the caller passes the function that combines processes.

Either each batch's per-sample results go through `gather` (Accelerate's `gather_for_metrics`,
which drops the padding that evens out a DataLoader's shards), or each process evaluates its own
unpadded share (`data.eval_shard`) and `evaluate_shard` adds the totals up with `sum_over_processes`.
Either way each test image counts exactly once at any world size.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from .data import MEAN, STD, normalize
from .model import INPUT_SIZE


def _identity(x):
    return x


@torch.no_grad()
def evaluate_sums(model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                  gather: Callable = _identity, normalization: tuple[float, float] = (MEAN, STD)) -> dict:
    """Correct predictions, summed cross-entropy, sample count and the confusion matrix
    (`confusion[true][predicted]`, counts) over `batches` of uint8 images, normalized with
    `normalization` = (mean, std) as in training."""
    was_training = model.training
    model.eval()
    loss_sum, samples = 0.0, 0
    # the logits' width, from one blank image: a process whose share is empty still adds a matrix of that size
    blank = torch.zeros(1, INPUT_SIZE, device=next(model.parameters()).device)
    num_classes = model(blank).shape[1]
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64)
    for images, labels in batches:
        logits = model(normalize(images, *normalization)).float()
        # per-sample values, so that padded duplicates can be dropped by `gather`
        losses = F.cross_entropy(logits, labels, reduction="none")
        predicted, labels, losses = gather((logits.argmax(dim=1), labels, losses))
        confusion = confusion.to(labels.device) + torch.bincount(labels * num_classes + predicted,
                                                                 minlength=num_classes * num_classes)
        loss_sum = loss_sum + losses.double().sum()
        samples += len(labels)
    model.train(was_training)
    confusion = confusion.view(num_classes, num_classes).cpu()
    return {"correct": int(confusion.trace()), "loss_sum": float(loss_sum), "samples": samples,
            "confusion": confusion.tolist()}


def summarize(sums: dict) -> dict:
    """The scores (`config.SCORES`: mean loss, accuracy as a fraction 0..1), the samples, per-class accuracy
    and the confusion matrix, from `evaluate_sums`."""
    if sums["samples"] == 0:
        raise ValueError("evaluate: no test samples")
    per_class = [row[i] / sum(row) if sum(row) else None for i, row in enumerate(sums["confusion"])]
    return {"loss": sums["loss_sum"] / sums["samples"], "accuracy": sums["correct"] / sums["samples"],
            "samples": sums["samples"], "per_class_accuracy": per_class, "confusion_matrix": sums["confusion"]}


@torch.no_grad()
def predict(model: torch.nn.Module, images: torch.Tensor, normalization: tuple[float, float] = (MEAN, STD),
            batch_size: int = 4096) -> torch.Tensor:
    """Class probabilities [N, classes] for uint8 `images` [N, 784], in eval mode."""
    was_training = model.training
    model.eval()
    probs = [
        torch.softmax(model(normalize(images[i : i + batch_size], *normalization)).float(), dim=1)
        for i in range(0, len(images), batch_size)
    ]
    model.train(was_training)
    return torch.cat(probs)


def evaluate(model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
             gather: Callable = _identity, normalization: tuple[float, float] = (MEAN, STD)) -> dict:
    """Accuracy (fraction 0..1), mean cross-entropy loss and sample count over `batches` of uint8 images."""
    return summarize(evaluate_sums(model, batches, gather, normalization))


def evaluate_shard(model: torch.nn.Module, shard: list[tuple[torch.Tensor, torch.Tensor]],
                   normalization: tuple[float, float] = (MEAN, STD),
                   sum_over_processes: Callable = _identity) -> dict:
    """`evaluate` over every process's `data.eval_shard`: this process's totals, added up across
    processes by `sum_over_processes` (a tensor in, its sum over processes out)."""
    sums = evaluate_sums(model, shard, normalization=normalization)
    device = next(model.parameters()).device
    confusion = sum_over_processes(torch.tensor(sums["confusion"], dtype=torch.int64, device=device)).cpu()
    loss_sum = sum_over_processes(torch.tensor([sums["loss_sum"]], dtype=torch.float64, device=device)).item()
    return summarize({"correct": int(confusion.trace()), "loss_sum": loss_sum, "samples": int(confusion.sum()),
                      "confusion": confusion.tolist()})

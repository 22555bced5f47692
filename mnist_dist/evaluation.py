"""Test-set evaluation. Plain PyTorch: the caller passes `gather` to combine processes.

Each batch's per-sample results go through `gather` (Accelerate's `gather_for_metrics`
in a distributed run), which returns every process's samples with the padding that evens
out the shards removed, so each test image counts exactly once at any world size.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from .data import MEAN, STD, normalize


def _identity(x):
    return x


@torch.no_grad()
def evaluate_sums(
    model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    gather: Callable = _identity,
    normalization: tuple[float, float] = (MEAN, STD),
) -> dict:
    """Correct predictions, summed cross-entropy and sample count over `batches` of uint8 images,
    normalized with `normalization` = (mean, std) as in training."""
    was_training = model.training
    model.eval()
    correct, loss_sum, samples = 0, 0.0, 0
    for images, labels in batches:
        logits = model(normalize(images, *normalization)).float()
        # per-sample values, so that padded duplicates can be dropped by `gather`
        losses = F.cross_entropy(logits, labels, reduction="none")
        hits = (logits.argmax(dim=1) == labels).to(torch.int64)
        hits, losses = gather((hits, losses))
        correct = correct + hits.sum()
        loss_sum = loss_sum + losses.double().sum()
        samples += len(hits)
    model.train(was_training)
    return {"correct": int(correct), "loss_sum": float(loss_sum), "samples": samples}


def summarize(sums: dict) -> dict:
    """Accuracy (fraction 0..1) and mean loss from `evaluate_sums`' totals."""
    if sums["samples"] == 0:
        raise ValueError("evaluate: no test samples")
    return {"accuracy": sums["correct"] / sums["samples"], "loss": sums["loss_sum"] / sums["samples"],
            "samples": sums["samples"]}


def evaluate(
    model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    gather: Callable = _identity,
    normalization: tuple[float, float] = (MEAN, STD),
) -> dict:
    """Accuracy (fraction 0..1), mean cross-entropy loss and sample count over `batches` of uint8 images."""
    return summarize(evaluate_sums(model, batches, gather, normalization))

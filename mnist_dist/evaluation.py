"""Test-set evaluation. Plain PyTorch: the caller passes `gather` to combine processes.

Each batch's per-sample results go through `gather` (Accelerate's `gather_for_metrics`
in a distributed run), which returns every process's samples with the padding that evens
out the shards removed, so each test image counts exactly once at any world size.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from .data import normalize


def _identity(x):
    return x


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    gather: Callable = _identity,
) -> dict:
    """Accuracy (fraction 0..1), mean cross-entropy loss and sample count over `batches` of uint8 images."""
    was_training = model.training
    model.eval()
    correct = loss_sum = None
    samples = 0
    for images, labels in batches:
        logits = model(normalize(images)).float()
        # per-sample values, so that padded duplicates can be dropped by `gather`
        losses = F.cross_entropy(logits, labels, reduction="none")
        hits = (logits.argmax(dim=1) == labels).to(torch.int64)
        hits, losses = gather((hits, losses))
        correct = hits.sum() if correct is None else correct + hits.sum()
        loss_sum = losses.double().sum() if loss_sum is None else loss_sum + losses.double().sum()
        samples += len(hits)
    model.train(was_training)
    if samples == 0:
        raise ValueError("evaluate: no test samples")
    return {"accuracy": int(correct) / samples, "loss": float(loss_sum) / samples, "samples": samples}

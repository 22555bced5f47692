"""Pictures of a run: training curves, the confusion matrix, misclassified test digits. Plain PNG files.

matplotlib draws (`figure`: Agg, no display needed, safe on cluster nodes); torchvision's `make_grid`
lays out the digits. Every function writes one PNG and returns its path.
"""

from __future__ import annotations

from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torchvision.utils import make_grid

from . import atomic
from .data import IMAGE_SIDE
from .metrics import predict

DPI = 100  # pixels per inch of figure size


def figure(**kwargs) -> Figure:
    """A figure that Agg draws into files: no pyplot, so nothing changes the backend or the figures of a
    program (a notebook) that imports mnist_dist."""
    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> Path:
    path = Path(path)
    with atomic.replacing(path) as tmp:  # never a half-written picture
        fig.savefig(tmp, dpi=DPI, bbox_inches="tight", format="png")
    return path


def training_curves(history: list[dict], path: Path, title: str = "", label_smoothing: float = 0.0) -> Path:
    """Train and validation (else test) loss, and validation (else test) accuracy, per epoch, from
    results.json's `history`."""
    return _save(curves_figure(history, title, label_smoothing), path)


def curves_figure(history: list[dict], title: str = "", label_smoothing: float = 0.0):
    """The figure `training_curves` saves."""
    epochs = [h["epoch"] for h in history]
    split, name = ("val", "validation") if history and "val_accuracy" in history[0] else ("test", "test")
    # constrained layout keeps axis labels clear of their tick labels, however wide those are
    fig = figure(figsize=(10, 4), layout="constrained")
    loss_ax, acc_ax = fig.subplots(1, 2)
    # a smoothed training loss has a floor above zero: say so, or it reads as underfitting
    train_label = f"train (label smoothing {label_smoothing:g})" if label_smoothing else "train"
    loss_ax.plot(epochs, [h["train_loss"] for h in history], marker="o", label=train_label)
    loss_ax.plot(epochs, [h[f"{split}_loss"] for h in history], marker="o", label=name)
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy loss", title="loss")
    loss_ax.legend()
    acc_ax.plot(epochs, [100 * h[f"{split}_accuracy"] for h in history], marker="o", color="tab:green")
    acc_ax.set(xlabel="epoch", ylabel=f"{name} accuracy (%)", title=f"{name} accuracy")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        if len(epochs) <= 20:  # one tick per epoch, never a fraction of one
            ax.set_xticks(epochs)
            ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
        else:
            ax.xaxis.get_major_locator().set_params(integer=True)
    if title:
        fig.suptitle(title)
    return fig


def confusion_matrix(matrix: list[list[int]], class_names: list[str], path: Path, title: str = "") -> Path:
    """Counts of (true class, predicted class), with each class's accuracy beside its row."""
    counts = torch.tensor(matrix, dtype=torch.float64)
    n = len(class_names)
    fig = figure(figsize=(7.5, 6.5), layout="constrained")
    ax = fig.subplots()
    # colour by the fraction of the true class, so rare and common classes read alike
    fractions = counts / counts.sum(dim=1, keepdim=True).clamp(min=1)
    image = ax.imshow(fractions.numpy(), cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    for i in range(n):
        for j in range(n):
            if counts[i, j]:
                ax.text(j, i, f"{int(counts[i, j])}", ha="center", va="center", fontsize=8,
                        color="white" if fractions[i, j] > 0.5 else "black")
    labels = [name if len(name) <= 11 else name[:10] + "." for name in class_names]
    ax.set_xticks(range(n), labels, rotation=45, ha="right")
    ax.set_yticks(range(n), [f"{label}  {100 * fractions[i, i]:.1f}%" for i, label in enumerate(labels)])
    ax.set(xlabel="predicted", ylabel="true class and its accuracy")
    accuracy = counts.trace() / counts.sum()
    ax.set_title(f"{title}  accuracy {100 * accuracy:.2f}% of {int(counts.sum())}".strip())
    return _save(fig, path)


def misclassified_grid(split, predicted: torch.Tensor, path: Path, limit: int = 64, columns: int = 8) -> Path:
    """The first `limit` misclassified images of `split` (a `data.Split`) in a grid, each labelled predicted / true."""
    images, labels, class_names = split.images, split.labels, split.class_names
    wrong = (predicted != labels).nonzero().flatten()[:limit]
    side, pad = IMAGE_SIDE, 14  # pixels: the padding holds each tile's two-line label
    if len(wrong) == 0:
        fig = figure(figsize=(4, 1))
        ax = fig.subplots()
        ax.text(0.5, 0.5, "no misclassified test images", ha="center", va="center")
        ax.axis("off")
        return _save(fig, path)
    tiles = images[wrong].view(-1, 1, side, side)
    grid = make_grid(tiles, nrow=columns, padding=pad, pad_value=255)  # [3, H, W] uint8
    rows = -(-len(wrong) // columns)
    fig = figure(figsize=(1.4 * columns, 1.4 * rows + 0.4))
    ax = fig.subplots()
    ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
    for k, index in enumerate(wrong.tolist()):
        x = (k % columns) * (side + pad) + pad
        y = (k // columns) * (side + pad) + pad
        ax.text(x + side / 2, y - 1, f"{class_names[predicted[index]]}\n(true: {class_names[labels[index]]})",
                fontsize=8, color="crimson", ha="center", va="bottom", linespacing=1.1)
    ax.axis("off")
    ax.set_title(f"misclassified test images: predicted class, true class in brackets (first {len(wrong)})",
                 fontsize=11)
    return _save(fig, path)


def test_pictures(output_dir: Path, matrix: list[list[int]], model, test_set, stats: tuple[float, float],
                  title: str) -> dict[str, Path]:
    """confusion_matrix.png and misclassified.png of `model` on `test_set` (scaled by `stats`, as in training)."""
    predicted = predict(model, test_set.images.to(next(model.parameters()).device), stats).argmax(1).cpu()
    return {
        "confusion_matrix": confusion_matrix(matrix, test_set.class_names, output_dir / "confusion_matrix.png", title),
        "misclassified": misclassified_grid(test_set, predicted, output_dir / "misclassified.png"),
    }

"""--augment: a random affine transform of each training image (rotation, translation, scale), applied to
a whole batch at once on its device with torch's `affine_grid` and `grid_sample`. Plain PyTorch.

Each sample's transform is drawn from (--seed, epoch, the sample's index in the training split): a table
of uniform numbers per epoch, indexed by sample. So the DataLoader and device paths, any world size and
any batch cut, and a resume mid-epoch, transform a sample the same way. Test and validation images are
never augmented.
"""

from __future__ import annotations

import hashlib
import math

import torch
import torch.nn.functional as F

from .data import IMAGE_SIDE


def epoch_draws(n: int, seed: int, epoch: int) -> torch.Tensor:
    """[n, 4] uniform numbers in [0, 1) for the `n` training samples of `epoch`: rotation, x and y shift,
    scale. From a CPU generator seeded by a hash of (seed, epoch): the same on every machine."""
    key = int.from_bytes(hashlib.sha256(f"mnist_dist augment {seed} {epoch}".encode()).digest()[:8], "little")
    return torch.rand(n, 4, generator=torch.Generator().manual_seed(key))


def transform(pixels: torch.Tensor, draws: torch.Tensor, rotation: float, translation: float,
              scale: float) -> torch.Tensor:
    """`pixels` ([batch, 784], 0..1) turned by up to `rotation` degrees, shifted by up to `translation`
    pixels in x and y and scaled by up to 1 +- `scale`, each sample by its row of `draws` ([batch, 4]);
    what moves in from outside the image is black (0)."""
    if len(pixels) == 0:  # a process's share of an epoch's last step may be empty; affine_grid refuses that
        return pixels
    spread = 2 * draws - 1  # [-1, 1)
    angle = spread[:, 0] * math.radians(rotation)
    zoom = 1 + spread[:, 3] * scale
    shift = spread[:, 1:3] * translation * 2 / IMAGE_SIDE  # affine_grid's coordinates span 2 over the image
    # the grid says where each output pixel comes from: for out = A in + shift (A turns by `angle` and scales
    # by `zoom`), in = A^-1 out - A^-1 shift, so that the shift is the one drawn, whatever the turn
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    inverse = torch.stack([torch.stack([cos, sin], 1), torch.stack([-sin, cos], 1)], 1)  # [batch, 2, 2]
    theta = torch.cat([inverse, -(inverse @ shift.unsqueeze(2))], 2)
    images = pixels.view(-1, 1, IMAGE_SIDE, IMAGE_SIDE)
    grid = F.affine_grid(theta.to(pixels.dtype), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False).flatten(1)

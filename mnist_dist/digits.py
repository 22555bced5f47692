"""Turn an image file (PNG, JPEG, ...; any size and colour) into an MNIST-style 28x28 digit.

MNIST's digits were made like this (LeCun et al.): a white-on-black grayscale image, the digit
cropped to its bounding box, scaled with anti-aliasing so its longer side is 20 pixels (aspect
ratio kept), then placed in a 28x28 frame with its centre of mass at the centre. Pillow reads
the file; torch and torchvision do the rest. No model or training code.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import numpy as np
from PIL import Image, ImageOps
from torchvision.transforms.v2 import functional as TF

from .data import IMAGE_SIDE

DIGIT_BOX = 20  # pixels: the longer side of the digit inside the 28x28 frame, as in MNIST
BACKGROUNDS = ("auto", "dark", "light")
THRESHOLD = 0.1 * 255  # ink level that counts towards the digit's bounding box (fainter: noise, paper grain)
# pixels an image may have (a 40-megapixel camera's photo); decoded, each costs about 10 bytes here
MAX_PIXELS = 40_000_000


class ImageError(ValueError):
    """An image file that cannot be read or holds no digit; the message names the file."""


def read_gray(path: str | Path) -> torch.Tensor:
    """The image at `path` as uint8 grayscale [H, W]; transparent pixels become white paper."""
    path = Path(path)
    if path.is_dir():
        raise ImageError(f"{path}: a directory; give the image files in it ({path / '*.png'}, say)")
    if not path.exists():
        raise ImageError(f"{path}: no such file")
    if not path.is_file():  # a FIFO would block the read, a device (/dev/zero) never end it
        raise ImageError(f"{path}: not a regular file (a pipe, a device or a socket); give an image file")
    try:
        with warnings.catch_warnings():  # Pillow's bomb warning (89 MP): MAX_PIXELS is tighter and an error
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)  # reads the header only
    except (OSError, ValueError, Image.DecompressionBombError):
        raise ImageError(f"{path}: not a readable image (PNG, JPEG, GIF, WebP, BMP or TIFF expected)") from None
    with image:
        if image.width * image.height > MAX_PIXELS:
            raise ImageError(f"{path}: {image.width}x{image.height} pixels, more than the {MAX_PIXELS / 1e6:.0f} "
                             "megapixels read; scale it down first")
        try:
            image = ImageOps.exif_transpose(image)  # phone photos: upright as a viewer shows them
            image = image.convert("LA")  # luminance + alpha, whatever the mode (RGB, palette, 16-bit, ...)
        except (OSError, ValueError) as err:
            raise ImageError(f"{path}: a damaged image ({err})") from None
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy())  # [H, W, 2]
    gray, alpha = pixels[..., 0], pixels[..., 1] / 255
    # a drawing on a transparent canvas: composite onto white, as it looks in a viewer
    return (gray * alpha + 255 * (1 - alpha)).round().to(torch.uint8)


def to_mnist(gray: torch.Tensor, background: str = "auto", source: str = "image") -> torch.Tensor:
    """uint8 [H, W] -> uint8 [784]: white digit on black, cropped, scaled to 20 px, centred by mass.

    `background`: 'dark' (white digit on black, like MNIST), 'light' (dark ink on paper: inverted),
    or 'auto' (light when the image's border is mostly bright).
    """
    if background not in BACKGROUNDS:
        raise ValueError(f"background={background!r}: choose one of {', '.join(BACKGROUNDS)}")
    image = gray.float()
    border = torch.cat([image[0], image[-1], image[:, 0], image[:, -1]])
    if background == "light" or (background == "auto" and border.median() > 127):
        image, border = 255 - image, 255 - border
    image = (image - border.median()).clamp(min=0)  # the paper's own grey level becomes black
    if image.max() < 32:  # nothing stands out of the background by more than an eighth of the range
        raise ImageError(f"{source}: no digit found (the image is blank at this contrast; try --background)")
    image = image * (255 / image.max())
    rows, cols = (image > THRESHOLD).nonzero(as_tuple=True)
    box = image[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    height, width = box.shape
    scale = DIGIT_BOX / max(height, width)
    size = [max(1, round(height * scale)), max(1, round(width * scale))]
    box = TF.resize(box[None], size, antialias=True)[0].clamp(0, 255)
    # place the box so that its centre of mass lands on the frame's centre (clamped inside the frame)
    total = box.sum()
    ys, xs = torch.arange(size[0], dtype=torch.float32), torch.arange(size[1], dtype=torch.float32)
    com_y, com_x = (box.sum(1) * ys).sum() / total, (box.sum(0) * xs).sum() / total
    top = int(round(IMAGE_SIDE / 2 - com_y.item()))  # MNIST: centre of mass at pixel (14, 14)
    left = int(round(IMAGE_SIDE / 2 - com_x.item()))
    top, left = min(max(top, 0), IMAGE_SIDE - size[0]), min(max(left, 0), IMAGE_SIDE - size[1])
    frame = torch.zeros(IMAGE_SIDE, IMAGE_SIDE)
    frame[top : top + size[0], left : left + size[1]] = box
    return frame.round().to(torch.uint8).flatten()


def load_digit(path: str | Path, background: str = "auto") -> torch.Tensor:
    """The image file at `path` as an MNIST-style uint8 [784] digit."""
    return to_mnist(read_gray(path), background, source=str(path))

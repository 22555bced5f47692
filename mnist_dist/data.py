"""MNIST-format data as uint8 tensors, from IDX files, the Hugging Face Hub or the bundled mnist-5k.

Every source is decoded once into `images` uint8 [N, 784] and `labels` int64 [N], checked, and
cached on disk as safetensors. Plain PyTorch: the training loop decides which process builds the
cache, and passes a process's rank and the world size where a shard is cut.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import socket
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, TensorDataset

HUB_IDS = {"mnist": "ylecun/mnist", "fashion_mnist": "zalando-datasets/fashion_mnist"}
BUNDLED_DIRS = {"mnist-5k": Path(__file__).parent / "datasets" / "mnist-5k"}
CLASS_NAMES = {"fashion_mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                                  "Sneaker", "Bag", "Ankle boot"]}
IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
IMAGE_SIDE = 28  # pixels
NUM_CLASSES = 10
# pixels go uint8 [0, 255] -> [0, 1] -> (x - MEAN) / STD, i.e. [-1, 1]
MEAN, STD = 0.5, 0.5
CACHE_FORMAT = 1  # bump when the cached layout changes
# the largest IDX payload read (EMNIST's biggest split is 0.5 GiB); a header promising more is refused
MAX_IDX_BYTES = 2 * 2**30


class DataError(ValueError):
    """Data that cannot be used; the message names the file, directory or dataset."""


@dataclass(frozen=True)
class Split:
    images: torch.Tensor  # uint8 [N, 784]
    labels: torch.Tensor  # int64 [N]

    def __len__(self) -> int:
        return len(self.labels)


def class_names(dataset: str) -> list[str]:
    return CLASS_NAMES.get(dataset, [str(i) for i in range(NUM_CLASSES)])


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


# ---------------------------------------------------------------- IDX files


def _open(path: Path):
    """The file at `path` as a binary stream, inflated on the fly when it is gzip (whatever its name)."""
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gzipped else open(path, "rb")


def _read_exactly(stream, out: memoryview, path: Path) -> None:
    filled = 0
    while filled < len(out):
        n = stream.readinto(out[filled:])
        if not n:
            raise DataError(f"{path}: truncated or corrupt: its header promises {len(out)} bytes of data, it holds {filled}")
        filled += n


def read_idx(path: str | Path, ndim: int) -> torch.Tensor:
    """Read an IDX file of unsigned bytes with `ndim` dimensions (3 for images, 1 for labels). Not
    torchvision's reader: every failure names the file and the problem, and memory stays bounded by
    what the header promises (a gzip that inflates past it is refused without inflating the rest)."""
    path = Path(path)
    expected_magic = 0x0800 | ndim  # 0x00 0x00, type 0x08 (unsigned byte), number of dimensions
    try:
        with _open(path) as stream:
            header = stream.read(4 + 4 * ndim)
            magic = int.from_bytes(header[:4], "big") if len(header) >= 4 else None
            if magic != expected_magic:
                found = f"0x{magic:08x}" if magic is not None else f"only {len(header)} bytes"
                raise DataError(f"{path}: wrong IDX magic number {found}, expected 0x{expected_magic:08x} (unsigned "
                                f"bytes, {ndim} dimension{'s' if ndim > 1 else ''}); is this the right file?")
            if len(header) < 4 + 4 * ndim:
                raise DataError(f"{path}: truncated IDX header ({len(header)} bytes)")
            dims = struct.unpack(f">{ndim}I", header[4:])
            if ndim == 3 and dims[1:] != (IMAGE_SIDE, IMAGE_SIDE):
                raise DataError(f"{path}: images of {dims[1]}x{dims[2]} pixels, expected 28x28")
            size = math.prod(dims)
            if size > MAX_IDX_BYTES:
                raise DataError(f"{path}: its header promises {size / 2**30:.1f} GiB of data (shape {tuple(dims)}), "
                                f"more than the {MAX_IDX_BYTES / 2**30:.0f} GiB an MNIST-like split can need")
            out = torch.empty(size, dtype=torch.uint8)
            _read_exactly(stream, memoryview(out.numpy()), path)
            if stream.read(1):
                raise DataError(f"{path}: holds more data than its header {tuple(dims)} promises ({size} bytes); "
                                "refused without reading the rest")
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise DataError(f"{path}: corrupt or truncated gzip file ({err})") from err
    except OSError as err:
        raise DataError(f"{path}: cannot read it ({err.strerror or err})") from err
    return out.reshape(dims)


def find_idx_files(data_dir: str | Path) -> dict[str, tuple[Path, Path]]:
    """Locate the four standard IDX files (gzip or not) in DIR, DIR/MNIST/raw or DIR/FashionMNIST/raw."""
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"--data-dir {root}: no such directory")
    places = [root, root / "MNIST" / "raw", root / "FashionMNIST" / "raw"]
    found = {}
    for split, names in IDX_FILES.items():
        paths = []
        for name in names:
            candidates = [place / (name + ext) for place in places for ext in ("", ".gz")]
            path = next((c for c in candidates if c.is_file()), None)
            if path is None:
                raise DataError(f"--data-dir {root}: missing {name} (or {name}.gz); looked in {', '.join(map(str, places))}")
            paths.append(path)
        found[split] = tuple(paths)
    return found


def check_split(images: torch.Tensor, labels: torch.Tensor, source: str) -> Split:
    """Validate decoded images [N, 28, 28] and labels [N]; return them flattened as a Split."""
    if images.ndim != 3 or tuple(images.shape[1:]) != (IMAGE_SIDE, IMAGE_SIDE):
        raise DataError(f"{source}: images have shape {tuple(images.shape)}, expected [N, 28, 28]")
    if len(images) != len(labels):
        raise DataError(f"{source}: {len(images)} images but {len(labels)} labels")
    if len(labels) == 0:
        raise DataError(f"{source}: no samples")
    labels = labels.to(torch.int64)
    bad = (labels < 0) | (labels >= NUM_CLASSES)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise DataError(f"{source}: label {int(labels[i])} at index {i} is outside 0-{NUM_CLASSES - 1}")
    return Split(images.reshape(len(images), -1).to(torch.uint8).contiguous(), labels.contiguous())


def load_idx(files: dict[str, tuple[Path, Path]]) -> dict[str, Split]:
    splits = {}
    for split, (images_path, labels_path) in files.items():
        images, labels = read_idx(images_path, 3), read_idx(labels_path, 1)
        splits[split] = check_split(images, labels, f"{images_path} + {labels_path}")
    return splits


# ---------------------------------------------------------------- Hugging Face Hub


def load_hub(path: str) -> dict[str, Split]:
    """Load a dataset with `image` and `label` columns through `datasets.load_dataset`."""
    import datasets  # slow to import; only this path needs it

    try:
        dataset = datasets.load_dataset(path)
    except ConnectionError as err:  # also what offline mode (HF_HUB_OFFLINE=1) raises
        raise DataError(
            f"cannot reach the Hugging Face Hub for {path!r} ({err}). To train offline, pass "
            f"--data-dir DIR with the four MNIST-format IDX files, or --dataset mnist-5k (bundled)."
        ) from err
    except Exception as err:
        raise DataError(f"could not load dataset {path!r}: {type(err).__name__}: {err}") from err
    splits = {}
    for split in IDX_FILES:
        if split not in dataset:
            raise DataError(f"dataset {path!r} has no {split!r} split (it has: {', '.join(dataset)})")
        columns = dataset[split].with_format("numpy")[:]
        if "image" not in columns or "label" not in columns:
            raise DataError(f"dataset {path!r}[{split}] needs 'image' and 'label' columns, has {list(columns)}")
        images, labels = torch.from_numpy(columns["image"]), torch.from_numpy(columns["label"])
        splits[split] = check_split(images, labels, f"{path}[{split}]")
    return splits


# ---------------------------------------------------------------- cache


def default_cache_dir() -> Path:
    if os.environ.get("MNIST_DIST_CACHE"):
        return Path(os.environ["MNIST_DIST_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mnist_dist"


def _files_identity(files: dict[str, tuple[Path, Path]]) -> list:
    # path, size and mtime: a replaced or edited file gets a new cache entry
    return [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for pair in files.values() for p in pair]


def _read_cache(path: Path) -> dict[str, Split] | None:
    try:
        tensors = load_file(path)
        # checked like freshly decoded data: a cache that was tampered with is never trained on
        return {s: check_split(tensors[f"{s}_images"].view(-1, IMAGE_SIDE, IMAGE_SIDE), tensors[f"{s}_labels"],
                               f"{path} [{s}]") for s in IDX_FILES}
    except FileNotFoundError:
        return None
    except (SafetensorError, KeyError, OSError, RuntimeError, DataError) as err:
        print(f"mnist_dist: ignoring unreadable cache file {path} ({err}); rebuilding it")
        return None


def _write_cache(path: Path, splits: dict[str, Split]) -> None:
    tensors = {}
    for s, split in splits.items():
        tensors[f"{s}_images"], tensors[f"{s}_labels"] = split.images, split.labels
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # write-then-rename: a reader never sees a half-written cache file
        # host and pid in the name: nodes sharing a file system may build the same entry at once
        tmp = path.with_name(f"{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
        try:
            save_file(tensors, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as err:
        print(f"mnist_dist: warning: could not write the dataset cache {path} ({err}); the next run decodes again")


def load_splits(dataset: str, data_dir: str | None = None, cache_dir: str | Path | None = None) -> dict[str, Split]:
    """The train and test splits of `dataset` (or of the IDX files in `data_dir`), cached on disk."""
    if data_dir is not None or dataset in BUNDLED_DIRS:
        files = find_idx_files(data_dir if data_dir is not None else BUNDLED_DIRS[dataset])
        identity, build = _files_identity(files), lambda: load_idx(files)
    elif dataset in HUB_IDS:
        identity, build = f"hub:{HUB_IDS[dataset]}", lambda: load_hub(HUB_IDS[dataset])
    else:
        raise DataError(f"--dataset {dataset!r}: unknown; choose one of {', '.join([*HUB_IDS, *BUNDLED_DIRS])}")
    key = hashlib.sha256(json.dumps([CACHE_FORMAT, identity]).encode()).hexdigest()[:16]
    cache_file = Path(cache_dir or default_cache_dir()) / f"{dataset}-{key}.safetensors"
    splits = _read_cache(cache_file)
    if splits is None:
        splits = build()  # said once it worked: an unreachable Hub says so itself, nothing was decoded
        _write_cache(cache_file, splits)
        print(f"mnist_dist: decoded {dataset if data_dir is None else data_dir} into {cache_file}", flush=True)
    return splits


def fingerprint(splits: dict[str, Split]) -> dict:
    """What a checkpoint records of its data: each split's size and the sha256 of its decoded tensors."""
    prints = {}
    for name, split in splits.items():
        digest = hashlib.sha256(memoryview(split.images.numpy()))
        digest.update(memoryview(split.labels.numpy()))
        prints[name] = {"samples": len(split), "sha256": digest.hexdigest()}
    return prints


# ---------------------------------------------------------------- loaders


def make_loaders(train: Split, test: Split, batch_size: int, eval_batch_size: int, num_workers: int = 0,
                 seed: int = 0) -> tuple[DataLoader, DataLoader]:
    """Plain DataLoaders over uint8 tensors; pixels are normalized later, on the device (4x less to copy)."""
    train_loader = DataLoader(TensorDataset(train.images, train.labels), batch_size=batch_size, shuffle=True,
                              generator=torch.Generator().manual_seed(seed), num_workers=num_workers)
    test_loader = DataLoader(TensorDataset(test.images, test.labels), batch_size=eval_batch_size,
                             num_workers=num_workers)
    return train_loader, test_loader


class DeviceBatches:
    """The DataLoader path's batches for process `rank` of `world`, cut from tensors on the device (no
    collation, no copy per step): Accelerate's seedable sampler's permutation (torch.randperm from seed +
    epoch, on the CPU), and at step s process r takes positions [(s * world + r) * batch, +batch) of it."""

    def __init__(self, split: Split, batch_size: int, seed: int, rank: int, world: int, device: torch.device):
        self.images, self.labels = split.images.to(device), split.labels.to(device)
        self.n, self.batch_size, self.seed, self.rank, self.world = len(split), batch_size, seed, rank, world

    def __len__(self) -> int:
        return math.ceil(self.n / (self.world * self.batch_size))

    def epoch(self, epoch: int, start: int = 0):
        """Yield (images, labels) of this process's steps `start`, `start + 1`, ... of `epoch`."""
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))
        order = order.to(self.images.device)
        for step in range(start, len(self)):
            lo = min((step * self.world + self.rank) * self.batch_size, self.n)
            index = order[lo : min(lo + self.batch_size, self.n)]
            # index_select copies whole rows, where images[index] gathers element by element
            yield torch.index_select(self.images, 0, index), torch.index_select(self.labels, 0, index)


def test_shard(split: Split, batch_size: int, rank: int, world: int, device: torch.device) -> list[tuple]:
    """Process `rank`'s contiguous share of the test set as (images, labels) batches on the device:
    together the `world` shares hold every test image once, with no padding."""
    per_process = math.ceil(len(split) / world)
    lo = min(rank * per_process, len(split))
    hi = min(lo + per_process, len(split))
    images, labels = split.images[lo:hi].to(device), split.labels[lo:hi].to(device)
    return [(images[i : i + batch_size], labels[i : i + batch_size]) for i in range(0, hi - lo, batch_size)]

"""Where MNIST-like data comes from: IDX files (a --data-dir, the bundled mnist-5k), or any 28x28
grayscale dataset that Hugging Face `datasets` reads (a Hub id, a Hub-layout directory, a save_to_disk
directory). Every source is decoded once into a `data.Split` (uint8 images [N, 784], int64 labels [N]),
checked, and cached on disk as safetensors; `load_splits` is the way in.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import math
import os
import re
import socket
import struct
import zlib
from pathlib import Path
import urllib.request
from urllib.parse import urlparse

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import atomic
from .config import MAX_CLASSES
from .readback import parse_json, read_json
from .data import DIGITS, IMAGE_SIDE, VALIDATION, DataError, Split

HUB_IDS = {"mnist": "ylecun/mnist", "fashion_mnist": "zalando-datasets/fashion_mnist"}
BUNDLED_DIRS = {"mnist-5k": Path(__file__).parent / "datasets" / "mnist-5k"}
CLASS_NAMES = {"fashion_mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                                  "Sneaker", "Bag", "Ankle boot"]}
# sha256 of each published test set's 10,000 labels (int64, file order): which dataset a --data-dir holds
KNOWN_TEST_LABELS = {
    "2fd8de6bdb8d11780b4b96dc57847bcfe6953f7c32aa48bfcd8237c3b7847243": "mnist",  # mnist-5k's test set too
    "d51d859896c55775b9e9e219b77ff03bcec1b6ac322f313544dc3f9e7bc94fae": "fashion_mnist",
}
IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
CACHE_FORMAT = 3  # bump when the cached layout changes
# the largest split read (EMNIST's biggest is 0.5 GiB of pixels); a header or dataset promising more is refused
MAX_IDX_BYTES = 2 * 2**30
HUB_PROBE_SECONDS = 3  # how long to wait for the Hub's address to answer before working offline


# ---------------------------------------------------------------- IDX files


def _open(path: Path):
    """The file at `path` as a binary stream, inflated on the fly when it is gzip (whatever its name)."""
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gzipped else open(path, "rb")


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
            filled = stream.readinto(memoryview(out.numpy()))  # buffered: reads until full or the end
            if filled < size:
                raise DataError(f"{path}: truncated or corrupt: its header promises {size} bytes of data, it holds {filled}")
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


def check_split(images: torch.Tensor, labels: torch.Tensor, source: str, class_names=DIGITS) -> Split:
    """Validate decoded images [N, 28, 28] and labels [N] in 0..len(class_names) - 1; return them flattened."""
    if images.ndim != 3 or tuple(images.shape[1:]) != (IMAGE_SIDE, IMAGE_SIDE):
        raise DataError(f"{source}: images have shape {tuple(images.shape)}, expected [N, 28, 28]")
    if len(images) != len(labels):
        raise DataError(f"{source}: {len(images)} images but {len(labels)} labels")
    if len(labels) == 0:
        raise DataError(f"{source}: no samples")
    if len(class_names) > MAX_CLASSES:  # before training: the evaluation's confusion matrix is classes^2
        raise DataError(f"{source}: {len(class_names):,} classes; mnist_dist trains on at most {MAX_CLASSES:,}")
    labels = labels.to(torch.int64)
    bad = (labels < 0) | (labels >= len(class_names))
    if bad.any():
        i = int(bad.nonzero()[0])
        if labels[i] == -1:  # ClassLabel's "no label"
            raise DataError(f"{source}: sample {i} has no label (-1); training and testing need every sample labelled")
        raise DataError(f"{source}: label {int(labels[i])} at index {i} is outside 0-{len(class_names) - 1}")
    return Split(images.reshape(len(images), -1).to(torch.uint8).contiguous(), labels.contiguous(),
                 tuple(class_names))


def load_idx(files: dict[str, tuple[Path, Path]], class_names=DIGITS) -> dict[str, Split]:
    splits = {}
    for split, (images_path, labels_path) in files.items():
        images, labels = read_idx(images_path, 3), read_idx(labels_path, 1)
        splits[split] = check_split(images, labels, f"{images_path} + {labels_path}", class_names)
    return splits


# ---------------------------------------------------------------- Hugging Face datasets


def open_hf(source: str, local: bool):
    """The DatasetDict at `source`: a save_to_disk directory, another local directory `datasets` reads (a
    Hub download holding parquet files, say), or a Hub id, read offline from a local copy when the Hub
    cannot be reached."""
    import datasets  # slow to import; only this path needs it

    offline = None if local else hub_unreachable()
    try:
        if offline is None:
            saved = (datasets.config.DATASETDICT_JSON_FILENAME, datasets.config.DATASET_STATE_JSON_FILENAME)
            if local and any((Path(source) / name).is_file() for name in saved):  # save_to_disk's output
                check_saved_splits(source, datasets.config.DATASET_STATE_JSON_FILENAME)
                return datasets.load_from_disk(source)
            return datasets.load_dataset(source)
        snapshot = hub_snapshot(source)
        if snapshot is not None:
            print(f"mnist_dist: {offline}; reading {source!r} from its download in {snapshot}", flush=True)
            return datasets.load_dataset(snapshot)
        if datasets.config.HF_HUB_OFFLINE:  # offline mode: what datasets itself has cached, if anything
            with contextlib.suppress(ConnectionError, FileNotFoundError):
                return datasets.load_dataset(source)
    except DataError:
        raise
    except Exception as err:
        raise DataError(f"--dataset {source}: could not load it ({type(err).__name__}: {err}); the names built in are "
                        f"{', '.join([*HUB_IDS, *BUNDLED_DIRS])}") from err
    raise DataError(
        f"cannot reach the Hugging Face Hub for {source!r} ({offline}) and there is no copy of it on this machine "
        f"(nor a directory of that name). To train offline: on a machine with a network run `hf download {source} "
        "--repo-type dataset --local-dir DIR` and pass --dataset DIR; "
        + ("" if datasets.config.HF_HUB_OFFLINE else "or set HF_HUB_OFFLINE=1 to use what `datasets` has cached; ")
        + "or pass --data-dir DIR with the four MNIST-format IDX files; or --dataset mnist-5k (bundled).")


def check_saved_splits(source: str, state_name: str) -> None:
    """Refuse a save_to_disk directory with an empty split by name (`datasets` fails on it with an IndexError)."""
    empty = []
    for state in sorted(Path(source).glob(f"*/{state_name}")):
        with contextlib.suppress(OSError, ValueError, AttributeError):  # unreadable: `datasets` says why
            if not read_json(state).get("_data_files"):
                empty.append(state.parent.name)
    if empty:
        raise DataError(f"--dataset {source}: its {' and '.join(map(repr, empty))} split holds no samples; training "
                        "and testing need both splits")


def hub_unreachable() -> str | None:
    """Why the Hub cannot be reached ('HF_HUB_OFFLINE is set', a connection error), or None if it answers.
    One connection attempt: without it, huggingface_hub retries for ~25 s before giving up."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    url = urlparse(constants.ENDPOINT)
    if urllib.request.getproxies().get(url.scheme) and not urllib.request.proxy_bypass(url.hostname):
        return None  # only the proxy knows: leave it to huggingface_hub
    try:
        socket.create_connection((url.hostname, url.port or {"http": 80}.get(url.scheme, 443)),
                                 timeout=HUB_PROBE_SECONDS).close()
    except OSError as err:
        return f"{url.hostname} does not answer ({err.strerror or err})"
    return None


def hub_snapshot(repo_id: str) -> str | None:
    """The directory of `repo_id`'s dataset files in the Hub cache (what `hf download` fills), or None."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(repo_id, repo_type="dataset", local_files_only=True)
    except (LocalEntryNotFoundError, ValueError):  # ValueError: not a valid repo id
        return None


def find_columns(features, image_column: str | None, label_column: str | None, source: str) -> tuple[str, str]:
    """The image and label columns: the ones named, else the only `Image` and the only `ClassLabel` column."""
    import datasets

    chosen = []
    for named, kind, flag in ((image_column, datasets.Image, "--image-column"),
                              (label_column, datasets.ClassLabel, "--label-column")):
        found = [named] if named else [k for k, f in features.items() if isinstance(f, kind)]
        if len(found) != 1 or found[0] not in features:
            what = f"no column {named!r}" if named else f"{len(found)} {kind.__name__} columns"
            columns = ", ".join(f"{k} ({type(f).__name__})" for k, f in features.items())
            raise DataError(f"--dataset {source}: {what}; its columns are {columns}; name the one to use with {flag}")
        chosen.append(found[0])
    return chosen[0], chosen[1]


def hf_class_names(splits, label_column: str, labels: dict[str, torch.Tensor], source: str) -> tuple[str, ...]:
    """Class names from the label column's ClassLabel, else '0'..'K-1' for integer `labels` up to K - 1."""
    named = [tuple(getattr(s.features[label_column], "names", ())) for s in splits.values()]
    if named[0] != named[1]:
        raise DataError(f"--dataset {source}: the splits' {label_column!r} classes differ ({len(named[0])} and "
                        f"{len(named[1])} names)")
    if named[0]:
        return named[0]
    top = max((int(x.max()) for x in labels.values() if len(x)), default=-1)
    if top + 1 > MAX_CLASSES:  # checked before a name is made for each class: a label of 10**9 is no 10**9 names
        raise DataError(f"--dataset {source}: label {top:,} in column {label_column!r} makes {top + 1:,} classes; "
                        f"mnist_dist trains on at most {MAX_CLASSES:,}")
    return tuple(str(i) for i in range(top + 1))


def decode_images(split, column: str, source: str) -> torch.Tensor:
    """The 28x28 grayscale images of `column` as uint8 [N, 28, 28]. Each image's size and mode are read
    from its header before it is decoded: a huge image is refused without decoding it."""
    import datasets
    from PIL import Image

    if len(split) * IMAGE_SIDE**2 > MAX_IDX_BYTES:
        raise DataError(f"{source}: {len(split)} images, more than an MNIST-like split can hold in memory")
    out = torch.empty(len(split), IMAGE_SIDE, IMAGE_SIDE, dtype=torch.uint8)
    if not isinstance(split.features[column], datasets.Image):  # arrays, say from save_to_disk
        for lo in range(0, len(split), 10_000):
            try:
                batch = torch.as_tensor(column_values(split.select(range(lo, min(lo + 10_000, len(split)))), column))
            except (TypeError, ValueError) as err:  # ragged lists, strings
                raise DataError(f"{source}: column {column!r} holds no 28x28 pixel arrays ({err})") from err
            out[lo : lo + len(batch)] = check_array(batch, column, source)
        return out
    encoded = split.cast_column(column, datasets.Image(decode=False))
    for i, item in enumerate(encoded[column]):
        try:
            with Image.open(io.BytesIO(item["bytes"]) if item["bytes"] else item["path"]) as image:
                if image.size != (IMAGE_SIDE, IMAGE_SIDE) or image.mode != "L":
                    raise DataError(f"{source}: column {column!r} image {i} is {image.size[0]}x{image.size[1]} "
                                    f"{image.mode}; expected 28x28 grayscale (mode L)")
                out[i] = torch.from_numpy(np.array(image))
        except (OSError, Image.DecompressionBombError) as err:
            raise DataError(f"{source}: column {column!r} image {i} cannot be decoded ({err})") from err
    return out


def check_array(batch: torch.Tensor, column: str, source: str) -> torch.Tensor:
    if batch.ndim != 3 or tuple(batch.shape[1:]) != (IMAGE_SIDE, IMAGE_SIDE) or batch.dtype.is_floating_point:
        raise DataError(f"{source}: column {column!r} holds {batch.dtype} arrays of shape {tuple(batch.shape[1:])}; "
                        "expected 28x28 integer pixels 0..255")
    if batch.min() < 0 or batch.max() > 255:
        raise DataError(f"{source}: column {column!r} has pixel values outside 0..255")
    return batch.to(torch.uint8)


def load_hf(source: str, local: bool, image_column: str | None = None, label_column: str | None = None
            ) -> dict[str, Split]:
    """The train and test splits of the `datasets` dataset at `source` (see `open_hf`), and its validation
    split if it has one."""
    dataset = open_hf(source, local)
    if not hasattr(dataset, "keys"):  # one Dataset, saved without its splits
        raise DataError(f"--dataset {source}: one split of {len(dataset)} rows; a DatasetDict with train and test is needed")
    missing = [s for s in IDX_FILES if s not in dataset]
    if missing:
        raise DataError(f"--dataset {source}: no {' or '.join(missing)} split (it has: {', '.join(dataset)})")
    dataset = {s: dataset[s] for s in (*IDX_FILES, VALIDATION) if s in dataset}
    found = {s: find_columns(split.features, image_column, label_column, f"{source}[{s}]") for s, split in dataset.items()}
    if len(set(found.values())) > 1:
        raise DataError(f"--dataset {source}: its splits' columns differ ({', '.join(f'{s} {c}' for s, c in found.items())}); "
                        "name them with --image-column and --label-column")
    image_column, label_column = found["train"]
    # labels first: they are cheap, and a wrong label column is refused before any image is decoded
    labels = {s: decode_labels(split, label_column, f"{source}[{s}]") for s, split in dataset.items()}
    names = hf_class_names(dataset, label_column, labels, source)
    return {s: check_split(decode_images(split, image_column, f"{source}[{s}]"), labels[s], f"{source}[{s}]", names)
            for s, split in dataset.items()}


def column_values(split, column: str) -> np.ndarray:
    return split.select_columns([column]).with_format("numpy")[:][column]


def decode_labels(split, column: str, source: str) -> torch.Tensor:
    labels = column_values(split, column)
    if labels.dtype.kind not in "iu":
        raise DataError(f"{source}: label column {column!r} holds {labels.dtype} values; expected integer class indices")
    return torch.from_numpy(labels.astype(np.int64))


# ---------------------------------------------------------------- cache


def default_cache_dir() -> Path:
    if os.environ.get("MNIST_DIST_CACHE"):
        return Path(os.environ["MNIST_DIST_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mnist_dist"


def _files_identity(files: dict[str, tuple[Path, Path]]) -> list:
    # path, size and mtime: a replaced or edited file gets a new cache entry
    return [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for pair in files.values() for p in pair]


def _tree_identity(root: Path) -> list:
    """Path, size and mtime of every file under `root` (a local dataset), in a stable order."""
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    return [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def _read_cache(path: Path) -> dict[str, Split] | None:
    try:
        with safe_open(path, "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            names = parse_json(f.metadata()["class_names"], f"{path}'s class names")
        # checked like freshly decoded data: a cache that was tampered with is never trained on
        return {s: check_split(tensors[f"{s}_images"].view(-1, IMAGE_SIDE, IMAGE_SIDE), tensors[f"{s}_labels"],
                               f"{path} [{s}]", names)
                for s in (*IDX_FILES, VALIDATION) if s in IDX_FILES or f"{s}_images" in tensors}
    except FileNotFoundError:
        return None
    except (SafetensorError, KeyError, TypeError, ValueError, OSError, RuntimeError) as err:
        print(f"mnist_dist: ignoring unreadable cache file {path} ({err}); rebuilding it")
        return None


def _write_cache(path: Path, splits: dict[str, Split]) -> bool:
    """Save decoded `splits` at `path`; whether it worked (a failure is a warning: the run goes on)."""
    tensors = {}
    for s, split in splits.items():
        tensors[f"{s}_images"], tensors[f"{s}_labels"] = split.images, split.labels
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # shared: nodes sharing a file system may build the same entry at once
        with atomic.replacing(path, shared=True) as tmp:
            save_file(tensors, tmp, metadata={"class_names": json.dumps(splits["train"].class_names)})
        return True
    except (OSError, SafetensorError) as err:  # safetensors reports a read-only directory as its own error
        print(f"mnist_dist: warning: could not write the dataset cache {path} ({err}); the next run decodes again")
        return False


def dataset_source(dataset: str) -> tuple[str, bool]:
    """(what `datasets` loads for --dataset, whether it is a local directory): a built-in name's Hub id, an
    existing directory made absolute, or a Hub id."""
    if dataset in HUB_IDS or dataset in BUNDLED_DIRS:  # the names built in win over directories so named
        return HUB_IDS.get(dataset, dataset), False
    path = Path(dataset).expanduser()
    if path.is_file():
        raise DataError(f"--dataset {dataset}: a file; pass the directory that holds the dataset's files")
    if path.is_dir():
        return str(path.resolve()), True
    if dataset.startswith(("/", ".", "~")) or dataset.count("/") > 1:  # not a Hub id either
        raise DataError(f"--dataset {dataset}: no such directory")
    return dataset, False


def load_splits(dataset: str, data_dir: str | None = None, cache_dir: str | Path | None = None,
                image_column: str | None = None, label_column: str | None = None) -> dict[str, Split]:
    """The train and test splits of `dataset` (or of the IDX files in `data_dir`), and its validation split
    if it has one, cached on disk.
    `dataset`: mnist, fashion_mnist, mnist-5k, a local directory or a Hub id (see `open_hf`)."""
    if data_dir is not None or dataset in BUNDLED_DIRS:
        files = find_idx_files(data_dir if data_dir is not None else BUNDLED_DIRS[dataset])
        names = CLASS_NAMES.get(dataset, DIGITS)
        identity, build = [_files_identity(files), names], lambda: load_idx(files, names)
    else:
        source, local = dataset_source(dataset)
        identity = [_tree_identity(Path(source)) if local else f"hub:{source}", image_column, label_column]
        build = lambda: load_hf(source, local, image_column, label_column)  # noqa: E731
    key = hashlib.sha256(json.dumps([CACHE_FORMAT, identity]).encode()).hexdigest()[:16]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", dataset).strip("_")[-48:]  # a readable name for a path or Hub id
    cache_file = Path(cache_dir or default_cache_dir()) / f"{slug}-{key}.safetensors"
    splits = _read_cache(cache_file)
    if splits is None:
        splits = build()  # said once it worked: an unreachable Hub says so itself, nothing was decoded
        if _write_cache(cache_file, splits):
            print(f"mnist_dist: decoded {dataset if data_dir is None else data_dir} into {cache_file}", flush=True)
    if data_dir is not None:
        check_named(splits, dataset, data_dir)
    return splits


def check_named(splits: dict[str, Split], dataset: str, data_dir: str) -> None:
    """Refuse IDX files that are a known dataset other than --dataset: their class names would be wrong."""
    known = KNOWN_TEST_LABELS.get(hashlib.sha256(splits["test"].labels.numpy().tobytes()).hexdigest())
    if known and dataset in HUB_IDS and known != dataset:
        raise DataError(f"--data-dir {data_dir} holds {known}'s test set (known by its labels), not {dataset}'s: "
                        f"pass --dataset {known}")

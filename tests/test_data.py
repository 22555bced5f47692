import gzip
import os
import struct
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mnist_dist import data
from mnist_dist.data import DataError, find_idx_files, load_splits, read_idx

from .helpers import check, mnist5k, run, train_cli, write_dataset, write_idx

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


def small(n_train=40, n_test=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda n: (torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8), torch.arange(n) % 10)
    return make(n_train), make(n_test)


# ---------------------------------------------------------------- IDX parsing


def test_bundled_mnist_5k_has_5000_train_and_10000_test_digits():
    splits = mnist5k()
    assert splits["train"].images.shape == (5000, 784) and splits["train"].images.dtype == torch.uint8
    assert splits["test"].images.shape == (10000, 784)
    assert splits["train"].labels.dtype == torch.int64
    assert torch.bincount(splits["train"].labels).tolist() == [500] * 10


def test_idx_reads_gzip_and_plain_files_alike(tmp_path):
    t = torch.randint(0, 256, (3, 28, 28), dtype=torch.uint8)
    gz = write_idx(tmp_path / "a.gz", t)
    plain = write_idx(tmp_path / "a", t)
    assert torch.equal(read_idx(gz, 3), t) and torch.equal(read_idx(plain, 3), t)


def test_torchvision_layout_is_found(tmp_path):
    write_dataset(tmp_path / "MNIST" / "raw", *small(), gz=False)
    files = find_idx_files(tmp_path)
    assert files["train"][0] == tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"


def test_fashion_mnist_from_the_debian_package_loads():
    if not FASHION_DIR.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"{FASHION_DIR} missing: .ci/run installs the Debian package dataset-fashion-mnist")
        pytest.skip("apt-get install dataset-fashion-mnist to run this test")
    splits = data.load_idx(find_idx_files(FASHION_DIR))
    assert len(splits["train"]) == 60000 and len(splits["test"]) == 10000
    assert torch.bincount(splits["test"].labels).tolist() == [1000] * 10


# ---------------------------------------------------------------- bad input, each named


def test_truncated_gzip_is_refused_naming_the_file(tmp_path):
    path = write_idx(tmp_path / "x.gz", torch.zeros(4, 28, 28, dtype=torch.uint8))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataError, match=rf"{path}: corrupt or truncated gzip"):
        read_idx(path, 3)


def test_truncated_idx_payload_is_refused_naming_the_file(tmp_path):
    path = write_idx(tmp_path / "x", torch.zeros(4, 28, 28, dtype=torch.uint8))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match=rf"{path}: truncated or corrupt"):
        read_idx(path, 3)


def test_wrong_magic_number_is_refused(tmp_path):
    labels = write_idx(tmp_path / "labels", torch.zeros(4, dtype=torch.uint8))
    with pytest.raises(DataError, match=rf"{labels}: wrong IDX magic number 0x00000801, expected 0x00000803"):
        read_idx(labels, 3)  # a labels file where images belong


def test_garbage_file_is_refused(tmp_path):
    path = tmp_path / "junk"
    path.write_bytes(b"<html>not found</html>")
    with pytest.raises(DataError, match=rf"{path}: wrong IDX magic"):
        read_idx(path, 1)


def test_image_label_count_mismatch_is_refused(tmp_path):
    (train, test) = small()
    write_dataset(tmp_path, train, test)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", test[1][:-1])
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte.gz.*20 images but 19 labels"):
        data.load_idx(find_idx_files(tmp_path))


def test_label_outside_0_to_9_is_refused(tmp_path):
    (train, test) = small()
    labels = train[1].clone()
    labels[7] = 10
    write_dataset(tmp_path, (train[0], labels), test)
    with pytest.raises(DataError, match=r"train-images.*label 10 at index 7 is outside 0-9"):
        data.load_idx(find_idx_files(tmp_path))


def test_missing_file_is_named(tmp_path):
    write_dataset(tmp_path, *small())
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=rf"--data-dir {tmp_path}: missing t10k-labels-idx1-ubyte"):
        find_idx_files(tmp_path)


def test_missing_directory_is_named(tmp_path):
    with pytest.raises(DataError, match=r"--data-dir .*nope: no such directory"):
        find_idx_files(tmp_path / "nope")


def test_bad_data_stops_the_cli_and_writes_nothing(tmp_path):
    (train, test) = small()
    write_dataset(tmp_path / "d", train, test)
    broken = tmp_path / "d" / "train-images-idx3-ubyte.gz"
    broken.write_bytes(broken.read_bytes()[:200])
    cache, out = tmp_path / "cache", tmp_path / "out"
    proc = check(
        train_cli("--data-dir", str(tmp_path / "d"), "--cache-dir", str(cache), "--output-dir", str(out), "--cpu"),
        rc=2,
    )
    assert f"error: {broken}: corrupt or truncated gzip file" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists() and not cache.exists()


# ---------------------------------------------------------------- cache


def test_cached_load_returns_the_decoded_tensors(tmp_path):
    cache = tmp_path / "cache"
    first = load_splits("mnist-5k", cache_dir=cache)
    assert len(list(cache.glob("mnist-5k-*.safetensors"))) == 1
    second = load_splits("mnist-5k", cache_dir=cache)
    for s in ("train", "test"):
        assert torch.equal(first[s].images, second[s].images) and torch.equal(first[s].labels, second[s].labels)


def test_cache_is_read_not_rebuilt(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    load_splits("mnist-5k", cache_dir=cache)
    monkeypatch.setattr(data, "load_idx", lambda files: pytest.fail("decoded again despite the cache"))
    assert len(load_splits("mnist-5k", cache_dir=cache)["train"]) == 5000


def test_changed_source_file_gets_a_new_cache_entry(tmp_path):
    src = write_dataset(tmp_path / "d", *small(n_train=40))
    cache = tmp_path / "cache"
    assert len(load_splits("mnist", data_dir=src, cache_dir=cache)["train"]) == 40
    (train, test) = small(n_train=30)
    time.sleep(0.01)
    write_dataset(src, train, test)
    assert len(load_splits("mnist", data_dir=src, cache_dir=cache)["train"]) == 30


def test_unreadable_cache_file_is_rebuilt(tmp_path, capsys):
    cache = tmp_path / "cache"
    load_splits("mnist-5k", cache_dir=cache)
    (cache_file,) = cache.glob("*.safetensors")
    cache_file.write_bytes(b"garbage")
    assert len(load_splits("mnist-5k", cache_dir=cache)["test"]) == 10000
    assert "ignoring unreadable cache file" in capsys.readouterr().out


# ---------------------------------------------------------------- Hugging Face datasets


def _hub_style_parquet(directory: Path, splits: dict) -> Path:
    """The layout of ylecun/mnist on the Hub: parquet files with an Image and a ClassLabel column."""
    import datasets
    from PIL import Image

    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(i) for i in range(10)])}
    )
    (directory / "data").mkdir(parents=True)
    for name, split in splits.items():
        images = split.images.reshape(-1, 28, 28).numpy()
        ds = datasets.Dataset.from_dict(
            {"image": [Image.fromarray(a) for a in images], "label": split.labels.tolist()}, features=features
        )
        ds.to_parquet(directory / "data" / f"{name}-00000-of-00001.parquet")
    return directory


def test_hub_format_decodes_to_the_same_pixels_and_labels(tmp_path):
    source = mnist5k()
    subset = {s: data.Split(source[s].images[:300], source[s].labels[:300]) for s in source}
    splits = data.load_hub(str(_hub_style_parquet(tmp_path / "hub", subset)))
    for s in ("train", "test"):
        assert torch.equal(splits[s].images, subset[s].images)
        assert torch.equal(splits[s].labels, subset[s].labels)


@pytest.mark.slow
def test_unreachable_hub_names_the_offline_options(tmp_path):
    # offline mode with an empty Hub cache fails the way an unreachable Hub does, without the wait
    offline = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = check(train_cli("--dataset", "mnist", "--output-dir", str(tmp_path / "out"), "--cpu", env=offline), rc=2)
    assert "cannot reach the Hugging Face Hub for 'ylecun/mnist'" in proc.stderr
    assert "--data-dir" in proc.stderr and "--dataset mnist-5k" in proc.stderr
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- hostile files


def write_gzip_bomb(path: Path, images: int, extra_gib: int) -> Path:
    """A gzip IDX image file whose header promises `images` 28x28 images, followed by `extra_gib` GiB more
    zeros: gzip members, one of them repeated, so it is a few MB on disk."""
    payload = bytes([0, 0, 0x08, 3]) + struct.pack(">3I", images, 28, 28) + bytes(images * 784)
    zeros = gzip.compress(bytes(2**27), compresslevel=9)  # 128 MiB of zeros -> 128 KB
    with open(path, "wb") as f:
        f.write(gzip.compress(payload, compresslevel=1))
        for _ in range(extra_gib * 8):
            f.write(zeros)
    return path


@pytest.mark.slow
def test_a_gzip_that_inflates_past_its_header_is_refused_in_bounded_memory(tmp_path):
    bomb = write_gzip_bomb(tmp_path / "train-images-idx3-ubyte.gz", 60000, 3)
    assert bomb.stat().st_size < 20 * 2**20
    probe = ("import resource, sys\nfrom mnist_dist.data import DataError, read_idx\n"
             "try:\n    read_idx(sys.argv[1], 3)\nexcept DataError as err:\n    print(err)\n"
             "print('peak_rss_kib', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n")
    proc = check(run([sys.executable, "-c", probe, str(bomb)]))
    assert f"{bomb}: holds more data than its header (60000, 28, 28) promises (47040000 bytes); refused" in proc.stdout
    peak = int(proc.stdout.split("peak_rss_kib")[1])
    print(f"peak RSS reading a 3 GiB gzip bomb: {peak / 2**10:.0f} MiB")
    assert peak < 2**20  # KiB: under 1 GiB


def test_a_header_that_promises_too_much_or_the_wrong_image_size_is_refused_before_reading(tmp_path):
    huge = tmp_path / "huge"
    huge.write_bytes(bytes([0, 0, 0x08, 3]) + struct.pack(">3I", 10**8, 28, 28))
    with pytest.raises(DataError, match=rf"{huge}: its header promises 73.0 GiB of data"):
        read_idx(huge, 3)
    wide = tmp_path / "wide"
    wide.write_bytes(bytes([0, 0, 0x08, 3]) + struct.pack(">3I", 1, 12000, 12000))
    with pytest.raises(DataError, match=rf"{wide}: images of 12000x12000 pixels, expected 28x28"):
        read_idx(wide, 3)


def test_a_cache_whose_contents_are_wrong_is_rebuilt(tmp_path, capsys):
    cache = tmp_path / "cache"
    load_splits("mnist-5k", cache_dir=cache)
    (cache_file,) = cache.glob("*.safetensors")
    tensors = load_file(cache_file)
    tensors["train_labels"][7] = 42
    save_file(tensors, cache_file)
    splits = load_splits("mnist-5k", cache_dir=cache)
    assert "label 42 at index 7 is outside 0-9" in capsys.readouterr().out
    assert splits["train"].labels.max() == 9 and splits["train"].labels.equal(mnist5k()["train"].labels)


def test_a_test_split_without_images_is_refused_naming_the_file(tmp_path):
    split = mnist5k()["train"]
    directory = write_dataset(tmp_path / "d", (split.images[:10], split.labels[:10]),
                              (torch.zeros(0, 28, 28, dtype=torch.uint8), torch.zeros(0, dtype=torch.uint8)))
    proc = check(train_cli("--cpu", "--data-dir", str(directory), "--output-dir", str(tmp_path / "o")), rc=2)
    assert "t10k-images-idx3-ubyte.gz" in proc.stderr and "no samples" in proc.stderr
    assert "Traceback" not in proc.stderr

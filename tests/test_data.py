import gzip
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mnist_dist import data, sources
from mnist_dist.data import DataError
from mnist_dist.sources import find_idx_files, load_splits, read_idx

from .helpers import (REPO, as_datasets, check, hub_layout, mnist5k, results, run, same_data, subset, train_cli,
    train_here, write_dataset, write_idx)

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
    splits = sources.load_idx(find_idx_files(FASHION_DIR))
    assert len(splits["train"]) == 60000 and len(splits["test"]) == 10000
    assert torch.bincount(splits["test"].labels).tolist() == [1000] * 10


def test_idx_files_of_a_known_dataset_under_another_name_are_refused(tmp_path):
    if not FASHION_DIR.is_dir():
        pytest.skip("apt-get install dataset-fashion-mnist to run this test")
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match=rf"--data-dir {FASHION_DIR} holds fashion_mnist's test set .*"
                                        r"not mnist's: pass --dataset fashion_mnist"):
        load_splits("mnist", data_dir=str(FASHION_DIR), cache_dir=cache)  # it would be labelled with digits
    assert load_splits("fashion_mnist", data_dir=str(FASHION_DIR), cache_dir=cache)["test"].class_names[0] == "T-shirt/top"
    mnist_dir = str(sources.BUNDLED_DIRS["mnist-5k"])  # its test set is MNIST's own
    with pytest.raises(DataError, match="holds mnist's test set"):
        load_splits("fashion_mnist", data_dir=mnist_dir, cache_dir=cache)
    assert len(load_splits("mnist", data_dir=mnist_dir, cache_dir=cache)["train"]) == 5000


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
        sources.load_idx(find_idx_files(tmp_path))


def test_label_outside_0_to_9_is_refused(tmp_path):
    (train, test) = small()
    labels = train[1].clone()
    labels[7] = 10
    write_dataset(tmp_path, (train[0], labels), test)
    with pytest.raises(DataError, match=r"train-images.*label 10 at index 7 is outside 0-9"):
        sources.load_idx(find_idx_files(tmp_path))


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
        train_here("--data-dir", str(tmp_path / "d"), "--cache-dir", str(cache), "--output-dir", str(out), "--cpu"),
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
    monkeypatch.setattr(sources, "load_idx", lambda files: pytest.fail("decoded again despite the cache"))
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

# online mode (the tests run offline), and nothing listens on the discard port: a connection is refused at once
UNREACHABLE_HUB = {"HF_HUB_OFFLINE": None, "HF_ENDPOINT": "http://127.0.0.1:9"}




def test_a_hub_download_directory_decodes_to_the_same_pixels_and_labels(tmp_path, capsys):
    expected = subset()
    directory = hub_layout(tmp_path / "hub", expected)
    assert same_data(load_splits(str(directory), cache_dir=tmp_path / "cache"), expected)
    assert f"decoded {directory} into" in capsys.readouterr().out
    assert same_data(load_splits(str(directory), cache_dir=tmp_path / "cache"), expected)
    assert "decoded" not in capsys.readouterr().out  # the second time from the cache


def test_a_save_to_disk_dataset_with_20_classes_finds_its_columns_by_type(tmp_path, capsys):
    import datasets

    expected = subset()
    names = [f"class {i}" for i in range(20)]
    more_classes = lambda split: split.labels + 10 * (torch.arange(len(split)) % 2)  # noqa: E731
    columns = {"note": datasets.Value("int32"), "picture": datasets.Image(), "kind": datasets.ClassLabel(names=names)}
    as_datasets(expected, columns, more_classes).save_to_disk(tmp_path / "disk")
    for decoded in (True, False):  # decoded, then read back from the cache with its class names
        loaded = load_splits(str(tmp_path / "disk"), cache_dir=tmp_path / "cache")
        assert ("decoded" in capsys.readouterr().out) == decoded
        assert loaded["train"].class_names == tuple(names) and loaded["test"].class_names == tuple(names)
        assert torch.equal(loaded["train"].labels, more_classes(expected["train"]))
        assert torch.equal(loaded["test"].images, expected["test"].images)


def test_columns_that_types_cannot_decide_are_named_with_flags(tmp_path):
    import datasets

    expected = subset(50, 50)
    columns = {"a": datasets.Image(), "b": datasets.Image(), "digit": datasets.Value("int64")}
    dataset = as_datasets(expected, columns)
    for name, split in dataset.items():  # column a holds other images than b
        dataset[name] = split.map(lambda row: {"a": row["a"].transpose(0)})
    dataset.save_to_disk(tmp_path / "disk")
    with pytest.raises(DataError, match=r"2 Image columns; its columns are a \(Image\), b \(Image\), digit "
                                        r"\(Value\); name the one to use with --image-column"):
        load_splits(str(tmp_path / "disk"), cache_dir=tmp_path / "cache")
    with pytest.raises(DataError, match="0 ClassLabel columns.*--label-column"):
        load_splits(str(tmp_path / "disk"), cache_dir=tmp_path / "cache", image_column="b")
    loaded = load_splits(str(tmp_path / "disk"), cache_dir=tmp_path / "cache", image_column="b", label_column="digit")
    assert same_data(loaded, expected)
    assert loaded["train"].class_names == data.DIGITS  # integer labels 0..9: ten classes named by number


def test_images_that_are_not_28x28_grayscale_are_refused_naming_the_column_and_size(tmp_path):
    import datasets
    from PIL import Image

    for name, image in [("big", Image.new("L", (32, 30))), ("rgb", Image.new("RGB", (28, 28)))]:
        split = datasets.Dataset.from_dict({"image": [image], "label": [0]},
                                           features=datasets.Features({"image": datasets.Image(),
                                                                       "label": datasets.ClassLabel(num_classes=10)}))
        datasets.DatasetDict({"train": split, "test": split}).save_to_disk(tmp_path / name)
    with pytest.raises(DataError, match=r"big\[train\]: column 'image' image 0 is 32x30 L; expected 28x28 grayscale"):
        load_splits(str(tmp_path / "big"), cache_dir=tmp_path / "cache")
    with pytest.raises(DataError, match=r"rgb\[train\]: column 'image' image 0 is 28x28 RGB; expected 28x28 grayscale"):
        load_splits(str(tmp_path / "rgb"), cache_dir=tmp_path / "cache")


def test_images_stored_as_arrays_are_read_as_well(tmp_path):
    import datasets

    expected = subset(50, 50)
    features = datasets.Features({"pixels": datasets.Array2D((28, 28), "uint8"), "label": datasets.ClassLabel(num_classes=10)})
    datasets.DatasetDict({s: datasets.Dataset.from_dict({"pixels": split.images.reshape(-1, 28, 28).numpy(),
                                                         "label": split.labels.numpy()}, features=features)
                          for s, split in expected.items()}).save_to_disk(tmp_path / "arrays")
    assert same_data(load_splits(str(tmp_path / "arrays"), cache_dir=tmp_path / "cache", image_column="pixels"), expected)
    datasets.Dataset.from_dict({"label": [1]}).save_to_disk(tmp_path / "one")
    with pytest.raises(DataError, match="one split of 1 rows; a DatasetDict with train and test is needed"):
        load_splits(str(tmp_path / "one"), cache_dir=tmp_path / "cache")


def load_in_subprocess(dataset: str, env: dict) -> subprocess.CompletedProcess:
    """load_splits in a fresh interpreter, so that the Hub settings in `env` are the ones huggingface_hub reads."""
    probe = ("import sys, time\nfrom mnist_dist.data import DataError\nfrom mnist_dist.sources import load_splits\nbegan = time.perf_counter()\n"
             "try:\n    print('samples', len(load_splits(sys.argv[1])['train']))\n"
             "except DataError as err:\n    print(err)\nprint('seconds', time.perf_counter() - began)\n")
    return check(run([sys.executable, "-c", probe, dataset], env=env))


@pytest.mark.slow
def test_an_unreachable_hub_fails_within_seconds_naming_every_offline_option(tmp_path):
    env = {**UNREACHABLE_HUB, "HF_HOME": str(tmp_path / "hf"), "MNIST_DIST_CACHE": str(tmp_path / "cache")}
    out = load_in_subprocess("mnist", env).stdout
    assert "cannot reach the Hugging Face Hub for 'ylecun/mnist'" in out and "Retrying" not in out
    for option in ("HF_HUB_OFFLINE=1", "hf download ylecun/mnist --repo-type dataset --local-dir DIR",
                   "--dataset DIR", "--data-dir DIR", "--dataset mnist-5k"):
        assert option in out
    assert float(out.split("seconds")[1]) < 10  # no retry ladder (it took ~25 s)
    assert "decod" not in out


@pytest.mark.slow
def test_an_unreachable_hub_reads_the_copy_that_hf_download_left_in_the_hub_cache(tmp_path):
    # the Hub cache's layout: datasets--OWNER--NAME/{refs/main, snapshots/REVISION/...}
    repo = tmp_path / "hub" / "datasets--ylecun--mnist"
    hub_layout(repo / "snapshots" / "0123abcd", subset())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    env = {**UNREACHABLE_HUB, "HF_HUB_CACHE": str(tmp_path / "hub"), "MNIST_DIST_CACHE": str(tmp_path / "cache")}
    out = load_in_subprocess("mnist", env).stdout
    assert f"reading 'ylecun/mnist' from its download in {repo / 'snapshots' / '0123abcd'}" in out
    assert "samples 300" in out


@pytest.mark.slow
def test_offline_mode_without_a_copy_names_the_offline_options(tmp_path):
    offline = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = check(train_cli("--dataset", "mnist", "--output-dir", str(tmp_path / "out"), "--cpu", env=offline), rc=2)
    assert "cannot reach the Hugging Face Hub for 'ylecun/mnist' (HF_HUB_OFFLINE is set)" in proc.stderr
    assert "or set HF_HUB_OFFLINE=1" not in proc.stderr  # it is set
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
    probe = ("import resource, sys\nfrom mnist_dist.data import DataError\nfrom mnist_dist.sources import read_idx\n"
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
    with safe_open(cache_file, "pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    tensors["train_labels"][7] = 42
    save_file(tensors, cache_file, metadata)
    splits = load_splits("mnist-5k", cache_dir=cache)
    assert "label 42 at index 7 is outside 0-9" in capsys.readouterr().out
    assert splits["train"].labels.max() == 9 and splits["train"].labels.equal(mnist5k()["train"].labels)


def test_a_test_split_without_images_is_refused_naming_the_file(tmp_path):
    split = mnist5k()["train"]
    directory = write_dataset(tmp_path / "d", (split.images[:10], split.labels[:10]),
                              (torch.zeros(0, 28, 28, dtype=torch.uint8), torch.zeros(0, dtype=torch.uint8)))
    proc = check(train_here("--cpu", "--data-dir", str(directory), "--output-dir", str(tmp_path / "o")), rc=2)
    assert "t10k-images-idx3-ubyte.gz" in proc.stderr and "no samples" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_a_20_class_dataset_trains_an_mlp_with_20_outputs_that_evaluate_and_predict_use(tmp_path):
    import datasets

    names = [f"class {i}" for i in range(20)]
    more_classes = lambda split: split.labels + 10 * (torch.arange(len(split)) % 2)  # noqa: E731
    as_datasets(subset(600, 300), {"image": datasets.Image(), "label": datasets.ClassLabel(names=names)},
                more_classes).save_to_disk(tmp_path / "disk")
    out = tmp_path / "out"
    relative = os.path.relpath(tmp_path / "disk", REPO)  # the CLIs run in REPO; config.json holds the absolute path
    check(train_cli("--dataset", relative, "--cpu", "--epochs", "1", "--output-dir", str(out)))
    config = json.loads((out / "config.json").read_text())
    assert (config["num_classes"], config["class_names"], config["dataset"]) == (20, names, str(tmp_path / "disk"))
    assert list(results(out)["per_class_accuracy"]) == names
    evaluation = check(run([sys.executable, "-m", "mnist_dist.evaluate", "--model", str(out), "--cpu"]))
    report = json.loads((out / "evaluation" / "evaluation.json").read_text())
    assert report["test_samples"] == 300 and len(report["confusion_matrix"]) == 20, evaluation.stdout
    assert report["test_accuracy"] == results(out)["test_accuracy"]


def test_a_dataset_path_that_does_not_exist_or_is_a_file_is_refused_as_such(tmp_path):
    with pytest.raises(DataError, match=f"--dataset {tmp_path / 'nope'}: no such directory"):
        load_splits(str(tmp_path / "nope"), cache_dir=tmp_path / "cache")
    (tmp_path / "train.parquet").write_bytes(b"")
    with pytest.raises(DataError, match="train.parquet: a file; pass the directory that holds the dataset's files"):
        load_splits(str(tmp_path / "train.parquet"), cache_dir=tmp_path / "cache")


def test_unlabelled_samples_are_refused_naming_the_sample(tmp_path):
    import datasets

    labels = lambda split: torch.where(torch.arange(len(split)) == 3, -1, split.labels)  # noqa: E731
    as_datasets(subset(20, 20), {"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)},
                labels).save_to_disk(tmp_path / "disk")
    with pytest.raises(DataError, match=r"disk\[train\]: sample 3 has no label \(-1\)"):
        load_splits(str(tmp_path / "disk"), cache_dir=tmp_path / "cache")


def test_an_empty_test_split_is_refused_by_name(tmp_path):
    import datasets

    columns = {"image": datasets.Image(), "label": datasets.ClassLabel(names=list("0123456789"))}
    splits = {"train": subset(20, 1)["train"], "test": data.Split(torch.zeros(0, 784, dtype=torch.uint8),
                                                                   torch.zeros(0, dtype=torch.int64))}
    as_datasets(splits, columns).save_to_disk(tmp_path / "disk")
    with pytest.raises(DataError, match="its 'test' split holds no samples"):
        load_splits(str(tmp_path / "disk"), cache_dir=tmp_path / "cache")


def test_a_dataset_of_more_classes_than_the_bound_is_refused_before_training(tmp_path):
    many = sources.MAX_CLASSES + 1
    with pytest.raises(DataError, match=f"{many:,} classes; mnist_dist trains on at most {sources.MAX_CLASSES:,}"):
        sources.check_split(torch.zeros(2, 28, 28, dtype=torch.uint8), torch.tensor([0, many - 1]), "source",
                         tuple(map(str, range(many))))


def test_a_cache_directory_that_cannot_be_written_is_a_warning_and_the_data_still_loads(tmp_path, capsys, monkeypatch):
    from safetensors import SafetensorError

    def refuse(*args, **kwargs):  # what safetensors raises in a read-only directory, even for root
        raise SafetensorError("Error while serializing: I/O error: Read-only file system (os error 30)")

    monkeypatch.setattr(sources, "save_file", refuse)
    splits = load_splits("mnist-5k", cache_dir=tmp_path / "cache")
    assert len(splits["train"]) == 5000
    said = capsys.readouterr().out
    assert "warning: could not write the dataset cache" in said and "decoded" not in said


def test_a_label_of_a_billion_is_refused_before_a_name_is_made_for_each_class(tmp_path):
    import datasets

    labels = lambda split: torch.where(torch.arange(len(split)) == 2, 10**9, split.labels)  # noqa: E731
    as_datasets(subset(20, 20), {"image": datasets.Image(), "label": datasets.Value("int64")},
                labels).save_to_disk(tmp_path / "disk")
    with pytest.raises(DataError, match=f"label 1,000,000,000 in column 'label' makes 1,000,000,001 classes; "
                                        f"mnist_dist trains on at most {sources.MAX_CLASSES:,}"):
        load_splits(str(tmp_path / "disk"), cache_dir=tmp_path / "cache", label_column="label")

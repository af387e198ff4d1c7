"""Dataset loaders: the shared local copies, class-folder trees, CIFAR pickles, and bad data."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from training.data import FASHION_FILES, DataError, Dataset, load_dataset, load_image_tree
from training.recipes import CIFAR10_LABELS, FASHION_LABELS, MNIST_LABELS

# The tiny tree built by the image_tree fixture (conftest.py): 3 classes, 4 train + 2 test 8x8 PNGs each. What the
# loader must make of it, written out here; a fixture that built something else fails the tests that use these.
TREE_SIZE = 8
TREE_SORTED_CLASSES = ["ant", "cat", "dog"]
TREE_TRAIN_PER_CLASS = 4
TREE_TEST_PER_CLASS = 2

MNIST_SHA256 = "06af5dfe73b70e3bc1c36439982b18a8d76803db9b544f6fdf838a37fbb01b64"


def check_split_arrays(ds: Dataset, shape: tuple[int, int, int], n_train: int, n_test: int) -> None:
    assert ds.x_train.shape == (n_train, *shape)
    assert ds.x_test.shape == (n_test, *shape)
    assert ds.x_train.dtype == np.uint8 and ds.x_test.dtype == np.uint8
    assert ds.y_train.shape == (n_train,) and ds.y_test.shape == (n_test,)
    assert ds.y_train.dtype == np.int64 and ds.y_test.dtype == np.int64


# --- The shared local copies -------------------------------------------------------------------

@pytest.fixture(scope="module")
def mnist(data_dir: Path) -> Dataset:
    return load_dataset("mnist", (28, 28, 1), MNIST_LABELS, data_dir)


@pytest.fixture(scope="module")
def fashion(data_dir: Path) -> Dataset:
    return load_dataset("fashion-mnist", (28, 28, 1), FASHION_LABELS, data_dir)


def test_mnist_npz_loads_60000_train_and_10000_test_uint8_images(mnist):
    check_split_arrays(mnist, (28, 28, 1), 60_000, 10_000)


def test_mnist_labels_cover_all_ten_digits(mnist):
    assert mnist.labels == list(MNIST_LABELS)
    assert set(np.unique(mnist.y_train)) == set(range(10))
    assert set(np.unique(mnist.y_test)) == set(range(10))


def test_mnist_images_are_white_digits_on_black(mnist):
    corners = mnist.x_test[:, [0, 0, -1, -1], [0, -1, 0, -1], 0]
    assert corners.max() == 0
    assert mnist.x_test[:100].max() == 255


def test_mnist_provenance_records_the_file_checksum(mnist):
    assert mnist.provenance == {"source": "local files",
                                "files": [{"file": "mnist.npz", "sha256": MNIST_SHA256}]}


def test_fashion_mnist_idx_files_load_60000_train_and_10000_test_uint8_images(fashion):
    check_split_arrays(fashion, (28, 28, 1), 60_000, 10_000)


def test_fashion_mnist_labels_are_balanced_over_ten_classes(fashion):
    assert fashion.labels == list(FASHION_LABELS)
    assert np.bincount(fashion.y_train).tolist() == [6_000] * 10
    assert np.bincount(fashion.y_test).tolist() == [1_000] * 10


def test_fashion_mnist_provenance_names_the_four_idx_files(fashion):
    files = fashion.provenance["files"]
    assert [f["file"] for f in files] == list(FASHION_FILES.values())
    assert all(len(f["sha256"]) == 64 for f in files)


def test_slow_cifar10_jpeg_archive_loads_50000_train_and_10000_test_rgb_images(data_dir):
    """Decodes 60,000 JPEGs from the shared archive on first use (~20 s), then reads the cache."""
    ds = load_dataset("cifar10", (32, 32, 3), CIFAR10_LABELS, data_dir)
    check_split_arrays(ds, (32, 32, 3), 50_000, 10_000)
    assert ds.labels == list(CIFAR10_LABELS)
    assert np.bincount(ds.y_train).tolist() == [5_000] * 10
    assert np.bincount(ds.y_test).tolist() == [1_000] * 10
    assert ds.provenance["files"][0]["file"] == "cifar10-jpeg.tar.xz"


# --- Dataset.limit -----------------------------------------------------------------------------

def tiny_dataset(n_train: int = 10, n_test: int = 6) -> Dataset:
    return Dataset(
        x_train=np.arange(n_train, dtype=np.uint8).reshape(n_train, 1, 1, 1),
        y_train=np.arange(n_train) % 3,
        x_test=np.arange(n_test, dtype=np.uint8).reshape(n_test, 1, 1, 1),
        y_test=np.arange(n_test) % 3,
        labels=["a", "b", "c"],
        provenance={"source": "test"},
    )


def test_limit_keeps_the_first_n_train_and_test_examples():
    limited = tiny_dataset().limit(4)
    assert limited.x_train[:, 0, 0, 0].tolist() == [0, 1, 2, 3]
    assert limited.x_test[:, 0, 0, 0].tolist() == [0, 1, 2, 3]
    assert len(limited.y_train) == len(limited.y_test) == 4


def test_limit_records_itself_in_the_provenance_without_touching_the_original():
    ds = tiny_dataset()
    limited = ds.limit(4)
    assert limited.provenance == {"source": "test", "limit": 4}
    assert ds.provenance == {"source": "test"}
    assert len(ds.x_train) == 10


def test_limit_larger_than_a_split_keeps_the_whole_split():
    limited = tiny_dataset(n_train=10, n_test=6).limit(8)
    assert (len(limited.x_train), len(limited.x_test)) == (8, 6)


@pytest.mark.parametrize("n", [None, 0])
def test_limit_none_or_zero_returns_the_dataset_unchanged(n):
    ds = tiny_dataset()
    assert ds.limit(n) is ds


# --- Class-folder trees ------------------------------------------------------------------------

TREE_FORMS = ["dir", "zip", "tar", "tar.xz"]


@pytest.mark.parametrize("form", TREE_FORMS)
def test_image_tree_loads_in_every_form_with_labels_from_sorted_folder_names(image_tree, form):
    source = image_tree.pack(form)
    ds = load_dataset("cifar10", (TREE_SIZE, TREE_SIZE, 3), CIFAR10_LABELS, source)
    assert ds.labels == TREE_SORTED_CLASSES
    check_split_arrays(ds, (TREE_SIZE, TREE_SIZE, 3), 3 * TREE_TRAIN_PER_CLASS, 3 * TREE_TEST_PER_CLASS)
    assert np.bincount(ds.y_train).tolist() == [TREE_TRAIN_PER_CLASS] * 3
    assert np.bincount(ds.y_test).tolist() == [TREE_TEST_PER_CLASS] * 3


@pytest.mark.parametrize("form", TREE_FORMS)
def test_image_tree_label_index_matches_the_image_folder(image_tree, form):
    ds = load_dataset("cifar10", (TREE_SIZE, TREE_SIZE, 3), CIFAR10_LABELS, image_tree.pack(form))
    for x, y in ((ds.x_train, ds.y_train), (ds.x_test, ds.y_test)):
        expected = [image_tree.pixel(TREE_SORTED_CLASSES[label]) for label in y]
        assert x[:, 0, 0, 0].tolist() == expected


@pytest.mark.parametrize("form", ["zip", "tar.xz"])
def test_image_tree_archive_may_hold_the_splits_under_one_top_folder(image_tree, form):
    ds = load_dataset("mnist", (TREE_SIZE, TREE_SIZE, 1), MNIST_LABELS, image_tree.pack(form, top="tiny"))
    assert ds.labels == TREE_SORTED_CLASSES
    assert len(ds.x_train) == 3 * TREE_TRAIN_PER_CLASS


def test_image_tree_images_are_converted_to_the_recipe_channels_and_size(image_tree):
    ds = load_dataset("mnist", (28, 28, 1), MNIST_LABELS, image_tree.as_dir())
    check_split_arrays(ds, (28, 28, 1), 3 * TREE_TRAIN_PER_CLASS, 3 * TREE_TEST_PER_CLASS)
    assert ds.x_train[0, 14, 14, 0] == image_tree.pixel(TREE_SORTED_CLASSES[ds.y_train[0]])


def test_image_tree_provenance_has_the_archive_checksum(image_tree):
    ds = load_dataset("cifar10", (TREE_SIZE, TREE_SIZE, 3), CIFAR10_LABELS, image_tree.as_tar())
    [entry] = ds.provenance["files"]
    assert entry["file"] == "tree.tar"
    assert len(entry["sha256"]) == 64


def test_image_tree_archives_are_decoded_once_into_the_cache_dir(image_tree, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("CONVSERVE_CACHE_DIR", str(cache))
    archive = image_tree.as_zip()
    first = load_dataset("cifar10", (TREE_SIZE, TREE_SIZE, 3), CIFAR10_LABELS, archive)
    [cached] = (cache / "datasets").glob("*.npz")
    assert cached.name.endswith("-8x8x3.npz")
    monkeypatch.setattr("training.data.load_image_tree", lambda *a: pytest.fail("the cache was not used"))
    second = load_dataset("cifar10", (TREE_SIZE, TREE_SIZE, 3), CIFAR10_LABELS, archive)
    assert second.labels == first.labels
    assert np.array_equal(second.x_train, first.x_train) and np.array_equal(second.y_test, first.y_test)


def test_image_tree_skips_hidden_files_and_non_images(image_tree):
    (image_tree.root / "train" / "ant" / ".DS_Store").write_bytes(b"junk")
    (image_tree.root / "train" / "ant" / "notes.txt").write_text("not an image")
    arrays, classes = load_image_tree(image_tree.root, (TREE_SIZE, TREE_SIZE, 3))
    assert classes == TREE_SORTED_CLASSES
    assert len(arrays["x_train"]) == 3 * TREE_TRAIN_PER_CLASS


# --- Bad data ------------------------------------------------------------------------------------

def test_loader_rejects_a_missing_data_dir(tmp_path):
    with pytest.raises(DataError, match=r"data directory .*nowhere does not exist"):
        load_dataset("mnist", (28, 28, 1), MNIST_LABELS, tmp_path / "nowhere")


def test_loader_rejects_a_dir_without_mnist_npz(tmp_path):
    with pytest.raises(DataError, match=r"no MNIST found .*expected mnist\.npz"):
        load_dataset("mnist", (28, 28, 1), MNIST_LABELS, tmp_path)


def test_loader_rejects_a_dir_without_the_fashion_idx_files(tmp_path):
    with pytest.raises(DataError, match=r"no Fashion-MNIST found .*train-images-idx3-ubyte\.gz"):
        load_dataset("fashion-mnist", (28, 28, 1), FASHION_LABELS, tmp_path)


def test_loader_rejects_a_dir_without_any_cifar10_copy(tmp_path):
    with pytest.raises(DataError, match=r"no CIFAR-10 found .*cifar10-jpeg\.tar\.xz.*cifar-10-python\.tar\.gz"):
        load_dataset("cifar10", (32, 32, 3), CIFAR10_LABELS, tmp_path)


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    return struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_fashion(folder: Path, n_train: int = 6, n_test: int = 4) -> dict[str, Path]:
    """A well-formed miniature Fashion-MNIST: the four gzip IDX files."""
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "x_train": np.zeros((n_train, 28, 28), np.uint8), "y_train": np.arange(n_train, dtype=np.uint8) % 10,
        "x_test": np.zeros((n_test, 28, 28), np.uint8), "y_test": np.arange(n_test, dtype=np.uint8) % 10,
    }
    paths = {}
    for key, name in FASHION_FILES.items():
        paths[key] = folder / name
        paths[key].write_bytes(gzip.compress(idx_bytes(arrays[key], 2051 if key.startswith("x") else 2049)))
    return paths


def test_loader_reads_well_formed_fashion_idx_files(tmp_path):
    write_fashion(tmp_path / "fashion-mnist")
    ds = load_dataset("fashion-mnist", (28, 28, 1), FASHION_LABELS, tmp_path)
    check_split_arrays(ds, (28, 28, 1), 6, 4)
    assert ds.y_train.tolist() == [0, 1, 2, 3, 4, 5]


def test_loader_rejects_truncated_gzip_idx_file(tmp_path):
    paths = write_fashion(tmp_path)
    data = paths["x_train"].read_bytes()
    paths["x_train"].write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz: not a readable gzip IDX file"):
        load_dataset("fashion-mnist", (28, 28, 1), FASHION_LABELS, tmp_path)


def test_loader_rejects_idx_file_with_missing_pixels(tmp_path):
    paths = write_fashion(tmp_path)
    raw = gzip.decompress(paths["x_test"].read_bytes())
    paths["x_test"].write_bytes(gzip.compress(raw[:-100]))
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte\.gz: truncated IDX file"):
        load_dataset("fashion-mnist", (28, 28, 1), FASHION_LABELS, tmp_path)


def test_loader_rejects_idx_file_truncated_inside_its_header(tmp_path):
    paths = write_fashion(tmp_path)
    raw = gzip.decompress(paths["x_train"].read_bytes())
    paths["x_train"].write_bytes(gzip.compress(raw[:10]))  # magic + 1.5 of the 3 dimensions
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz: truncated IDX file"):
        load_dataset("fashion-mnist", (28, 28, 1), FASHION_LABELS, tmp_path)


def test_loader_rejects_idx_file_with_a_wrong_magic_number(tmp_path):
    paths = write_fashion(tmp_path)
    paths["y_test"].write_bytes(gzip.compress(idx_bytes(np.zeros((4, 28, 28), np.uint8), 2051)))
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\.gz: bad IDX magic number \(expected 2049\)"):
        load_dataset("fashion-mnist", (28, 28, 1), FASHION_LABELS, tmp_path)


def test_loader_rejects_idx_files_whose_label_count_differs_from_the_image_count(tmp_path):
    paths = write_fashion(tmp_path)
    paths["y_train"].write_bytes(gzip.compress(idx_bytes(np.zeros(5, np.uint8), 2049)))
    with pytest.raises(DataError, match=r"train has 6 images but 5 labels"):
        load_dataset("fashion-mnist", (28, 28, 1), FASHION_LABELS, tmp_path)


def write_npz(path: Path, **arrays: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def test_loader_rejects_npz_missing_an_array(tmp_path):
    x = np.zeros((3, 28, 28), np.uint8)
    y = np.zeros(3, np.uint8)
    write_npz(tmp_path / "mnist.npz", x_train=x, y_train=y, x_test=x)
    expected = r"mnist\.npz: missing array .*y_test.*expected x_train, y_train, x_test, y_test"
    with pytest.raises(DataError, match=expected):
        load_dataset("mnist", (28, 28, 1), MNIST_LABELS, tmp_path)


def test_loader_rejects_a_file_that_is_not_an_npz(tmp_path):
    (tmp_path / "mnist.npz").write_bytes(b"this is not a zip file")
    with pytest.raises(DataError, match=r"mnist\.npz: not a readable \.npz file"):
        load_dataset("mnist", (28, 28, 1), MNIST_LABELS, tmp_path)


def test_loader_rejects_npz_with_images_of_the_wrong_shape(tmp_path):
    x = np.zeros((3, 32, 32), np.uint8)
    y = np.zeros(3, np.uint8)
    write_npz(tmp_path / "mnist.npz", x_train=x, y_train=y, x_test=x, y_test=y)
    with pytest.raises(DataError, match=r"expected train images of shape \[N, 28, 28, 1\], got \[3, 32, 32, 1\]"):
        load_dataset("mnist", (28, 28, 1), MNIST_LABELS, tmp_path)


def test_loader_rejects_labels_outside_the_class_range(tmp_path):
    x = np.zeros((3, 28, 28), np.uint8)
    write_npz(tmp_path / "mnist.npz", x_train=x, y_train=np.array([0, 1, 10], np.uint8), x_test=x,
              y_test=np.zeros(3, np.uint8))
    with pytest.raises(DataError, match=r"train labels must lie in 0\.\.9"):
        load_dataset("mnist", (28, 28, 1), MNIST_LABELS, tmp_path)


def test_loader_rejects_an_archive_without_a_train_split(image_tree):
    for path in (image_tree.root / "train").rglob("*.png"):
        path.unlink()
    archive = image_tree.as_tar_xz()
    with pytest.raises(DataError, match=r"tree\.tar\.xz: expected images under train/<class>/ and test/<class>/"):
        load_dataset("cifar10", (TREE_SIZE, TREE_SIZE, 3), CIFAR10_LABELS, archive)


def test_loader_rejects_a_test_class_without_a_train_folder(image_tree):
    extra = image_tree.root / "test" / "zebra"
    extra.mkdir()
    (extra / "0000.png").write_bytes((image_tree.root / "test" / "ant" / "0000.png").read_bytes())
    with pytest.raises(DataError, match=r"test classes \['zebra'\] have no train/ folder"):
        load_dataset("cifar10", (TREE_SIZE, TREE_SIZE, 3), CIFAR10_LABELS, image_tree.as_zip())


@pytest.mark.parametrize("form", ["dir", "zip"])
def test_loader_rejects_a_corrupt_image_inside_a_tree(image_tree, form):
    (image_tree.root / "train" / "cat" / "0001.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError, match=r"train/cat/0001\.png: not a decodable image"):
        load_dataset("cifar10", (TREE_SIZE, TREE_SIZE, 3), CIFAR10_LABELS, image_tree.pack(form))


def test_loader_rejects_a_corrupt_archive(tmp_path):
    archive = tmp_path / "tree.zip"
    archive.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(DataError, match=r"tree\.zip: cannot read the image tree"):
        load_dataset("cifar10", (TREE_SIZE, TREE_SIZE, 3), CIFAR10_LABELS, archive)


def test_cifar_folder_tree_with_the_wrong_class_count_is_rejected(image_tree, tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    image_tree.as_dir().rename(data_dir / "cifar10")
    with pytest.raises(DataError, match=r"cifar10: found 3 classes, the recipe expects 10"):
        load_dataset("cifar10", (TREE_SIZE, TREE_SIZE, 3), CIFAR10_LABELS, data_dir)


# --- CIFAR-10 python pickles ---------------------------------------------------------------------

def cifar_batch(n: int, first_label: int) -> dict[bytes, object]:
    """A batch in the original CIFAR-10 layout: rows of 3072 bytes, R plane then G then B."""
    data = np.zeros((n, 3, 32, 32), np.uint8)
    data[:, 0], data[:, 1], data[:, 2] = 10, 20, 30
    data[:, 0, 0, 0] = np.arange(n)  # the red value of the top-left pixel numbers the image
    return {
        b"batch_label": b"testing batch",
        b"labels": [(first_label + i) % 10 for i in range(n)],
        b"data": data.reshape(n, 3072),
        b"filenames": [f"img_{i}.png".encode() for i in range(n)],
    }


def write_cifar_pickles(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


def test_cifar_python_archive_loads_batches_in_the_original_layout(tmp_path):
    write_cifar_pickles(tmp_path / "cifar-10-python.tar.gz", {
        "batches.meta": pickle.dumps({b"label_names": [b"airplane"]}, protocol=4),
        "data_batch_1": pickle.dumps(cifar_batch(5, first_label=0), protocol=4),
        "data_batch_2": pickle.dumps(cifar_batch(3, first_label=5), protocol=4),
        "test_batch": pickle.dumps(cifar_batch(4, first_label=2), protocol=4),
    })
    ds = load_dataset("cifar10", (32, 32, 3), CIFAR10_LABELS, tmp_path)
    check_split_arrays(ds, (32, 32, 3), 8, 4)
    assert ds.y_train.tolist() == [0, 1, 2, 3, 4, 5, 6, 7]
    assert ds.y_test.tolist() == [2, 3, 4, 5]
    assert ds.x_train[1, 0, 0].tolist() == [1, 20, 30]  # channels last after the transpose
    assert ds.x_train[0, 31, 31].tolist() == [10, 20, 30]
    assert ds.provenance["files"][0]["file"] == "cifar-10-python.tar.gz"


class RunsAShellCommand:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def test_cifar_python_archive_refuses_a_pickle_that_calls_os_system(tmp_path):
    marker = tmp_path / "pwned"
    malicious = {b"data": RunsAShellCommand(marker), b"labels": [0]}
    write_cifar_pickles(tmp_path / "cifar-10-python.tar.gz", {
        "data_batch_1": pickle.dumps(malicious, protocol=4),
        "test_batch": pickle.dumps(cifar_batch(2, first_label=0), protocol=4),
    })
    with pytest.raises(DataError, match=r"refusing to unpickle (posix|os)\.system: only numpy arrays are allowed"):
        load_dataset("cifar10", (32, 32, 3), CIFAR10_LABELS, tmp_path)
    assert not marker.exists()


def test_cifar_python_archive_without_a_test_batch_is_rejected(tmp_path):
    write_cifar_pickles(tmp_path / "cifar-10-python.tar.gz", {
        "data_batch_1": pickle.dumps(cifar_batch(2, first_label=0), protocol=4),
    })
    with pytest.raises(DataError, match=r"expected data_batch_1\.\.5 and test_batch inside"):
        load_dataset("cifar10", (32, 32, 3), CIFAR10_LABELS, tmp_path)


def test_cifar_python_archive_with_a_batch_missing_its_labels_is_rejected(tmp_path):
    batch = cifar_batch(2, first_label=0)
    del batch[b"labels"]
    write_cifar_pickles(tmp_path / "cifar-10-python.tar.gz", {
        "data_batch_1": pickle.dumps(batch, protocol=4),
        "test_batch": pickle.dumps(cifar_batch(2, first_label=0), protocol=4),
    })
    with pytest.raises(DataError, match=r"cifar-10-python\.tar\.gz: not a valid CIFAR-10 python archive"):
        load_dataset("cifar10", (32, 32, 3), CIFAR10_LABELS, tmp_path)


def test_zip_entries_escaping_the_tree_are_ignored(image_tree):
    archive = image_tree.as_zip()
    with zipfile.ZipFile(archive, "a") as zf:
        zf.writestr("../train/evil/0000.png", (image_tree.root / "train" / "ant" / "0000.png").read_bytes())
    ds = load_dataset("cifar10", (TREE_SIZE, TREE_SIZE, 3), CIFAR10_LABELS, archive)
    assert ds.labels == TREE_SORTED_CLASSES
